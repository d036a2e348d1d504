"""The dashboard in a real browser: opens from disk, runs its script cleanly, shows the planted feature.

Needs Debian's Chromium (`apt-get install -y chromium`) and the Python `playwright` package
(`pip install playwright`, the `browser` extra); `playwright install` is not needed, the system
Chromium is launched directly. Skipped with the reason when either is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_analysis import PLANTED_FEATURE, build_tiny_setup

from framework.analysis.analyze import analyze_sae
from framework.analysis.dashboard import write_dashboard
from framework.config import AnalyzeConfig

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs `pip install playwright`")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    """A whole analysis of the tiny setup; (analysis directory, the planted token's text)."""
    tiny = build_tiny_setup(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("analysis")
    cfg = AnalyzeConfig(n_tokens=600, batch_size=8, n_features=-1, top_k_examples=5,
                        n_quantile_intervals=3, examples_per_interval=2, n_random_examples=3)
    analyze_sae(tiny.model, tiny.trained, tiny.corpus, cfg, out)
    return out, tiny.model.tokenizer.token_strings([tiny.planted_token])[0]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser, path: Path):
    """A page at file://path, and the list its console errors and uncaught exceptions land in."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri())
    return page, errors


def test_index_opens_from_disk_and_searches_and_sorts_without_console_errors(browser, site):
    out, token = site
    page, errors = open_page(browser, out / "dashboard" / "index.html")
    row = page.locator(f'#units tbody tr:has(a[href="features/{PLANTED_FEATURE}.html"])')
    assert token in row.inner_text()  # its top logit token, in the index

    page.fill("#search", token)
    visible_rows = page.locator("#units tbody tr:visible")
    assert 1 <= visible_rows.count() < page.locator("#units tbody tr").count()
    assert row.is_visible()

    page.fill("#search", "")
    assert densities(page) == sorted(densities(page), reverse=True)  # most active first
    page.click("#units th:has-text('Density')")
    assert densities(page) == sorted(densities(page))
    page.click("#units th:has-text('Feature')")
    ids = [int(v) for v in page.eval_on_selector_all("#units tbody td:nth-child(1)", "cs => cs.map(c => c.dataset.v)")]
    assert ids == sorted(ids, reverse=True)
    assert errors == []


def densities(page) -> list[float]:
    values = page.eval_on_selector_all("#units tbody td:nth-child(2)", "cells => cells.map(c => c.dataset.v)")
    return [float(v) for v in values]


def test_feature_page_shows_the_planted_token_first_in_its_logit_table(browser, site):
    out, token = site
    page, errors = open_page(browser, out / "dashboard" / "features" / f"{PLANTED_FEATURE}.html")
    promoted = page.locator("section:has(h2:text('Logit effects')) table").first
    assert promoted.locator("tbody tr").first.inner_text().split()[0] == token
    assert page.locator("table.examples .ex span.focus").count() > 0
    data = json.loads((out / "features.json").read_text())
    top = data["kinds"]["features"]["pages"][str(PLANTED_FEATURE)]["top"]
    assert len(top) == 5 and all(example["tokens"] for example in top)
    assert errors == []


def test_every_neuron_page_opens_without_console_errors(browser, site):
    out, _ = site
    pages = sorted((out / "dashboard" / "neurons").glob("*.html"))
    assert pages
    for path in pages[:5]:
        page, errors = open_page(browser, path)
        assert page.locator("h1").inner_text().startswith("Neuron") and errors == []
        page.close()


def test_autointerp_scores_show_once_written_beside_the_analysis(browser, site, tmp_path):
    out, _ = site
    shutil.copy(out / "features.json", tmp_path / "features.json")
    scores = {"features": {str(PLANTED_FEATURE): {"score": 0.73, "explanation": "the <heap> module & friends"}}}
    (tmp_path / "autointerp.json").write_text(json.dumps(scores))
    write_dashboard(tmp_path)
    page, errors = open_page(browser, tmp_path / "dashboard" / "index.html")
    assert "Interp. score" in page.locator("#units thead").inner_text()
    row = page.locator(f'#units tbody tr:has(a[href="features/{PLANTED_FEATURE}.html"])')
    assert "0.73" in row.inner_text()
    page, more_errors = open_page(browser, tmp_path / "dashboard" / "features" / f"{PLANTED_FEATURE}.html")
    assert "the <heap> module & friends" in page.inner_text("body")
    assert errors == more_errors == []
