"""The built-in one-layer transformer: every hook point is what the paper's equations say."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from framework.lm import HOOK_KINDS, BuiltinArchitecture, BuiltinLM, UnknownHookError, list_hooks

ARCH = BuiltinArchitecture(d_model=32, d_mlp=64, n_heads=4, n_layers=2, vocab_size=50, n_ctx=16)


@pytest.fixture(scope="module")
def model() -> BuiltinLM:
    torch.manual_seed(0)
    lm = BuiltinLM(ARCH).eval()
    with torch.no_grad():  # non-trivial LayerNorm gains and biases, so the test sees them
        for block in [*lm.blocks, lm]:
            for ln in [m for m in block.modules() if isinstance(m, torch.nn.LayerNorm)]:
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.1)
    return lm


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, ARCH.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight + ln.bias


def attention_by_hand(x: torch.Tensor, block) -> torch.Tensor:
    """Causal multi-head attention from the raw weight matrices, softmax written out."""
    batch, seq, d = x.shape
    heads, d_head = ARCH.n_heads, d // ARCH.n_heads
    q, k, v = (x @ block.attn.W_QKV.weight.T + block.attn.W_QKV.bias).split(d, dim=-1)
    q, k, v = (t.view(batch, seq, heads, d_head).transpose(1, 2) for t in (q, k, v))  # (b, h, s, d_head)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)  # (b, h, s, s)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, d)
    return z @ block.attn.W_O.weight.T + block.attn.W_O.bias


def forward_by_hand(model: BuiltinLM, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    resid = model.embed.weight[tokens] + model.pos_embed.weight[: tokens.shape[1]]
    acts = {}
    for i, block in enumerate(model.blocks):
        acts[f"blocks.{i}.hook_resid_pre"] = resid
        attn_out = attention_by_hand(layer_norm(resid, block.ln1), block)
        resid = resid + attn_out
        pre = layer_norm(resid, block.ln2) @ block.W_in.weight.T + block.W_in.bias
        post = torch.clamp(pre, min=0)
        mlp_out = post @ block.W_out.weight.T + block.W_out.bias
        resid = resid + mlp_out
        acts.update({f"blocks.{i}.hook_attn_out": attn_out, f"blocks.{i}.mlp.hook_pre": pre,
                     f"blocks.{i}.mlp.hook_post": post, f"blocks.{i}.hook_mlp_out": mlp_out,
                     f"blocks.{i}.hook_resid_post": resid})
    logits = layer_norm(resid, model.ln_final) @ model.unembed.weight.T + model.unembed.bias
    return acts, logits


@torch.no_grad()
def test_every_hook_point_equals_the_activation_computed_by_hand_from_the_weights(model, tokens):
    expected, expected_logits = forward_by_hand(model, tokens)
    out = model.run(tokens, capture=list(model.hook_points()))
    assert list(out.activations) == list(model.hook_points())
    for name, activation in out.activations.items():
        torch.testing.assert_close(activation, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_hook_points_list_six_kinds_per_layer_with_their_widths(model):
    points = model.hook_points()
    assert len(points) == 6 * ARCH.n_layers
    assert points["blocks.1.mlp.hook_post"] == ARCH.d_mlp and points["blocks.0.hook_resid_pre"] == ARCH.d_model
    assert [name.split(".", 2)[2] for name in list(points)[:6]] == list(HOOK_KINDS)


def test_list_hooks_prints_the_default_paper_model_without_weights():
    lines = list_hooks("builtin")
    assert len(lines) == 6
    assert lines[3].split() == ["blocks.0.mlp.hook_post", "512"]


@torch.no_grad()
def test_early_exit_returns_the_same_activations_and_does_less_work(model, tokens):
    hook = "blocks.0.mlp.hook_post"
    with FlopCounterMode(display=False) as full_count:
        full = model.run(tokens, capture=[hook])
    with FlopCounterMode(display=False) as early_count:
        early = model.run(tokens, capture=[hook], stop_at=hook)
    assert early.logits is None
    assert torch.equal(early.activations[hook], full.activations[hook])
    # Block 1 and the unembedding are skipped: well under half of the full pass.
    assert early_count.get_total_flops() < 0.5 * full_count.get_total_flops()


@torch.no_grad()
def test_splicing_the_identity_leaves_logits_unchanged_and_zeros_change_them(model, tokens):
    clean = model.run(tokens).logits
    for hook in ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre", "blocks.0.hook_attn_out"]:
        assert torch.equal(model.run(tokens, splice={hook: lambda x: x}).logits, clean)
        zeroed = model.run(tokens, splice={hook: torch.zeros_like}).logits
        assert (zeroed - clean).abs().max() > 1e-3, hook


@torch.no_grad()
def test_a_splice_acts_downstream_while_capture_sees_the_activation_as_computed(model, tokens):
    hook = "blocks.0.mlp.hook_post"
    out = model.run(tokens, capture=[hook, "blocks.0.hook_mlp_out"], splice={hook: torch.zeros_like})
    assert out.activations[hook].abs().sum() > 0
    torch.testing.assert_close(out.activations["blocks.0.hook_mlp_out"],
                               model.blocks[0].W_out.bias.expand(3, 12, -1))


def test_an_unknown_hook_names_itself_suggests_the_closest_and_how_to_list_them(model, tokens):
    with pytest.raises(UnknownHookError) as err:
        model.run(tokens, capture=["blocks.0.mlp.hook_posst"])
    message = str(err.value)
    assert "'blocks.0.mlp.hook_posst' does not exist" in message
    assert "'blocks.0.mlp.hook_post'" in message and "sae hooks RECIPE.yaml" in message
    with pytest.raises(UnknownHookError, match="blocks 0..1"):
        model.run(tokens, stop_at="blocks.7.hook_resid_post")


def test_capturing_or_splicing_a_hook_after_the_stop_point_is_refused(model, tokens):
    with pytest.raises(ValueError, match="cannot capture .* after stopping at"):
        model.run(tokens, capture=["blocks.1.hook_resid_post"], stop_at="blocks.0.mlp.hook_post")
    with pytest.raises(ValueError, match="cannot splice .* after stopping at"):  # it was silently never applied
        model.run(tokens, splice={"blocks.1.hook_resid_post": torch.zeros_like}, stop_at="blocks.0.mlp.hook_post")


@torch.no_grad()
def test_unembed_weight_folds_the_final_layernorm_up_to_its_per_token_scale(model, tokens):
    resid = model.run(tokens, capture=["blocks.1.hook_resid_post"]).activations["blocks.1.hook_resid_post"]
    logits = model.run(tokens).logits
    scale = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + model.ln_final.eps)
    remainder = logits - (resid @ model.unembed_weight()) / scale  # (b, s, vocab)
    # What is left is the LayerNorm bias through W_U plus b_U: the same for every token.
    torch.testing.assert_close(remainder, remainder[:1, :1].expand_as(remainder), rtol=1e-4, atol=1e-4)
    assert model.unembed_weight().shape == (ARCH.d_model, ARCH.vocab_size)


def test_mlp_out_weight_maps_neurons_to_the_residual_stream(model, tokens):
    post = model.run(tokens, capture=["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"]).activations
    W_out = model.mlp_out_weight(0)  # (d_mlp, d_model)
    assert W_out.shape == (ARCH.d_mlp, ARCH.d_model)
    torch.testing.assert_close(post["blocks.0.mlp.hook_post"] @ W_out + model.blocks[0].W_out.bias,
                               post["blocks.0.hook_mlp_out"])


def test_training_forward_matches_run_and_next_token_loss(model, tokens):
    logits = model(tokens)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(model.next_token_loss(tokens), expected)
