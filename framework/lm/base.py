"""One interface for every base LM: named hook points, early exit, splicing.

The rest of the framework never asks which kind of model it holds. Every model names its hook
points with the TransformerLens scheme that SAELens checkpoints also use, so an exported SAE's
`hook_name` means the same thing everywhere:

    blocks.{i}.hook_resid_pre     residual stream entering block i          (d_model)
    blocks.{i}.hook_attn_out      attention output added to the residual    (d_model)
    blocks.{i}.mlp.hook_pre       MLP pre-activation (the gate for gated MLPs) (d_mlp)
    blocks.{i}.mlp.hook_post      MLP neurons after the nonlinearity        (d_mlp)
    blocks.{i}.hook_mlp_out       MLP output added to the residual          (d_model)
    blocks.{i}.hook_resid_post    residual stream leaving block i           (d_model)

`run(tokens, capture=..., stop_at=..., splice=...)` is the single entry point:
- `capture` returns those activations;
- `stop_at` ends the forward pass right after that hook (early exit: harvesting layer 0 of a
  30-layer model should not pay for 29 more layers) and returns no logits;
- `splice` maps hook names to functions `f(activation) -> activation` whose result replaces the
  activation downstream (an SAE reconstruction, zeros, a mean) -- what "loss recovered" needs.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from framework.errors import FrameworkError

HOOK_KINDS = (
    "hook_resid_pre",
    "hook_attn_out",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)

Splice = Callable[[torch.Tensor], torch.Tensor]


def hook_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.{kind}"


def parse_hook(name: str) -> tuple[int, str]:
    """'blocks.3.mlp.hook_post' -> (3, 'mlp.hook_post'); raises ValueError for other names."""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in HOOK_KINDS:
        raise ValueError(name)
    return int(parts[1]), parts[2]


class UnknownHookError(FrameworkError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (batch, seq, vocab); None after an early exit
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> (batch, seq, width)


class Tokenizer:
    """The few things the framework needs from a tokenizer, for every kind of model."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer  # a `tokenizers.Tokenizer` or `transformers` tokenizer

    @property
    def vocab_size(self) -> int:
        hf = self.hf
        return hf.get_vocab_size() if hasattr(hf, "get_vocab_size") else len(hf)

    @property
    def eos_id(self) -> int | None:
        hf = self.hf
        if hasattr(hf, "eos_token_id"):
            return hf.eos_token_id
        return hf.token_to_id("<|endoftext|>")

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the full serialised tokenizer: equal fingerprints tokenise identically."""
        hf = self.hf
        backend = hf if hasattr(hf, "to_str") else getattr(hf, "backend_tokenizer", None)
        if backend is None:  # a slow (pure Python) transformers tokenizer has no serialisation
            return hashlib.sha256(f"{hf.name_or_path}:{sorted(hf.get_vocab().items())}".encode()).hexdigest()
        return hashlib.sha256(backend.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        hf = self.hf
        if hasattr(hf, "get_vocab_size"):  # tokenizers.Tokenizer
            return hf.encode(text).ids
        return hf.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        hf = self.hf
        if hasattr(hf, "get_vocab_size"):
            return [e.ids for e in hf.encode_batch(texts)]
        return hf(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each token's own text, for showing contexts token by token (dashboards, autointerp
        prompts). Decoded after a fixed anchor token and cut after the anchor's text: a decoder
        that strips a text's leading space (SentencePiece's Metaspace: Llama 2, Mistral) strips
        the anchor's, not the token's, so ` x` and `x` stay apart. Decoded alone where the anchor
        does not come out first (the tokenizer merges across the boundary)."""
        anchor, anchor_text = self._anchor
        strings = []
        for i in ids:
            text = self.hf.decode([*anchor, int(i)])
            strings.append(text[len(anchor_text):] if anchor and text.startswith(anchor_text) else self.hf.decode([int(i)]))
        return strings

    @functools.cached_property
    def _anchor(self) -> tuple[list[int], str]:
        """The ids of a plain letter and their text; nothing for a tokenizer without one, or
        without a decoder (it joins tokens with spaces: an anchor would put one before each)."""
        hf = self.hf
        backend = hf if hasattr(hf, "get_vocab_size") else getattr(hf, "backend_tokenizer", None)
        if backend is not None and backend.decoder is None:
            return [], ""
        ids = self.encode("a")
        return (ids, hf.decode(ids)) if ids and hf.decode(ids) else ([], "")


class BaseLM(nn.Module):
    """A causal LM with named hook points. Subclasses implement `hook_points` and `run`."""

    name: str = "lm"
    tokenizer: Tokenizer
    identity: dict  # what the manifest records: model name, revision/hash, tokenizer

    def hook_points(self) -> dict[str, int]:
        """Every hook point, in forward order, with its width."""
        raise NotImplementedError

    def run(
        self,
        tokens: torch.Tensor,
        capture: Iterable[str] = (),
        stop_at: str | None = None,
        splice: dict[str, Splice] | None = None,
    ) -> LMOutput:
        raise NotImplementedError

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """(d_mlp, d_model): how MLP neurons of `layer` write to the residual stream."""
        raise NotImplementedError

    def unembed_weight(self) -> torch.Tensor:
        """(d_model, vocab): the residual stream's direct effect on the logits (final norm folded)."""
        raise NotImplementedError

    # ---- shared helpers -------------------------------------------------------------------

    def check_hooks(self, names: Iterable[str]) -> None:
        available = self.hook_points()
        for hook in names:
            if hook not in available:
                import difflib

                close = difflib.get_close_matches(hook, list(available), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UnknownHookError(
                    f"hook point {hook!r} does not exist on {self.name} "
                    f"({len(available)} hook points, blocks 0..{self.n_layers - 1}).{hint} "
                    f"List them with `sae hooks {'RECIPE.yaml' if self.name == 'builtin' else self.name}`."
                )

    def last_hook(self, names: Iterable[str]) -> str:
        """The hook latest in forward order: where an early exit can stop."""
        order = list(self.hook_points())
        return max(names, key=order.index)

    @property
    def max_context(self) -> int | None:
        """The longest context the model can read: the size of its learned position table, or
        None where nothing limits it (rotary positions only degrade past their training length)."""
        return None

    @property
    def n_layers(self) -> int:
        return 1 + max(parse_hook(h)[0] for h in self.hook_points())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def next_token_loss(
        self, tokens: torch.Tensor, splice: dict[str, Splice] | None = None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Cross-entropy of predicting tokens[:, 1:] (per token if reduction='none')."""
        logits = self.run(tokens, splice=splice).logits  # run() takes tokens on any device
        targets = tokens[:, 1:].flatten().to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction=reduction)
        return loss.view(tokens.shape[0], -1) if reduction == "none" else loss
