"""gradlab on torchvision's ResNets end to end, as a user runs it: `gradlab train --model
torchvision:NAME` with SGD on the real CIFAR-10 copy, then `gradlab report` as text and as HTML
in Debian's chromium. The numbers themselves are checked against autograd in test_probes.py."""
import json
import re

import pytest
from click.testing import CliRunner

from gradlab.cli import main
from gradlab.report.html import build_report
from gradlab.runs import load_run
from test_report_html import browser_tab


@pytest.fixture(scope="module", params=[("resnet18", "BasicBlock", 8, 128),
                                        pytest.param(("resnet50", "Bottleneck", 16, 32), marks=pytest.mark.slow)],
                ids=["resnet18", "resnet50"])
def trained(request, tmp_path_factory, cifar_root):
    name, block, depth, batch = request.param
    out = tmp_path_factory.mktemp(name) / "run"
    result = CliRunner().invoke(main, [
        "train", "--model", f"torchvision:{name}", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
        "--epochs", "1", "--subset", str(2 * batch), "--batch-size", str(batch), "--val-fraction", "0.02",
        "--data-root", str(cifar_root), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, name, block, depth


def test_every_block_the_stem_and_the_head_are_recorded(trained):
    out, name, block, depth = trained
    run = load_run(out)
    records = run.records()
    blocks = records[records.role == "stack"].drop_duplicates("layer").sort_values("stack_index")
    assert list(blocks.stack_index) == list(range(depth)) and set(blocks.module_type) == {block}
    assert blocks.layer.iloc[0] == "layer1.0" and blocks.layer.iloc[-1] == f"layer4.{2 if name == 'resnet50' else 1}"
    assert set(records.loc[records.role == "stem", "layer"]) == {"conv1"}
    assert set(records.loc[records.role == "head", "layer"]) == {"fc"}
    split = records[records.metric.isin(["grad_in_branch_norm", "grad_in_skip_norm"])]
    assert set(split.layer) == set(blocks.layer)  # every block declared, so every block split
    assert sorted(set(records.step)) == [0, 1]  # two optimizer steps, both recorded
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["optimizer"] == "sgd" and config["train"]["momentum"] == 0.9
    assert config["model"]["spec"] == f"torchvision:{name}" and config["model"]["norm"] == "batch"
    assert run.identity() | {"width": None} == {"run": "run", "model": f"torchvision:{name}", "block": block,
                                                 "depth": depth, "width": None, "norm": "batch", "seed": 0}


def test_the_text_report_reads_by_role_and_stack_index(trained):
    out, name, block, depth = trained
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"models: torchvision:{name} · blocks: {block} · depths: {depth}" in text
    assert re.search(rf"^layer1\.0\s+1\s+stack\s+0\s+{block}\s", text, re.M)
    assert re.search(r"^fc\s+\d+\s+head\s+–\s+Linear\s", text, re.M)
    assert "nan" not in text.lower()


@pytest.mark.browser
def test_the_html_report_in_a_real_browser(trained, tmp_path):
    out, name, block, depth = trained
    report = build_report(out)
    facts = dict(report.facts)
    assert facts["Models"] == f"torchvision:{name}" and facts["Blocks"] == block
    page = tmp_path / "report.html"
    page.write_text(report.to_html(), encoding="utf-8")
    errors, dialogs = [], []
    with browser_tab(page.resolve().as_uri(), errors, dialogs) as tab:
        tab.click("#gradient-flow details summary")
        shown = tab.inner_text("#gradient-flow details")
        widths = tab.evaluate("Array.from(document.images, i => i.complete ? i.naturalWidth : 0)")
        body = tab.inner_text("body")
    assert errors == [] and dialogs == []
    assert f"layer1.0\t1\tstack\t0\t{block}" in shown and "\thead\t" in shown
    assert widths and all(w > 0 for w in widths)
    assert f"torchvision:{name}" in body and not re.search(r"\bnan\b", body, re.IGNORECASE)
