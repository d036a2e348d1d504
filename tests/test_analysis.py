"""Feature analysis: the streaming stores are exact, logit effects and ablation find what was planted."""

from __future__ import annotations

import copy
import json
import math
import sysconfig
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from framework.analysis.ablation import AblationEffects, measure_ablations
from framework.analysis.analyze import STATE_FILE, analyze
from framework.analysis.collect import UnitStats, stream_unit_stats
from framework.analysis.composition import neuron_composition
from framework.analysis.corpus import Corpus
from framework.analysis.dashboard import visible
from framework.analysis.examples import N_BINS, ActivationHistogram, GroupSample, TopExamples, histogram_edges
from framework.analysis.logits import logit_effects, readout
from framework.analysis.units import feature_units, units_for
from framework.config import AnalyzeConfig, SAEConfig, TextConfig
from framework.export import export_sae
from framework.lm import load_lm
from framework.lm.builtin import BuiltinArchitecture, BuiltinLM
from framework.lm.hf import HFLM
from framework.lm.tokenizer import train_tokenizer
from framework.sae import build_sae
from framework.saved import TrainedSAE

HOOK = "blocks.0.mlp.hook_post"
PLANTED_FEATURE = 3
CORPUS_MODULES = ("textwrap.py", "heapq.py", "bisect.py", "colorsys.py", "shlex.py", "fnmatch.py")


@dataclass
class TinySetup:
    """A small real pipeline: Python source, a BPE trained on it, a built-in LM and an SAE whose
    feature PLANTED_FEATURE fires everywhere and writes the direction that most raises one token."""

    model: BuiltinLM
    trained: TrainedSAE
    corpus: Corpus
    planted_token: int


def build_tiny_setup(directory: Path) -> TinySetup:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (directory / "corpus").mkdir(parents=True, exist_ok=True)
    for name in CORPUS_MODULES:
        (directory / "corpus" / f"{name}.txt").write_text((stdlib / name).read_text())
    text = TextConfig(source=str(directory / "corpus"), context_length=32, heldout_fraction=0.5)
    tokenizer = train_tokenizer(text, 400)
    torch.manual_seed(0)
    arch = BuiltinArchitecture(d_model=32, d_mlp=64, n_heads=2, vocab_size=tokenizer.vocab_size, n_ctx=32)
    model = BuiltinLM(arch, tokenizer).eval()
    sae = build_sae(arch.d_mlp, SAEConfig(variant="paper", n_features=16)).eval()
    names = tokenizer.token_strings(range(tokenizer.vocab_size))
    planted = next(i for i, s in enumerate(names) if s.isalpha() and len(s) >= 4)
    direct = (model.mlp_out_weight(0) @ model.unembed_weight()).detach()  # (d_mlp, vocab)
    with torch.no_grad():
        sae.W_dec[PLANTED_FEATURE] = direct[:, planted] / direct[:, planted].norm()
        sae.b_enc[PLANTED_FEATURE] = 2.0
    corpus = Corpus(text, tokenizer, "heldout", n_contexts=24, skip_first_tokens=1)
    return TinySetup(model, TrainedSAE("tiny", sae, HOOK, 1.0), corpus, planted)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"))


def sparse_activations(rows: int, units: int, seed: int = 0) -> torch.Tensor:
    """Continuous (so tie-free) non-negative activations, mostly zero, some units silent."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(rows, units, generator=g) - 1.0)
    acts[:, -1] = 0.0  # a dead unit
    return acts


def test_top_examples_equal_a_full_sort():
    acts = sparse_activations(500, 12)
    tokens = torch.randperm(10_000, generator=torch.Generator().manual_seed(1))[:500]  # any token indices
    store = TopExamples(12, k=7)
    for start in range(0, 500, 37):
        store.update(acts[start : start + 37], tokens[start : start + 37])
    values, rows = torch.sort(acts, dim=0, descending=True)
    assert torch.equal(store.values, values[:7].T)
    fired = store.values > 0
    assert torch.equal(store.tokens[fired], tokens[rows[:7].T][fired])
    assert not fired[-1].any()


def test_group_sample_keeps_the_smallest_keys_of_each_group():
    g = torch.Generator().manual_seed(2)
    groups = torch.randint(0, 9, (400,), generator=g)
    keys = torch.rand(400, generator=g, dtype=torch.float64)
    tokens, values = torch.arange(400), torch.rand(400, generator=g)
    sample = GroupSample(9, m=4)
    for start in range(0, 400, 50):
        part = slice(start, start + 50)
        sample.update(groups[part], keys[part], tokens[part], values[part])
    for group in range(9):
        members = (groups == group).nonzero().flatten()
        expected = members[torch.argsort(keys[members])[:4]]
        held, held_values = sample.samples(group)
        assert sorted(held.tolist()) == sorted(expected.tolist())
        assert torch.equal(held_values.sort().values, values[expected].sort().values)


def test_interval_samples_lie_in_their_activation_interval():
    acts = sparse_activations(600, 5, seed=3)
    tokens = torch.arange(600)
    stats = UnitStats(5, AnalyzeConfig(top_k_examples=3, n_quantile_intervals=4, examples_per_interval=3))
    for start in range(0, 600, 100):
        stats.first_pass(acts[start : start + 100], tokens[start : start + 100])
    generator = torch.Generator().manual_seed(0)
    for start in range(0, 600, 100):
        stats.second_pass(acts[start : start + 100], tokens[start : start + 100], generator)
    for unit in range(4):
        top = acts[:, unit].max()
        for j in range(4):
            held, held_values = stats.interval_samples(unit, j)
            lo, hi = j * top / 4, (j + 1) * top / 4
            in_interval = ((acts[:, unit] >= lo) & (acts[:, unit] < hi if j < 3 else acts[:, unit] <= hi)
                           & (acts[:, unit] > 0))
            assert len(held) == min(3, int(in_interval.sum()))
            assert torch.equal(acts[held, unit], held_values)
            assert in_interval[held].all()


def test_a_firing_the_first_pass_did_not_see_goes_to_the_last_interval():
    """The two passes see the same activations, save rounding on another device or kernel: a
    unit silent in pass 1 (max 0) that fires in pass 2 divided by 0, and inf cast to an integer
    is the most negative index (an IndexError deep in the sampler)."""
    stats = UnitStats(2, AnalyzeConfig(top_k_examples=3, n_quantile_intervals=4, examples_per_interval=3))
    stats.first_pass(torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.arange(2))
    stats.second_pass(torch.tensor([[1e-7, 1.0], [0.0, 2.0]]), torch.arange(2), torch.Generator().manual_seed(0))
    held, values = stats.interval_samples(0, 3)
    assert held.tolist() == [0] and values.tolist() == [pytest.approx(1e-7)]


def test_histogram_counts_each_firing_once_in_its_log_bin():
    histogram = ActivationHistogram(2)
    values = torch.tensor([1e-6, 0.5, 1.0, 3.0, 1e9])
    histogram.update(torch.tensor([0, 0, 1, 1, 1]), values)
    edges = histogram_edges()
    assert len(edges) == N_BINS + 1 and histogram.fires.tolist() == [2, 3]
    assert histogram.counts[0, 0] == 1  # below the axis: first bin
    assert histogram.counts[1, -1] == 1  # above the axis: last bin
    bin_of_3 = next(i for i in range(N_BINS) if edges[i] <= math.log10(3.0) < edges[i + 1])
    assert histogram.counts[1, bin_of_3] == 1


def test_planted_feature_logit_effect_tops_the_logit_table(tiny: TinySetup):
    units = feature_units(tiny.trained)
    effects = logit_effects(units.directions, readout(tiny.model, HOOK), k=5)
    assert effects.top_ids[PLANTED_FEATURE, 0] == tiny.planted_token
    assert tiny.planted_token not in effects.bottom_ids[PLANTED_FEATURE]
    neurons = units_for(tiny.trained)["neurons"]  # the neuron baseline reads W_out @ W_U itself
    neuron_effects = logit_effects(neurons.directions, readout(tiny.model, HOOK), k=5)
    expected = tiny.model.mlp_out_weight(0) @ tiny.model.unembed_weight()
    assert torch.equal(neuron_effects.top_ids[:, 0], expected.argmax(dim=1))


def test_neuron_composition_counts_how_many_neurons_carry_a_direction():
    directions = torch.zeros(3, 8)
    directions[0, 5] = -2.0  # one neuron
    directions[1] = 1.0  # spread evenly over all eight
    directions[2, :2] = torch.tensor([3.0, 1.0])  # 90% in the first, all in two
    comp = neuron_composition(directions, top=2)
    assert comp.top_neurons[0, 0] == 5 and comp.top_weights[0, 0] == -1.0
    assert comp.neurons_for_50.tolist() == [1, 4, 1]
    assert comp.neurons_for_90.tolist() == [1, 8, 1]
    assert torch.allclose(comp.effective_neurons, torch.tensor([1.0, 8.0, 100 / 82]))


def test_ablating_the_planted_feature_lowers_the_log_prob_of_its_token(tiny: TinySetup):
    units = feature_units(tiny.trained)
    tokens = tiny.corpus.fetch([0, 1])
    acts = tiny.model.run(tokens, capture=[HOOK], stop_at=HOOK).activations[HOOK]
    unit_acts = units.activations(acts)
    effects = AblationEffects()
    pairs = [(0, PLANTED_FEATURE, 5), (1, PLANTED_FEATURE, 9)]
    measure_ablations(tiny.model, HOOK, units, tokens, acts, unit_acts, pairs, [0, 1], effects)
    promoted, _ = effects.moved_tokens(PLANTED_FEATURE, k=3)
    assert promoted[0][0] == tiny.planted_token and promoted[0][1] < 0
    assert [e.position for e in effects.examples[PLANTED_FEATURE]] == [5, 9]


def test_ablation_keeps_the_models_own_activation_where_the_sae_never_trained(tiny: TinySetup, monkeypatch):
    """Below skip_first_tokens both passes spliced in the SAE's reconstruction (and removed the
    feature there): in a deeper model, position 0's atypical activation, which attention reads
    from every later position, was replaced by what the SAE never learned to reconstruct."""
    units = feature_units(tiny.trained)
    tokens = tiny.corpus.fetch([0, 1])
    acts = tiny.model.run(tokens, capture=[HOOK], stop_at=HOOK).activations[HOOK]
    spliced, run = [], tiny.model.run

    def spy(t, **kwargs):
        if "splice" in kwargs:
            spliced.append((t, kwargs["splice"][HOOK](acts[: len(t), : t.shape[1]])))
        return run(t, **kwargs)

    monkeypatch.setattr(tiny.model, "run", spy)
    pairs = [(0, PLANTED_FEATURE, 5), (1, PLANTED_FEATURE, 9)]
    measure_ablations(tiny.model, HOOK, units, tokens, acts, units.activations(acts), pairs, [0, 1], AblationEffects(), 3)
    assert len(spliced) == 2  # the clean pass and the ablated one
    for t, replacement in spliced:
        for i, sequence in enumerate(t):
            row = next(j for j in range(len(tokens)) if torch.equal(tokens[j, : len(sequence)], sequence))
            assert torch.equal(replacement[i, :3], acts[row, :3])
            assert not torch.equal(replacement[i, 3:], acts[row, 3 : len(sequence)])


class InterruptedCorpus(Corpus):
    """The same contexts, but the run dies after `survive` batches (a killed process)."""

    survive = 3

    def batches(self, batch_size, first_batch=0):
        yield from islice(super().batches(batch_size, first_batch), self.survive)
        raise KeyboardInterrupt


def test_an_interrupted_stream_resumes_to_the_uninterrupted_result(tiny: TinySetup, tmp_path):
    cfg = AnalyzeConfig(batch_size=4, save_every=2, top_k_examples=3, n_quantile_intervals=3,
                        examples_per_interval=2, n_random_examples=2)
    units = units_for(tiny.trained)
    whole = stream_unit_stats(tiny.model, HOOK, units, tiny.corpus, cfg, tmp_path / "a.safetensors", "d")
    broken = InterruptedCorpus(**vars(tiny.corpus))
    with pytest.raises(KeyboardInterrupt):
        stream_unit_stats(tiny.model, HOOK, units, broken, cfg, tmp_path / "b.safetensors", "d")
    resumed = stream_unit_stats(tiny.model, HOOK, units, tiny.corpus, cfg, tmp_path / "b.safetensors", "d")
    for kind in units:
        for key, tensor in whole[kind].state_dict().items():
            assert torch.equal(tensor, resumed[kind].state_dict()[key]), (kind, key)


def test_token_text_is_escaped_and_its_whitespace_drawn():
    assert visible("if a<b and c>d & e:\n\t") == "if a&lt;b and c&gt;d &amp; e:\u21b5\u2192"


def test_analyze_stage_writes_a_complete_analysis_then_skips_it(pretrained_recipe, tmp_path):
    model = load_lm(pretrained_recipe)
    sae = build_sae(model.hook_points()[HOOK], SAEConfig(variant="paper", n_features=32))
    export_sae(TrainedSAE("stage", sae.eval(), HOOK, 1.0), tmp_path / "sae")
    recipe = copy.deepcopy(pretrained_recipe)
    recipe.eval.sae_path = str(tmp_path / "sae")
    recipe.analyze.output_dir = str(tmp_path / "analysis")
    recipe.analyze.n_tokens, recipe.analyze.n_features, recipe.analyze.top_k_examples = 1500, 4, 4
    out = analyze(recipe)
    for name in ("COMPLETE", "recipe.yaml", "features.json", "report.md", "dashboard/index.html",
                 "dashboard/neurons.html"):
        assert (out / name).is_file(), name
    data = json.loads((out / "features.json").read_text())
    assert data["n_tokens"] >= 1500 and len(data["kinds"]["features"]["pages"]) == 4
    assert not (out / STATE_FILE).exists()
    written = (out / "features.json").stat().st_mtime_ns
    assert analyze(recipe) == out and (out / "features.json").stat().st_mtime_ns == written


@pytest.mark.parametrize("config", [
    GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),  # Conv1D projections
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64),  # nn.Linear projections
], ids=["gpt2", "llama"])
def test_hf_readout_is_each_neurons_measured_write_through_the_unembedding(config):
    torch.manual_seed(0)
    lm = HFLM(AutoModelForCausalLM.from_config(config), tokenizer=None, name=config.model_type)
    hook, out = "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"
    width = lm.hook_points()[hook]
    tokens = torch.zeros(1, width, dtype=torch.long)  # position j carries neuron j's basis vector

    def mlp_out(splice) -> torch.Tensor:
        return lm.run(tokens, capture=[out], stop_at=out, splice={hook: splice}).activations[out][0]

    writes = mlp_out(lambda a: torch.eye(width)[None]) - mlp_out(torch.zeros_like)  # (d_mlp, d_model)
    expected = writes @ lm.unembed_weight()  # the unembedding with the final norm's gain folded in
    assert torch.allclose(readout(lm, hook), expected, atol=1e-5)
