"""The training loop as `sae train` runs it, against the bare step bench/train_step.py times: what
Lightning, the shard reader and the callbacks add to each step, at the issue's shapes.

    python bench/train_loop.py                    # TopK k=32 and the paper SAE (L0 ~ 32), n 16,384, fp32 and bf16
    python bench/train_loop.py --device cuda      # the same on a GPU, more steps
    python bench/train_loop.py --num-workers 2    # the shard reader in DataLoader worker processes
    python bench/train_loop.py --device cuda --cuda-graphs   # TopK with train.cuda_graphs=true

A store of random rows (d_in 576, batch 4,096, bfloat16 on disk as the SmolLM2 recipes store
it) is written once into a temporary directory. Each configuration is one call of `train()`,
exactly what `sae train` runs: a real Lightning Trainer, the shards streamed through WebDataset,
the default callbacks (checkpoint at the end, feature density, held-out evaluation at the end),
CSV logging. Its step times are the `Throughput` callback's (start of one batch to the start of
the next: reading the batch, the step, every callback); the median over the steps after the
first few is the loop's step, and their mean is beside it (the median leaves out what happens
every few steps only, such as writing the logs every `train.log_every`). Right after, the same SAE's bare step (`train_step.ours`: the
module's math and hooks without Lightning or data) runs in the same process on the same shape
and precision. Overhead = loop step / bare step - 1. Resampling is off (it is an occasional
event, not part of a step); everything else is as a recipe would run it.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402
from common import base_parser, fmt, machine, markdown_table, precisions_for, run_step, write_results  # noqa: E402

HOOK = "synthetic.hook_resid"
CONFIGS = ("topk", "paper")  # paper: the sparse regime (encoder bias calibrated to L0 ~ 32)
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
SKIP = 3  # first loop steps left out of the median (workspaces, Adam state, first shard)


def write_store(directory: Path, rows: int, d_in: int, rows_per_shard: int = 16_384) -> Path:
    """A store of `rows` random rows in the harvest's format (bfloat16 shards + manifest)."""
    from framework.activations.format import Manifest, Rows, shard_name, write_manifest, write_shard

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards, total, norm_sum = [], torch.zeros(d_in, dtype=torch.float64), 0.0
    for index, start in enumerate(range(0, rows, rows_per_shard)):
        count = min(rows_per_shard, rows - start)
        acts = torch.randn(count, d_in, generator=generator)
        total += acts.sum(0, dtype=torch.float64)
        norm_sum += float(acts.norm(dim=1).sum())
        ids = torch.arange(start, start + count)
        block = Rows([acts], token=ids % 50_000, context=ids // 128, position=ids % 128)
        shards.append(write_shard(directory / shard_name(index), index, block, "bfloat16", rows_per_sample=1024))
    manifest = Manifest(
        model={"name": "synthetic"}, hook_points=[HOOK], d=[d_in], dtype="bfloat16", rows=rows,
        rows_per_sample=1024, rows_per_shard=rows_per_shard, context_length=128, tokens_per_context=128,
        text={"source": "synthetic"}, split="train",
        normalisation={HOOK: {"mean": (total / rows).tolist(), "mean_norm": norm_sum / rows}},
        shards=shards, recipe={},
    )
    write_manifest(directory, manifest)
    return directory


def sae_overrides(variant: str, n: int) -> list[str]:
    """The SAE train_step.our_sae builds, as recipe fields."""
    if variant == "paper":
        return ["sae.variant=paper", f"sae.n_features={n}", f"sae.l1_coefficient={ts.L1}", "sae.init=data",
                f"sae.init_target_l0={ts.TARGET_L0}", "sae.decoder_bias_init=mean"]
    return [f"sae.variant={variant}", f"sae.n_features={n}", f"sae.k={ts.K}", "sae.init=transpose",
            "sae.decoder_bias_init=mean"]


def loop_step_seconds(store: Path, out: Path, variant: str, n: int, precision: str, steps: int,
                      device: torch.device, num_workers: int, cuda_graphs: bool = False) -> list[float]:
    """Every step's wall time of one `train()` run (the Throughput callback's record)."""
    import framework.training.train as train_stage
    from framework.config import load_recipe
    from framework.training.callbacks import Throughput

    recipe = load_recipe(None, [
        "name=bench-train-loop", f"workdir={out}", f"harvest.output_dir={store}", f"train.output_dir={out / 'sae'}",
        *sae_overrides(variant, n),
        f"train.n_tokens={steps * ts.BATCH}", f"train.batch_size={ts.BATCH}", f"train.lr={ts.LR}",
        f"train.precision={PRECISIONS[precision]}", "train.resample=false", "train.log_every=10",
        f"train.num_workers={num_workers}", "train.eval_batches=1", "train.wandb.mode=disabled",
        f"train.devices={1 if device.type == 'cuda' else 'auto'}", f"train.cuda_graphs={str(cuda_graphs).lower()}",
    ])
    built = []
    original = train_stage.build_trainer

    def keep(*args, **kwargs):
        trainer = original(*args, **kwargs)
        built.append(trainer)
        return trainer

    train_stage.build_trainer = keep
    # `sae train` takes the GPU whenever there is one; a CPU run on a GPU host must not.
    on_cpu = mock.patch("torch.cuda.is_available", return_value=False) if device.type == "cpu" else nullcontext()
    try:
        with on_cpu:
            train_stage.train(recipe)
    finally:
        train_stage.build_trainer = original
    throughput = next(c for c in built[0].callbacks if isinstance(c, Throughput))
    return list(throughput.step_seconds)


def bare_step_seconds(variant: str, n: int, precision: str, steps: int, device: torch.device,
                      cuda_graphs: bool = False) -> list[float]:
    regime = "sparse" if variant == "paper" else ""
    setup = ts.make_setup(n, ts.BATCH, device, precision)
    contender = ts.ours(setup, variant, regime, cuda_graphs=cuda_graphs)
    for _ in range(SKIP):
        run_step(contender, device)
    return [run_step(contender, device) for _ in range(steps)]


def run(device: str = "cpu", quick: bool = False, sizes: list[int] | None = None,
        precisions: tuple[str, ...] = ("fp32", "bf16"), steps: int | None = None, num_workers: int = 0,
        cuda_graphs: bool = False) -> dict:
    """`cuda_graphs`: TopK only (what train.cuda_graphs records), loop and bare step both graphed."""
    dev = torch.device(device)
    precisions = precisions_for(dev, precisions)
    sizes = sizes or ([1024] if quick else [16384])
    steps = steps or (6 if quick else (200 if dev.type == "cuda" else 16))
    if steps < SKIP + 2:
        raise SystemExit(f"--steps {steps}: at least {SKIP + 2} (the first {SKIP} are not timed)")
    workdir = Path(tempfile.mkdtemp(prefix="bench-train-loop-"))
    results = {"machine": machine(dev), "steps": steps, "num_workers": num_workers, "cuda_graphs": cuda_graphs,
               "rows": []}
    try:
        store = write_store(workdir / "store", (steps + 1) * ts.BATCH, ts.D_IN)
        for n in sizes:
            for precision in precisions:
                for variant in ("topk",) if cuda_graphs else CONFIGS:
                    loop = loop_step_seconds(store, workdir / f"{variant}-{n}-{precision}", variant, n, precision,
                                             steps, dev, num_workers, cuda_graphs)[SKIP:]
                    bare = bare_step_seconds(variant, n, precision, len(loop), dev, cuda_graphs)
                    row = {"variant": variant, "n": n, "precision": precision,
                           "loop_ms": 1e3 * statistics.median(loop), "loop_mean_ms": 1e3 * statistics.mean(loop),
                           "bare_ms": 1e3 * statistics.median(bare),
                           "loop_samples_s": loop, "bare_samples_s": bare}
                    row["overhead"] = row["loop_ms"] / row["bare_ms"] - 1
                    results["rows"].append(row)
                    print(f"{variant} n={n} {precision}: loop {row['loop_ms']:.1f} ms (mean {row['loop_mean_ms']:.1f}), bare step "
                          f"{row['bare_ms']:.1f} ms, overhead {100 * row['overhead']:+.1f}%", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def table(results: dict) -> str:
    rows = []
    for r in results["rows"]:
        name = "TopK k=32" if r["variant"] == "topk" else "paper, L0 ≈ 32"
        name += ", CUDA graphs" if results.get("cuda_graphs") else ""
        mean = r.get("loop_mean_ms")
        rows.append([f"{name}, n={r['n']:,}", r["precision"], fmt(ts.BATCH / (r["loop_ms"] / 1e3)),
                     fmt(ts.BATCH / (mean / 1e3)) if mean else "–",
                     fmt(ts.BATCH / (r["bare_ms"] / 1e3)), f"{100 * r['overhead']:+.1f}%"])
    header = ["SAE", "precision", "`sae train` loop tokens/s (median step)", "(mean step)", "bare step tokens/s",
              "loop over bare step (medians)"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="n_features (default 16384)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=None, help="loop steps per configuration "
                        "(default 16 on CPU, 200 on a GPU)")
    parser.add_argument("--num-workers", type=int, default=0, help="train.num_workers (DataLoader processes)")
    parser.add_argument("--cuda-graphs", action="store_true", help="TopK with train.cuda_graphs=true (CUDA only)")
    args = parser.parse_args(argv)
    results = run(args.device, args.quick, args.sizes, tuple(args.precision), args.steps, args.num_workers,
                  args.cuda_graphs)
    write_results("train_loop", results, args.out, args.quick)
    timed = len(results["rows"][0]["loop_samples_s"]) if results["rows"] else 0
    print(f"\n### The `sae train` loop against the bare step ({args.device}, median of {timed} steps each, "
          f"train.num_workers={args.num_workers}{', train.cuda_graphs=true' if args.cuda_graphs else ''})\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
