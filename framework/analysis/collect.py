"""The streaming pass: every analysed token through the LM (to the hook) and the SAE, twice.

Pass 1 keeps each unit's top-k examples and activation histogram, hence its density and max
activation (a unit "fires" where its activation is positive: always so for SAE features and
ReLU neurons; for GELU/SiLU neurons the small negative values are not counted). Pass 2 samples examples from `n_quantile_intervals` equal activation intervals
between 0 and each unit's max -- which only pass 1 can know -- and random firing examples.
Two passes cost a second forward pass over the tokens but make the interval samples exact:
intervals against a running max would misfile everything seen before the max settled, worst
for the rare features one most wants to read.

Progress is saved every `analyze.save_every` batches to `stream_state.safetensors` in the
analysis directory: every store, the pass, the batches done and the digest of the recipe that
made them. A re-run with the same recipe resumes there and redoes at most `save_every` batches;
a different recipe starts over. Pass 2's random keys come from a generator seeded by (seed,
batch), so a resumed run draws exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from framework.analysis.corpus import Corpus
from framework.analysis.examples import ActivationHistogram, GroupSample, TopExamples
from framework.analysis.units import Units
from framework.config import AnalyzeConfig
from framework.lm.base import BaseLM
from framework.progress import Progress

log = logging.getLogger(__name__)
DONE = 3  # the pass number recorded once both passes are complete


class UnitStats:
    """Everything the stream learns about one kind of unit."""

    def __init__(self, n_units: int, cfg: AnalyzeConfig, device: torch.device | str = "cpu"):
        self.n_intervals = cfg.n_quantile_intervals
        self.top = TopExamples(n_units, cfg.top_k_examples, device)
        self.histogram = ActivationHistogram(n_units, device)
        self.intervals = GroupSample(n_units * cfg.n_quantile_intervals, cfg.examples_per_interval, device)
        self.random = GroupSample(n_units, cfg.n_random_examples, device)
        self.n_tokens = 0

    def first_pass(self, acts: torch.Tensor, tokens: torch.Tensor) -> None:
        """acts (rows, n_units) of the tokens (rows,) named by global index."""
        self.top.update(acts, tokens)
        rows, units = (acts > 0).nonzero(as_tuple=True)
        self.histogram.update(units, acts[rows, units])
        self.n_tokens += acts.shape[0]

    def second_pass(self, acts: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator) -> None:
        rows, units = (acts > 0).nonzero(as_tuple=True)
        values = acts[rows, units]
        # Interval j holds activations in [j, j + 1) * max / n_intervals; the max itself goes last,
        # and so does a firing pass 1 did not see (max 0: the ratio is inf; clamped before the
        # cast to an integer, which would make inf the most negative index).
        ratio = values / self.top.max_activation[units] * self.n_intervals
        interval = ratio.clamp(max=self.n_intervals - 1).long()
        keys = torch.rand(2, len(values), generator=generator, dtype=torch.float64, device=values.device)
        self.intervals.update(units * self.n_intervals + interval, keys[0], tokens[rows], values)
        self.random.update(units, keys[1], tokens[rows], values)

    @property
    def density(self) -> torch.Tensor:
        """(n_units,) the fraction of analysed tokens each unit fired on."""
        return self.histogram.fires.double() / max(self.n_tokens, 1)

    def interval_samples(self, unit: int, interval: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.intervals.samples(unit * self.n_intervals + interval)

    def state_dict(self) -> dict[str, torch.Tensor]:
        stores = {"top": self.top, "histogram": self.histogram, "intervals": self.intervals, "random": self.random}
        state = {f"{name}.{key}": t for name, store in stores.items() for key, t in store.state_dict().items()}
        return state | {"n_tokens": torch.tensor(self.n_tokens)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("top", "histogram", "intervals", "random"):
            prefix = f"{name}."
            getattr(self, name).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        self.n_tokens = int(state["n_tokens"])


def hook_rows(model: BaseLM, hook: str, corpus: Corpus, ids: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hook's activations (rows, d_in) at analysed positions, and each row's token index."""
    acts = model.run(tokens, capture=[hook], stop_at=hook).activations[hook]  # (b, L, d_in)
    skip, length = corpus.skip_first_tokens, corpus.context_length
    positions = torch.arange(skip, length)
    index = ids[:, None] * length + positions[None, :]  # (b, L - skip)
    return acts[:, skip:].reshape(-1, acts.shape[-1]), index.reshape(-1).to(acts.device)


@torch.no_grad()
def stream_unit_stats(
    model: BaseLM,
    hook: str,
    units: dict[str, Units],
    corpus: Corpus,
    cfg: AnalyzeConfig,
    state_path: Path,
    digest: str,
    seed: int = 0,
) -> dict[str, UnitStats]:
    """Both passes over the corpus for every kind of unit, resuming from `state_path`."""
    device = model.device
    stats = {kind: UnitStats(u.n, cfg, device) for kind, u in units.items()}
    done_pass, done_batches = load_state(state_path, stats, digest)
    n_batches = corpus.n_batches(cfg.batch_size)
    for pass_number in range(done_pass, DONE):
        first = done_batches if pass_number == done_pass else 0
        progress = Progress(f"analyze pass {pass_number}/2", n_batches, unit="batches", already=first)
        for batch, (ids, tokens) in enumerate(corpus.batches(cfg.batch_size, first), start=first):
            acts, index = hook_rows(model, hook, corpus, ids, tokens)
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + batch)
            for kind, unit in units.items():
                unit_acts = unit.activations(acts)  # (rows, n_units)
                if pass_number == 1:
                    stats[kind].first_pass(unit_acts, index)
                else:
                    stats[kind].second_pass(unit_acts, index, generator)
            progress.update(1)
            if (batch + 1) % cfg.save_every == 0 and batch + 1 < n_batches:
                save_state(state_path, stats, digest, pass_number, batch + 1)
        save_state(state_path, stats, digest, pass_number + 1, 0)
    return stats


def save_state(path: Path, stats: dict[str, UnitStats], digest: str, pass_number: int, batches: int) -> None:
    """Every store, atomically: a crash mid-write leaves the previous state intact."""
    tensors = {
        f"{kind}.{key}": t.detach().cpu().contiguous()
        for kind, s in stats.items() for key, t in s.state_dict().items()
    }
    meta = {"digest": digest, "pass": str(pass_number), "batches": str(batches)}
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_state(path: Path, stats: dict[str, UnitStats], digest: str) -> tuple[int, int]:
    """(pass to continue, batches of it already done): (1, 0) without a usable state."""
    if not path.is_file():
        return 1, 0
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("digest") != digest:
        log.info("ignoring %s: it was saved for a different recipe", path)
        return 1, 0
    tensors = load_file(str(path))
    for kind, s in stats.items():
        prefix = f"{kind}."
        s.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    pass_number, batches = int(meta["pass"]), int(meta["batches"])
    log.info("resuming analysis from %s: pass %d, %d batches done", path, min(pass_number, 2), batches)
    return pass_number, batches
