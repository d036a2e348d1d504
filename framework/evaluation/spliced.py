"""Metrics that need the base LM: what the SAE's reconstruction does to next-token loss.

The reconstruction is spliced into the hook point in place of the real activation and the
forward pass continues from there. Following the paper,

    loss explained = (L_ablated - L_sae) / (L_ablated - L_clean)

with L_ablated the loss when the hook's activation is zeroed (for MLP neurons: the MLP reduced
to its output bias, the paper's "MLP ablated"). It is 1 for a perfect reconstruction and 0 for
one as bad as ablation. The same ratio against mean ablation (the activation replaced by its
mean over the evaluation tokens) and the KL divergence from the clean next-token distribution
are reported beside it, as later work prefers them.

Every splice (the reconstruction, zeros, the mean) replaces the activation only from position
`skip_first_tokens` on (`harvest.skip_first_tokens`): the SAE never trained on earlier
positions, whose activations are atypical (position 0 attends only to itself; in many LMs it is
an attention sink with outsized activations), so there they keep their clean value, and the
mean is taken over the same positions. Every predicted token is scored, so `loss_clean` is the
LM's own loss; the predictions before `skip_first_tokens` score alike in every condition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.lm import BaseLM
from framework.saved import TrainedSAE


def _nll_and_logprobs(model: BaseLM, tokens: torch.Tensor, splice=None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model.run(tokens, splice=splice).logits[:, :-1].float()  # (b, s-1, vocab)
    logprobs = F.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)  # (b, s-1)
    return nll, logprobs


@torch.no_grad()
def hook_mean(model: BaseLM, hook: str, batches: list[torch.Tensor], skip_first_tokens: int = 0) -> torch.Tensor:
    """The hook's mean activation over the batches' positions from `skip_first_tokens` on."""
    total, count = None, 0
    for tokens in batches:
        acts = model.run(tokens, capture=[hook], stop_at=hook).activations[hook][:, skip_first_tokens:].float()
        flat = acts.reshape(-1, acts.shape[-1])
        total = flat.sum(0) if total is None else total + flat.sum(0)
        count += flat.shape[0]
    return total / count


def _from_position(skip: int, replace):
    """A splice that replaces the activation from position `skip` on and keeps the rest."""
    if skip == 0:
        return replace

    def splice(a: torch.Tensor) -> torch.Tensor:  # (b, s, d)
        out = a.clone()
        out[:, skip:] = replace(a[:, skip:])
        return out

    return splice


@torch.no_grad()
def spliced_metrics(model: BaseLM, trained: TrainedSAE, batches: list[torch.Tensor],
                    skip_first_tokens: int = 0) -> dict[str, float]:
    """Clean / SAE / zero- / mean-ablated losses, loss explained and KL over token batches,
    each splice from position `skip_first_tokens` on."""
    hook = trained.hook_point
    mean = hook_mean(model, hook, batches, skip_first_tokens)
    splices = {
        "sae": lambda a: trained.reconstruct(a),
        "zero": lambda a: torch.zeros_like(a),
        "mean": lambda a: mean.to(a.dtype).expand_as(a),
    }
    splices = {name: _from_position(skip_first_tokens, fn) for name, fn in splices.items()}
    sums = {k: 0.0 for k in ("clean", "sae", "zero", "mean", "kl_sae", "kl_zero")}
    n_tokens = 0
    for tokens in batches:
        clean_nll, clean_lp = _nll_and_logprobs(model, tokens)
        sums["clean"] += clean_nll.sum().item()
        for name, fn in splices.items():
            nll, lp = _nll_and_logprobs(model, tokens, splice={hook: fn})
            sums[name] += nll.sum().item()
            if name in ("sae", "zero"):
                kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)  # KL(clean || spliced) per token
                sums[f"kl_{name}"] += kl.sum().item()
        n_tokens += clean_nll.numel()
    loss = {k: v / n_tokens for k, v in sums.items()}
    return {
        "loss_clean": loss["clean"],
        "loss_sae": loss["sae"],
        "loss_zero_ablated": loss["zero"],
        "loss_mean_ablated": loss["mean"],
        "loss_explained": _explained(loss["zero"], loss["sae"], loss["clean"]),
        "loss_explained_vs_mean": _explained(loss["mean"], loss["sae"], loss["clean"]),
        "kl_sae": loss["kl_sae"],
        "kl_zero_ablated": loss["kl_zero"],
        "eval_tokens": n_tokens,
    }


def _explained(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")
