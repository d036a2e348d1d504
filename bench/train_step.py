"""One full SAE training step -- forward, loss, backward, decoder constraint, Adam -- of ours,
SAELens's and sparsify's, in one process on the same random activations, beside the hardware
limit for the same shapes.

    python bench/train_step.py [--quick] [--device cuda] [--precision fp32 bf16] [--compile]

Every peer runs its own training code, not a reimplementation:
- SAELens: `SAETrainer.step(batch)` of a real `SAETrainer` (its loss, firing statistics,
  gradient clipping, Adam, LR and coefficient schedulers; bf16 through its `autocast` option).
- sparsify: its training step lives inside `Trainer.fit`'s forward hook, so `sparsify_step`
  repeats that loop body line for line for `loss_fn="fvu"` (decoder renormalisation, the
  SparseCoder forward, did-fire bookkeeping, backward, the parallel-gradient removal, Adam,
  the LR schedule). Left out: the LM forward that produces the activations, and what the hook
  does around the step with them (a detached clone of the outputs, a boolean-mask copy, a
  `.item()` sync per batch): sparsify's timed step is lighter than its trainer's. Also left
  out: `fit()` sets `torch.set_float32_matmul_precision("high")` process-wide (TF32 on a GPU);
  every contender here runs strict fp32 in the fp32 column, a setting sparsify's trainer never
  uses on a GPU. sparsify enables bf16 autocast inside `SparseCoder.forward` on CUDA only; on
  CPU the bench wraps the forward in the same autocast, and the CUDA fp32 column calls the
  undecorated forward.
- ours: `sae(x)`, backward, `before_optimizer_step`, Adam, `after_optimizer_step`, and the
  feature statistics `SAEModule.training_step` keeps -- its step without Lightning.

All three start from the same weights (ours, copied), so they select the same codes and do the
same work. The paper SAE is measured in both of its regimes: dense codes (the paper's Kaiming
init with zero encoder bias: half the features fire, L0 ~ n/2, as at the start of training) and
sparse codes (biases calibrated to L0 ~ 32, as after the first hundred steps; our fast path
switches to sparse products there). SAELens's "standard" SAE is its paper SAE (its L1 weighted by
decoder norms, no unit-norm constraint: the April 2024 form); its L1 coefficient is ours × d_in,
since its MSE sums over d_in where ours averages (Adam makes the two runs' updates the same).

The limits are the step's irreducible dense work timed alone with torch on preallocated outputs:
paper SAE, the five (batch × d_in × n) GEMMs of a dense step; TopK, one encoder GEMM + torch.topk
+ one fused Adam update of the SAE's parameters.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    Timed,
    autocast,
    base_parser,
    fmt,
    machine,
    markdown_table,
    measure_peak,
    precisions_for,
    round_robin,
    synchronize,
    write_results,
)

D_IN = 576  # SmolLM2-135M's residual stream
BATCH = 4096
K = 32
TARGET_L0 = 32  # the paper SAE's sparse regime
L1 = 1e-3  # ours (MSE averaged over d_in); SAELens gets L1 * D_IN
LR = 1e-4


@dataclass
class Setup:
    """One shape, one precision: the data and the weights every contender starts from."""

    n: int
    batch: int
    d_in: int
    device: torch.device
    precision: str  # "fp32" or "bf16"
    batches: list[torch.Tensor]
    sample: torch.Tensor  # for data-dependent initialisation

    def x(self, i: int) -> torch.Tensor:
        return self.batches[i % len(self.batches)]


def make_setup(n: int, batch: int, device: torch.device, precision: str, d_in: int = D_IN,
               pool: int = 2) -> Setup:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, d_in, generator=g).to(device) for _ in range(pool)]
    sample = torch.randn(max(2 * batch, 8192), d_in, generator=g).to(device)
    return Setup(n, batch, d_in, device, precision, batches, sample)


# ---- ours --------------------------------------------------------------------------------------


def our_sae(setup: Setup, variant: str, regime: str):
    from framework.config import SAEConfig
    from framework.sae import build_sae

    if variant == "paper" and regime == "dense":  # the paper's init: Kaiming, zero encoder bias
        cfg = SAEConfig(variant="paper", n_features=setup.n, l1_coefficient=L1, init="kaiming",
                        decoder_bias_init="mean")
    elif variant == "paper":
        cfg = SAEConfig(variant="paper", n_features=setup.n, l1_coefficient=L1, init="data",
                        init_target_l0=TARGET_L0, decoder_bias_init="mean")
    else:
        cfg = SAEConfig(variant=variant, n_features=setup.n, k=K, init="transpose", decoder_bias_init="mean")
    sae = build_sae(setup.d_in, cfg).to(setup.device)
    sae.initialize_from_data(setup.sample)
    return sae.train()


def weights_of(sae) -> dict[str, torch.Tensor]:
    return {k: getattr(sae, k).detach().clone() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}


def ours(setup: Setup, variant: str, regime: str, cuda_graphs: bool = False, compiled: str | None = None,
         dense_path: bool = False) -> Timed:
    """`cuda_graphs`: the whole step (forward, backward, decoder constraint, Adam, statistics)
    replayed as a CUDA graph, as train.cuda_graphs runs it (framework/training/cuda_graphs.py).
    `compiled`: the forward (and so its backward) through torch.compile: "fast", our fast path;
    "plain", the SAE's reference math (`forward_reference`: dense codes, dense products), which
    is what compiling a straightforward SAE gives. Compilation happens in the untimed steps.
    `dense_path`: a ReLU SAE's dense path whatever its codes' density (--paths)."""
    from framework.memory import HostCopy
    from framework.training.layout import ParameterLayout
    from framework.training.module import FeatureStats, any_non_finite

    sae = our_sae(setup, variant, regime)
    if dense_path:
        sae.sparse_density_threshold = {device: dict.fromkeys(table, 0.0)
                                        for device, table in sae.sparse_density_threshold.items()}
    forward = sae
    if compiled:
        forward = compile_forward(sae.forward if compiled == "fast" else sae.forward_reference)
    stats, layout = FeatureStats(setup.n).to(setup.device), ParameterLayout()
    # As SAEModule.configure_optimizers builds it for one process or DDP: torch's fused Adam.
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999), fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    counter = itertools.count()
    pending: list[tuple[int, HostCopy] | None] = [None]  # the last step's finiteness check

    def update_stats(name, sae, fire_counts, rows):  # SAEModule._update_stats
        stats.update(fire_counts, rows, layout)
        if hasattr(sae, "steps_since_fired"):
            sae.steps_since_fired.copy_(stats.steps_since_fired)

    if cuda_graphs:
        from framework.training.cuda_graphs import RecordedSteps, StepParts

        parts = StepParts(lambda batch, name: batch[0], update_stats, lambda: layout.before_optimizer_step(sae),
                          lambda: layout.after_optimizer_step(sae), statistics=(stats,))
        recorded = RecordedSteps({"sae": sae}, optimizer, parts)

    def step():
        # SAEModule.training_step (without logging), then Lightning's optimizer step with the
        # module's hooks around it; with graphs, SAEModule._replay_step.
        i = next(counter)
        x = setup.x(i)
        if cuda_graphs:
            with autocast(setup.device, setup.precision):
                out = recorded((x,))["sae"][1]
        else:
            with autocast(setup.device, setup.precision):
                out = forward(x, i)
            update_stats("sae", sae, out.fire_counts(), x.shape[0])
            out.loss.backward()
            layout.before_optimizer_step(sae)
            optimizer.step()
            layout.after_optimizer_step(sae)
        # SAEModule._check_finite: the loss and the weights, read at the next step's check
        earlier, pending[0] = pending[0], (i, HostCopy(any_non_finite([out.loss.detach(), *sae.parameters()])))
        if earlier is not None and earlier[1].values()[0]:
            raise RuntimeError(f"non-finite loss or weights at step {earlier[0]}")
        if not cuda_graphs:
            optimizer.zero_grad(set_to_none=True)
        schedule.step()
        loss, l0 = out.loss.detach(), out.losses["l0"]  # read before the next step (bench/common.py run_step)
        return lambda: {"loss": loss.item(), "l0": l0.item()}

    return Timed("ours", step, records_graph=cuda_graphs)


WITH_COMPILE = False  # --compile: the torch.compile contenders too (compiling takes ~10 s each on CPU)
COMPILE_BACKEND = "inductor"  # --compile-backend: "aot_eager" captures the same graphs without generating code
WITH_PATHS = False  # --paths: the paper SAE's dense path on sparse codes too, beside the path it takes


def compile_forward(forward: Callable) -> Callable:
    import torch._dynamo

    # Every contender recompiles (new weights, shapes, dtypes): past the limit dynamo would run
    # the forward eagerly without a word, and the row would not measure what it says.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(forward, backend=COMPILE_BACKEND)


# ---- SAELens -----------------------------------------------------------------------------------


def saelens(setup: Setup, weights: dict[str, torch.Tensor], variant: str,
            sparse_activations: bool = False) -> Timed:
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    common = {"d_in": setup.d_in, "d_sae": setup.n, "device": str(setup.device), "dtype": "float32"}
    if variant == "paper":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=L1 * setup.d_in))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=K, use_sparse_activations=sparse_activations))
    with torch.no_grad():
        for name, value in weights.items():
            getattr(sae, name).copy_(value)
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=setup.batch * 10**6, train_batch_size_samples=setup.batch, lr=LR,
            lr_end=LR, device=str(setup.device), autocast=setup.precision == "bf16",
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae,
        data_provider=iter(()),
    )
    counter = itertools.count()

    def step():
        out = trainer.step(setup.x(next(counter)))
        trainer.n_training_steps += 1  # as SAETrainer.fit does after each step
        loss, acts = out.loss.detach(), out.feature_acts.detach()
        return lambda: {"loss": loss.item(), "l0": float(acts.to_dense().gt(0).sum(-1).float().mean())}

    return Timed("SAELens", step)


# ---- sparsify ----------------------------------------------------------------------------------


def sparsify(setup: Setup, weights: dict[str, torch.Tensor]) -> Timed:
    from sparsify import SparseCoder, SparseCoderConfig
    from transformers import get_linear_schedule_with_warmup

    device = setup.device
    sae = SparseCoder(setup.d_in, SparseCoderConfig(num_latents=setup.n, k=K), device, dtype=torch.float32)
    with torch.no_grad():
        sae.encoder.weight.copy_(weights["W_enc"].T)
        sae.encoder.bias.copy_(weights["b_enc"])
        sae.W_dec.copy_(weights["W_dec"])
        sae.b_dec.copy_(weights["b_dec"])
    # Trainer.__init__ for optimizer="adam" without bitsandbytes (none on CPU): torch Adam. The
    # schedule's warm-up is 0 here so that the few steps timed actually learn (the loss check).
    optimizer = torch.optim.Adam([{"params": sae.parameters(), "lr": LR}])
    schedule = get_linear_schedule_with_warmup(optimizer, 0, 10**6)
    auxk_alpha = 0.0  # TrainConfig's default: no AuxK, so no dead mask
    num_tokens_since_fired = torch.zeros(setup.n, device=device, dtype=torch.long)
    did_fire = torch.zeros(setup.n, device=device, dtype=torch.bool)
    # SparseCoder.forward carries @torch.autocast("cuda", bfloat16): bypass it for CUDA fp32.
    forward = SparseCoder.forward.__wrapped__ if device.type == "cuda" and setup.precision == "fp32" else SparseCoder.forward
    counter = itertools.count()

    def step():
        # Trainer.fit's hook, loss_fn="fvu", one SAE, no DDP, grad_acc_steps = micro_acc_steps = 1.
        outputs = setup.x(next(counter))
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (outputs - outputs.mean(0)).pow(2).sum()
        with autocast(device, setup.precision):
            out = forward(sae, x=outputs, y=outputs, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        avg_fvu = float(out.fvu.detach())  # noqa: F841 -- fit's logging accumulator: a sync
        loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.div(1).backward()
        # ...and fit's optimizer step after the hook.
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        with torch.no_grad():
            num_tokens_since_fired.add_(outputs.shape[0])
            num_tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        fvu, l0 = out.fvu.detach(), out.latent_acts.detach()
        return lambda: {"loss": fvu.item(), "l0": float(l0.gt(0).sum(-1).float().mean())}

    return Timed("sparsify", step)


# ---- the limits --------------------------------------------------------------------------------


def _adam_over_sae(setup: Setup) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """The fastest torch Adam (fused) over fp32 parameters of the SAE's shapes, gradients set."""
    d = setup.d_in
    shapes = [(d, setup.n), (setup.n,), (setup.n, d), (d,)]
    params = [torch.nn.Parameter(torch.randn(s, device=setup.device) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    return torch.optim.Adam(params, lr=LR, fused=True), params


def _timed_parts(device: torch.device, parts: list[tuple[str, Callable[[], object]]]) -> dict:
    times = {}
    for name, run in parts:
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times[name] = time.perf_counter() - start
    return times


def _parts_step(device: torch.device, parts: list[tuple[str, Callable[[], object]]]) -> Callable:
    """A limit's step: its parts back to back, as a real step queues its kernels, with no sync
    between them (which would add a host round-trip per part to the limit on a GPU); each part's
    time from CUDA events (read after run_step's final sync), or the clock on a CPU, where every
    operation finishes before the next starts."""
    def step():
        if device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(parts) + 1)]
            events[0].record()
            for (_, run), done in zip(parts, events[1:]):
                run()
                done.record()
            return lambda: {name: events[i].elapsed_time(events[i + 1]) / 1000 for i, (name, _) in enumerate(parts)}
        marks = [time.perf_counter()]
        for _, run in parts:
            run()
            marks.append(time.perf_counter())
        return lambda: {name: marks[i + 1] - marks[i] for i, (name, _) in enumerate(parts)}

    return step


def limit_paper(setup: Setup, with_adam: bool = False) -> Timed:
    """The five (batch × d_in × n) GEMMs of a dense step: encoder, decoder, decoder-weight
    gradient, gradient at the codes, encoder-weight gradient.

    The two weight gradients sum over the batch, a GEMM with a transposed operand. Each runs in
    the faster of two layouts, timed once here: as written (xᵀ @ grad_pre), or with its small
    operand already laid out transposed (a free choice for a limit), which on CPU in bfloat16
    ran about twice as fast (framework/sae/kernels.py `_transposed_mm`); the decoder-weight
    gradient then comes out transposed, (d, n), which a limit may leave so."""
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    B, d, n, dev = setup.batch, setup.d_in, setup.n, setup.device
    x, g = (torch.randn(B, d, device=dev, dtype=dtype) for _ in range(2))
    xT, gT = x.T.contiguous(), g.T.contiguous()
    W_enc, W_dec = torch.randn(d, n, device=dev, dtype=dtype), torch.randn(n, d, device=dev, dtype=dtype)
    f, grad_pre = torch.empty(B, n, device=dev, dtype=dtype), torch.empty(B, n, device=dev, dtype=dtype)
    x_hat, grad_W_dec = torch.empty(B, d, device=dev, dtype=dtype), torch.empty(n, d, device=dev, dtype=dtype)
    grad_W_dec_T, grad_W_enc = torch.empty(d, n, device=dev, dtype=dtype), torch.empty(d, n, device=dev, dtype=dtype)
    optimizer = _adam_over_sae(setup)[0] if with_adam else None
    torch.mm(x, W_enc, out=f)
    torch.mm(g, W_dec.T, out=grad_pre)
    grad_W_dec_step = _fastest([lambda: torch.mm(f.T, g, out=grad_W_dec),  # (n, B) @ (B, d)
                                lambda: torch.mm(gT, f, out=grad_W_dec_T)], dev)  # (d, B) @ (B, n): transposed
    grad_W_enc_step = _fastest([lambda: torch.mm(x.T, grad_pre, out=grad_W_enc),  # (d, B) @ (B, n)
                                lambda: torch.mm(xT, grad_pre, out=grad_W_enc)], dev)

    def gemms():
        torch.mm(x, W_enc, out=f)  # (B, d) @ (d, n)
        torch.mm(f, W_dec, out=x_hat)  # (B, n) @ (n, d)
        grad_W_dec_step()
        torch.mm(g, W_dec.T, out=grad_pre)  # (B, d) @ (d, n)
        grad_W_enc_step()

    parts = [("gemms_s", gemms)] + ([("adam_s", optimizer.step)] if optimizer else [])
    return Timed("limit", _parts_step(dev, parts))


def _fastest(runs: list[Callable[[], object]], device: torch.device) -> Callable[[], object]:
    """The run that took least time, the best of three each."""
    return min(runs, key=lambda run: min(_timed_parts(device, [(str(i), run) for i in range(3)]).values()))


def limit_topk(setup: Setup) -> Timed:
    """One encoder GEMM + torch.topk + a fused Adam update: what any TopK step must do densely."""
    dtype = torch.bfloat16 if setup.precision == "bf16" else torch.float32
    dev = setup.device
    x = torch.randn(setup.batch, setup.d_in, device=dev, dtype=dtype)
    W_enc = torch.randn(setup.d_in, setup.n, device=dev, dtype=dtype)
    pre = torch.empty(setup.batch, setup.n, device=dev, dtype=dtype)
    optimizer, _ = _adam_over_sae(setup)
    parts = [
        ("gemm_s", lambda: torch.mm(x, W_enc, out=pre)),
        ("topk_s", lambda: pre.topk(K, dim=1, sorted=False)),
        ("adam_s", optimizer.step),
    ]
    return Timed("limit", _parts_step(dev, parts))


# ---- groups ------------------------------------------------------------------------------------


Builder = tuple[str, Callable[[], Timed]]


def compiled_contenders(variant: str, label: str, setup: Setup, regime: str = "") -> list[Builder]:
    """With --compile: our fast path through torch.compile, and our reference math through it
    ("plain": a straightforward dense SAE, compiled)."""
    if not WITH_COMPILE:
        return []
    return [(f"ours {label}, torch.compile", lambda: ours(setup, variant, regime, compiled="fast")),
            (f"plain {label}, torch.compile", lambda: ours(setup, variant, regime, compiled="plain"))]


def paper_contenders(setup: Setup) -> list[Builder]:
    out: list[Builder] = []
    for regime in ("dense", "sparse"):
        weights = weights_of(our_sae(setup, "paper", regime))
        graphed = [(f"ours paper, {regime} codes, CUDA graphs", lambda r=regime: ours(setup, "paper", r, cuda_graphs=True))]
        forced = [("ours paper, sparse codes, dense path", lambda: ours(setup, "paper", "sparse", dense_path=True))]
        out += [
            (f"ours paper, {regime} codes", lambda r=regime: ours(setup, "paper", r)),
            *(forced if WITH_PATHS and regime == "sparse" else []),
            *(graphed if setup.device.type == "cuda" else []),
            *compiled_contenders("paper", f"paper, {regime} codes", setup, regime),
            (f"SAELens standard, {regime} codes", lambda r=regime, w=weights: saelens(setup, w, "paper")),
        ]
    return out + [("limit: 5 GEMMs", lambda: limit_paper(setup)),
                  ("limit: 5 GEMMs + fused Adam", lambda: limit_paper(setup, with_adam=True))]


def topk_contenders(setup: Setup) -> list[Builder]:
    weights = weights_of(our_sae(setup, "topk", ""))
    graphed = [("ours topk, CUDA graphs", lambda: ours(setup, "topk", "", cuda_graphs=True))]
    return [
        ("ours topk", lambda: ours(setup, "topk", "")),
        *(graphed if setup.device.type == "cuda" else []),
        *compiled_contenders("topk", "topk", setup),
        ("SAELens topk", lambda: saelens(setup, weights, "topk")),
        # SAELens: "only worthwhile if using float32 and not using autocast"
        ("SAELens topk, sparse activations", lambda: saelens(setup, weights, "topk", sparse_activations=True)),
        ("sparsify topk", lambda: sparsify(setup, weights)),
        ("limit: GEMM + topk + fused Adam", lambda: limit_topk(setup)),
    ]


FAMILIES = {"paper": paper_contenders, "topk": topk_contenders}


def check_sane(summary: dict, pool: int = 2) -> str:
    """'ok', or what is wrong: losses must be finite, and lower at the last visit of a batch
    than at its first (the batches alternate)."""
    losses = summary.get("loss")
    if losses is None:
        return "–"
    if not all(torch.isfinite(torch.tensor(losses)).tolist()):
        return "non-finite loss"
    last = len(losses) - 1
    first = last % pool
    if last > first and not losses[last] < losses[first]:
        return f"loss did not fall ({losses[first]:.4g} -> {losses[last]:.4g})"
    return "ok"


def build_all(builders: list[Builder], device: torch.device, quiet: bool = False
              ) -> tuple[list[Timed], list[dict]]:
    """Each contender built and stepped (peak memory); one that fails is reported, not fatal."""
    built, failed = [], []
    for label, build in builders:
        try:
            contender = measure_peak(build, device)
        except Exception as err:  # a peer that cannot run this configuration
            message = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            if not quiet:
                print(f"  {label}: fails ({message})", file=sys.stderr)
            failed.append({"name": label, "error": message})
            continue
        contender.name = label
        built.append(contender)
    return built, failed


def warm_up_libraries(device: torch.device) -> None:
    """One tiny step of every contender, untimed: imports and torch's lazy one-time setup
    (thread pools, oneDNN kernels) would otherwise land in the first contender's memory/time.
    Not the torch.compile ones: compiling is slow, and they compile in their own untimed steps."""
    global WITH_COMPILE
    with_compile, WITH_COMPILE = WITH_COMPILE, False
    try:
        for family in FAMILIES:
            for precision in ("fp32", "bf16"):
                setup = make_setup(256, 64, device, precision)
                build_all(FAMILIES[family](setup), device, quiet=True)
    finally:
        WITH_COMPILE = with_compile


def run_group(family: str, n: int, precision: str, device: torch.device, batch: int,
              warmup: int, repeats: int) -> dict:
    load_before = os.getloadavg()[0]
    setup = make_setup(n, batch, device, precision)
    contenders, failed = build_all(FAMILIES[family](setup), device)
    round_robin(contenders, device, warmup, repeats)
    summaries = [c.summary(batch) for c in contenders]
    for s in summaries:
        s["sanity"] = check_sane(s)
        if s["sanity"] not in ("ok", "–"):
            print(f"WARNING {family} n={n} {precision} {s['name']}: {s['sanity']}", file=sys.stderr)
    return {"family": family, "n": n, "precision": precision, "batch": batch,
            "contenders": summaries, "failed": failed, "load_average": [load_before, os.getloadavg()[0]]}


def run(device: str = "cpu", quick: bool = False, precisions: tuple[str, ...] = ("fp32", "bf16"),
        sizes: tuple[int, ...] | None = None, families: tuple[str, ...] = tuple(FAMILIES)) -> dict:
    dev = torch.device(device)
    precisions = precisions_for(dev, precisions)
    torch.manual_seed(0)
    if quick:
        sizes, batch, warmup, repeats = sizes or (256,), 256, 0, 1
    else:  # GPU steps take milliseconds: more of them
        sizes, batch = sizes or (4096, 16384), BATCH
        warmup, repeats = (5, 20) if dev.type == "cuda" else (2, 7)
        warm_up_libraries(dev)
    groups = []
    for family in families:
        for n in sizes:
            for precision in precisions:
                print(f"train_step: {family} n={n} {precision}", file=sys.stderr, flush=True)
                groups.append(run_group(family, n, precision, dev, batch, warmup, repeats))
    return {
        "machine": machine(dev),
        "settings": {"d_in": D_IN, "batch": batch, "k": K, "target_l0": TARGET_L0, "lr": LR,
                     "warmup_rounds": warmup, "repeats": repeats, "quick": quick,
                     "compile_backend": COMPILE_BACKEND if WITH_COMPILE else None},
        "groups": groups,
    }


# ---- the table ---------------------------------------------------------------------------------


def _find(group: dict, prefix: str) -> dict | None:
    return next((c for c in group["contenders"] if c["name"].startswith(prefix)), None)


def _best(group: dict, prefix: str) -> dict | None:
    found = [c for c in group["contenders"] if c["name"].startswith(prefix)]
    return max(found, key=lambda c: c["tokens_per_s"]) if found else None


def comparisons(group: dict) -> list[dict]:
    """Ours against each peer (its fastest configuration that ran) and against the limit; a
    ratio is None where that contender did not run."""

    def ratio(mine: dict, other: dict | None) -> float | None:
        return None if other is None else mine["tokens_per_s"] / other["tokens_per_s"]

    rows = []
    if group["family"] == "paper":
        ours_names = [f"ours paper, {r} codes{c}" for r in ("dense", "sparse")
                      for c in ("", ", dense path", ", CUDA graphs", ", torch.compile")]
        limit = _find(group, "limit: 5 GEMMs")
    else:
        ours_names = ["ours topk", "ours topk, CUDA graphs", "ours topk, torch.compile"]
        limit = _find(group, "limit:")
    for name in ours_names:
        mine = next((c for c in group["contenders"] if c["name"] == name), None)
        if mine is None:
            continue
        row = {"ours": name, "tokens_per_s": mine["tokens_per_s"], "l0": _l0(mine), "vs_limit": ratio(mine, limit)}
        if group["family"] == "paper":
            regime = "dense" if "dense codes" in name else "sparse"
            row["vs_saelens"] = ratio(mine, _find(group, f"SAELens standard, {regime}"))
            plain = _find(group, f"plain paper, {regime} codes, torch.compile")
        else:
            row["vs_saelens"] = ratio(mine, _best(group, "SAELens"))
            row["vs_sparsify"] = ratio(mine, _find(group, "sparsify"))
            plain = _find(group, "plain topk, torch.compile")
        if plain is not None:  # --compile
            row["vs_compiled_plain"] = ratio(mine, plain)
        rows.append(row)
    return rows


def _l0(summary: dict) -> float | None:
    l0 = summary.get("l0")
    return sum(l0) / len(l0) if l0 else None


def _by_shape(results: dict) -> dict[tuple[str, int], dict[str, dict]]:
    shapes: dict[tuple[str, int], dict[str, dict]] = {}
    for group in results["groups"]:
        shapes.setdefault((group["family"], group["n"]), {})[group["precision"]] = group
    return shapes


def _cell(group: dict | None, name: str) -> str:
    if group is None:
        return "–"
    c = next((c for c in group["contenders"] if c["name"] == name), None)
    if c is None:
        failed = next((f for f in group.get("failed", []) if f["name"] == name), None)
        return "fails" if failed else "–"
    spread = f"{c['min_s'] * 1e3:,.0f}–{c['max_s'] * 1e3:,.0f} ms"
    check = "" if c.get("sanity") in ("ok", "–") else f" ({c['sanity']})"
    return f"{fmt(c['tokens_per_s'])} ({spread}){check}"


def tables(results: dict) -> str:
    """Per shape: every contender's tokens/s in fp32 and bf16, then ours' ratios."""
    out = []
    for (family, n), by_precision in _by_shape(results).items():
        groups = [by_precision.get(p) for p in ("fp32", "bf16")]
        names = list(dict.fromkeys(
            [c["name"] for g in groups if g for c in g["contenders"]]
            + [f["name"] for g in groups if g for f in g.get("failed", [])]
        ))
        batch = next(g for g in groups if g)["batch"]
        rows = []
        for name in names:
            found = [next((c for c in g["contenders"] if c["name"] == name), None) if g else None for g in groups]
            l0 = next((_l0(c) for c in found if c and _l0(c) is not None), None)
            rows.append([name, _cell(groups[0], name), _cell(groups[1], name), fmt(l0, 0),
                         " / ".join(fmt(c["peak_mib"]) if c else "–" for c in found)])
        loads = [f"{g['precision']} {g['load_average'][0]:.1f}→{g['load_average'][1]:.1f}"
                 for g in groups if g and "load_average" in g]
        out += [f"### {family} SAE, n = {n:,} (d_in {results['settings']['d_in']}, batch {batch:,})", "",
                f"1-minute load average before→after: {', '.join(loads)}", "",
                markdown_table(["step", "fp32 tokens/s (min–max step)", "bf16 tokens/s (min–max step)", "L0",
                                "peak MiB fp32 / bf16"], rows), ""]
        ratios = [{r["ours"]: r for r in comparisons(g)} if g else {} for g in groups]
        compiled = any("torch.compile" in name for name in names)
        ratio_rows = []
        for name in dict.fromkeys(k for r in ratios for k in r):
            cells = []
            keys = [("vs_saelens", False), ("vs_sparsify", False), ("vs_limit", True)]
            keys += [("vs_compiled_plain", False)] if compiled else []
            for key, percent in keys:
                for r in ratios:
                    v = r.get(name, {}).get(key)
                    cells.append("–" if v is None else (f"{100 * v:.0f}%" if percent else f"{v:.2f}×"))
            ratio_rows.append([name] + cells)
        header = ["ours", "vs SAELens fp32", "bf16", "vs sparsify fp32", "bf16", "of the limit fp32", "bf16"]
        header += ["vs plain + torch.compile fp32", "bf16"] if compiled else []
        out += [markdown_table(header, ratio_rows), ""]
        for g in groups:
            for c in (g or {}).get("contenders", []):
                if "parts_s" in c:
                    parts = ", ".join(f"{k.removesuffix('_s')} {v * 1e3:,.1f} ms" for k, v in c["parts_s"].items())
                    out.append(f"- {c['name']} ({g['precision']}): {parts}")
        for g in groups:
            for f in (g or {}).get("failed", []):
                out.append(f"- {f['name']} ({g['precision']}) fails: `{f['error']}`")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=None, help="n_features (default 4096 16384)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--compile", action="store_true",
                        help="also our fast path and the plain (reference) SAE through torch.compile")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for --compile (default inductor; aot_eager: dynamo's and "
                             "AOTAutograd's graphs run by eager kernels, no code generated)")
    parser.add_argument("--paths", action="store_true",
                        help="also the paper SAE's dense path on sparse codes (where its sparse path runs): which "
                             "is faster on this device, for sparse_density_threshold")
    args = parser.parse_args(argv)
    global WITH_COMPILE, WITH_PATHS, COMPILE_BACKEND
    WITH_COMPILE, WITH_PATHS, COMPILE_BACKEND = args.compile, args.paths, args.compile_backend
    results = run(args.device, args.quick, tuple(args.precision), tuple(args.sizes) if args.sizes else None,
                  tuple(args.families))
    path = write_results("train_step", results, args.out, args.quick)
    print(tables(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
