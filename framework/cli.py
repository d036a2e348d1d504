"""The `sae` command: parse, load the recipe, call one stage function. No logic lives here."""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import logging
import signal
import sys
from pathlib import Path

from framework.config import is_url, load_recipe
from framework.distributed import current_rank
from framework.errors import FrameworkError
from framework.locks import output_locks
from framework.memory import keep_freed_memory

# stage -> (module, function, what it reads and writes)
STAGES: dict[str, tuple[str, str, str]] = {
    "pretrain": (
        "framework.lm.pretrain", "pretrain",
        "Train the built-in one-layer LM on the recipe's text source.\n"
        "Reads: text.*, lm.builtin.*, pretrain.*. Writes: {workdir}/lm (model.safetensors, "
        "tokenizer.json, config.json, metrics.json, logs).",
    ),
    "harvest": (
        "framework.activations.harvest", "harvest",
        "Run the base LM over text and write activation shards (WebDataset tar + manifest.json).\n"
        "Reads: the LM (lm.*), text.*, harvest.*. Writes: {workdir}/activations (train shards, "
        "heldout/ shards). Re-running resumes: complete shards are skipped.\n"
        "--verify checks every shard's sha256 against the manifest instead.",
    ),
    "train": (
        "framework.training.train", "train",
        "Train the recipe's SAE bank on the activation shards (or live activations).\n"
        "Reads: {workdir}/activations, sae.*, train.*. Writes: {workdir}/sae/ (checkpoints/, "
        "logs/ with W&B + CSV, report.md, training_curves.png) and {workdir}/sae/<name>/ per SAE "
        "(sae.safetensors, metrics.json, density.png). Resumes from the last checkpoint.",
    ),
    "eval": (
        "framework.evaluation.evaluate", "evaluate",
        "Evaluate trained SAEs on held-out data: MSE, FVU, L0, dead/dense fractions, loss "
        "explained and KL with the LM.\nReads: {workdir}/sae (or eval.sae_path), the LM. "
        "Writes: {workdir}/eval (metrics.json, report.md).",
    ),
    "analyze": (
        "framework.analysis.analyze", "analyze",
        "Find each feature's top examples, logit effects and neuron composition; write HTML "
        "dashboards.\nReads: {workdir}/sae, the LM, text. Writes: {workdir}/analysis.",
    ),
    "export": (
        "framework.export", "export",
        "Export each SAE as safetensors + cfg.json in SAELens's format.\n"
        "Reads: {workdir}/sae. Writes: {workdir}/export/<name>/.",
    ),
    "sweep": (
        "framework.sweep", "sweep",
        "Run every point of the recipe's sweep (sweep.grid, sweep.points) in its own directory, "
        "or, when only sae.* keys vary, train them all as one bank; skip finished points; write "
        "summary.md, summary.csv and a Pareto plot.\nReads: sweep.*. Writes: {workdir}/sweep/.",
    ),
    "run": (
        "framework.pipeline", "run",
        "Run the recipe's stages (run.stages) in order, skipping stages already complete.\n"
        "Writes: everything under {workdir}, and {workdir}/report.md.",
    ),
}


def _call_stage(stage: str, recipe, args) -> object:
    module_name, function_name, _ = STAGES[stage]
    function = getattr(importlib.import_module(module_name), function_name)
    if _as_program:  # see program(): the imports are done, the stage's own objects come and go
        gc.freeze()
        gc.enable()
    if stage == "harvest" and args.verify:
        from framework.activations.verify import verify_store

        return verify_store(recipe)
    if stage == "sweep" and args.point is not None:
        return function(recipe, point_index=args.point)
    from framework.pipeline import STAGE_FUNCTIONS, call_stage

    if stage in STAGE_FUNCTIONS:  # as `sae run` runs it: under torchrun, some stages on rank 0 alone
        return call_stage(stage, recipe, function)
    return function(recipe)


def _written_dirs(stage: str, recipe, args) -> list[Path]:
    """The directories `sae STAGE` writes, to lock against a second process writing them."""
    from framework.pipeline import STAGE_OUTPUTS, stages_for

    if stage == "run":
        return [d for s in stages_for(recipe) for d in _written_dirs(s, recipe, args)]
    if stage == "sweep":
        from framework.sweep import point_directories, point_directory, shared_outputs

        if args.point is None:  # every point's directory too: a `--point N` run beside it is refused
            return [Path(recipe.workdir) / "sweep", *point_directories(recipe), *shared_outputs(recipe)]
        # SLURM array tasks (one --point each) share the sweep directory, so it is not locked;
        # the point's own directory, where its stages write, is: a second process running the
        # same point is refused, other points run side by side. The shared LM and store they may
        # make, each task waits for (framework.sweep).
        return [point_directory(recipe, args.point)]
    if stage == "pretrain" and not recipe.pretrains_lm:
        return []  # it writes nothing then (Recipe.pretrains_lm)
    if stage == "harvest" and recipe.harvest.output_dir and is_url(recipe.harvest.output_dir):
        # Nothing to lock: with a URL, harvest (and --verify) only reads the store's manifest and
        # shards; it writes no local file, not even a cache (framework/activations/harvest.py).
        return []
    return [recipe.path(STAGE_OUTPUTS[stage])]


def _hooks(model: str) -> int:
    from framework.lm import list_hooks

    print("\n".join(list_hooks(model)))
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """A stage's parser: flags may come before, between or after the key=value overrides
    (`sae harvest RECIPE --verify workdir=...`). argparse's plain parsing ends the positionals at
    the first flag, so overrides after one were "unrecognized arguments"; and
    parse_intermixed_args cannot be used on the top-level parser, which has subcommands.

    Arguments it does not know are an error of this parser, not left over: argparse hands a
    subcommand's leftovers to the top-level parser, whose error read `sae: error: unrecognized
    arguments` with the top-level usage, naming neither the stage nor its flags."""

    _intermixed = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixed:  # parse_known_intermixed_args calls this itself
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False
        if extras:
            flags = ", ".join("/".join(action.option_strings) for action in self._actions if action.option_strings)
            overrides = any(action.dest == "overrides" for action in self._actions)
            self.error(f"unrecognized arguments: {' '.join(extras)} (the flags of {self.prog}: {flags}"
                       f"{'; recipe overrides are key=value' if overrides else ''})")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae",
        description="Train sparse autoencoders on language-model activations and study their features.",
        epilog="Every stage reads a recipe YAML; any field can be overridden: "
        "sae train recipes/quickstart.yaml sae.n_features=8192 train.output_dir=runs/quickstart/sae-8192 "
        "(a directory of its own: a stage refuses one that holds another recipe's output)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE", parser_class=_IntermixedParser)
    for stage, (_, _, help_text) in STAGES.items():
        p = sub.add_parser(stage, help=help_text.splitlines()[0], description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("recipe", help="recipe YAML (e.g. recipes/quickstart.yaml)")
        p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="recipe overrides (optional)")
        if stage == "harvest":
            p.add_argument("--verify", action="store_true", help="check shard checksums and exit")
        if stage == "sweep":
            p.add_argument("--point", type=int, default=None,
                           help="run only point N (0-based; one SLURM array task per point)")
    hooks = sub.add_parser("hooks", help="List a base LM's hook points and their widths.",
                           description="List a model's hook points with widths. MODEL is "
                           "builtin (its default shape; for a recipe's own shape pass the recipe), "
                           "smollm2, a local Hugging Face model directory or hub id, or a recipe YAML.")
    hooks.add_argument("model")
    return parser


def _not_printed_already(record: logging.LogRecord) -> bool:
    """False for a record that a console handler of a logger on its way to the root printed.

    Lightning's package logger ("lightning") has a console handler of its own and still
    propagates to the root, so with the root's handler every Lightning line appeared twice.
    Checked per record, not once here: Lightning is imported later, by the stage that needs it.
    """
    logger = logging.getLogger(record.name)
    while logger.parent is not None:  # every logger below the root
        if any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               for h in logger.handlers):
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # if SAE_KEEP_FREED_MEMORY=1: every stage allocates large CPU tensors step after step
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_printed_already)
    try:
        if args.command == "hooks":
            return _hooks(args.model)
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "sweep":
            from framework.sweep import check_overrides_not_swept

            check_overrides_not_swept(recipe, args.overrides)
        with output_locks(_written_dirs(args.command, recipe, args), args.command):
            result = _call_stage(args.command, recipe, args)
        # Once per job (not once per torchrun rank); `sae run` has printed its summary, which
        # ends with the report it returns.
        if result is not None and args.command != "run" and current_rank().is_main:
            print(result)
        return 0
    except FrameworkError as err:
        if args.verbose:
            raise
        print(f"sae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if args.verbose or err.errno not in MACHINE_ERRNOS:
            raise
        print(f"sae {args.command}: error: {_machine_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except SystemExit as stop:
        # Lightning turns Ctrl-C during training into a graceful shutdown and then sys.exit(1).
        if isinstance(stop.__context__, KeyboardInterrupt):
            return _interrupted(args.command)
        # Lightning turns SIGTERM (a cluster's preemption) into SystemExit(None), which Python
        # reports as success: a job script would go on to the next stage as if this one finished.
        if not _is_sigterm(stop):
            raise
        print(f"sae {args.command}: stopped by SIGTERM before finishing; what was checkpointed is kept, "
              f"and the same command resumes from it", file=sys.stderr)
        return 128 + signal.SIGTERM


# What the machine refused, not a fault of the code: said in one line, not a traceback (-v shows it).
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.EROFS)


def _machine_error(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"the disk is full (or a size limit reached) writing{where}: {err.strerror}. Free space and run the "
                f"same command again: finished work is kept (complete shards and stages are skipped, training "
                f"resumes from its last checkpoint)")
    return (f"{err.strerror}:{where}. Where it is an output, point the stage's output directory (its "
            f"output_dir, lm.path for pretrain, or workdir) at one this user can write; otherwise make that "
            f"path readable")


def _interrupted(command: str) -> int:
    print(f"sae {command}: interrupted; re-run the same command to resume", file=sys.stderr)
    return 128 + signal.SIGINT


def _is_sigterm(stop: SystemExit) -> bool:
    try:
        from lightning.pytorch.utilities.exceptions import SIGTERMException
    except ImportError:
        return False
    return isinstance(stop, SIGTERMException)


_as_program = False


def program(argv: list[str] | None = None) -> int:
    """`sae` as a program (the console script, `python -m framework.cli`, torchrun's entry):
    `main`, with the garbage collector set for a process that imports torch and Lightning once
    and then exits. Collections while those imports build millions of objects took 2.4 s of a
    stage's 8.5 s of imports on a 2-core machine, and the collection at interpreter exit took 2 s
    more: the collector is off until the stage's modules are imported, and what exists then is
    moved to the permanent generation (`gc.freeze`), which collections and the exit skip; it
    lives until exit anyway. Memory stays bounded: reference counting frees objects as usual,
    and the collector runs while the stage does. In-process callers (tests) call `main`, which
    leaves the collector alone."""
    global _as_program
    _as_program = True
    gc.disable()
    try:
        code = main(argv)
    finally:
        gc.freeze()  # the process exits next: its objects need no collection
        gc.enable()
    if code == 0:
        _destroy_process_group()
    return code


def _destroy_process_group() -> None:
    """End the default process group while the interpreter is whole. Left to the exit, gloo's
    worker threads still held work whose tensors were freed during the interpreter's teardown:
    now and then a rank that had finished aborted there ("terminate called without an active
    exception", SIGABRT), failing a job that had done all its work (pytorch/pytorch#190489).
    Only after success: after a failure other ranks may still be inside a collective."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(program())
