"""gradlab demo: where its report goes, and its closing sentences on real (tiny) trained networks."""
import json
import subprocess
from pathlib import Path

import pytest

from gradlab.cli import demo as demo_command
from gradlab.demo import DemoConfig, _trained_table
from gradlab.report.text import accuracy_sentences

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_writes_its_report_outside_the_committed_gallery():
    out = next(p for p in demo_command.params if p.name == "html").default
    assert out == DemoConfig().html == "runs/demo/demo.html"
    assert not Path(out).is_relative_to("reports")  # reports/ is the committed gallery
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True, text=True)
    if inside.stdout.strip() != "true":
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--quiet", out], cwd=ROOT)
    assert ignored.returncode == 0, f"{out} is not ignored by git: a new checkout would show it as untracked"


def test_the_demos_closing_sentences_name_the_budget_its_networks_trained_for(tmp_path, small_splits):
    """Two epochs of 4 steps on 400 images, as the demo's sweep lays them out; every network is
    still near chance after 8 steps, and the sentences say that 8 steps cannot tell."""
    from conftest import train_tiny_sweep

    sweep_dir = tmp_path / "train"
    cells, _ = train_tiny_sweep(sweep_dir, small_splits, ("conv", "res"), (2, 16))
    (sweep_dir / "sweep.json").write_text(json.dumps({"cells": cells}))
    trained = _trained_table(sweep_dir)
    assert trained[["block", "depth", "steps", "train_images", "epochs_done"]].values.tolist() == [
        ["conv", 2, 8, 400, 2], ["conv", 16, 8, 400, 2], ["res", 2, 8, 400, 2], ["res", 16, 8, 400, 2]]
    sentences = accuracy_sentences(trained)
    assert [s.split(":")[0] for s in sentences] == ["conv", "res"]
    for sentence, (_, rows) in zip(sentences, trained.groupby("block", sort=False)):
        shallow, deep = (f"{100 * a:.1f} %" for a in rows["test_acc"])
        assert f"{shallow} at depth 2 and {deep} at depth 16, each after 8 optimizer steps on 400 training " \
               "images (2 epochs)." in sentence
        at_chance = rows.loc[(rows["test_acc"] - 0.1).abs() <= 0.03, "depth"].tolist()
        if at_chance:  # synthetic labels after 8 steps: near chance, which 8 steps cannot tell apart from "cannot"
            assert "still at chance (10 %) after only 8 optimizer steps: too short a budget to tell whether" in sentence
