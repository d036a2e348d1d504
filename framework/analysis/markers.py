"""Completion markers for the analysis modes (splitting, universality), each in its own directory.

The features analysis is a stage with the usual marker (framework/artifacts.py): a re-run with
the same recipe skips it, a different recipe is refused. The other modes are cheaper, read
things outside the recipe (another run's SAE) and are meant to be re-run with other settings,
so their marker records the analyze fingerprint plus the mode's own settings: when both match
the output is reused, otherwise it is recomputed in place rather than refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from framework.artifacts import (
    MARKER,
    as_fingerprinted_now,
    made_from_current_weights,
    mark_complete,
    stage_fingerprint,
)
from framework.config import Recipe


def _normalised(value) -> object:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def is_done(out: Path, recipe: Recipe, settings: dict) -> bool:
    """True if `out` holds this mode's finished output for this recipe and these settings, made
    from the SAE weights there now."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    saved = json.loads(marker.read_text())
    return (as_fingerprinted_now(saved.get("fingerprint", {}), "analyze") == _normalised(stage_fingerprint(recipe, "analyze"))
            and saved.get("settings") == _normalised(settings)
            and made_from_current_weights(out, saved, recipe, "analyze"))


def start(out: Path) -> None:
    """Before (re)writing a mode's output: whatever is there stops counting as finished."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)


def mark_done(out: Path, recipe: Recipe, settings: dict, sae_weights: str | None) -> None:
    """`sae_weights`: the digest of the SAE files taken before the mode read them
    (artifacts.trained_weights_digest)."""
    mark_complete(out, recipe, "analyze", settings=_normalised(settings), sae_weights=sae_weights)
