"""Hugging Face causal LMs through module hooks: tiny random Llama, GPT-2 and GPT-NeoX models.

Each hook point is checked against the activation computed by hand from the modules' weight
matrices, so a hook on the wrong module (or the wrong side of it) cannot pass.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Olmo2Config,
    PreTrainedTokenizerFast,
)

from framework.config import load_recipe
from framework.errors import RecipeError
from framework.lm import UnknownHookError, list_hooks, load_lm, weights_sha256
from framework.lm.base import Tokenizer
from framework.lm.hf import HFLM

N_LAYERS = 2


def build(config) -> HFLM:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return HFLM(model, tokenizer=None, name=config.model_type)


@pytest.fixture(scope="module")
def llama() -> HFLM:
    return build(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def gpt2() -> HFLM:
    return build(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=N_LAYERS, n_head=4))


@pytest.fixture(scope="module")
def neox() -> HFLM:
    return build(GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                               num_attention_heads=4, max_position_embeddings=64))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v (batch, heads, seq, d_head) -> (batch, seq, heads * d_head), softmax written out."""
    seq = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    z = scores.softmax(-1) @ v
    return z.transpose(1, 2).flatten(2)


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.view(*x.shape[:2], n, -1).transpose(1, 2)  # (batch, heads, seq, d_head)


# ---- Llama by hand: RMSNorm, RoPE, grouped-query attention, gated SiLU MLP -----------------------


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = torch.arange(x.shape[2])[:, None].float() * inv_freq[None]  # (seq, d_head / 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def llama_by_hand(lm: HFLM, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
    model, cfg = lm.model.model, lm.model.config
    resid = model.embed_tokens.weight[tokens]
    inv_freq = model.rotary_emb.inv_freq
    acts = {}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        x = rms_norm(resid, layer.input_layernorm)
        q = rope(heads(x @ attn.q_proj.weight.T, cfg.num_attention_heads), inv_freq)
        k = rope(heads(x @ attn.k_proj.weight.T, cfg.num_key_value_heads), inv_freq)
        v = heads(x @ attn.v_proj.weight.T, cfg.num_key_value_heads)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        z = causal_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        attn_out = z @ attn.o_proj.weight.T
        mid = rms_norm(resid + attn_out, layer.post_attention_layernorm)
        pre = mid @ layer.mlp.gate_proj.weight.T
        post = F.silu(pre) * (mid @ layer.mlp.up_proj.weight.T)
        mlp_out = post @ layer.mlp.down_proj.weight.T
        acts.update(_block(i, resid, attn_out, pre, post, mlp_out))
        resid = resid + attn_out + mlp_out
    return acts, rms_norm(resid, model.norm) @ lm.model.lm_head.weight.T


def _block(i, resid, attn_out, pre, post, mlp_out) -> dict:
    return {f"blocks.{i}.hook_resid_pre": resid, f"blocks.{i}.hook_attn_out": attn_out,
            f"blocks.{i}.mlp.hook_pre": pre, f"blocks.{i}.mlp.hook_post": post,
            f"blocks.{i}.hook_mlp_out": mlp_out, f"blocks.{i}.hook_resid_post": resid + attn_out + mlp_out}


# ---- GPT-2 by hand: LayerNorm, Conv1D (x @ W + b), learned positions, tanh-GELU MLP ---------------


def conv1d(x: torch.Tensor, layer) -> torch.Tensor:
    return x @ layer.weight + layer.bias  # GPT-2's Conv1D stores (in, out)


def gpt2_by_hand(lm: HFLM, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
    model, n_head = lm.model.transformer, lm.model.config.n_head
    resid = model.wte.weight[tokens] + model.wpe.weight[: tokens.shape[1]]
    acts = {}
    for i, block in enumerate(model.h):
        q, k, v = conv1d(block.ln_1(resid), block.attn.c_attn).split(resid.shape[-1], -1)
        attn_out = conv1d(causal_attention(heads(q, n_head), heads(k, n_head), heads(v, n_head)), block.attn.c_proj)
        pre = conv1d(block.ln_2(resid + attn_out), block.mlp.c_fc)
        post = F.gelu(pre, approximate="tanh")
        mlp_out = conv1d(post, block.mlp.c_proj)
        acts.update(_block(i, resid, attn_out, pre, post, mlp_out))
        resid = resid + attn_out + mlp_out
    return acts, model.ln_f(resid) @ lm.model.lm_head.weight.T


@pytest.mark.parametrize("arch, by_hand", [("llama", llama_by_hand), ("gpt2", gpt2_by_hand)])
@torch.no_grad()
def test_every_hook_point_equals_the_activation_computed_by_hand(arch, by_hand, request, tokens):
    lm = request.getfixturevalue(arch)
    expected, expected_logits = by_hand(lm, tokens)
    out = lm.run(tokens, capture=list(lm.hook_points()))
    assert list(out.activations) == list(lm.hook_points())
    for name, activation in out.activations.items():
        torch.testing.assert_close(activation, expected[name], rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(out.logits, expected_logits, rtol=1e-4, atol=1e-4)


# Gemma 2 and OLMo 2: a norm on each sub-layer's output before it is added to the residual stream.
POST_NORM_CONFIGS = [
    pytest.param(Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64),
                 id="gemma2"),
    pytest.param(Olmo2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), id="olmo2"),
]


@pytest.mark.parametrize("config", [
    *POST_NORM_CONFIGS,
    pytest.param(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64), id="llama"),
])
@torch.no_grad()
def test_attn_out_and_mlp_out_are_what_the_layer_adds_to_the_residual_stream(config, tokens):
    """Gemma 2 and OLMo 2 normalise each sub-layer's output before adding it: their hook_attn_out
    and hook_mlp_out are the normalised outputs (TransformerLens's meaning, which SAELens's hook
    names carry), so that resid_pre + attn_out + mlp_out = resid_post, as in Llama; a splice there
    replaces what is added."""
    lm = build(config)
    out = lm.run(tokens, capture=list(lm.hook_points()))
    for i in range(N_LAYERS):
        a = {name.split(".", 2)[2]: t for name, t in out.activations.items() if name.startswith(f"blocks.{i}.")}
        torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"],
                                   rtol=1e-5, atol=1e-5)
    zeroed = lm.run(tokens, capture=["blocks.1.hook_resid_post"], splice={"blocks.1.hook_mlp_out": torch.zeros_like})
    a = {name.split(".", 2)[2]: t for name, t in out.activations.items() if name.startswith("blocks.1.")}
    torch.testing.assert_close(zeroed.activations["blocks.1.hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"],
                               rtol=1e-5, atol=1e-5)


def test_a_model_that_scales_what_its_sub_layers_add_is_refused_not_taken_for_llama():
    """Granite's module tree is Llama's, but it adds residual_multiplier x each sub-layer's output:
    its hook_attn_out / hook_mlp_out were not what the residual stream receives."""
    from transformers import GraniteConfig

    config = GraniteConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           residual_multiplier=0.22)
    with pytest.raises(RecipeError, match=r"'granite' scales what each sub-layer adds.*residual_multiplier=0.22"):
        build(config)


@torch.no_grad()
def test_gpt_neox_parallel_residual_adds_attention_and_mlp_to_the_same_input(neox, tokens):
    out = neox.run(tokens, capture=list(neox.hook_points()))
    a = {name.split(".", 2)[2]: t for name, t in out.activations.items() if name.startswith("blocks.1.")}
    torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"])
    torch.testing.assert_close(a["mlp.hook_post"], F.gelu(a["mlp.hook_pre"]))
    assert neox.hook_points()["blocks.1.mlp.hook_post"] == 128


def test_hook_points_have_the_model_widths(llama, gpt2):
    assert llama.hook_points()["blocks.1.mlp.hook_pre"] == 128
    assert llama.hook_points()["blocks.1.hook_resid_post"] == 64
    assert gpt2.hook_points()["blocks.0.mlp.hook_post"] == 256  # GPT-2's MLP is 4 x n_embd
    assert len(llama.hook_points()) == 6 * N_LAYERS


def test_only_a_learned_position_table_limits_the_context(llama, gpt2):
    """GPT-2 cannot index positions past n_positions; Llama's rotary positions have no table."""
    assert gpt2.max_context == 64 and llama.max_context is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_early_exit_returns_the_same_activations_and_skips_later_layers(arch, request, tokens):
    lm = request.getfixturevalue(arch)
    hook = "blocks.0.mlp.hook_post"
    with FlopCounterMode(display=False) as full_count:
        full = lm.run(tokens, capture=[hook])
    with FlopCounterMode(display=False) as early_count:
        early = lm.run(tokens, capture=[hook], stop_at=hook)
    assert early.logits is None
    assert torch.equal(early.activations[hook], full.activations[hook])
    assert early_count.get_total_flops() < 0.5 * full_count.get_total_flops()


@torch.no_grad()
def test_hooks_are_removed_after_every_run_including_an_early_exit(llama, tokens):
    llama.run(tokens, capture=["blocks.1.hook_resid_pre"], stop_at="blocks.1.hook_resid_pre",
              splice={"blocks.0.mlp.hook_post": torch.zeros_like})
    assert not [m for m in llama.model.modules() if m._forward_hooks or m._forward_pre_hooks]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_splicing_the_identity_leaves_logits_unchanged_and_zeros_change_them(arch, request, tokens):
    lm = request.getfixturevalue(arch)
    clean = lm.run(tokens).logits
    for hook in lm.hook_points():
        if hook.startswith("blocks.1."):
            continue  # layer 0 covers every kind; one layer keeps the test quick
        assert torch.equal(lm.run(tokens, splice={hook: lambda x: x}).logits, clean), hook
        zeroed = lm.run(tokens, splice={hook: torch.zeros_like}).logits
        assert (zeroed - clean).abs().max() > 1e-4, hook


@torch.no_grad()
def test_a_splice_reaches_the_next_hook_point(llama, tokens):
    out = llama.run(tokens, capture=["blocks.0.hook_mlp_out"], splice={"blocks.0.mlp.hook_post": torch.zeros_like})
    assert out.activations["blocks.0.hook_mlp_out"].abs().max() == 0  # down_proj has no bias


@torch.no_grad()
def test_unembed_weight_folds_the_final_rmsnorm_gain_of_llama(llama, tokens):
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    out = llama.run(tokens, capture=[last])
    resid = out.activations[last]
    rms = torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + llama.model.model.norm.variance_epsilon)
    torch.testing.assert_close(out.logits, (resid / rms) @ llama.unembed_weight(), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_unembed_weight_folds_gpt2s_final_layernorm_up_to_a_per_token_constant(gpt2, tokens):
    last = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    out = gpt2.run(tokens, capture=[last])
    resid = out.activations[last]
    scale = torch.sqrt(resid.var(-1, unbiased=False, keepdim=True) + gpt2.model.transformer.ln_f.eps)
    remainder = out.logits - (resid / scale) @ gpt2.unembed_weight()  # ln_f's bias through W_U
    torch.testing.assert_close(remainder, remainder[:1, :1].expand_as(remainder), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@torch.no_grad()
def test_mlp_out_weight_maps_neurons_to_the_mlp_output(arch, request, tokens):
    lm = request.getfixturevalue(arch)
    acts = lm.run(tokens, capture=["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"]).activations
    bias = getattr(lm.layers[0].mlp, "c_proj", None)
    expected = acts["blocks.0.hook_mlp_out"] - (bias.bias if bias is not None else 0)
    torch.testing.assert_close(acts["blocks.0.mlp.hook_post"] @ lm.mlp_out_weight(0), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", POST_NORM_CONFIGS)
@torch.no_grad()
def test_mlp_out_weight_folds_the_gain_of_the_norm_after_the_mlp(config, tokens):
    """Gemma 2/3 and OLMo 2 normalise the MLP's output before adding it: what a neuron writes to
    the residual is its output row times that norm's gain, up to a positive per-token scale. The
    gain was left out, and the logit tables of mlp.hook_post features ranked tokens by the wrong
    matrix (29% of a random tiny Gemma 2's neurons kept their top token)."""
    lm = build(config)
    norm = lm.layers[0].post_feedforward_layernorm
    norm.weight.copy_(torch.rand(norm.weight.shape, generator=torch.Generator().manual_seed(3)) * 2 - 0.5)
    acts = lm.run(tokens, capture=["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"]).activations
    written = acts["blocks.0.mlp.hook_post"] @ lm.mlp_out_weight(0)
    cosine = torch.nn.functional.cosine_similarity(written, acts["blocks.0.hook_mlp_out"], dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-5)


@pytest.mark.parametrize("decoder", [
    pytest.param(decoders.Metaspace(), id="metaspace"),
    pytest.param(decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)]), id="llama2"),
])
@pytest.mark.parametrize("transformers_wrapper", [False, True])
def test_token_strings_keep_the_leading_space_a_sentencepiece_decoder_strips(decoder, transformers_wrapper):
    """Decoded alone, `\u2581x` came out as `x` under SentencePiece decoders (Llama 2, Mistral):
    dashboards lost every space between words and could not tell ` x` from `x`."""
    vocab = {"[UNK]": 0, "\u2581a": 1, "\u2581x": 2, "x": 3, "\u2581=": 4, "a": 5}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.normalizer = normalizers.Replace(" ", "\u2581")
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoder
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]") if transformers_wrapper else rust
    assert Tokenizer(hf).token_strings([2, 3, 4, 2]) == [" x", "x", " =", " x"]
    rust.decoder = None  # no decoder: tokens are joined with spaces, so no anchor (it would add one to each)
    hf = PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]") if transformers_wrapper else rust
    assert Tokenizer(hf).token_strings([3, 5]) == ["x", "a"]


def test_an_unknown_hook_names_itself_and_how_to_list_hooks(llama, tokens):
    with pytest.raises(UnknownHookError, match=r"'blocks.5.hook_resid_post' does not exist.*blocks 0..1.*sae hooks"):
        llama.run(tokens, capture=["blocks.5.hook_resid_post"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama) -> str:
    """The tiny Llama saved as an ordinary local Hugging Face model directory, with a tokenizer."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<|endoftext|>", unk_token="[UNK]").save_pretrained(directory)
    llama.model.save_pretrained(directory)
    return str(directory)


@torch.no_grad()
def test_load_lm_reads_a_local_hf_directory_with_its_tokenizer_and_identity(llama_dir, llama, tokens):
    recipe = load_recipe(None, [f"lm.name={llama_dir}", "lm.device=cpu"])
    lm = load_lm(recipe)
    assert isinstance(lm, HFLM)
    torch.testing.assert_close(lm.run(tokens).logits, llama.run(tokens).logits)
    assert lm.tokenizer.encode("hello world") == [2, 3] and lm.tokenizer.eos_id == 0
    assert len(lm.identity["weights_sha256"]) == 64 and len(lm.identity["tokenizer_sha256"]) == 64
    # what `sae train` compares with a store's manifest, computed without loading the model
    assert weights_sha256(recipe) == lm.identity["weights_sha256"]


def test_a_hub_id_records_its_cached_snapshot_and_its_weights_hash_and_a_home_path_loads(llama_dir, tmp_path):
    """A hub id's identity had neither a revision (transformers 5 keeps no `_commit_hash`) nor a
    weights hash, so nothing said which weights made a store; a `~/...` directory was taken for
    a hub id. In a fresh process: the Hugging Face cache location is read at import."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(llama_dir, tmp_path / "home" / "tiny")
    script = ("import json\nfrom framework.config import load_recipe\nfrom framework.lm import load_lm, weights_sha256\n"
              "out = {}\nfor name in ('org/tiny', '~/tiny'):\n"
              "    recipe = load_recipe(None, [f'lm.name={name}', 'lm.device=cpu'])\n"
              "    out[name] = load_lm(recipe).identity | {'without_loading': weights_sha256(recipe)}\n"
              "print(json.dumps(out))\n")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    hub, home = json.loads(run.stdout.splitlines()[-1]).values()
    local = load_lm(load_recipe(None, [f"lm.name={llama_dir}", "lm.device=cpu"])).identity["weights_sha256"]
    assert hub["revision"] == commit and hub["weights_sha256"] == hub["without_loading"] == local
    assert home["revision"] is None and home["weights_sha256"] == home["without_loading"] == local


def test_list_hooks_reads_a_local_hf_directory_without_loading_weights(llama_dir):
    lines = list_hooks(llama_dir)
    assert len(lines) == 6 * N_LAYERS
    assert lines[2].split() == ["blocks.0.mlp.hook_pre", "128"]


def test_a_wrong_model_name_lists_what_lm_name_accepts():
    with pytest.raises(RecipeError) as err:
        load_lm(load_recipe(None, ["lm.name=no-such-model-xyz", "lm.device=cpu"]))
    message = str(err.value)
    assert "'no-such-model-xyz'" in message
    for accepted in ("'builtin'", "'smollm2'", "local Hugging Face model directory", "hub id", "network"):
        assert accepted in message


def test_a_model_path_that_does_not_exist_says_so_rather_than_the_hubs_repo_id_rules(tmp_path):
    for command in (lambda: list_hooks(str(tmp_path / "gone")),
                    lambda: load_lm(load_recipe(None, [f"lm.name={tmp_path / 'gone'}", "lm.device=cpu"]))):
        with pytest.raises(RecipeError, match=rf"cannot load LM '{tmp_path / 'gone'}': there is no such directory"):
            command()
