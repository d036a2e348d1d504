"""Typed recipes: one dataclass per stage, loaded from OmegaConf YAML and validated.

A recipe is the record of an experiment. It is loaded in three layers -- the typed defaults
below, then the YAML file (and the `base:` recipe it names, recursively), then `key=value`
overrides from the command line -- and every artifact a stage writes carries the resolved result
(`save_recipe`). Validation happens at load time so that a typo fails before hours of harvesting,
and every error says which key, which value and what would have been accepted.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from framework.distributed import process_tag
from framework.errors import RecipeError  # re-exported: stages raise it from here


@dataclass
class TextConfig:
    """Where text comes from and how it becomes fixed-length token contexts."""

    # "stdlib" (the Python standard library's source), a path or glob of .txt/.jsonl/.parquet
    # files, or "hf:NAME[:CONFIG]" for a locally installed Hugging Face dataset.
    source: str = "stdlib"
    text_field: str = "text"  # the column holding text in .jsonl / .parquet / HF datasets
    hf_split: str = "train"
    context_length: int = 128
    heldout_fraction: float = 0.05  # documents, chosen deterministically by hashing their id
    max_documents: int | None = None  # cap for quick runs; None reads everything
    seed: int = 0


@dataclass
class BuiltinLMConfig:
    """The paper's one-layer transformer (residual 128, 512 ReLU MLP neurons)."""

    d_model: int = 128
    d_mlp: int = 512
    n_heads: int = 4
    n_layers: int = 1
    vocab_size: int = 4096  # size of the byte-level BPE trained on the corpus
    seed: int = 0


@dataclass
class LMConfig:
    """Which base model. `builtin` is trained by `sae pretrain`; others load ready-made."""

    # "builtin", "smollm2", or any Hugging Face causal LM by local path or hub id.
    name: str = "builtin"
    # Where the built-in model lives (written by `sae pretrain`); empty = {workdir}/lm.
    path: str = ""
    builtin: BuiltinLMConfig = field(default_factory=BuiltinLMConfig)
    dtype: str = "float32"
    device: str = "auto"  # "auto" picks cuda when present


@dataclass
class PretrainConfig:
    """Training the built-in LM on the text source (a real Lightning run)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    val_every: int = 100
    val_batches: int = 20
    precision: str = "32-true"


@dataclass
class HarvestConfig:
    """Running the LM over text and writing activation shards (or streaming them live)."""

    hook_points: list[str] = field(default_factory=lambda: ["blocks.0.mlp.hook_post"])
    mode: str = "shards"  # "shards" (write to disk once) or "live" (regenerate while training)
    output_dir: str = ""  # empty = {workdir}/activations; training also reads a URL (docs/activations.md)
    n_tokens: int = 1_000_000
    tokens_per_context: int = 64  # sampled from each context, as the paper draws 250 of 1024
    skip_first_tokens: int = 1  # position 0 sees only itself; its activations are atypical
    shuffle_window: int = 65_536  # rows mixed together before a shard is written
    # Which contexts each window takes: "shuffled" (a seeded permutation of the whole split, so
    # every window, and every shard, samples the whole corpus) or "source" (consecutive contexts
    # in the split's order, as stores harvested before this key existed hold them).
    context_order: str = "shuffled"
    rows_per_sample: int = 1024  # rows in one tar member
    rows_per_shard: int = 65_536
    dtype: str = "float32"  # float32, float16 or bfloat16 on disk
    batch_size: int = 32  # contexts per forward pass
    split: str = "train"  # "train" or "heldout"
    heldout_tokens: int = 65_536  # also harvested, for evaluation, into {output_dir}/heldout
    verify_on_read: bool = False
    seed: int = 0


@dataclass
class SAEConfig:
    """One sparse autoencoder. `train.bank` lists variations trained on the same batches."""

    name: str = ""  # empty = derived from variant and size
    variant: str = "paper"  # paper, april2024, topk, batchtopk, jumprelu, gated
    hook_point: str = ""  # empty = the first harvested hook point
    d_in: int = 0  # 0 = the width of hook_point in the activations; otherwise checked against it
    n_features: int = 4096
    l1_coefficient: float = 1e-3
    k: int = 32  # topk / batchtopk
    aux_k: int = 256  # topk / batchtopk: latents used by the AuxK loss
    aux_k_coefficient: float = 1 / 32
    dead_steps_threshold: int = 1000  # topk AuxK: a latent is dead after this many silent steps
    jumprelu_threshold: float = 1e-3  # initial threshold
    jumprelu_bandwidth: float = 1e-3
    l0_coefficient: float = 1e-3  # jumprelu sparsity penalty
    l1_warmup_steps: int = 0  # april2024: ramp lambda from 0 over this many steps
    # How weights start. "kaiming": the paper (PyTorch default, untied). "transpose": random
    # unit decoder columns, encoder = decoder^T (April 2024 update). "data": decoder columns
    # drawn from activations, encoder = decoder^T.
    init: str = "kaiming"
    # Set each encoder bias so its feature fires on about this many tokens in total per row
    # at step 0 (0 = leave the biases at zero, as the paper does).
    init_target_l0: float = 0.0
    decoder_bias_init: str = "geometric_median"  # geometric_median, mean, zeros
    seed: int = 0


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "sae-framework"
    entity: str = ""
    # "auto": online when WANDB_API_KEY is set, offline otherwise. "online", "offline", "disabled".
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)


RETIRED_SHUFFLE_BUFFER = 16  # train.shuffle_buffer's only accepted value (see TrainConfig)


@dataclass
class TrainConfig:
    """SAE training: optimisation, callbacks, strategy, tracking."""

    output_dir: str = ""  # empty = {workdir}/sae
    bank: list[Any] = field(default_factory=list)  # dicts of SAEConfig fields overriding `sae`
    n_tokens: int = 1_000_000
    batch_size: int = 4096  # global, split across data-parallel ranks
    lr: float = 1e-3
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_warmup_steps: int = 0
    lr_decay: str = "constant"  # constant, linear (to 0 over the last lr_decay_fraction), cosine
    lr_decay_fraction: float = 0.2
    grad_clip: float = 0.0
    precision: str = "32-true"  # or bf16-mixed; Lightning's 16-mixed and bf16-true are accepted too
    normalize_activations: str = "none"  # "none" or "norm" (scale rows to mean norm sqrt(d))
    # Resampling (paper): at these steps, features silent for `dead_window` steps are resampled.
    # null (the default) = the paper's 25k/50k/75k/100k scaled to this run's length; [] = none.
    resample_steps: list[int] | None = None
    resample: bool = True
    dead_window: int = 0  # 0 = paper's 12,500 scaled to this run's length
    resample_sample_size: int = 819_200
    density_window: int = 100  # steps over which feature density is measured
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0 = only at the end
    strategy: str = "auto"  # auto, ddp, fsdp, deepspeed, feature_sharded (docs/distributed.md)
    deepspeed_stage: int = 2  # ZeRO stage 1, 2 or 3 (strategy=deepspeed)
    # strategy=feature_sharded: ranks that split one dictionary's features (0 = all ranks); the
    # world size over it is the data-parallel degree.
    feature_shards: int = 0
    devices: str = "auto"
    num_nodes: int = 1
    epochs: int = 1
    # Retired: it never did anything (rows are shuffled at harvest time and the reader permutes
    # shards per epoch; docs/activations.md, "Reading"). Kept so that the recipes saved beside
    # earlier runs still load and their fingerprints still match; any other value is refused.
    shuffle_buffer: int = RETIRED_SHUFFLE_BUFFER
    num_workers: int = 0
    # TopK and paper SAEs on one GPU: record the whole training step (forward to Adam) as a CUDA graph and replay it
    # (framework/training/cuda_graphs.py; docs/training.md, "CUDA graphs")
    cuda_graphs: bool = False
    seed: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    output_dir: str = ""  # empty = {workdir}/eval
    n_tokens: int = 65_536
    batch_size: int = 16  # contexts per forward pass when splicing
    n_contexts: int = 64  # for loss recovered / KL with the LM
    sae_path: str = ""  # empty = the trained bank; or an SAELens-format directory


@dataclass
class AnalyzeConfig:
    output_dir: str = ""  # empty = {workdir}/analysis
    sae_name: str = ""  # empty = first SAE of the bank
    n_tokens: int = 200_000
    batch_size: int = 32  # contexts per forward pass
    save_every: int = 20  # batches between progress saves (an interrupted analyze resumes there)
    top_k_examples: int = 20
    n_quantile_intervals: int = 10
    examples_per_interval: int = 5
    n_random_examples: int = 10
    context_window: int = 24  # tokens shown around an example
    n_features: int = 200  # pages written (most active first); -1 = all
    logit_top_tokens: int = 10
    ablation_examples: int = 10  # top examples per page whose ablation is measured (a forward pass each)
    autointerp: bool = False
    autointerp_model: str = "smollm2"  # "smollm2" or an OpenAI-compatible URL
    autointerp_api_key_env: str = "OPENAI_API_KEY"
    autointerp_n_features: int = 20
    # What `sae analyze` does (docs/analysis.md): "features" (examples, logit effects,
    # dashboards), "splitting" (match features across the bank's dictionary sizes),
    # "universality" (best activation correlations with another run's features), "autointerp"
    # (explain and score features and neurons with an LLM). Each mode writes its own output.
    mode: str = "features"
    split_feature: int = -1  # root of the drawn split tree, a feature of the smallest SAE; -1 = the most split
    split_candidates: int = 8  # nearest larger-dictionary features (decoder cosine) correlated per feature
    split_min_correlation: float = 0.3  # activation correlation that makes a match an edge of the tree
    other_workdir: str = ""  # universality: the other run's workdir (model B), holding its recipe.yaml
    other_sae_name: str = ""  # universality: the other run's SAE (empty: the first of its bank)
    ceiling_sae: str = ""  # universality ceiling: a second SAE on this run's activations (bank name or directory)
    ultralow_log10_density: float = -4.0  # features rarer than this form the "ultralow density cluster"
    autointerp_api_model: str = ""  # the request's "model" when autointerp_model is a URL
    autointerp_explain_examples: int = 49  # examples the explainer sees (the paper's 49)
    autointerp_simulate_examples: int = 60  # held-out examples the simulator predicts (the paper's 60)


@dataclass
class ExportConfig:
    output_dir: str = ""  # empty = {workdir}/export


@dataclass
class RunConfig:
    stages: list[str] = field(
        default_factory=lambda: ["pretrain", "harvest", "train", "eval", "analyze", "export"]
    )


@dataclass
class SweepConfig:
    """Grid or list of recipe overrides; each point runs `sweep.stages` in its own directory."""

    grid: dict[str, Any] = field(default_factory=dict)  # key -> list of values (product)
    points: list[Any] = field(default_factory=list)  # explicit dicts of key -> value
    stages: list[str] = field(default_factory=lambda: ["train", "eval"])


@dataclass
class Recipe:
    name: str = "recipe"
    workdir: str = "runs/${name}"
    seed: int = 0
    text: TextConfig = field(default_factory=TextConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    # Where each stage writes, with the recipe's explicit paths taking precedence.
    def path(self, stage: str) -> Path:
        explicit = {
            "lm": self.lm.path,
            "activations": self.harvest.output_dir,
            "sae": self.train.output_dir,
            "eval": self.eval.output_dir,
            "analysis": self.analyze.output_dir,
            "export": self.export.output_dir,
        }[stage]
        return Path(explicit) if explicit else Path(self.workdir) / stage

    @property
    def pretrains_lm(self) -> bool:
        """Whether `sae pretrain` trains this recipe's LM: only the built-in one is trained here;
        SmolLM2 and Hugging Face models load ready-made, so `sae run` and `sae sweep` skip the
        stage for them and the CLI locks nothing for it."""
        return self.lm.name == "builtin"

    def store_location(self) -> str:
        """Where training reads activations: the local store directory, or harvest.output_dir
        as given when it is a URL (`http(s)://`, `s3://`, `pipe:...`), which a Path would mangle."""
        explicit = self.harvest.output_dir
        return explicit if explicit and is_url(explicit) else str(self.path("activations"))

    def sae_configs(self) -> list[SAEConfig]:
        """The bank: `sae` alone, or `sae` overridden by each entry of `train.bank`."""
        entries = self.train.bank or [{}]
        configs = []
        for i, entry in enumerate(entries):
            where = f"train.bank[{i}]"
            if not isinstance(entry, dict):
                raise RecipeError(f"{where} must be a mapping of sae fields, got {entry!r}")
            base = OmegaConf.structured(self.sae)
            merged = _merge_checked([base, OmegaConf.create(entry)], section=where)
            cfg = OmegaConf.to_object(merged)
            if not cfg.name:
                cfg.name = default_sae_name(cfg)
            if any(c in cfg.name for c in "./ "):
                raise RecipeError(f"{where}: SAE name {cfg.name!r} may not contain '.', '/' or spaces")
            _check_sae_choices(cfg, where if self.train.bank else "sae")
            configs.append(cfg)
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise RecipeError(f"train.bank: SAE names must be unique, got {names}; set `name`")
        return configs


def is_url(location: str) -> bool:
    """A store given as a URL or pipe command rather than a local directory."""
    return "://" in location or location.startswith("pipe:")


def _compact_float(value: float) -> str:
    """3e-4 -> '3e-04', 1.5e-3 -> '1p5e-03': short, and free of dots (names become module keys)."""
    if not math.isfinite(value):  # named before it is validated; the check then refuses it
        return str(value)
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.').replace('.', 'p')}e{exponent}"


def default_sae_name(cfg: SAEConfig) -> str:
    if cfg.variant in ("topk", "batchtopk"):
        sparsity = f"k{cfg.k}"
    elif cfg.variant == "jumprelu":
        sparsity = f"l0_{_compact_float(cfg.l0_coefficient)}"
    else:
        sparsity = f"l1_{_compact_float(cfg.l1_coefficient)}"
    return f"{cfg.variant}_{cfg.n_features}_{sparsity}"


# --------------------------------------------------------------------------------------------
# Choices checked after the schema: values that are strings in YAML but drawn from a set.

CHOICES: dict[str, tuple[str, ...]] = {
    "lm.dtype": ("float32", "float16", "bfloat16"),
    "harvest.mode": ("shards", "live"),
    "harvest.dtype": ("float32", "float16", "bfloat16"),
    "harvest.split": ("train", "heldout"),
    "harvest.context_order": ("shuffled", "source"),
    "sae.variant": ("paper", "april2024", "topk", "batchtopk", "jumprelu", "gated"),
    "sae.init": ("kaiming", "transpose", "data"),
    "sae.decoder_bias_init": ("geometric_median", "mean", "zeros"),
    "train.lr_decay": ("constant", "linear", "cosine"),
    "train.precision": ("32-true", "bf16-mixed", "16-mixed", "bf16-true"),
    "pretrain.precision": ("32-true", "bf16-mixed", "16-mixed", "bf16-true"),
    "train.normalize_activations": ("none", "norm"),
    "train.strategy": ("auto", "ddp", "fsdp", "deepspeed", "feature_sharded"),
    "train.wandb.mode": ("auto", "online", "offline", "disabled"),
    "analyze.mode": ("features", "splitting", "universality", "autointerp"),
}
STAGES = ("pretrain", "harvest", "train", "eval", "analyze", "export")
MAX_CONTEXT_LENGTH = 32_768  # positions (0 .. length - 1) are int16 in the activation shards (activations/format.py)


# Numbers a run cannot use: (dotted key, smallest allowed value, what it means).
MINIMUMS: tuple[tuple[str, float, str], ...] = (
    ("train.batch_size", 1, "rows per step"),
    ("train.n_tokens", 1, "rows to train on"),
    ("train.num_workers", 0, "DataLoader processes"),
    ("train.eval_batches", 1, "held-out batches per evaluation"),
    ("train.resample_sample_size", 1, "rows drawn to choose the new directions of resampled features"),
    ("train.log_every", 1, "steps between logged metrics"),
    ("train.density_window", 1, "steps over which feature density is measured"),
    ("train.checkpoint_every", 0, "steps between checkpoints; 0 = only at the end"),
    ("train.eval_every", 0, "steps between held-out evaluations; 0 = only at the end"),
    ("train.dead_window", 0, "steps a feature must stay silent to count as dead; 0 = the paper's, scaled"),
    ("train.epochs", 1, "passes over the activation store training may make"),
    ("harvest.n_tokens", 1, "rows to harvest"),
    ("harvest.batch_size", 1, "contexts per forward pass"),
    ("harvest.tokens_per_context", 1, "positions harvested from each context"),
    ("harvest.rows_per_sample", 1, "rows in one tar member of a shard"),
    ("harvest.rows_per_shard", 1, "rows in one shard"),
    ("eval.n_tokens", 1, "held-out rows the SAE is evaluated on"),
    ("eval.batch_size", 1, "contexts per forward pass when splicing the SAE into the LM"),
    ("eval.n_contexts", 1, "contexts for the loss recovered and KL with the LM"),
    ("pretrain.steps", 1, "optimizer steps"),
    ("pretrain.batch_size", 1, "contexts per step"),
    ("pretrain.val_every", 1, "steps between validations (and checkpoints)"),
    ("harvest.skip_first_tokens", 0, "positions left out at the start of each context"),
    ("train.grad_clip", 0, "largest gradient norm; 0 = no clipping"),
    ("train.lr_warmup_steps", 0, "steps of linear learning-rate warm-up; 0 = none"),
    ("train.num_nodes", 1, "machines the run spans"),
    ("analyze.n_tokens", 1, "tokens the analysis reads"),
    ("analyze.batch_size", 1, "contexts per forward pass"),
)
POSITIVE = ("train.lr", "pretrain.lr")
# The same for each SAE (the `sae` section and every bank entry): (field, smallest, meaning).
SAE_MINIMUMS: tuple[tuple[str, float, str], ...] = (
    ("l1_coefficient", 0, "weight of the L1 sparsity penalty; 0 turns it off"),
)
# topk / batchtopk only (the other variants ignore these fields).
TOPK_MINIMUMS: tuple[tuple[str, float, str], ...] = (
    ("k", 1, "features active per row"),
    ("aux_k", 1, "dead latents the AuxK loss reconstructs from; to turn AuxK off set aux_k_coefficient=0"),
)


def _too_small(dotted: str, value: Any, minimum: float, meaning: str) -> RecipeError:
    return RecipeError(f"{dotted}={value} must be at least {minimum} ({meaning}); set {dotted} to {minimum} or more")


def _check_sae_choices(cfg: SAEConfig, where: str) -> None:
    """An SAE's fields drawn from a set, and its size (the `sae` section and each bank entry)."""
    for dotted, allowed in CHOICES.items():
        section, _, key = dotted.partition(".")
        if section != "sae":
            continue
        value = getattr(cfg, key)
        if value not in allowed:
            raise _not_a_choice(f"{where}.{key}", value, allowed)
    if cfg.n_features < 1:
        raise RecipeError(f"{where}.n_features={cfg.n_features}: an SAE needs at least one feature")
    checks = SAE_MINIMUMS + (TOPK_MINIMUMS if cfg.variant in ("topk", "batchtopk") else ())
    for key, minimum, meaning in checks:
        value = getattr(cfg, key)
        if not math.isfinite(value):
            raise RecipeError(f"{where}.{key}={value} must be a finite number ({meaning})")
        if value < minimum:
            raise _too_small(f"{where}.{key}", value, minimum, meaning)
    if cfg.variant in ("topk", "batchtopk") and cfg.k > cfg.n_features:
        raise RecipeError(
            f"{where}.k={cfg.k} exceeds {where}.n_features={cfg.n_features}: a {cfg.variant} SAE keeps the k "
            f"largest of its n_features latents per row. Set {where}.k to at most {cfg.n_features}, or raise "
            f"{where}.n_features"
        )


# What a choice field given a YAML boolean most likely meant, where one choice plainly means it.
BOOLEAN_MEANS = {("train.wandb.mode", "False"): "disabled"}


def _not_a_choice(dotted: str, value: Any, allowed: tuple[str, ...]) -> RecipeError:
    if value in ("True", "False"):
        # YAML reads unquoted off/no/false and on/yes/true as booleans, and OmegaConf stores a
        # boolean given to a string field as "True"/"False": name the word's fate, not the string.
        words = "off, no and false" if value == "False" else "on, yes and true"
        meant = BOOLEAN_MEANS.get((dotted, value))
        return RecipeError(
            f"{dotted}: YAML read the value as the boolean {value.lower()} (unquoted {words} all read so), "
            f"not as one of the choices {', '.join(repr(a) for a in allowed)}"
            + (f"; use {meant} ({dotted}={meant})" if meant else "; set one of them")
        )
    return RecipeError(f"{dotted}={value!r} is not one of {', '.join(allowed)}" + _suggest(str(value), allowed))


def _check_choices(recipe: Recipe) -> None:
    for dotted, minimum, meaning in MINIMUMS:
        value = _lookup(recipe, dotted)
        if value < minimum:
            raise _too_small(dotted, value, minimum, meaning)
    n_tokens, batch_size = recipe.train.n_tokens, recipe.train.batch_size
    if n_tokens < batch_size:  # training takes n_tokens // batch_size steps, and at least one
        raise RecipeError(
            f"train.n_tokens={n_tokens:,} is less than one batch (train.batch_size={batch_size:,}): the run "
            f"would train one step on {batch_size:,} rows, not the {n_tokens:,} asked for. Set train.n_tokens "
            f"to at least {batch_size} (steps = n_tokens // batch_size), or train.batch_size to at most {n_tokens}"
        )
    if not 0 <= recipe.text.heldout_fraction < 1:
        raise RecipeError(
            f"text.heldout_fraction={recipe.text.heldout_fraction} must lie in [0, 1) (the share of documents "
            f"kept for the held-out split); set it between 0 and 1, e.g. 0.05"
        )
    if recipe.analyze.n_features == 0 or recipe.analyze.n_features < -1:
        raise RecipeError(
            f"analyze.n_features={recipe.analyze.n_features} must be a positive count of feature pages (the most "
            f"active first), or -1 for every feature"
        )
    for dotted in POSITIVE:
        if not 0 < _lookup(recipe, dotted) < math.inf:
            raise RecipeError(f"{dotted}={_lookup(recipe, dotted)} must be a positive finite number")
    for dotted, allowed in CHOICES.items():
        value = _lookup(recipe, dotted)
        if value not in allowed:
            raise _not_a_choice(dotted, value, allowed)
    for stage in recipe.run.stages:
        if stage not in STAGES:
            raise RecipeError(f"run.stages: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    for stage in recipe.sweep.stages:
        if stage not in STAGES:
            raise RecipeError(f"sweep.stages: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    if recipe.text.context_length < 2:
        raise RecipeError("text.context_length must be at least 2 (a next-token loss needs two)")
    if recipe.harvest.split == "heldout" and recipe.harvest.heldout_tokens > 0:
        raise RecipeError("harvest.split=heldout with harvest.heldout_tokens > 0: the held-out store would "
                          "repeat the first rows of the store itself (both harvest the held-out split from its "
                          "start). Set harvest.heldout_tokens=0 for a store of held-out text")
    if recipe.text.context_length > MAX_CONTEXT_LENGTH:
        raise RecipeError(f"text.context_length ({recipe.text.context_length}) exceeds {MAX_CONTEXT_LENGTH}: "
                          f"activation shards store each row's position as int16")
    harvest = recipe.harvest
    if max(harvest.shuffle_window, harvest.rows_per_shard) % harvest.rows_per_shard \
            or harvest.rows_per_shard % harvest.tokens_per_context:
        raise RecipeError(
            f"harvest.shuffle_window ({harvest.shuffle_window}) must be a multiple of harvest.rows_per_shard "
            f"({harvest.rows_per_shard}), which must be a multiple of harvest.tokens_per_context "
            f"({harvest.tokens_per_context}): a window's contexts fill whole shards"
        )
    if recipe.harvest.tokens_per_context + recipe.harvest.skip_first_tokens > recipe.text.context_length:
        raise RecipeError(
            f"harvest.tokens_per_context ({recipe.harvest.tokens_per_context}) + "
            f"harvest.skip_first_tokens ({recipe.harvest.skip_first_tokens}) exceeds "
            f"text.context_length ({recipe.text.context_length}); lower one or raise the other"
        )
    # Listed resampling steps the run never reaches were skipped without a word. Checked while
    # train.resample is on (off, the list is never read), whatever the variants: a bank may mix
    # them, and a step outside the run is a mistake for any of them.
    # The last step is outside too: features resampled after it would be saved untrained.
    steps = total_steps(recipe)
    outside = sorted(s for s in recipe.train.resample_steps or [] if not 1 <= s < steps)
    if recipe.train.resample and outside:
        raise RecipeError(
            f"train.resample_steps lists {outside}, outside the run: it trains {steps:,} steps (train.n_tokens="
            f"{n_tokens:,} // train.batch_size={batch_size:,}), and resampling happens after steps 1 to "
            f"{steps - 1} (after the last, the new features would be saved untrained; a run of one step has "
            f"none). "
            f"Set train.resample_steps to steps in that range, raise train.n_tokens, or set train.resample_steps="
            f"null for the paper's schedule scaled to this run"
        )
    betas = recipe.train.adam_betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise RecipeError(
            f"train.adam_betas={list(betas)} must be two numbers in [0, 1) (Adam's decay rates for the "
            f"gradient's mean and its square); set e.g. train.adam_betas=[0.9,0.999]"
        )
    fraction = recipe.train.lr_decay_fraction
    if not 0 <= fraction <= 1:
        raise RecipeError(
            f"train.lr_decay_fraction={fraction} must lie in [0, 1] (the share of the run, at its end, over "
            f"which train.lr_decay=linear decays the learning rate to 0); set it between 0 and 1"
        )
    if recipe.train.deepspeed_stage not in (1, 2, 3):
        raise RecipeError(f"train.deepspeed_stage={recipe.train.deepspeed_stage} is not one of 1, 2, 3")
    if recipe.train.strategy == "deepspeed" and recipe.train.precision == "16-mixed" and recipe.train.grad_clip > 0:
        # DeepSpeed's fp16 optimizer unscales the gradients inside its step, after the clip: the
        # clip would see them times the loss scale (2^16 at first) and shrink every step.
        raise RecipeError("train.grad_clip with train.strategy=deepspeed and train.precision=16-mixed would clip "
                          "gradients still multiplied by the loss scale; use train.precision=bf16-mixed (or 32-true), "
                          "or train.grad_clip=0")
    if recipe.train.feature_shards < 0:
        raise RecipeError(f"train.feature_shards={recipe.train.feature_shards} must be 0 (all ranks) or positive")
    if recipe.train.shuffle_buffer != RETIRED_SHUFFLE_BUFFER:
        raise RecipeError(
            f"train.shuffle_buffer={recipe.train.shuffle_buffer} has no effect and is refused: rows are "
            f"shuffled when harvested (across harvest.shuffle_window rows) and training reads whole shards "
            f"in a new random order each epoch (train.seed). Remove the key; for more mixing, raise "
            f"harvest.shuffle_window and re-harvest"
        )
    if not recipe.harvest.hook_points:
        raise RecipeError("harvest.hook_points is empty; name at least one (see `sae hooks MODEL`)")
    for i, point in enumerate(recipe.sweep.points):
        if not isinstance(point, dict):
            raise RecipeError(
                f"sweep.points[{i}]={point!r} is not a mapping: each point is a set of overrides, key to value, "
                f"e.g. sweep.points=[{{train.lr: 0.002}}] (in YAML: `- {{train.lr: 0.002}}`)"
            )
    hooks = list(recipe.harvest.hook_points)
    repeated = sorted({h for h in hooks if hooks.count(h) > 1})
    if repeated:
        raise RecipeError(
            f"harvest.hook_points={hooks} names {', '.join(repeated)} more than once: each listed hook is harvested, "
            f"so it would be written to disk twice. List each hook once, e.g. harvest.hook_points="
            f"[{','.join(dict.fromkeys(hooks))}]"
        )


def total_steps(recipe: Recipe) -> int:
    """The training run's optimizer steps: one per batch of train.n_tokens."""
    return max(1, recipe.train.n_tokens // recipe.train.batch_size)


def _lookup(recipe: Recipe, dotted: str) -> Any:
    value: Any = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section_keys(section: str) -> list[str]:
    """Valid keys of a dotted section of the schema ('' = top level)."""
    node: Any = Recipe
    for part in filter(None, section.split(".")):
        node = {f.name: f for f in fields(node)}[part].default_factory
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _field_type(dotted: str) -> str:
    """The annotated type of a dotted schema key, for error messages."""
    node: Any = SAEConfig if dotted.startswith("train.bank") else Recipe
    parts = dotted.split(".")[2:] if dotted.startswith("train.bank") else dotted.split(".")
    annotation = "a different type"
    for part in parts:
        name, bracket, _ = part.partition("[")
        by_name = {f.name: f for f in fields(node)} if is_dataclass(node) else {}
        if name not in by_name:
            break
        annotation = str(by_name[name].type)
        if bracket:  # an element of a list field: list[float] -> float
            inner = re.fullmatch(r"(?:list|tuple)\[(.*)\]", annotation.removesuffix(" | None"))
            annotation = inner.group(1) if inner else annotation
        node = by_name[name].default_factory if is_dataclass(by_name[name].default_factory) else None
    return annotation


def _check_shapes(node: DictConfig, schema: type, prefix: str) -> None:
    """Refuse a single value where the schema has a section or a list, naming the key and the
    form it takes: OmegaConf reports these as a merge error that names neither the key nor the
    value (or, for a mapping given to a list, as a TypeError)."""
    by_name = {f.name: f for f in fields(schema)}
    for key in node:
        spec = by_name.get(str(key))
        if spec is None or OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue  # unknown keys, interpolations and ???: the merge and the resolver name them
        value, dotted = node[key], f"{prefix}{key}"
        if value is None:
            continue  # null: the merge says, by key, whether it may be
        if is_dataclass(spec.default_factory):
            if not isinstance(value, DictConfig):
                raise _not_a_section(dotted, spec.default_factory, value)
            _check_shapes(value, spec.default_factory, f"{dotted}.")
        elif spec.type == "str" and isinstance(value, bool) and not _is_choice(dotted, key, schema):
            # OmegaConf would store "False"/"True" (a W&B project named False); choice fields get
            # their own message, with the choices (_not_a_choice)
            raise RecipeError(
                f"{dotted}: YAML read the value as the boolean {str(value).lower()} (unquoted on/off, "
                f"yes/no and true/false all read so), where a text is expected; quote the word you "
                f"meant, e.g. {dotted}='{'no' if not value else 'yes'}' (in YAML: `{key}: \"...\"`)"
            )
        elif str(spec.type).startswith("dict[") and not isinstance(value, DictConfig):
            shown = "a list" if isinstance(value, ListConfig) else repr(value)
            raise RecipeError(
                f"{dotted!r} maps dotted recipe keys to lists of values, got {shown}; e.g. "
                f"'{dotted}={{sae.l1_coefficient: [1e-3, 3e-3]}}' (in YAML: `{key}:` with "
                f"`sae.l1_coefficient: [1e-3, 3e-3]` below it)"
            )
        elif str(spec.type).startswith("list[") and not isinstance(value, ListConfig):
            shown = "a mapping" if isinstance(value, DictConfig) else repr(value)
            # list[Any] holds mappings (train.bank, sweep.points); the others hold single values.
            entry = "{KEY: VALUE}" if spec.type == "list[Any]" else "..." if isinstance(value, DictConfig) else value
            raise RecipeError(
                f"{dotted!r} is a list, got {shown}; write it in brackets, e.g. {dotted}=[{entry}] "
                f"(in YAML: `{key}: [...]`)"
            )


def _is_choice(dotted: str, key: str, schema: type) -> bool:
    return dotted in CHOICES or (schema is SAEConfig and f"sae.{key}" in CHOICES)


def _not_a_section(dotted: str, schema: type, value: Any) -> RecipeError:
    keys = [f.name for f in fields(schema)]
    if isinstance(value, ListConfig):
        shown, example = "a list", f"{dotted}.KEY=VALUE"
    else:
        # The key whose choices hold the value, when there is one: train.wandb=disabled means mode.
        meant = next((k for k in keys if value in CHOICES.get(f"{dotted}.{k}", ())), "KEY")
        shown, example = repr(value), f"{dotted}.{meant}={value}"
    return RecipeError(
        f"{dotted!r} is a section, not a single value: got {shown}. Set one of its keys instead, e.g. "
        f"{example} (keys of {dotted}: {', '.join(keys)})"
    )


def _merge_checked(configs: list, section: str = "") -> DictConfig:
    schema = SAEConfig if section else Recipe
    for layer in configs:
        if isinstance(layer, DictConfig):
            _check_shapes(layer, schema, f"{section}." if section else "")
    try:
        return OmegaConf.merge(*configs)
    except ConfigKeyError as err:
        key = str(getattr(err, "key", "") or "")
        parent = str(getattr(err, "full_key", "") or key).rpartition(".")[0]
        where = ".".join(filter(None, [section, parent])) if section == "" else section
        valid = _section_keys(parent) if section == "" else [f.name for f in fields(SAEConfig)]
        raise RecipeError(
            f"unknown key {key!r} in section {where or 'top level'!r}{_suggest(key, valid)}; "
            f"valid keys: {', '.join(valid)}"
        ) from None
    except ValidationError as err:
        full_key = ".".join(filter(None, [section, str(getattr(err, "full_key", "") or "")]))
        value = getattr(err, "value", None)
        if value is None:
            value = str(err).split("'")[1] if str(err).count("'") >= 2 else "?"
        elif isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value)
        raise RecipeError(
            f"wrong type for {full_key!r}: got {value!r}, expected {_field_type(full_key)}"
        ) from None
    except OmegaConfBaseException as err:
        raise RecipeError(f"invalid recipe{f' ({section})' if section else ''}: {err}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """A recipe file and, first, the chain of `base:` recipes it extends."""
    path = path.resolve()
    if not path.is_file():
        named_by = f" (the `base:` of {seen[-1]})" if seen else ""
        if path.is_dir():
            raise RecipeError(f"{path} is a directory, not a recipe file{named_by}")
        raise RecipeError(f"recipe file not found: {path}{named_by}")
    if path in seen:
        raise RecipeError(f"recipe `base:` chain loops back to {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends
        raise RecipeError(f"cannot parse recipe {path}: {err}") from None
    if not isinstance(node, DictConfig):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(node).__name__}")
    layers: list[DictConfig] = []
    key = "base" if "base" in node else "defaults"
    base = node.pop("base", None) or node.pop("defaults", None)
    refs = [base] if isinstance(base, str) else list(base) if isinstance(base, ListConfig) else base
    if refs is not None and not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
        raise RecipeError(
            f"{path}: `{key}: {OmegaConf.to_container(base) if isinstance(base, (DictConfig, ListConfig)) else base!r}` "
            f"must name the recipe file this one extends, relative to it (e.g. `{key}: ../quickstart.yaml`), "
            f"or a list of such files"
        )
    for ref in refs or []:
        layers += _read_yaml((path.parent / str(ref)), seen + (path,))
    return layers + [node]


def _override_layer(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value (e.g. sae.n_features=8192)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:
        raise RecipeError(f"cannot parse overrides {overrides}: {err}") from None


# `${oc.env:NAME}` is resolved when the recipe loads and then saved like any value (recipe.yaml,
# checkpoints, W&B's config): fine for a path (`${oc.env:SCRATCH}/runs`), not for a secret.
_ENV_INTERPOLATION = re.compile(r"\$\{oc\.env:\s*([^,}\s]+)")
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)


def _refuse_secret_interpolations(node: Any, where: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_secret_interpolations(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_secret_interpolations(value, f"{where}[{i}]")
    elif isinstance(node, str):
        for name in _ENV_INTERPOLATION.findall(node):
            if "${" in name:
                raise RecipeError(
                    f"{where} reads an environment variable whose name is itself computed ({node!r}): its value "
                    f"would be saved with the recipe, and a computed name cannot be checked for a secret. Name the "
                    f"variable literally, e.g. ${{oc.env:SCRATCH}}"
                )
            if _SECRET_NAME.search(name):
                raise RecipeError(
                    f"{where} reads ${{oc.env:{name}}}: a recipe's values are saved (recipe.yaml, checkpoints, "
                    f"W&B's config), so a secret must not be one. Keys stay in the environment: name the variable "
                    f"(analyze.autointerp_api_key_env={name}; W&B reads WANDB_API_KEY itself), or in a pipe "
                    f"command let the shell expand it (pipe:curl -H \"Authorization: Bearer ${name}\" ...)"
                )


def _finish(layers: list) -> Recipe:
    merged = _merge_checked(layers)
    _refuse_secret_interpolations(OmegaConf.to_container(merged, resolve=False))
    try:
        OmegaConf.resolve(merged)
        recipe: Recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise RecipeError(f"invalid recipe: {err}") from None
    _check_choices(recipe)
    recipe.sae_configs()  # validates the bank entries now rather than at train time
    return recipe


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Defaults, then the YAML chain, then `key=value` overrides; validated and typed."""
    layers: list = [OmegaConf.structured(Recipe)]
    if path is not None:
        layers += _read_yaml(Path(path))
    if overrides:
        layers.append(_override_layer(overrides))
    recipe = _finish(layers)
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        setting = bank_entries_setting(recipe, key)
        if setting and len(setting) == len(recipe.train.bank):  # it reaches no SAE at all
            raise RecipeError(
                f"override {key} does not reach the SAEs: every train.bank entry ({setting}) sets "
                f"{key[len('sae.'):]} itself, and an entry overrides the sae section (the outputs would "
                f"record the override for SAEs trained without it). Override the bank instead "
                f"(train.bank=[...]), or remove {key[len('sae.'):]} from the entries"
            )
    return recipe


def bank_entries_setting(recipe: Recipe, key: str) -> list[int]:
    """The `train.bank` entries that set the field of `sae.*` key `key` themselves, so that a
    value given to `key` reaches none of them."""
    if not key.startswith("sae."):
        return []
    field_name = key[len("sae."):]
    return [i for i, entry in enumerate(recipe.train.bank) if field_name in entry]


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A validated copy of a recipe with `key=value` overrides applied."""
    return _finish([OmegaConf.structured(Recipe), OmegaConf.structured(recipe), _override_layer(overrides)])


def with_values(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """A validated copy of a recipe with typed `{dotted key: value}` overrides (a sweep's points,
    already read from YAML): a value is never turned back into text and read again, so null
    stays None, a quoted "off" a string and "1e3" not a number."""
    layer = OmegaConf.create()
    for key, value in values.items():
        OmegaConf.update(layer, key, value, merge=False)
    return _finish([OmegaConf.structured(Recipe), OmegaConf.structured(recipe), layer])


def recipe_to_dict(recipe: Recipe) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(recipe), resolve=True)


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def recipe_from_dict(data: dict) -> Recipe:
    merged = _merge_checked([OmegaConf.structured(Recipe), OmegaConf.create(data)])
    return OmegaConf.to_object(merged)


def save_recipe(recipe: Recipe, directory: str | os.PathLike) -> Path:
    """Write the resolved recipe beside an artifact, so the artifact explains itself."""
    out = Path(directory) / "recipe.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".recipe.yaml.{process_tag()}.tmp")  # the process's own: torchrun ranks write it too
    tmp.write_text(recipe_to_yaml(recipe))
    tmp.replace(out)
    return out


__all__ = [
    "Recipe", "RecipeError", "TextConfig", "LMConfig", "BuiltinLMConfig", "PretrainConfig",
    "HarvestConfig", "SAEConfig", "TrainConfig", "WandbConfig", "EvalConfig", "AnalyzeConfig",
    "ExportConfig", "RunConfig", "SweepConfig", "load_recipe", "save_recipe", "recipe_to_dict",
    "recipe_to_yaml", "recipe_from_dict", "default_sae_name", "with_overrides",
]
