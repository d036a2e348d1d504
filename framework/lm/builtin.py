"""The paper's base model: a small transformer with one ReLU MLP layer, hooks written inline.

"Towards Monosemanticity" studies a one-layer transformer (residual 128, 512 MLP neurons) and
reads the SAE's input after the ReLU. The model is written out plainly, TransformerLens style
(pre-LayerNorm, learned positions, untied unembedding), and passes every hook point through
`HookRun.visit` as it computes it, so capture, splicing and early exit need no module hooks.

For logit-effect analysis (a feature's decoder column through W_out and W_U), the MLP output
weight and the unembedding are exposed as plain matrices; see `unembed_weight` for how the
final LayerNorm is approximated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from framework.artifacts import files_sha256
from framework.config import BuiltinLMConfig
from framework.lm.base import BaseLM, LMOutput, Splice, Tokenizer, hook_name
from framework.lm.hooks import HookRun, StopForward
from framework.lm.tokenizer import load_tokenizer


@dataclass
class BuiltinArchitecture:
    """What `config.json` records: enough to rebuild the model before loading its weights."""

    d_model: int = 128
    d_mlp: int = 512
    n_heads: int = 4
    n_layers: int = 1
    vocab_size: int = 4096
    n_ctx: int = 128  # learned positions: the longest context the model can read

    @classmethod
    def from_config(cls, cfg: BuiltinLMConfig, n_ctx: int, vocab_size: int | None = None) -> BuiltinArchitecture:
        """The recipe's shape; `vocab_size` is the trained tokenizer's (BPE may stop short)."""
        return cls(cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_layers, vocab_size or cfg.vocab_size, n_ctx)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.W_QKV = nn.Linear(d_model, 3 * d_model)
        self.W_O = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.W_QKV(x).view(batch, seq, 3, self.n_heads, d_model // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, seq, d_head)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, heads, seq, d_head)
        return self.W_O(z.transpose(1, 2).reshape(batch, seq, d_model))  # (batch, seq, d_model)


class Block(nn.Module):
    def __init__(self, arch: BuiltinArchitecture):
        super().__init__()
        self.ln1 = nn.LayerNorm(arch.d_model)
        self.attn = Attention(arch.d_model, arch.n_heads)
        self.ln2 = nn.LayerNorm(arch.d_model)
        self.W_in = nn.Linear(arch.d_model, arch.d_mlp)
        self.W_out = nn.Linear(arch.d_mlp, arch.d_model)

    def forward(self, resid: torch.Tensor, layer: int, hooks: HookRun) -> torch.Tensor:
        def visit(kind: str, x: torch.Tensor) -> torch.Tensor:
            return hooks.visit(hook_name(layer, kind), x)

        resid = visit("hook_resid_pre", resid)  # (batch, seq, d_model)
        resid = resid + visit("hook_attn_out", self.attn(self.ln1(resid)))
        pre = visit("mlp.hook_pre", self.W_in(self.ln2(resid)))  # (batch, seq, d_mlp)
        post = visit("mlp.hook_post", F.relu(pre))  # (batch, seq, d_mlp)
        resid = resid + visit("hook_mlp_out", self.W_out(post))
        return visit("hook_resid_post", resid)


class BuiltinLM(BaseLM):
    name = "builtin"

    def __init__(self, arch: BuiltinArchitecture, tokenizer: Tokenizer | None = None, identity: dict | None = None):
        super().__init__()
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab_size, arch.d_model)
        self.pos_embed = nn.Embedding(arch.n_ctx, arch.d_model)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.n_layers))
        self.ln_final = nn.LayerNorm(arch.d_model)
        self.unembed = nn.Linear(arch.d_model, arch.vocab_size)
        self.apply(_init_weights)
        self.tokenizer = tokenizer  # None only for a model built without a corpus (tests)
        self.identity = identity or {"name": self.name, "architecture": asdict(arch)}

    def hook_points(self) -> dict[str, int]:
        widths = {
            "hook_resid_pre": self.arch.d_model, "hook_attn_out": self.arch.d_model,
            "mlp.hook_pre": self.arch.d_mlp, "mlp.hook_post": self.arch.d_mlp,
            "hook_mlp_out": self.arch.d_model, "hook_resid_post": self.arch.d_model,
        }
        return {hook_name(i, kind): w for i in range(self.arch.n_layers) for kind, w in widths.items()}

    @property
    def max_context(self) -> int:
        return self.arch.n_ctx  # set by the context length `sae pretrain` trained it on

    def run(
        self,
        tokens: torch.Tensor,
        capture: Iterable[str] = (),
        stop_at: str | None = None,
        splice: dict[str, Splice] | None = None,
    ) -> LMOutput:
        hooks = HookRun(self, capture, stop_at, splice)
        try:
            logits = self._forward(tokens.to(self.device), hooks)
        except StopForward:
            logits = None
        return LMOutput(logits, hooks.activations)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab): what training calls."""
        return self.run(tokens).logits

    def _forward(self, tokens: torch.Tensor, hooks: HookRun) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.arch.n_ctx:
            raise ValueError(f"context of {seq} tokens exceeds the model's n_ctx={self.arch.n_ctx}")
        resid = self.embed(tokens) + self.pos_embed.weight[:seq]  # (batch, seq, d_model)
        for layer, block in enumerate(self.blocks):
            resid = block(resid, layer, hooks)
        return self.unembed(self.ln_final(resid))  # (batch, seq, vocab)

    # ---- weights for logit-effect analysis ------------------------------------------------------

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """W_out of block `layer`, (d_mlp, d_model), float32: neuron i writes row i to the residual."""
        return self.blocks[layer].W_out.weight.float().T

    def unembed_weight(self) -> torch.Tensor:
        """W_U (d_model, vocab) with the final LayerNorm folded in approximately.

        LayerNorm centres its input, divides by a per-token scale and multiplies by a gain. The
        centring and the gain are linear and are folded in exactly (centre each column, scale
        rows by the gain); the per-token scale is dropped. It is positive, so the ranking of
        tokens by a direction's logit effect is what the model would produce to first order.
        """
        # In float32 whatever the model's dtype: a bfloat16 fold would round the table it ranks.
        W_U = self.ln_final.weight.float()[:, None] * self.unembed.weight.float().T  # (d_model, vocab)
        return W_U - W_U.mean(dim=0, keepdim=True)


def _init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation (normal, std 0.02; zero biases): trains fast at this size."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def builtin_weights_sha256(directory: str | Path) -> str:
    """The hash a loaded built-in LM's identity records (and harvest writes into each manifest)."""
    return files_sha256([Path(directory) / "model.safetensors"])


def load_builtin(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> BuiltinLM:
    """The model `sae pretrain` wrote: config.json + model.safetensors + tokenizer.json."""
    directory = Path(directory)
    arch = BuiltinArchitecture(**json.loads((directory / "config.json").read_text()))
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    identity = {
        "name": "builtin",
        "path": str(directory.resolve()),
        "weights_sha256": builtin_weights_sha256(directory),
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": tokenizer.fingerprint,
        "architecture": asdict(arch),
    }
    model = BuiltinLM(arch, tokenizer, identity)
    model.load_state_dict(load_file(directory / "model.safetensors"))
    return model.to(device=device, dtype=dtype).eval()
