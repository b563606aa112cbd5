"""Lesion study: the notebook's own classes as an independent check, blocks that change the shape,
hooks and modules put back, stored results reused until the checkpoint changes, the command line."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner

import notebook_reference as nb
from gradlab import lesion as lesion_module, lessons, runs
from gradlab.cli import main
from gradlab.data import MEAN, STD
from gradlab.lesion import (LESION, deletable_blocks, deleted, draw_sets, k_values, lesion_runs, lesion_study,
                            replaced, stack_points, swapped)
from gradlab.models import build_model
from gradlab.recorder import RecordConfig
from gradlab.train import TrainConfig, load_checkpoint, train_run

TRAIN = dict(depth=4, width=8, epochs=2, batch_size=32, lr=3e-3, dataset="synthetic", device="cpu",
             channels_last=False, eval_batch_size=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_splits):
    """Trained res and conv runs, a depth-0 run (no stack), a diverged run and one without a checkpoint."""
    root = tmp_path_factory.mktemp("lesion-runs")
    off = RecordConfig(every=0)
    for block in ("res", "conv"):
        train_run(TrainConfig(block=block, **TRAIN), root / block, splits=small_splits, record=off)
    train_run(TrainConfig(block="res", **{**TRAIN, "depth": 0, "epochs": 1}), root / "stackless", splits=small_splits,
              record=off)
    bad = TrainConfig(block="conv", **{**TRAIN, "depth": 2, "epochs": 1, "norm": "none", "lr": 1e6})
    assert train_run(bad, root / "diverged", splits=small_splits, record=off)["status"] == "diverged"
    (root / "probed").mkdir()  # what gradlab probe --out writes: options and a summary, no checkpoint
    runs.write_json(root / "probed" / runs.CONFIG, {"train": asdict(TrainConfig(block="res", **TRAIN))})
    runs.write_json(root / "probed" / runs.SUMMARY, {"status": "probe"})
    return root


# --- the independent check: the notebook's classes, the same weights, the same blocks removed ----


def _notebook_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The notebook's evaluation: ToTensor then Normalize, eval mode."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        return model((images.float() / 255 - mean) / std)


@pytest.mark.parametrize("block", ["res", "conv"])
def test_the_notebooks_classes_with_the_same_weights_and_blocks_removed_give_identical_accuracies(trained, small_splits,
                                                                                                  block):
    frame, _, _ = lesion_runs(trained / block, draws=3, device="cpu", splits=small_splits, recompute=True)
    state = load_checkpoint(trained / block / runs.BEST)["model"]
    ours = build_model(block, 4, 8)
    ours.load_state_dict(state)
    images, labels = small_splits.test
    checked = frame.loc[frame["experiment"].isin(["intact", "delete"])]
    assert len(checked) == 1 + 4 + 3 + 1  # intact, each of 4 blocks, 3 pairs of blocks, all 4
    for row in checked.to_dict("records"):
        names = [name for name in row["blocks"].split("+") if name]
        reference = nb.Deep_CNN(3, num_blocks=4, ch_width=8, layer_type=nb.BLOCK_CLASSES[block])
        reference.load_state_dict(state)
        for name in names:
            reference.layers[int(name.split(".")[1])] = nn.Identity()  # the notebook's own way to drop a block
        logits = _notebook_logits(reference, images)
        assert row["accuracy"] == (logits.argmax(1) == labels).sum().item() / len(labels), row["blocks"]
        with deleted(ours, names):  # and the networks are the same function, not only as accurate
            torch.testing.assert_close(_notebook_logits(ours, images), logits, rtol=1e-5, atol=1e-5)
    # the intact network is the run's test accuracy with the best checkpoint
    intact = frame.loc[frame["experiment"] == "intact", "accuracy"].item()
    assert intact == runs.load_run(trained / block).summary["test_acc_best"]


# --- what is deleted, and that everything is put back ------------------------------------------


def test_k_values_and_draws():
    assert k_values(8) == [1, 2, 4, 8] and k_values(6) == [1, 2, 4, 6] and k_values(1) == [1] and k_values(0) == []
    assert draw_sets(4, 2, 10) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # every set: there are only 6
    drawn = draw_sets(16, 4, 5, seed=1)
    assert len(set(drawn)) == 5 and all(len(s) == 4 and list(s) == sorted(s) for s in drawn)
    assert drawn == draw_sets(16, 4, 5, seed=1) and drawn != draw_sets(16, 4, 5, seed=2)


def test_a_resnets_downsampling_blocks_are_not_deletable_and_nothing_crashes():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (8,))
    frame = lesion_study(model, images, labels, draws=1, batch_size=8)
    singles = frame.loc[(frame["experiment"] == "delete") & (frame["k"] == 1)].set_index("blocks")
    assert singles.index.tolist() == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    stuck = ["layer2.0", "layer3.0", "layer4.0"]  # each stage's first block downsamples: another shape
    assert not singles.loc[stuck, "deletable"].any() and singles.loc[stuck, "accuracy"].isna().all()
    assert singles.drop(index=stuck)["accuracy"].notna().all()
    deletions = frame.loc[frame["experiment"] == "delete"]
    assert sorted(deletions["k"].unique()) == [1, 2, 4, 5]  # 5 deletable blocks
    assert not deletions.loc[deletions["k"] > 1, "blocks"].str.contains("|".join(stuck)).any()
    assert "not deletable" in lessons.single_table(frame.assign(run="r18")).to_string()


def test_hooks_are_removed_and_every_block_is_put_back(small_splits):
    torch.manual_seed(0)
    model = build_model("res", 3, 4).eval()
    before = {name: module for name, module in model.named_modules()}
    points = stack_points(model)
    assert deletable_blocks(model, points, torch.zeros(2, 3, 32, 32)) == {f"layers.{i}": True for i in range(3)}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    lesion_study(model, *small_splits.test, draws=2, reorder=True, batch_size=100)
    assert dict(model.named_modules()) == before
    with deleted(model, ["layers.1"]):
        assert isinstance(model.layers[1], nn.Identity) and len(model.layers) == 3
    with swapped(model, "layers.0", "layers.1"):
        assert model.layers[0] is before["layers.1"] and model.layers[1] is before["layers.0"]
    with pytest.raises(RuntimeError, match="inside"):
        with replaced(model, {"layers.2": nn.Identity()}):
            raise RuntimeError("inside")
    assert dict(model.named_modules()) == before


class _Branchy(nn.Module):
    """A stack whose head also reads a value from before the stack's input (``a``), or whose forward
    depends on the data (``data_dependent``): torch.fx gives no shortcut, the model runs whole."""

    def __init__(self, data_dependent: bool) -> None:
        super().__init__()
        self.data_dependent = data_dependent
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.Sequential(*(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)))
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        a = self.conv(x)
        if self.data_dependent and a.sum() > 0:
            a = -a
        out = self.blocks(torch.relu(a)) + a
        return self.head(out.mean(dim=(2, 3)))


@pytest.mark.parametrize("make", [lambda: build_model("res", 3, 8), lambda: build_model("skip", 3, 8),
                                  lambda: torchvision.models.resnet18(num_classes=10),
                                  lambda: _Branchy(False), lambda: _Branchy(True)],
                         ids=["res", "skip", "resnet18", "reads-before-the-stack", "data-dependent"])
def test_the_shortcut_from_the_stack_gives_the_same_results_or_is_not_taken(make, small_splits):
    from gradlab.lesion import tail_graph

    torch.manual_seed(0)
    model = make().eval()
    images, labels = small_splits.test[0][:64], small_splits.test[1][:64]
    expected = isinstance(model, nn.Module) and not isinstance(model, _Branchy)
    assert (tail_graph(model, stack_points(model)) is not None) == expected
    fast = lesion_study(model, images, labels, draws=2, reorder=True, batch_size=32)
    whole = lesion_study(model, images, labels, draws=2, reorder=True, batch_size=32, shortcut=False)
    pd.testing.assert_frame_equal(fast, whole)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_a_network_without_a_stack_is_refused():
    with pytest.raises(ValueError, match="a network without a block stack"):
        stack_points(build_model("res", 0, 4))


def test_reorder_swaps_each_pair_of_adjacent_blocks(small_splits):
    torch.manual_seed(0)
    frame = lesion_study(build_model("conv", 3, 4), *small_splits.test, draws=2, reorder=True, batch_size=100)
    swaps = frame.loc[frame["experiment"] == "swap"]
    assert swaps["blocks"].tolist() == ["layers.0<->layers.1", "layers.1<->layers.2"]
    assert swaps["stack_index"].tolist() == [0, 1] and swaps["accuracy"].between(0, 1).all()


# --- stored results ---------------------------------------------------------------------------


def test_results_are_stored_and_reused_until_the_checkpoint_changes(trained, small_splits, tmp_path):
    import shutil

    run = tmp_path / "res"
    shutil.copytree(trained / "res", run)
    (run / LESION).unlink(missing_ok=True)
    calls = []

    def study(**options):
        return lesion_runs(run, draws=2, device="cpu", splits=small_splits,
                           on_evaluation=lambda *args: calls.append(args), **options)

    first, _, reused = study()
    assert reused == [] and calls and (run / LESION).is_file()
    stored = runs.read_parquet(run / LESION)
    assert stored["checkpoint"].str.startswith("sha256:").all()
    calls.clear()
    again, _, reused = study()
    assert reused == ["res"] and calls == []
    pd.testing.assert_frame_equal(again, first)
    study(reorder=True)  # a swap was not stored: evaluated
    assert calls
    calls.clear()
    assert study()[2] == ["res"] and calls == []  # the stored study with swaps serves one without
    part = dataclasses.replace(small_splits, test=(small_splits.test[0][:50], small_splits.test[1][:50]))
    assert lesion_runs(run, draws=2, device="cpu", splits=part)[2] == []  # other test images: evaluated
    assert (runs.read_parquet(run / LESION)["images"] == 50).all()
    study()
    calls.clear()
    # a new best.pt (here: other weights, stored without a digest) is evaluated again
    state = torch.load(run / runs.BEST, weights_only=True)
    state.pop("digest")
    state["model"]["linear1.bias"] += 1.0
    torch.save(state, run / runs.BEST)
    _, _, reused = study()
    assert reused == [] and calls
    assert runs.read_parquet(run / LESION)["checkpoint"].str.startswith("size:").all()


# --- summaries and sentences ------------------------------------------------------------------


def test_summaries_of_a_lesion_frame():
    frame = pd.DataFrame({
        "run": "net", "experiment": ["intact", "delete", "delete", "delete", "delete"],
        "k": [0, 1, 1, 1, 2], "draw": [0, 0, 1, 2, 0], "stack_index": [-1, 0, 1, 2, -1],
        "blocks": ["", "b0", "b1", "b2", "b0+b1"], "deletable": [True, True, True, False, True],
        "images": 100, "accuracy": [0.8, 0.7, 0.5, np.nan, 0.3]})
    k = lessons.lesion_k(frame).set_index("k")
    assert k["mean"].tolist() == pytest.approx([0.8, 0.6, 0.3]) and k["sets"].tolist() == [1, 2, 1]
    assert k["all_sets"].all()  # b2 cannot be deleted: 2 single blocks and 1 pair are every set
    alone = lessons.lesion_k(frame.drop(columns="run"))  # one network without run keys, as lesion_study returns it
    assert alone["mean"].tolist() == pytest.approx([0.8, 0.6, 0.3]) and alone["all_sets"].all()
    assert lessons.describe_lesion(frame.drop(columns="run"))[0].startswith("the network: 80.0%")
    single = lessons.lesion_single(frame)
    assert single["change"].tolist()[:2] == pytest.approx([-0.1, -0.3]) and math.isnan(single["change"].iloc[2])
    (sentence,) = lessons.describe_lesion(frame)
    assert sentence.startswith("net: 80.0% test accuracy with all 3 blocks; deleting one block gave 50.0% to 70.0%")
    assert "1 of the 3 blocks change the shape" in sentence and sentence.endswith("chance is 10.0%.")


# --- the command line -------------------------------------------------------------------------


def _invoke(args):
    return CliRunner().invoke(main, ["lesion", *args], catch_exceptions=False)


def test_cli_prints_the_tables_and_reuses_stored_results(trained, small_splits, monkeypatch):
    monkeypatch.setattr(lesion_module, "make_splits", lambda *a, **k: small_splits)
    # stored results count for the whole test split: here the stand-in's 200 images
    monkeypatch.setattr(lesion_module.resources, "TEST_IMAGES", len(small_splits.test[1]))
    result = _invoke([str(trained / "res"), "--draws", "2", "--device", "cpu", "--recompute"])
    assert result.exit_code == 0, result.output
    assert "Test accuracy with one block deleted" in result.stdout and "layers.3" in result.stdout
    assert "res: " in result.stdout and "chance is 10.0%" in result.stdout
    again = _invoke([str(trained / "res"), "--draws", "2", "--device", "cpu", "--format", "json"])
    assert "reused its stored lesion study" in again.stderr
    report = json.loads(again.stdout)
    assert set(report) == {"single", "k_blocks", "reading"} and len(report["single"]) == 4
    stored = lessons.read_lesions(runs.load_sweep(trained / "res"))  # what the report side reads, torch-free
    assert set(stored["run"]) == {"res"} and len(lessons.lesion_single(stored)) == 4
    assert lessons.read_lesions(runs.load_sweep(trained / "probed")).empty


@pytest.mark.parametrize("target, args, message", [
    ("probed", [], "best.pt: missing, so the run (status probe) holds no trained network"),
    ("diverged", [], "the run diverged (first non-finite loss at step 1"),
    ("stackless", [], "DeepCNN is a network without a block stack"),
    ("res", ["--draws", "0"], "draws must be an integer >= 1, got 0"),
])
def test_bad_input_is_one_line_and_exit_status_2(trained, small_splits, monkeypatch, target, args, message):
    monkeypatch.setattr(lesion_module, "make_splits", lambda *a, **k: small_splits)
    result = _invoke([str(trained / target), *args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_networks_are_listed_by_block_and_depth_never_by_the_runs_name():
    """Names sort depth 16 before depth 2; tables and sentences follow the block order and depth."""
    rows = []
    for run, block, depth in (("skip-d2-s0", "skip", 2), ("conv-d16-s0", "conv", 16), ("conv-d2-s0", "conv", 2)):
        keys = {"run": run, "model": "deepcnn", "block": block, "depth": depth, "width": 32, "norm": "batch", "seed": 0}
        rows.append({**keys, "experiment": "intact", "k": 0, "draw": 0, "blocks": "", "stack_index": -1,
                     "deletable": True, "images": 100, "accuracy": 0.6})
        rows += [{**keys, "experiment": "delete", "k": 1, "draw": i, "blocks": f"layers.{i}", "stack_index": i,
                  "deletable": True, "images": 100, "accuracy": 0.5} for i in range(depth)]
    frame = pd.DataFrame(rows)
    order = ["conv-d2-s0", "conv-d16-s0", "skip-d2-s0"]
    assert list(dict.fromkeys(lessons.lesion_k(frame)["run"])) == order
    assert list(dict.fromkeys(lessons.lesion_single(frame)["run"])) == order
    assert list(lessons.k_table(frame).columns[1:]) == order
    assert [s.split(":")[0] for s in lessons.describe_lesion(frame)] == order
