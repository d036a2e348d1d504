"""What analysis studies: an SAE's features, or the hook's own basis (the neuron baseline).

The paper's claim is comparative -- features are more interpretable than neurons -- so every
analysis (examples, logit effects, ablation, dashboards) runs on both through one interface.
A unit has an activation per token and a direction it adds to the hook's activation per unit
of activation:

    SAE feature i:  activation f_i(x),  direction W_dec[i] / input_scale
    MLP neuron j:   activation x_j,     direction e_j (the j-th basis vector)

Ablating unit i replaces the hook's activation by `baseline - a_i * direction_i`, where the
baseline is what the model sees with the unit present: the SAE's full reconstruction for
features (so the SAE's own error is not counted as the feature's effect) and the clean
activation for neurons. The neuron baseline only makes sense where the basis is privileged,
so it is built for `mlp.hook_post` hooks only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.lm.base import parse_hook
from framework.saved import TrainedSAE


@dataclass
class Units:
    kind: str  # "features" or "neurons": the key everything downstream is filed under
    directions: torch.Tensor  # (n, d_in): what each unit adds to the activation, per unit
    sae: TrainedSAE | None = None  # None for neurons: the activation is the unit

    @property
    def n(self) -> int:
        return self.directions.shape[0]

    @torch.no_grad()
    def activations(self, acts: torch.Tensor) -> torch.Tensor:
        """acts (..., d_in) -> unit activations (..., n)."""
        return acts.float() if self.sae is None else self.sae.features(acts)

    @torch.no_grad()
    def baseline(self, acts: torch.Tensor, unit_acts: torch.Tensor) -> torch.Tensor:
        """The activation with every unit present, (..., d_in), from acts and their unit_acts."""
        if self.sae is None:
            return acts.float()
        flat = unit_acts.reshape(-1, unit_acts.shape[-1])
        return (self.sae.sae.decode(flat) / self.sae.input_scale).view(acts.shape)


def feature_units(trained: TrainedSAE) -> Units:
    return Units("features", trained.sae.W_dec.detach().float() / trained.input_scale, trained)


def neuron_units(hook: str, width: int, device: torch.device | str) -> Units | None:
    """The MLP neurons as units when the hook reads them (mlp.hook_post), else None."""
    if parse_hook(hook)[1] != "mlp.hook_post":
        return None
    return Units("neurons", torch.eye(width, device=device))


def units_for(trained: TrainedSAE) -> dict[str, Units]:
    """The SAE's features and, for an MLP-neuron SAE, the neurons to compare them with."""
    units = {"features": feature_units(trained)}
    neurons = neuron_units(trained.hook_point, trained.sae.d_in, trained.sae.W_dec.device)
    if neurons is not None:
        units["neurons"] = neurons
    return units
