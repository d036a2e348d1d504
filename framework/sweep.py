"""`sae sweep`: a grid or list of recipe overrides, each point in its own directory.

Points share what they can: unless a point changes the text, LM or harvest sections, every
point reads the base recipe's pretrained LM and activation store, which are made once. When
every swept key is an `sae.*` field, the sweep is one *bank* (training.module): all points
train together on the same batches in a single pass over the activations, which costs far
less than one pass per point. Otherwise points run one after another (or one per SLURM array
task with `--point N`, see launch/slurm.sbatch), and a re-run skips points whose stages are
complete.

Outputs in `{workdir}/sweep/`: one directory per point (or one bank), `summary.csv`,
`summary.md`, and `pareto.png` (L0 against loss explained).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
from pathlib import Path

from framework.artifacts import (
    MARKER,
    atomic_save_figure,
    atomic_write_text,
    differences_from,
    is_complete,
    read_marker,
)
from framework.config import (
    Recipe,
    RecipeError,
    bank_entries_setting,
    is_url,
    recipe_from_dict,
    recipe_to_dict,
    with_values,
)
from framework.distributed import current_rank
from framework.errors import FrameworkError
from framework.locks import output_locks
from framework.pipeline import run_stage

log = logging.getLogger(__name__)
# A point that changes none of these sections reuses the base recipe's LM / activations.
LM_SECTIONS = ("text.", "lm.", "pretrain.")
# A point with its own LM needs its own store too: activations are refused for other LM weights.
STORE_SECTIONS = (*LM_SECTIONS, "harvest.")
FAILED = "FAILED"  # in a point's directory: why its last run failed (removed when it runs again)
SUMMARY_METRICS = ("l0", "fvu", "mse", "loss_explained", "loss_explained_vs_mean", "kl_sae", "dead_fraction",
                   "dense_fraction")


def expand_points(recipe: Recipe) -> list[dict]:
    """Every point of the sweep: explicit points, each combined with every grid combination.
    Validated once per recipe and process (each point's recipe is built and checked: ~0.4 s a
    point, and `sae sweep` asks for the points several times before it starts)."""
    key = json.dumps(recipe_to_dict(recipe), sort_keys=True, default=str)
    if key not in _EXPANDED:
        _EXPANDED[key] = _expand_points(recipe)
    return copy.deepcopy(_EXPANDED[key])


_EXPANDED: dict[str, list[dict]] = {}


def _expand_points(recipe: Recipe) -> list[dict]:
    grid = _dotted(recipe.sweep.grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise RecipeError(f"sweep.grid.{key} must be a non-empty list of values, got {values!r}")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    points = [_dotted(p, f"sweep.points[{i}]") for i, p in enumerate(recipe.sweep.points)] or [{}]
    for i, point in enumerate(points):
        if both := [key for key in point if key in grid]:
            raise RecipeError(
                f"sweep.points[{i}] sets {', '.join(both)}, which sweep.grid sweeps too: the grid's values would "
                f"replace the point's. Sweep each key in one place (sweep.points or sweep.grid)"
            )
    expanded = [p | c for p in points for c in combos]
    if expanded == [{}]:
        raise RecipeError("the sweep is empty: set sweep.grid (key: [values]) or sweep.points")
    for key in sweep_keys(expanded):
        if key == "sae.name" or key.startswith("sweep."):
            raise RecipeError(
                f"{key} cannot be swept: {'each point names its SAE after its own values' if key == 'sae.name' else 'a point runs no sweep'}"
                f"; remove it from sweep.grid / sweep.points"
            )
    for i, point in enumerate(expanded):
        if point in expanded[:i]:  # 1.0e-3 and 0.001 are one value
            raise RecipeError(
                f"the sweep has the point {point} twice (points {expanded.index(point)} and {i}): both would "
                f"train the same thing in one directory. Remove the repeated value from sweep.grid or sweep.points"
            )
    keys = sweep_keys(expanded)
    names = [point_name(p, keys) for p in expanded]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RecipeError(
                f"sweep points {expanded[names.index(name)]} and {expanded[i]} would share the directory "
                f"{name!r}; give them values that differ in more than '/', '.' or spaces"
            )
    for i, point in enumerate(expanded):  # every key and value validated now, not hours into the sweep
        try:
            _check_not_overridden_by_bank(_apply(recipe, point), point)
        except RecipeError as err:
            raise RecipeError(f"sweep point {i} ({point}, from sweep.grid / sweep.points): {err}") from None
    return expanded


def _dotted(mapping, where: str = "sweep.grid") -> dict:
    """{dotted key: value}, nested mappings flattened: `sae: {l1_coefficient: [...]}` (YAML's
    nested form, or sweep.grid.sae.l1_coefficient=[...] on the command line) is the key
    sae.l1_coefficient."""
    if not isinstance(mapping, dict):
        raise RecipeError(f"{where} must be a mapping of dotted recipe keys to values, got {mapping!r}")
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            flat |= {f"{key}.{inner}": v for inner, v in _dotted(value, where).items()}
        else:
            flat[str(key)] = value
    return flat


def check_overrides_not_swept(recipe: Recipe, overrides: list[str]) -> None:
    """Refuse a command-line override of a key that the sweep sets at every point: each point's
    value would replace it, and the override would change nothing (a key only some points set
    still reaches the others)."""
    points = expand_points(recipe)
    swept = {key for key in sweep_keys(points) if all(key in point for point in points)}
    given = [key for key in (item.split("=", 1)[0].strip() for item in overrides) if key in swept]
    if given:
        raise RecipeError(
            f"{', '.join(given)} is swept (sweep.grid / sweep.points): every point sets its own value, so the "
            f"override would change nothing. Change the sweep's values instead (e.g. 'sweep.grid={{{given[0]}: "
            f"[...]}}'), or drop the override"
        )


def _check_not_overridden_by_bank(point_recipe: Recipe, point: dict) -> None:
    """A swept `sae.*` key that a `train.bank` entry also sets never reaches that SAE: the entry
    overrides the `sae` section, and the points would train the same dictionaries."""
    for key in point:
        if setting := bank_entries_setting(point_recipe, key):
            field_name = key[len("sae."):]
            raise RecipeError(
                f"sweep key {key} is overridden by train.bank entries {setting}, which set {field_name} "
                f"themselves: every point would train the bank's values under different labels. Sweep "
                f"train.bank instead (sweep.points of {{train.bank: [...]}}), remove {field_name} from those "
                f"entries, or remove train.bank"
            )


def sweep_keys(points: list[dict]) -> list[str]:
    """Every key swept, in order of first appearance."""
    return list(dict.fromkeys(k for point in points for k in point))


def point_name(point: dict, keys: list[str] | None = None) -> str:
    """The point's directory name: each key by the shortest dotted suffix that no other key of
    the sweep (`keys`; default the point's own) shares, so that train.n_tokens and eval.n_tokens
    stay apart while sae.l1_coefficient is l1_coefficient."""
    if not point:
        return "base"  # the base recipe as it is (an empty entry of sweep.points)
    labels = _short_labels(list(dict.fromkeys([*(keys or []), *point])))
    parts = [f"{labels[key]}={value}" for key, value in point.items()]
    return "_".join(parts).replace("/", "-").replace(".", "p").replace(" ", "")


def _short_labels(keys: list[str]) -> dict[str, str]:
    labels = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = parts[-n:]
            if not any(other != key and other.split(".")[-n:] == suffix for other in keys):
                break
        labels[key] = "-".join(suffix)  # the name turns dots into p
    return labels


def _apply(recipe: Recipe, point: dict, workdir: Path | None = None) -> Recipe:
    """The recipe of one point; with `workdir`, placed there and sharing the base's LM and
    activations unless the point changes how they are made."""
    data = recipe_to_dict(recipe)
    data["sweep"] = {}
    if workdir is not None:
        # Shared: the base's LM and store. Changed: the point's own, in its workdir (not in a
        # directory the base recipe names, where the base's would be overwritten).
        data["lm"]["path"] = "" if _changes(point, LM_SECTIONS) else str(recipe.path("lm"))
        if _changes(point, STORE_SECTIONS):
            # Its own store in its workdir, even where the base reads one from a URL: training
            # does not check a remote store's recipe, and would take the base's rows.
            data["harvest"]["output_dir"] = ""
        else:
            data["harvest"]["output_dir"] = recipe.store_location()
        data["workdir"] = str(workdir)
        for section in ("train", "eval", "analyze", "export"):
            data[section]["output_dir"] = ""
    return with_values(recipe_from_dict(data), point)


def _changes(point: dict, sections: tuple[str, ...]) -> bool:
    return any(key.startswith(sections) for key in point)


def point_stages(recipe: Recipe, point: dict) -> list[str]:
    """What a point runs itself: its own pretraining and harvest only if it changes them."""
    own, point_recipe = [], _apply(recipe, point)  # the point's: it may change the LM or the mode
    if _changes(point, LM_SECTIONS) and point_recipe.pretrains_lm:
        own.append("pretrain")
    if _changes(point, STORE_SECTIONS) and point_recipe.harvest.mode == "shards":
        own.append("harvest")
    return own + list(recipe.sweep.stages)


def _is_bank_sweep(recipe: Recipe, points: list[dict]) -> bool:
    return (not recipe.train.bank and all(k.startswith("sae.") for p in points for k in p)
            and set(recipe.sweep.stages) <= {"train", "eval", "export", "analyze"})


def _bank_recipe(recipe: Recipe, points: list[dict], workdir: Path) -> Recipe:
    data = recipe_to_dict(_apply(recipe, {}, workdir))
    keys = sweep_keys(points)
    data["train"]["bank"] = [{"name": point_name(p, keys), **{k[len("sae."):]: v for k, v in p.items()}} for p in points]
    return recipe_from_dict(data)


def _shared_stages(recipe: Recipe, points: list[dict]) -> list[str]:
    """The base recipe's stages that these points share: pretraining (the built-in LM) and the
    harvest, each when at least one point does not make its own."""
    stages = []
    if recipe.pretrains_lm and any(not _changes(p, LM_SECTIONS) for p in points):
        stages.append("pretrain")
    if recipe.harvest.mode == "shards" and any(not _changes(p, STORE_SECTIONS) for p in points):
        stages.append("harvest")
    return stages


def shared_outputs(recipe: Recipe, points: list[dict] | None = None) -> list[Path]:
    """The directories outside `{workdir}/sweep` that a sweep writes: the base recipe's LM and
    activation store, which its points share (a store given as a URL is only read)."""
    stages = _shared_stages(recipe, expand_points(recipe) if points is None else points)
    dirs = [recipe.path("lm")] if "pretrain" in stages else []
    if "harvest" in stages and not is_url(recipe.harvest.output_dir):
        dirs.append(recipe.path("activations"))
    return dirs


def _prepare_shared(recipe: Recipe, points: list[dict]) -> None:
    """Pretrain and harvest once, for the points that share the base recipe's."""
    for stage in _shared_stages(recipe, points):
        run_stage(stage, recipe)


def sweep(recipe: Recipe, point_index: int | None = None) -> Path:
    """Run the sweep (or only point `point_index`, for one SLURM array task); returns its dir."""
    points = expand_points(recipe)
    keys = sweep_keys(points)
    root = Path(recipe.workdir) / "sweep"
    root.mkdir(parents=True, exist_ok=True)
    if point_index is not None:
        _check_point_index(point_index, points)
    if point_index is None and _is_bank_sweep(recipe, points):
        log.info("sweep: %d points over sae.* keys train as one bank in a single pass", len(points))
        bank = _bank_recipe(recipe, points, root / "bank")
        _check_bank_is_these_points(bank, root / "bank")
        _prepare_shared(recipe, points)
        for stage in recipe.sweep.stages:
            if stage != "analyze":
                run_stage(stage, bank)
                continue
            for point in points:  # the analysis reads one SAE: each point's in a directory of its own
                name = point_name(point, keys)
                run_stage(stage, with_values(bank, {"analyze.sae_name": name,
                                                    "analyze.output_dir": str(root / "bank" / "analysis" / name)}))
        results = [(p, "", _read_metrics(bank, point_name(p, keys))) for p in points]
    else:
        selected = [points[point_index]] if point_index is not None else points
        if point_index is None:  # the CLI holds the locks of the shared LM and store
            _prepare_shared(recipe, selected)
        else:
            # One SLURM array task per point: every task would pretrain and harvest the shared LM
            # and store at once, into the same directories. The first makes them; the others
            # wait for its lock, then find them complete.
            with output_locks(shared_outputs(recipe, selected), "sweep", wait=True):
                _prepare_shared(recipe, selected)
        failed: dict[str, str] = {}
        for i, point in enumerate(selected):
            name = point_name(point, keys)
            point_recipe = _apply(recipe, point, root / name)
            log.info("sweep point %d/%d: %s", i + 1, len(selected), name)
            (root / name / FAILED).unlink(missing_ok=True)
            try:
                for stage in point_stages(recipe, point):
                    run_stage(stage, point_recipe)
            except FrameworkError as err:
                if current_rank().world > 1:
                    # Under torchrun the other ranks wait for rank 0's stages, or are inside the
                    # point's training: going on to the next point alone would hang them.
                    raise
                # One point's failure (a diverged run, say) stops neither the others nor the summary
                failed[name] = str(err)
                (root / name).mkdir(parents=True, exist_ok=True)  # (a point can fail before writing anything)
                atomic_write_text(root / name / FAILED, str(err))  # for the summaries of other tasks, too
                log.error("sweep point %s failed: %s", name, err)
        summarise(recipe, points, root)
        if failed:
            listed = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            raise FrameworkError(
                f"{len(failed)} of {len(selected)} sweep points failed ({listed}). The others finished; "
                f"{root / 'summary.md'} lists them all. Once each failure's cause is dealt with (for a diverged "
                f"run: its swept values, or train.lr / train.grad_clip), run the same command again: finished "
                f"points are skipped"
            )
        return root
    write_summary(root, results)
    return root


def summarise(recipe: Recipe, points: list[dict], root: Path) -> None:
    """Read every point's metrics (and the FAILED note of a point whose last run failed) and
    write the summary, one process at a time: SLURM array tasks (`--point N`) finishing together
    each read, then rename their summary into place, and a task that read before another's point
    finished would put back a summary without it."""
    keys = sweep_keys(points)
    with output_locks([root / "summary.csv"], "sweep", wait=True):
        failed = {}
        for point in points:
            note = root / point_name(point, keys) / FAILED
            if note.is_file():
                failed[point_name(point, keys)] = note.read_text()
        write_summary(root, _point_results(recipe, points, root), failed)


def _check_bank_is_these_points(bank: Recipe, directory: Path) -> None:
    """A bank sweep whose recipe changed (a grid value added, another train.lr) finds the bank
    trained by the earlier version: say what to do in a sweep, whose output directories are
    its own (the stage's advice, another output_dir, cannot be followed there)."""
    marker = bank.path("sae") / MARKER
    saved = read_marker(marker) if marker.is_file() else {}
    if saved.get("stage") != "train":
        return  # nothing trained yet (or not a bank: the train stage says so)
    differences = differences_from(saved.get("fingerprint", {}), bank, "train")
    if differences:
        raise RecipeError(
            f"the sweep's bank in {directory} was trained by another version of this sweep "
            f"({'; '.join(differences[:5])}). A bank trains its points together, so it cannot take new points "
            f"or settings: delete {directory} to train it again, or give this version its own workdir=..."
        )


def _point_results(recipe: Recipe, points: list[dict], root: Path) -> list[tuple[dict, str, dict]]:
    """(point, SAE, metrics) for each SAE each point trains (the SAE "" where the recipe trains
    one): from the point's own directory, or, for a point only an earlier bank sweep trained (a
    `--point N` run after it), from the bank's, so that its summary row stays filled."""
    keys = sweep_keys(points)
    bank = _bank_recipe(recipe, points, root / "bank") if (root / "bank").is_dir() and _is_bank_sweep(recipe, points) else None
    results = []
    for point in points:
        name = point_name(point, keys)
        point_recipe = _apply(recipe, point, root / name)
        saes = [c.name for c in point_recipe.sae_configs()]
        for sae in saes:
            metrics = _read_metrics(point_recipe, sae)
            if not metrics and bank is not None:
                metrics = _read_metrics(bank, name)
            results.append((point, sae if len(saes) > 1 else "", metrics))
    return results


def point_directory(recipe: Recipe, point_index: int) -> Path:
    """The directory of point `point_index` (0-based), where `sae sweep --point N` runs the
    point's stages; the CLI locks it, so that two processes running the same point refuse each
    other while array tasks running other points share the sweep directory."""
    directories = point_directories(recipe)
    _check_point_index(point_index, directories)
    return directories[point_index]


def point_directories(recipe: Recipe) -> list[Path]:
    """Every point's directory, in point order."""
    points = expand_points(recipe)
    keys = sweep_keys(points)
    return [Path(recipe.workdir) / "sweep" / point_name(point, keys) for point in points]


def _check_point_index(point_index: int, points: list) -> None:
    if not 0 <= point_index < len(points):
        raise RecipeError(f"--point {point_index} is out of range: the sweep has {len(points)} points (0..{len(points) - 1})")


def _read_metrics(recipe: Recipe, name: str) -> dict:
    """SAE `name`'s metrics from `sae eval`, else from training; only from output this recipe
    finished (a point's directory can hold an earlier version of the sweep's output)."""
    eval_dir, sae_dir = recipe.path("eval"), recipe.path("sae")
    if (eval_dir / "metrics.json").is_file() and _finished_by(recipe, eval_dir, "eval"):
        return json.loads((eval_dir / "metrics.json").read_text()).get(name, {})
    train_file = sae_dir / name / "metrics.json"
    if train_file.is_file() and _finished_by(recipe, sae_dir, "train"):
        return json.loads(train_file.read_text())
    return {}


def _finished_by(recipe: Recipe, directory: Path, stage: str) -> bool:
    try:
        return is_complete(directory, recipe, stage)
    except RecipeError:  # another recipe's: its numbers are not this point's
        return False


def write_summary(root: Path, results: list[tuple[dict, str, dict]], failed: dict[str, str] | None = None) -> None:
    """summary.csv and summary.md (a row per point, or per point and SAE where the recipe trains
    a bank: its values, metrics and status: "done", "failed: reason", or "not run" for one with
    no finished output yet) and pareto.png."""
    keys = sweep_keys([point for point, _, _ in results])
    by_sae = any(sae for _, sae, _ in results)
    header = ["point", *keys, *(["sae"] if by_sae else []), *SUMMARY_METRICS, "status"]
    rows = []
    for point, sae, metrics in results:
        name = point_name(point, keys)
        status = "done" if metrics else "not run"
        if name in (failed or {}):  # one line, no table separators: the reason is the summary.md cell
            status = "failed: " + " ".join(failed[name].split()).replace("|", "/")
        rows.append([name, *[point.get(k, "") for k in keys], *([sae] if by_sae else []),
                     *[metrics.get(s, "") for s in SUMMARY_METRICS], status])
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    # Written under a temporary name and renamed: SLURM array tasks (`--point N`) finishing
    # together each rewrite the summary, and a reader never sees a half-written one.
    atomic_write_text(root / "summary.csv", buffer.getvalue())
    lines = ["# Sweep summary", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    lines += ["", "![L0 vs loss explained](pareto.png)", ""]
    atomic_write_text(root / "summary.md", "\n".join(lines))
    plot_pareto(results, root / "pareto.png")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def plot_pareto(results: list[tuple[dict, str, dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_key = "loss_explained" if any("loss_explained" in m for _, _, m in results) else "fvu"
    keys = sweep_keys([p for p, _, _ in results])
    points = [(m["l0"], m[y_key], "/".join(filter(None, [point_name(p, keys), sae])))
              for p, sae, m in results if "l0" in m and y_key in m]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], color="#3b6ea5")
        for x, y, label in points:
            ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        frontier = _pareto_front([(x, y) for x, y, _ in points], maximise_y=y_key == "loss_explained")
        ax.plot(*zip(*frontier), color="#c44e52", linewidth=1, label="Pareto front")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (features active per token)")
    ax.set_ylabel(y_key.replace("_", " "))
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def _pareto_front(points: list[tuple[float, float]], maximise_y: bool) -> list[tuple[float, float]]:
    """Points not beaten by another with lower L0 and better y."""
    better = (lambda a, b: a > b) if maximise_y else (lambda a, b: a < b)
    front, best = [], None
    for x, y in sorted(points):
        if best is None or better(y, best):
            front.append((x, y))
            best = y
    return front

