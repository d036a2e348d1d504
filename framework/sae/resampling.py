"""The paper's dead-feature resampling, as pure functions a training callback calls.

Why resample: with an L1 penalty many features stop firing early and never recover; the paper
re-initialises them (at steps 25k/50k/75k/100k, features silent for the previous 12,500 steps)
towards inputs the SAE reconstructs badly, so they start where there is loss to remove:

  1. give each of a random sample of inputs probability ∝ (its loss)²;
  2. per dead feature draw one input (with replacement: two features may get the same input,
     as unlikely as it is with hundreds of thousands of candidates);
  3. decoder row = that input at unit norm (the input itself, not minus b_dec, as the paper says);
     encoder column = the same direction × 0.2 × the mean norm of the alive encoder columns;
     encoder bias = 0;
  4. reset Adam's moments for exactly those rows, columns and biases.

`resample_dead_features` does 1-3 and returns which indices of which parameter it changed;
`reset_adam_state` does 4 for one of them. Nothing else is touched, so alive features continue
bit-identical. Under data parallelism every rank must call it with the same inputs, losses and
generator state (or rank 0 calls it and the parameters are broadcast), so replicas stay equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from framework.sae.base import SAE

# Which dimension of each modified parameter indexes features.
FEATURE_DIM = {"W_enc": 1, "W_dec": 0, "b_enc": 0}


@torch.no_grad()
def resample_dead_features(
    sae: SAE,
    dead_mask: Tensor,  # (n,) bool
    inputs: Tensor,  # (m, d)
    per_input_loss: Tensor,  # (m,)
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Re-initialise dead features from badly reconstructed inputs; returns, per parameter name,
    the feature indices changed (along FEATURE_DIM[name]). Empty when nothing is dead."""
    dead = dead_mask.nonzero().squeeze(1)  # (n_dead,)
    weights = resampling_weights(per_input_loss, inputs)
    if dead.numel() == 0 or not weights.any():
        return {}
    chosen = torch.multinomial(weights, dead.numel(), replacement=True, generator=generator)
    directions = inputs[chosen.to(inputs.device)].to(sae.W_dec.dtype)  # (n_dead, d)
    directions = directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True).clamp_min(1e-12)

    alive = ~dead_mask
    if alive.any():
        alive_norm = torch.linalg.vector_norm(sae.W_enc[:, alive], dim=0).mean()
    else:
        alive_norm = torch.ones((), device=sae.W_enc.device)
    sae.W_dec[dead] = directions
    sae.W_enc[:, dead] = (directions * 0.2 * alive_norm).T.to(sae.W_enc.dtype)
    sae.b_enc[dead] = 0
    return {"W_enc": dead, "W_dec": dead, "b_enc": dead}


def resampling_weights(per_input_loss: Tensor, inputs: Tensor) -> Tensor:
    """(m,) float64 on the CPU: each input's probability weight, its loss squared; 0 for an
    all-zero input (every neuron silent on a token), which has a loss but no direction (its
    unit-norm row would be 0/0, and the run would stop on non-finite weights). All zero (no
    loss anywhere): nothing to resample towards."""
    weights = per_input_loss.double().pow(2)
    weights[torch.linalg.vector_norm(inputs.float(), dim=1) == 0] = 0
    return weights.cpu()


@torch.no_grad()
def reset_adam_state(optimizer: torch.optim.Optimizer, param: Tensor, index: Tensor, dim: int) -> None:
    """Zero Adam's first and second moments of `param` at `index` along `dim`.

    The step count stays: Adam keeps one per tensor, not per row, so the bias correction of the
    reset entries follows the tensor's age.
    """
    state = optimizer.state.get(param)
    if not state:
        return  # the optimizer has not stepped yet: there is nothing to reset
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index.to(state[key].device), 0)
