"""Complete-markers for stage outputs, so re-runs skip finished work and refuse foreign work.

A stage writes its files under temporary names, renames them, and only then writes `COMPLETE`:
a directory without the marker is unfinished, whatever else it holds. The marker records a
fingerprint of the recipe sections the stage depends on, so `sae run` can tell "already done"
(skip) from "done for a different recipe" (refuse, naming the keys that differ) -- silently
reusing activations of another hook point would poison every later stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from framework.config import Recipe, RecipeError, load_recipe, recipe_to_dict
from framework.distributed import process_tag

MARKER = "COMPLETE"
log = logging.getLogger(__name__)

# Which recipe sections determine each stage's output (its inputs included, transitively).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "pretrain": ("text", "lm", "pretrain"),
    "harvest": ("text", "lm", "harvest"),
    "train": ("text", "lm", "harvest", "sae", "train"),
    "eval": ("text", "lm", "harvest", "sae", "train", "eval"),
    "analyze": ("text", "lm", "harvest", "sae", "train", "analyze", "seed"),  # seed: its random examples
    "export": ("text", "lm", "harvest", "sae", "train", "export"),
}
# Fields that change how or where a stage runs, not what it produces: a store moved to
# another directory, or trained on more GPUs, is still the same experiment.
VOLATILE = {
    "train": ("wandb", "log_every", "num_workers", "devices", "num_nodes", "strategy", "feature_shards", "deepspeed_stage",
              "checkpoint_every", "output_dir", "cuda_graphs"),
    "harvest": ("batch_size", "verify_on_read", "output_dir"),
    "lm": ("device", "path"),
    "eval": ("output_dir",),
    # The modes other than "features" write elsewhere (their own markers record their settings);
    # autointerp (analyze.autointerp=true, or its mode) adds to a finished features analysis and
    # keys its scores by its own settings (autointerp/cache.json).
    "analyze": ("output_dir", "save_every", "mode", "split_feature", "split_candidates", "split_min_correlation",
                "other_workdir", "other_sae_name", "ceiling_sae", "ultralow_log10_density",
                "autointerp", "autointerp_model", "autointerp_api_key_env", "autointerp_n_features",
                "autointerp_api_model", "autointerp_explain_examples", "autointerp_simulate_examples"),
    "export": ("output_dir",),
}
# Keys of a section that one stage does not read: pretraining trains and saves in float32
# whatever lm.dtype says (the dtype later stages load the LM in), so an LM pretrained once serves
# recipes of any lm.dtype. Dropped from recorded fingerprints too.
NOT_READ_BY = {
    "pretrain": {"lm": ("dtype",)},
}
# Keys that were part of a stage's fingerprint in markers written before they joined VOLATILE,
# ignored when such a marker is read. Only these: a key made volatile for another reason
# (lm.path, whose LM is checked by its weights' hash where it matters) stays compared in old
# markers.
FORMERLY_FINGERPRINTED = {
    "analyze": ("autointerp", "autointerp_model", "autointerp_api_key_env", "autointerp_n_features"),
}
# Keys added to fingerprints after outputs were made, with the value those outputs implicitly
# had: a recorded fingerprint without one is read as having that value. So a store harvested
# before harvest.context_order existed counts as `source` order: a recipe asking for that keeps
# using it, and the default (shuffled) is refused naming the key. A top-level key (no dot) is
# added only to the fingerprints of the stages that list it.
ADDED_LATER = {
    "harvest.context_order": "source",
    "seed": 0,  # analyze's (the default; earlier analyses did not record theirs)
}


# Stages that read the trained SAEs. Their markers also record a digest of the weights they read
# (`trained_weights_digest`): SAEs trained again under the same fingerprint (another
# train.devices, or the SAE directory deleted and trained again) make different weights, and
# output made from the earlier ones then reads as unfinished and is made again.
READS_TRAINED_SAES = ("eval", "analyze", "export")
SAE_FILES = ("config.json", "sae.safetensors")  # a trained SAE's directory, as `sae train` writes it


def files_sha256(paths: Iterable[Path]) -> str:
    """One sha256 over the files' bytes, in path order: an LM's weights, a bank's SAE files.
    Within a process a file unchanged since (same inode, size and modification times) is not read
    again: one `sae run` asks for the same LM's hash at every stage that loads or checks the LM
    (about 100 MB to read for SmolLM2), and for the SAEs' at each stage that reads them."""
    paths = sorted(paths)
    key = tuple((str(p.resolve()), *_version(p.stat())) for p in paths)
    if key not in _HASHED:
        digest = hashlib.sha256()
        for path in paths:
            with path.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


_HASHED: dict[tuple, str] = {}  # files_sha256's results, by the files' paths and _version


def _version(stat) -> tuple[int, ...]:
    """What changes when a file is rewritten: a new file renamed over it (another inode), or
    bytes written in place (its size or modification time)."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def trained_weights_digest(recipe: Recipe, stage: str) -> str | None:
    """A digest of the SAE files `stage` reads: each bank SAE's config.json and sae.safetensors,
    or, for eval and analyze with eval.sae_path set, that SAELens directory's cfg.json and
    sae_weights.safetensors (export always reads the bank). None when any is missing: the stage's
    own loader says what to do about that."""
    if recipe.eval.sae_path and stage != "export":
        root = Path(recipe.eval.sae_path)
        return files_digest([root / "cfg.json", root / "sae_weights.safetensors"])
    root = recipe.path("sae")
    return files_digest([root / cfg.name / name for cfg in recipe.sae_configs() for name in SAE_FILES])


def files_digest(files: list[Path]) -> str | None:
    """The first 16 hex digits of `files_sha256`, or None when any of the files is missing."""
    return files_sha256(files)[:16] if all(f.is_file() for f in files) else None


def load_saved_recipe(path: str | os.PathLike) -> Recipe:
    """A recipe.yaml an output saved beside itself. Keys added since (ADDED_LATER) that it lacks
    read as the value that output had, not today's default: a workdir's recipe from before
    harvest.context_order describes source-order activations, and its SAEs are that recipe's."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # noqa: BLE001 -- YAML's parser errors, OmegaConf's, a file that is not text
        raise RecipeError(f"{path} is not a readable recipe ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from None
    if not isinstance(saved, dict):
        raise RecipeError(f"{path} is not a recipe (a YAML mapping of sections)")
    missing = []
    for dotted, value in ADDED_LATER.items():
        node = saved
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(f"{dotted}={value}")
    return load_recipe(path, missing)


def stage_fingerprint(recipe: Recipe, stage: str) -> dict:
    data = recipe_to_dict(recipe)
    if not data["sae"]["hook_point"]:  # the default: the first harvested hook point
        data["sae"]["hook_point"] = data["harvest"]["hook_points"][0]
    picked = {}
    for section in STAGE_SECTIONS[stage]:
        if not isinstance(data[section], dict):  # a top-level value (seed)
            picked[section] = data[section]
            continue
        values = dict(data[section])
        for key in (*VOLATILE.get(section, ()), *NOT_READ_BY.get(stage, {}).get(section, ())):
            values.pop(key, None)
        picked[section] = values
    return picked


def fingerprint_digest(fingerprint: dict) -> str:
    """A short, stable name of a fingerprint (`stage_fingerprint`): the first 16 hex digits of the
    sha256 of its JSON with sorted keys. The `digest` a COMPLETE marker records, and what other
    outputs carry to say which recipe made them (an export's `metadata.framework_export`; the
    analysis's resumable stream state, with the SAE weights' digest beside the fingerprint)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {vb!r} there, {va!r} here")
    return out


def as_fingerprinted_now(fingerprint: dict, stage: str) -> dict:
    """A recorded fingerprint of `stage` less FORMERLY_FINGERPRINTED (output finished before
    those keys became volatile still counts as this recipe's) and NOT_READ_BY, and with the
    ADDED_LATER keys it lacks."""
    def dropped(section: str) -> tuple[str, ...]:
        return (*FORMERLY_FINGERPRINTED.get(section, ()), *NOT_READ_BY.get(stage, {}).get(section, ()))

    now = {section: {k: v for k, v in values.items() if k not in dropped(section)}
           if isinstance(values, dict) else values for section, values in fingerprint.items()}
    for dotted, value in ADDED_LATER.items():
        section, _, key = dotted.rpartition(".")
        if not section:
            if key in STAGE_SECTIONS[stage]:
                now.setdefault(key, value)
        elif isinstance(now.get(section), dict):
            now[section].setdefault(key, value)
    return now


def differences_from(recorded: dict, recipe: Recipe, stage: str) -> list[str]:
    """How a recorded fingerprint of `stage` differs from this recipe's, one "key: value there,
    value here" each; empty when they are the same."""
    mine = json.loads(json.dumps(stage_fingerprint(recipe, stage), default=str))
    recorded = json.loads(json.dumps(as_fingerprinted_now(recorded, stage), default=str))
    if recorded == mine:
        return []
    return _diff(mine, recorded) or ["unknown differences"]


def mark_complete(directory: str | os.PathLike, recipe: Recipe, stage: str, **info) -> Path:
    """Write the COMPLETE marker. A stage that reads trained SAEs passes `sae_weights`, their
    digest taken before it read them (taken here, SAEs trained again meanwhile would be
    recorded as the ones the output was made from)."""
    directory = Path(directory)
    fingerprint = stage_fingerprint(recipe, stage)
    if stage in READS_TRAINED_SAES and "sae_weights" not in info:
        info["sae_weights"] = trained_weights_digest(recipe, stage)
    marker = directory / MARKER
    tmp = directory / f".{MARKER}.{process_tag()}.tmp"  # the process's own: two never share a temporary
    tmp.write_text(json.dumps({"stage": stage, "digest": fingerprint_digest(fingerprint), "fingerprint": fingerprint, **info}, indent=1, default=str))
    tmp.replace(marker)
    return marker


def read_marker(marker: Path) -> dict:
    try:
        return json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError):
        raise RecipeError(
            f"{marker} is damaged (not the JSON a stage writes when it finishes). Delete it and re-run the "
            f"stage: it checks what is there again (complete shards are skipped, training resumes from its "
            f"last checkpoint)"
        ) from None


def is_complete(directory: str | os.PathLike, recipe: Recipe, stage: str) -> bool:
    """True if `directory` holds this stage's finished output for this recipe, made (for the
    stages that read trained SAEs) from the SAE weights there now.

    Raises RecipeError if it holds finished output of a different recipe.
    """
    marker = Path(directory) / MARKER
    if not marker.is_file():
        return False
    saved = read_marker(marker)
    if saved.get("stage", stage) != stage:
        raise RecipeError(
            f"{directory} holds the output of `{saved['stage']}`, not of `{stage}`: give `{stage}` a directory of "
            f"its own (its output_dir, or workdir=...)"
        )
    fingerprint = stage_fingerprint(recipe, stage)
    recorded = as_fingerprinted_now(saved.get("fingerprint", {}), stage)
    if fingerprint_digest(fingerprint) in (saved.get("digest"), fingerprint_digest(recorded)):
        return made_from_current_weights(directory, saved, recipe, stage)
    differences = _diff(fingerprint, recorded)
    raise RecipeError(
        f"{directory} already holds `{stage}` output made with a different recipe "
        f"({'; '.join(differences[:5]) or 'unknown differences'}). "
        f"Point the recipe at another directory (workdir=... or the stage's output_dir), "
        f"or delete {directory} to redo it."
    )


def made_from_current_weights(directory: str | os.PathLike, saved: dict, recipe: Recipe, stage: str) -> bool:
    """Whether finished output of this recipe was made from the SAE weights there now. A marker
    from before the digest was recorded, or SAEs no longer there to compare, count as current."""
    made_from = saved.get("sae_weights")
    if stage not in READS_TRAINED_SAES or made_from is None:
        return True
    now = trained_weights_digest(recipe, stage)
    if now is None or now == made_from:
        return True
    log.warning("%s holds `%s` output of SAE weights that have changed since (trained again): it counts as "
                "unfinished", directory, stage)
    return False


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `path` under a temporary name and rename it: a reader sees the old file or the new
    one, never a half-written one. The temporary name is the process's own, so two processes
    writing the same file (array tasks rewriting a sweep's summary) do not write into each
    other's temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{process_tag()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def atomic_save_figure(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Save a matplotlib figure under a temporary name, close it, then rename."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{process_tag()}.tmp{path.suffix}")  # the suffix tells savefig the format
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
