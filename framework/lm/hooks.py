"""What one `run` call does at each hook point: capture, splice, and the early exit.

Both kinds of model route every hook point through `HookRun.visit`, so capture, splicing and
early exit behave identically whichever model computes the activations. An early exit is an
exception (`StopForward`) raised right after the stop point is visited: for hooked Hugging Face
models it is the only way to leave the middle of `model.forward` without editing its code, and
the built-in model uses the same mechanism so both paths share one tested behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from framework.lm.base import BaseLM, Splice


class StopForward(Exception):
    """Raised after the `stop_at` hook point; caught by `run`, never seen by callers."""


class HookRun:
    """The requests of one `run` call, and the activations captured so far."""

    def __init__(
        self, lm: BaseLM, capture: Iterable[str], stop_at: str | None, splice: dict[str, Splice] | None
    ):
        self.capture = list(capture)
        self.splice = dict(splice or {})
        self.stop_at = stop_at
        lm.check_hooks([*self.capture, *self.splice, *([stop_at] if stop_at else [])])
        if stop_at is not None:
            order = list(lm.hook_points())
            late = [h for h in self.capture if order.index(h) > order.index(stop_at)]
            if late:
                raise ValueError(f"cannot capture {late} after stopping at {stop_at!r}")
            late = [h for h in self.splice if order.index(h) > order.index(stop_at)]
            if late:  # never reached: the splice would silently not happen
                raise ValueError(f"cannot splice {late} after stopping at {stop_at!r}")
        self.activations: dict[str, torch.Tensor] = {}

    @property
    def points(self) -> set[str]:
        """Hook points this run must visit; every other point costs nothing."""
        return {*self.capture, *self.splice, *([self.stop_at] if self.stop_at else [])}

    def visit(self, name: str, activation: torch.Tensor) -> torch.Tensor:
        """Capture (the activation as computed), then splice; raise StopForward at `stop_at`."""
        if name in self.capture:
            self.activations[name] = activation
        if name in self.splice:
            activation = self.splice[name](activation)
        if name == self.stop_at:
            raise StopForward
        return activation
