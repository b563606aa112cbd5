"""gradlab.report.html: one self-contained page of a tiny real sweep, parsed and in a real browser.

The sweep is trained for real once per module (conv, res, skip x depths 1, 3 on 400 synthetic
images, a few seconds); a copy adds a hostile cell whose folder name, error message and
hardware string are markup, to show that everything read from files is escaped.
"""
import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlab import __version__
from gradlab.report import html as report_html
from gradlab.report.html import SECTIONS, build_report, default_html_path, write_report
from gradlab.report.text import MISSING
from gradlab.runs import load_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE_NAME = "<img src=x onerror=alert(1)>"  # a folder name cannot hold "/", so no </script> here
HOSTILE_ERROR = "<script>alert(1)</script>"
HOSTILE_PROCESSOR = "<b onmouseover=alert(2)>x86</b>"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, small_splits) -> Path:
    """A sweep folder laid out as gradlab.sweep writes it: sweep.json and runs/<cell>/."""
    from conftest import train_tiny_sweep

    out = tmp_path_factory.mktemp("report") / "tiny-sweep"
    cells, base = train_tiny_sweep(out, small_splits, ("conv", "res", "skip"), (1, 3))
    grid = {"blocks": ["conv", "res", "skip"], "depths": [1, 3], "seeds": [0], "norms": ["batch"]}
    (out / "sweep.json").write_text(json.dumps({"grid": grid, "base": asdict(base), "cells": cells}))
    return out


@pytest.fixture(scope="module")
def hostile_dir(sweep_dir, tmp_path_factory) -> Path:
    """The sweep plus a failed copy of one run under a name (and with strings) that are markup."""
    out = tmp_path_factory.mktemp("hostile") / "hostile-sweep"
    shutil.copytree(sweep_dir, out)
    cell = out / "runs" / HOSTILE_NAME
    shutil.copytree(out / "runs" / "conv-d3-s0", cell)
    summary = json.loads((cell / "summary.json").read_text())
    summary.update(status="failed", error=HOSTILE_ERROR)
    (cell / "summary.json").write_text(json.dumps(summary))
    config = json.loads((cell / "config.json").read_text())
    config["hardware"]["processor"] = HOSTILE_PROCESSOR
    (cell / "config.json").write_text(json.dumps(config))
    sweep = json.loads((out / "sweep.json").read_text())
    sweep["cells"].append(HOSTILE_NAME)
    (out / "sweep.json").write_text(json.dumps(sweep))
    return out


@pytest.fixture(scope="module")
def report(sweep_dir):
    return build_report(sweep_dir)


@pytest.fixture(scope="module")
def page(report) -> tuple[str, float]:
    """(html, seconds to build and render it) of the clean sweep's report."""
    start = time.perf_counter()
    html = report.to_html()
    return html, report.build_seconds + time.perf_counter() - start


@pytest.fixture(scope="module")
def hostile_page(hostile_dir, tmp_path_factory) -> Path:
    return write_report(hostile_dir, tmp_path_factory.mktemp("html") / "hostile.html")


class Page(HTMLParser):
    """Every tag with its attributes, the ids and the visible text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self) -> list[str]:
        return [attrs["id"] for _, attrs in self.tags if "id" in attrs]

    def all(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def test_every_section_is_present_in_order(page):
    ids = Page(page[0]).ids()
    assert [i for i in ids if i in SECTIONS] == list(SECTIONS)


def test_the_page_is_self_contained(page):
    html = page[0]
    parsed = Page(html)
    for attrs in parsed.all("img"):
        assert attrs["src"].startswith("data:image/png;base64,")
        assert attrs["alt"]
    for _, attrs in parsed.tags:
        for name in ("src", "href"):
            if name in attrs:
                assert not attrs[name].startswith(("http://", "https://", "//")), attrs[name]
        if "href" in attrs:
            assert attrs["href"].startswith("#"), attrs["href"]  # only in-page links
    assert not parsed.all("script") and not parsed.all("link") and not parsed.all("iframe")
    assert "@import" not in html and "url(" not in html
    style = html.split("<style>")[1].split("</style>")[0]
    assert '"Segoe UI"' in style  # our CSS is inserted as is, not escaped
    assert len(parsed.all("img")) >= 7
    assert len(html) < 6_000_000


def test_the_report_is_fast(page):
    html, seconds = page
    assert seconds < 15


def test_the_header_says_what_was_run(page):
    text = " ".join(Page(page[0]).text)
    assert "SYNTHETIC DATA" in text  # stated prominently: in the facts and in a banner
    assert "Synthetic data: these runs trained on seeded noise" in text
    for fact in ("conv, res, skip", "1, 3", "batch norm", f"gradlab {__version__}", "torch ", "Wall time", "cpu"):
        assert fact in text, fact


def test_a_short_budget_is_named_under_the_title_and_in_every_accuracy_comparison(report, page):
    budget = "8 optimizer steps on 400 training images (2 epochs)"  # the fixture: 2 epochs of 4 steps of 100
    assert report.caption.startswith(f"A short training budget: 8 optimizer steps on 400 training images per run, "
                                     f"fewer than 500.")
    assert "too short to tell how well a network of any depth can learn" in report.caption
    html = page[0]
    assert html.index('<p class="caption">A short training budget') < html.index("<nav>")  # right under the title
    assert dict(report.facts)["Training budget"] == f"{budget}, every run"
    scaling = report.section("depth-scaling")
    assert "the test accuracy each depth reached, and its train accuracy in the last epoch" in scaling.lead
    assert scaling.lead.endswith(f"after {budget}.")
    assert scaling.images[1].alt.endswith(f"train accuracy against depth per block type, after {budget}.")
    sentences = [n for n in scaling.notes if n.startswith(("conv:", "res:", "skip:"))]
    assert len(sentences) == 6 and all(budget in n for n in sentences)  # test, then train accuracy, per block
    assert [n.split(":")[1].split(" ")[1] for n in sentences] == ["test"] * 3 + ["train"] * 3
    assert all("too short a budget to tell" in n for n in sentences if "at chance" in n)
    assert f"test accuracy (mean ± std over seeds) after {budget}" in report.section("depth-table").lead
    listing = report.section("run").tables[0]
    assert {"steps", "train_images"} <= set(listing.columns)
    assert {row[listing.columns.index("steps")] for row in listing.rows} == {"8"}


def test_a_long_budget_has_no_caption(sweep_dir, tmp_path):
    from gradlab import runs

    long = tmp_path / "long"
    shutil.copytree(sweep_dir, long)
    for summary in long.glob("runs/*/summary.json"):
        runs.write_json(summary, json.loads(summary.read_text()) | {"steps_done": 600})
    report = build_report(long)
    assert report.caption == "" and 'class="caption"' not in report.to_html()
    assert dict(report.facts)["Training budget"] == "600 optimizer steps on 400 training images (2 epochs), every run"


def test_the_headline_figure_states_the_verdicts(report):
    flow = report.section("gradient-flow")
    assert len(flow.images) == 1
    assert "At initialisation (depth 3):" in flow.images[0].alt
    assert any(word in flow.images[0].alt for word in ("stays within", "stay within", "explode", "vanish"))


def test_a_notebook_shows_the_page_in_a_frame_that_keeps_its_stylesheet_inside(report):
    import html

    inline = report._repr_html_()
    assert inline.startswith("<iframe srcdoc=") and inline.endswith("</iframe>")
    assert "<style>" not in inline and "<body" not in inline  # nothing that could restyle the notebook
    (page,) = re.findall(r'srcdoc="([^"]*)"', inline)
    assert html.unescape(page) == report.to_html()


def test_the_depth_scaling_table_is_an_html_table(page):
    parsed = Page(page[0])
    headers = [t for t in parsed.text if t.startswith("Depth scaling at")]
    assert len(headers) == 2
    assert "ratio" in " ".join(parsed.text) and "n/a" in " ".join(parsed.text)  # depth 1: nothing to compare


def test_strings_from_files_are_escaped(hostile_page):
    html = hostile_page.read_text(encoding="utf-8")
    for raw in (HOSTILE_NAME, HOSTILE_ERROR, HOSTILE_PROCESSOR):
        assert raw not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parsed = Page(html)
    assert not parsed.all("script") and not parsed.all("b")
    assert all(attrs["src"].startswith("data:") for attrs in parsed.all("img"))
    text = "".join(parsed.text)
    assert HOSTILE_NAME in text and HOSTILE_ERROR in text  # shown as text


def test_a_failed_run_is_marked(hostile_page):
    html = hostile_page.read_text(encoding="utf-8")
    assert '<tr class="failed">' in html
    assert "1 run(s) failed or diverged" in html


def test_a_single_run_says_what_a_sweep_would_add(sweep_dir, tmp_path):
    report = build_report(sweep_dir / "runs" / "res-d3-s0")
    assert [s.id for s in report.sections] == list(SECTIONS)
    scaling = report.section("depth-scaling")
    assert not scaling.images and "A sweep over depths" in scaling.notes[0]
    assert report.section("branch-skip").images  # a res run has a branch/skip split
    assert report.section("samples").images and report.section("training-curves").images


def test_a_sweep_without_residual_blocks_says_so(sweep_dir):
    report = build_report(sweep_dir / "runs" / "conv-d3-s0")
    assert "No residual blocks" in report.section("branch-skip").notes[0]


def test_runs_without_records_and_a_sweep_not_started_still_make_every_section(sweep_dir, tmp_path):
    quiet = tmp_path / "quiet"
    shutil.copytree(sweep_dir, quiet)
    for records in quiet.glob("runs/*/records.parquet"):
        shutil.rmtree(records)
    report = build_report(quiet)
    assert [s.id for s in report.sections] == list(SECTIONS)
    assert "recording off" in report.section("gradient-flow").notes[0]
    assert report.section("training-curves").images and report.section("depth-scaling").images

    waiting = tmp_path / "waiting"
    (waiting / "runs").mkdir(parents=True)
    (waiting / "sweep.json").write_text(json.dumps({"cells": ["conv-d2-s0", "res-d2-s0"]}))
    report = build_report(waiting)
    assert [s.id for s in report.sections] == list(SECTIONS)
    assert "2 of the sweep's 2 cells have not started yet" in report.banners[0]
    assert "<section id=\"depth-table\">" in report.to_html()


def test_write_report_defaults_to_the_reports_folder(sweep_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_html_path(sweep_dir) == Path("reports") / "tiny-sweep.html"
    out = write_report(sweep_dir / "runs" / "skip-d1-s0")
    assert out == Path("reports") / "skip-d1-s0.html" and out.is_file()


def test_big_sweeps_are_capped_and_say_so():
    rows = [{"run": f"{a}-d{d}-s{s}-{n}", "model": "deepcnn", "block": a, "depth": d, "norm": n, "seed": s}
            for a in ("conv", "res", "resdown", "skip") for n in ("batch", "none")
            for d in (1, 2, 4, 8, 16, 32, 64, 128) for s in (0, 1)]
    runs = pd.DataFrame(rows)  # 128 runs
    shown, note = report_html._depth_selection(runs)
    assert shown.groupby(["block", "norm"])["depth"].nunique().max() <= report_html.MAX_DEPTHS
    assert shown.groupby("block").size().max() <= report_html.MAX_SEED_LINES
    assert {1, 128} <= set(shown["depth"]) and note.startswith(f"Showing {len(shown)} of 128 runs")
    curves, note = report_html._curve_selection(runs)
    assert len(curves) <= report_html.MAX_CURVE_RUNS and (curves["seed"] == 0).all()
    assert note.startswith(f"Showing {len(curves)} of 128 runs")
    deepest = report_html._deepest(runs)
    assert len(deepest) == 8 and set(deepest["depth"]) == {128}


def test_phase_rows_keep_what_init_and_end_read():
    from gradlab import analysis

    frame = pd.DataFrame({"run": "r", "metric": "grad_out_norm", "layer": "layers.0", "step": np.arange(10),
                          "value": np.arange(10.0)})
    kept = report_html._phase_rows(frame)
    assert kept["step"].tolist() == [0, *range(10 - analysis.END_STEPS, 10)]


# ---------------------------------------------------------------- in a real browser


def _chromium() -> None:
    """Fail on CI, skip elsewhere, when the system Chromium or playwright is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        message = "playwright is not installed: pip install -e '.[dev]'"
    else:
        if CHROMIUM.is_file():
            return
        message = f"no {CHROMIUM}: apt-get install -y chromium (Debian's package; never a downloaded browser)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def browser_tab(url: str, errors: list, dialogs: list, requests: list | None = None):
    """A page loaded in the system chromium; console and page errors, dialogs (dismissed) and
    (when ``requests`` is given) requested URLs are collected into the lists."""
    _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            tab.on("pageerror", lambda error: errors.append(str(error)))
            tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            if requests is not None:
                tab.on("request", lambda request: requests.append(request.url))
            tab.goto(url, wait_until="load")
            yield tab
        finally:
            browser.close()


@pytest.mark.browser
def test_the_page_in_a_real_browser(hostile_page, tmp_path):
    url = hostile_page.resolve().as_uri()
    errors, requests, dialogs = [], [], []
    with browser_tab(url, errors, dialogs, requests) as tab:
        widths = tab.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
        ids = tab.evaluate("Array.from(document.querySelectorAll('section[id]'), s => s.id)")
        shown = tab.evaluate("document.querySelector('#run').innerText")
        tab.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert errors == []
    assert dialogs == []  # no alert(1): the hostile strings stayed text
    assert [r for r in requests if not r.startswith("data:")] == [url]
    assert len(widths) >= 7 and all(w > 0 for w in widths), widths
    assert ids == list(SECTIONS)
    assert HOSTILE_NAME in shown and HOSTILE_ERROR in shown
    assert (tmp_path / "report.png").stat().st_size > 10_000


# ---------------------------------------------------------------- a sweep with diverged runs and corrupt cells

SCRIPT = "<script>alert(1)</script>"
BROKEN_NAME = "<svg onload=alert(3)>"  # an unreadable cell whose folder name is markup


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory, small_splits) -> Path:
    """test_report_text's real broken sweep (a diverged run, a real lr-1e8 run, a corrupt config, corrupt
    records) plus markup in a config string, a summary string and a layer name, and a markup-named cell."""
    from test_report_text import broken_sweep

    from gradlab import runs

    root = broken_sweep(tmp_path_factory.mktemp("broken-html") / "broken-sweep", small_splits)
    cell = root / "runs" / "conv-d3-s1"
    config = runs.read_json(cell / runs.CONFIG)
    config["versions"]["torch"] = SCRIPT
    runs.write_json(cell / runs.CONFIG, config)
    records = runs.load_run(cell).records()
    records["layer"] = records["layer"].replace("linear1", SCRIPT)
    for part in (cell / runs.RECORDS).glob("part-*.parquet"):
        part.unlink()
    runs.RecordsWriter(cell)({c: records[c].to_numpy() for c in runs.RECORD_COLUMNS})
    summary = runs.read_json(cell / runs.SUMMARY)
    summary["diverged"].update(layer=SCRIPT, position=6)
    runs.write_json(cell / runs.SUMMARY, summary)
    (root / "runs" / BROKEN_NAME).mkdir()
    (root / "runs" / BROKEN_NAME / runs.CONFIG).write_text(SCRIPT)
    sweep = runs.read_json(root / runs.SWEEP)
    runs.write_json(root / runs.SWEEP, sweep | {"cells": [*sweep["cells"], BROKEN_NAME]})
    return root


@pytest.fixture(scope="module")
def broken_report(broken_dir):
    return build_report(broken_dir)


def test_diverged_runs_and_unreadable_cells_get_their_own_sections(broken_report, broken_dir):
    report = broken_report
    ids = [s.id for s in report.sections]
    assert ids == ["run", "diverged", "unreadable", *list(SECTIONS)[1:]]
    diverged = report.section("diverged")
    assert diverged.badge == "2 diverged"
    where = load_run(broken_dir / "runs" / "conv-d3-s0-none").summary["diverged"]
    assert diverged.notes == [
        f"conv-d3-s1 (conv, depth 3, batch norm) diverged at step 5, epoch 1: the first non-finite gradient "
        f"appeared at {SCRIPT} (from its summary.json)",
        f"conv-d3-s0-none (conv, depth 3, no normalisation) diverged at step 1, epoch 0: the first non-finite "
        f"activation appeared at {where['layer']} (from its summary.json)"]
    table = diverged.tables[0]
    assert table.columns == ["run", "model", "block", "depth", "width", "norm", "seed", "status", "step", "epoch",
                             "layer", "position", "cause", "source"]
    assert table.rows[0][:12] == ["conv-d3-s1", "deepcnn", "conv", "3", "4", "batch", "1", "diverged", "5", "1",
                                  SCRIPT, "6"]
    unreadable = report.section("unreadable")
    assert unreadable.badge == "3 unreadable"
    cells = {row[0]: row[1] for row in unreadable.tables[0].rows}
    assert sorted(cells) == sorted([BROKEN_NAME, "res-d3-s1", "skip-d3-s0"])
    assert "config.json: not valid JSON" in cells[BROKEN_NAME] and "cannot be read as Parquet" in cells["skip-d3-s0"]
    # the run list: a diverged column and the row marked; the others are reported
    listing = report.section("run").tables[0]
    rows = {row[0]: dict(zip(listing.columns, row)) for row in listing.rows}
    assert sorted(rows) == ["conv-d3-s0", "conv-d3-s0-none", "conv-d3-s1", "res-d3-s0"]
    assert rows["conv-d3-s1"]["diverged"] == f"at step 5 (layer {SCRIPT})" and rows["conv-d3-s0"]["diverged"] == ""
    assert [c for r, c in zip(listing.rows, listing.row_classes) if c] == ["diverged", "diverged"]
    assert any("2 run(s) failed or diverged" in b for b in report.banners)
    assert any("3 cell(s) could not be read" in b for b in report.banners)
    # every figure still drawn; the headline and the table say where the runs diverged
    flow = report.section("gradient-flow")
    assert "diverged" in flow.images[0].alt
    depth_table = report.section("depth-table").tables[1]  # at the end of training
    cells = [cell for row in depth_table.rows for cell in row]
    assert f"test {MISSING} · diverged at step 1 (layer {where['layer']}) · 1 diverged" in cells
    assert not any(re.search(r"\bnan\b", cell, re.IGNORECASE) for cell in cells)
    assert report.section("training-curves").images and report.section("heatmaps").images


@pytest.mark.browser
def test_a_broken_sweep_in_a_real_browser_shows_markup_as_text(broken_report, tmp_path):
    """Markup from config.json, summary.json, records and a folder name: shown literally, never run."""
    page = tmp_path / "broken.html"
    page.write_text(broken_report.to_html(), encoding="utf-8")
    html = page.read_text(encoding="utf-8")
    assert SCRIPT not in html and BROKEN_NAME not in html  # escaped in the file ...
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    url = page.resolve().as_uri()
    errors, dialogs = [], []
    with browser_tab(url, errors, dialogs) as tab:
        scripts = tab.evaluate("document.scripts.length + document.querySelectorAll('svg, iframe').length")
        diverged = tab.inner_text("#diverged")
        unreadable = tab.inner_text("#unreadable")
        facts = tab.inner_text("#run")
        badges = tab.evaluate("Array.from(document.querySelectorAll('.badge'), b => "
                              "[b.innerText, b.getBoundingClientRect().width > 0])")
        widths = tab.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
        body = tab.inner_text("body")
    assert dialogs == [] and errors == [] and scripts == 0  # ... and nothing ran in the browser
    assert f"appeared at {SCRIPT} (from its summary.json)" in diverged  # ... but shows as text
    assert BROKEN_NAME in unreadable and "not valid JSON" in unreadable and "skip-d3-s0" in unreadable
    assert SCRIPT in facts  # torch version from config.json
    assert badges == [["2 diverged", True], ["3 unreadable", True]]
    assert len(widths) == 6 and all(w > 0 for w in widths)  # one depth: no depth-scaling figures
    assert not re.search(r"\bnan\b", body, re.IGNORECASE)


# ---------------------------------------------------------------- any model: a resnet18-like run beside a DeepCNN


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory) -> Path:
    """A sweep folder with a DeepCNN run and a torchvision-resnet18-like run, records written by hand."""
    from test_analysis import make_records, make_resnet
    from test_runs import make_run_dir

    from gradlab import runs, schema

    root = tmp_path_factory.mktemp("mixed") / "mixed-sweep"
    cells = {"conv-d8-s0": ({"block": "conv", "depth": 8, "width": 8, "norm": "batch", "seed": 0},
                            make_records(depth=8, gain=1.5, steps=[0, 5, 10])),
             "r18-s0": ({"model": "torchvision:resnet18", "norm": "batch", "seed": 0},
                        make_resnet(gain=1.2, steps=[0, 5, 10]))}
    for name, (train, records) in cells.items():
        make_run_dir(root / runs.RUNS_FOLDER / name, train, records.drop(columns=list(schema.RUN_KEYS)))
    runs.write_json(root / runs.SWEEP, {"cells": list(cells)})
    return root


@pytest.mark.browser
def test_a_resnet18_like_run_beside_a_deepcnn_in_a_real_browser(mixed_dir, tmp_path):
    report = build_report(mixed_dir)
    facts = dict(report.facts)
    assert facts["Models"] == "deepcnn, torchvision:resnet18" and facts["Blocks"] == "BasicBlock, conv"
    flow = report.section("gradient-flow")
    assert "torchvision:resnet18, BasicBlock (×3.58) stays within ×0.1–×10" in flow.images[0].alt
    assert "conv (×17.1) explodes toward the input" in flow.images[0].alt
    tables = {t.caption: t for t in flow.tables}
    caption = "Per probe point at initialisation: r18-s0 (torchvision:resnet18, BasicBlock, depth 8, batch norm)"
    assert list(tables) == ["Per probe point at initialisation: conv-d8-s0 (conv, depth 8, batch norm)", caption]
    table = tables[caption]
    assert table.collapsed and table.columns[:5] == ["layer", "position", "role", "stack_index", "module_type"]
    assert [row[:5] for row in table.rows] == [
        ["conv1", "0", "stem", MISSING, "Conv2d"],
        *[[f"layer{s}.{i}", str(2 * s + i - 1), "stack", str(2 * s + i - 2), "BasicBlock"]
          for s in (1, 2, 3, 4) for i in (0, 1)],
        ["fc", "9", "head", MISSING, "Linear"]]
    listing = report.section("run").tables[0]
    assert listing.columns[:4] == ["run", "model", "block", "depth"]
    assert [row[:4] for row in listing.rows] == [["conv-d8-s0", "deepcnn", "conv", "8"],
                                                 ["r18-s0", "torchvision:resnet18", "BasicBlock", "8"]]
    page = tmp_path / "mixed.html"
    page.write_text(report.to_html(), encoding="utf-8")
    errors, dialogs = [], []
    with browser_tab(page.resolve().as_uri(), errors, dialogs) as tab:
        tab.click("#gradient-flow details:nth-of-type(2) summary")  # open the resnet's per-layer table
        shown = tab.inner_text("#gradient-flow details:nth-of-type(2)")
        widths = tab.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
        body = tab.inner_text("body")
    assert errors == [] and dialogs == []
    assert "layer3.1\t6\tstack\t5\tBasicBlock" in shown and "fc\t9\thead" in shown
    assert widths and all(w > 0 for w in widths)
    assert "torchvision:resnet18" in body and not re.search(r"\bnan\b", body, re.IGNORECASE)


# ---------------------------------------------------------------- the lesson's experiments: shatter and lesion


@pytest.fixture(scope="module")
def lesson_dir(sweep_dir, tmp_path_factory, small_splits) -> Path:
    """The tiny sweep with its lesion study (lesion.parquet in each run) and its shattered gradients
    (shatter/ in the sweep directory), measured by the library on the synthetic test split."""
    import torch

    from gradlab.lesion import lesion_runs
    from gradlab.shatter import shatter_runs, write

    out = tmp_path_factory.mktemp("lesson") / "lesson-sweep"
    shutil.copytree(sweep_dir, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # width-4 nets: one thread is fastest (see sweep_dir)
    try:
        lesion_runs(out, draws=2, device="cpu", splits=small_splits)
        write(shatter_runs(out, points=16, pairs=2, max_lag=4, device="cpu", splits=small_splits),
              out / "shatter")
    finally:
        torch.set_num_threads(threads)
    return out


def test_a_sweep_without_lesson_data_has_no_lesson_sections(report):
    assert not {"shatter", "lesion"} & {s.id for s in report.sections}


@pytest.mark.browser
def test_stored_shatter_and_lesion_frames_get_their_sections_in_a_real_browser(lesson_dir, tmp_path):
    report = build_report(lesson_dir)
    assert [s.id for s in report.sections] == [*SECTIONS, "shatter", "lesion"]
    shatter, lesion = report.section("shatter"), report.section("lesion")
    assert shatter.title == f"{len(SECTIONS) + 1} · Shattered gradients"
    assert lesion.title == f"{len(SECTIONS) + 2} · Lesion study"
    assert len(shatter.images) == 3 and len(lesion.images) == 2
    # one sentence per block type, saying how BatchNorm's statistics were obtained
    assert len(shatter.notes) == 3
    assert all("the checkpoint's running statistics" in n for n in shatter.notes)
    assert shatter.tables[0].columns == ["depth", "conv", "res", "skip"]
    assert [row[0] for row in shatter.tables[0].rows] == ["1", "3"]
    # one sentence per run, the tables per k and per block
    assert len(lesion.notes) == 6 and all("chance is 10.0%" in n for n in lesion.notes)
    assert "200 test images" in lesion.lead and "running statistics" in lesion.lead
    assert lesion.tables[0].columns[0] == "deleted" and lesion.tables[1].columns[0] == "stack index"
    page = tmp_path / "lesson.html"
    page.write_text(report.to_html(), encoding="utf-8")
    errors, dialogs = [], []
    with browser_tab(page.resolve().as_uri(), errors, dialogs) as tab:
        ids = tab.evaluate("Array.from(document.querySelectorAll('section[id]'), s => s.id)")
        widths = tab.evaluate("Array.from(document.querySelectorAll('#shatter img, #lesion img'), "
                              "i => i.complete ? i.naturalWidth : 0)")
        shown = {id: tab.inner_text(f"#{id}") for id in ("shatter", "lesion")}
        links = tab.evaluate("Array.from(document.querySelectorAll('nav a'), a => a.getAttribute('href'))")
    assert errors == [] and dialogs == []
    assert ids == [*SECTIONS, "shatter", "lesion"] and links[-2:] == ["#shatter", "#lesion"]
    assert len(widths) == 5 and all(w > 0 for w in widths)
    assert "the mean cosine similarity of input gradients at neighbouring points was" in shown["shatter"]
    assert "conv-d3-s0: " in shown["lesion"] and "test accuracy with all 3 blocks" in shown["lesion"]
    assert not re.search(r"\bnan\b", shown["shatter"] + shown["lesion"], re.IGNORECASE)


def test_a_report_of_one_width_says_what_a_width_sweep_would_add(report):
    section = report.section("width-depth")
    assert not section.images and "--shape wider-deeper" in section.notes[0] and "one width (4)" in section.notes[0]
    listing = report.section("run").tables[0]
    assert {"width", "n_params", "beta"} <= set(listing.columns)
