"""User-facing errors: each message names the problem and what to do about it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class FrameworkError(Exception):
    """An input problem the user can fix (recipe, files, shards, checkpoints, model names)."""


class RecipeError(FrameworkError, ValueError):
    """A recipe that cannot be run."""


class DataError(FrameworkError):
    """Missing, truncated or corrupt data: shards, manifests, corpora."""


class CheckpointError(FrameworkError):
    """A checkpoint that does not belong to this recipe or cannot be read."""


class TrainingError(FrameworkError):
    """Training cannot continue (a NaN loss, a diverged run)."""
