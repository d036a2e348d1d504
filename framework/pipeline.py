"""`sae run`: every stage of a recipe in order, skipping the ones already complete.

Each stage still decides for itself whether its output is complete (and refuses output made by
a different recipe), so `sae run` after an interruption redoes only what is missing.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from framework.artifacts import MARKER, is_complete
from framework.config import Recipe, RecipeError, save_recipe
from framework.distributed import PARALLEL_STAGES, current_rank, on_rank_zero

log = logging.getLogger(__name__)
LIVE_HARVEST = "(live: generated while training)"  # harvest's output with harvest.mode=live

STAGE_FUNCTIONS = {
    "pretrain": ("framework.lm.pretrain", "pretrain"),
    "harvest": ("framework.activations.harvest", "harvest"),
    "train": ("framework.training.train", "train"),
    "eval": ("framework.evaluation.evaluate", "evaluate"),
    "analyze": ("framework.analysis.analyze", "analyze"),
    "export": ("framework.export", "export"),
}


# stage -> the recipe.path() directory it writes
STAGE_OUTPUTS = {"pretrain": "lm", "harvest": "activations", "train": "sae", "eval": "eval",
                 "analyze": "analysis", "export": "export"}
REPORTED_STAGES = ("pretrain", "train", "eval", "analyze")  # those that write a report.md of their own
EARLIER = "earlier run"  # report.md's time column for a complete output of an earlier run


def run_stage(stage: str, recipe: Recipe) -> Path | str | None:
    """Run one stage; under torchrun a stage that does not divide its work over ranks runs on
    rank 0 alone, and returns None on the others (`distributed.on_rank_zero`)."""
    module_name, function_name = STAGE_FUNCTIONS[stage]
    return call_stage(stage, recipe, getattr(importlib.import_module(module_name), function_name))


def call_stage(stage: str, recipe: Recipe, function: Callable[[Recipe], object]) -> object:
    """`function` (stage `stage`'s) on this recipe: on every rank where the stage divides its
    work over ranks, on rank 0 alone otherwise."""
    if stage in PARALLEL_STAGES:
        return function(recipe)
    return on_rank_zero(stage, recipe.workdir, lambda: function(recipe))


def stages_for(recipe: Recipe) -> list[str]:
    """The recipe's stages, minus pretraining when the LM is not the built-in one."""
    return [s for s in recipe.run.stages if s != "pretrain" or recipe.pretrains_lm]


def run(recipe: Recipe) -> Path:
    workdir = Path(recipe.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, tuple[Path | str, float]] = {}  # str: a store read from a URL, or LIVE_HARVEST
    for stage in stages_for(recipe):
        log.info("== %s ==", stage)
        start = time.perf_counter()
        output = run_stage(stage, recipe)
        if stage == "harvest" and recipe.harvest.mode == "live":
            output = LIVE_HARVEST  # nothing was written: training generates its activations itself
        outputs[stage] = (output, time.perf_counter() - start)
    report = workdir / "report.md"
    if current_rank().is_main:  # under torchrun every rank ran the parallel stages; one writes and prints
        # Once every stage is done: {workdir}/recipe.yaml describes the last run that finished
        # here (universality's analyze.other_workdir reads it), not an invocation a stage refused.
        save_recipe(recipe, workdir)
        report.write_text(pipeline_report(recipe, outputs))
        print(summary_text(outputs, report))
    return report


def summary_text(outputs: dict[str, tuple[Path | str, float]], report: Path) -> str:
    lines = ["", "Done. Where everything went:"]
    lines += [f"  {stage:<9} {path}  ({seconds:.0f}s)" for stage, (path, seconds) in outputs.items()]
    lines += [f"  report    {report}", ""]
    return "\n".join(lines)


def earlier_outputs(recipe: Recipe, outputs: dict[str, tuple[Path | str, float]]) -> dict[str, tuple[Path, str]]:
    """The directories of stages that did not run this time but that an earlier run left
    (`run.stages=[eval]` after a full run), each with its state: "earlier run" when its COMPLETE
    marker is this recipe's, whose report.md keeps its section; otherwise why it is not
    reported (a stage stopped before its marker can leave a report.md of a half-written output,
    and another recipe's output is not this recipe's result)."""
    earlier = {}
    for stage in REPORTED_STAGES:
        if stage in outputs or (stage == "pretrain" and not recipe.pretrains_lm):
            continue
        directory = recipe.path(STAGE_OUTPUTS[stage])
        if not directory.is_dir():
            continue
        try:
            if is_complete(directory, recipe, stage):
                state = EARLIER
            elif (directory / MARKER).is_file():
                state = "made from SAE weights that changed since: not reported"
            else:
                state = "incomplete (no COMPLETE marker): not reported"
        except RecipeError:
            state = "made by a different recipe: not reported"
        earlier[stage] = (directory, state)
    return earlier


def pipeline_report(recipe: Recipe, outputs: dict[str, tuple[Path | str, float]]) -> str:
    """One markdown page linking each stage's own report, with the headline numbers inline: the
    stages run now and, from earlier runs, those whose output is there."""
    workdir = Path(recipe.workdir).resolve()
    earlier = earlier_outputs(recipe, outputs)
    lines = [f"# {recipe.name}", "", "| stage | output | time |", "|---|---|---|"]
    for stage in STAGE_FUNCTIONS:
        if stage in outputs:
            path, seconds = outputs[stage]
            lines.append(f"| {stage} | `{path}` | {seconds:.0f}s |")
        elif stage in earlier:
            directory, state = earlier[stage]
            lines.append(f"| {stage} | `{directory}` | {state} |")
    for stage in REPORTED_STAGES:
        if stage in outputs:
            directory = Path(outputs[stage][0])
            directory = directory if directory.is_dir() else directory.parent
        elif stage in earlier and earlier[stage][1] == EARLIER:
            directory = earlier[stage][0]
        else:
            continue
        sub = directory / "report.md"
        if sub.is_file():
            text = sub.read_text()
            rel = directory.resolve().relative_to(workdir) if directory.resolve().is_relative_to(workdir) else directory
            # Re-root the sub-report's relative links (plots) so they open from the workdir.
            text = text.replace("](", f"]({rel}/").replace(f"]({rel}/http", "](http")
            lines += ["", text.replace("# ", "## ", 1)]
    return "\n".join(lines) + "\n"
