"""Shattered gradients: the similarity measure against cases with a known answer, the batched
gradients against one-point-at-a-time autograd, the BatchNorm statistics, and the command line."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from gradlab import lessons, runs, shatter as shatter_module
from gradlab.cli import main
from gradlab.data import normalize
from gradlab.models import build_model
from gradlab.recorder import RecordConfig
from gradlab.shatter import (MIN_PAIRS, MIN_POINTS, ShatterConfig, check_line, estimate_bn_statistics, image_pairs,
                             input_gradients, lag_similarity, line, shatter, shatter_runs)
from gradlab.train import TrainConfig, train_run

SMALL = dict(blocks=("conv", "res"), depths=(1, 3), width=4, points=16, pairs=2, max_lag=4, stat_batches=2,
             stat_batch_size=32, dataset="synthetic", device="cpu")


# --- calibrations: cases whose answer is known -----------------------------------------------


def test_a_linear_model_has_identical_gradients_along_the_line_so_similarity_exactly_1(small_splits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    images, labels = small_splits.test
    a, b = normalize(images[:2])
    for target in ("logit", "loss"):
        grads = input_gradients(model, line(a, b, 64), int(labels[0]), target)
        values = lag_similarity(grads, 8).numpy()
        if target == "logit":  # the gradient is the weight row, the same at every point
            assert torch.equal(grads, model[1].weight[int(labels[0])].detach().expand_as(grads))
            np.testing.assert_allclose(values, 1.0, rtol=0, atol=1e-12)
        else:  # softmax(z) - onehot changes along the line: the loss gradient is not constant
            assert values[0] == pytest.approx(1.0) and values[1] < 1.0


def test_independent_random_gradients_give_0_within_the_sampling_error():
    n, dim = 512, 3072
    grads = torch.randn(n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values = lag_similarity(grads, 16).numpy()
    assert values[0] == pytest.approx(1.0)
    # each cosine of two independent directions in `dim` dimensions has standard deviation 1/sqrt(dim)
    for k in range(1, 17):
        error = 1 / math.sqrt(dim * (n - k))
        assert abs(values[k]) < 5 * error, (k, values[k])


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_an_ar1_sequence_of_vectors_gives_rho_to_the_lag(rho):
    """g_t = ρ g_{t-1} + sqrt(1 - ρ²) e_t: the lag-k correlation of the sequence is ρ^k."""
    n, dim = 512, 4096
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.empty_like(noise)
    grads[0] = noise[0]
    for t in range(1, n):
        grads[t] = rho * grads[t - 1] + math.sqrt(1 - rho ** 2) * noise[t]
    values = lag_similarity(grads, 8).numpy()
    np.testing.assert_allclose(values, rho ** np.arange(9), atol=0.01)


def test_zero_gradients_are_left_out_and_a_lag_without_pairs_is_nan():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    values = lag_similarity(grads, 3).numpy()
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 1.0 and math.isnan(values[3])


# --- the measurement on real networks ---------------------------------------------------------


def test_line_runs_from_a_to_b_in_equal_steps():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    points = line(a, b, 5)
    assert points.shape == (5, 3, 2, 2)
    assert torch.equal(points[0], a) and torch.equal(points[-1], b)
    assert torch.allclose(points[:, 0, 0, 0], torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize("block", ["conv", "res", "skip"])
def test_batched_gradients_equal_each_point_differentiated_alone(small_splits, block):
    torch.manual_seed(0)
    model = build_model(block, 2, 8)
    estimate_bn_statistics(model, [normalize(small_splits.train[0][:64])])
    a, b = normalize(small_splits.test[0][:2])
    points = line(a, b, 12)
    batched = input_gradients(model, points, 3, "logit", chunk=5)  # chunks do not change the result
    for i in range(len(points)):
        x = points[i:i + 1].clone().requires_grad_(True)
        (alone,) = torch.autograd.grad(model(x)[0, 3], x)
        torch.testing.assert_close(batched[i], alone.flatten(), rtol=1e-5, atol=1e-7)


def test_channels_last_memory_gives_the_same_gradients(small_splits):
    torch.manual_seed(0)
    model = build_model("skip", 2, 8).eval()
    a, b = normalize(small_splits.test[0][:2])
    points = line(a, b, 8)
    plain = input_gradients(model, points, 1)
    fast = input_gradients(model.to(memory_format=torch.channels_last), points.contiguous(memory_format=torch.channels_last), 1)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)


def test_input_gradients_refuse_a_model_in_training_mode():
    model = build_model("res", 1, 4).train()
    with pytest.raises(ValueError, match="eval mode"):
        input_gradients(model, torch.zeros(2, 3, 32, 32), 0)


def test_bn_statistics_are_the_cumulative_average_of_the_batches_and_the_model_ends_in_eval_mode(small_splits):
    torch.manual_seed(0)
    model = build_model("conv", 2, 8)
    momentum = model.bn1.momentum
    batches = [normalize(small_splits.train[0][i:i + 50]) for i in (0, 50, 100)]
    assert estimate_bn_statistics(model, batches) == 4  # bn1, bn2 and one per block
    with torch.no_grad():
        means = [model.conv1(x).mean(dim=(0, 2, 3)) for x in batches]
    torch.testing.assert_close(model.bn1.running_mean, torch.stack(means).mean(0))
    assert model.bn1.momentum == momentum and int(model.bn1.num_batches_tracked) == 3
    assert not any(m.training for m in model.modules())


def test_image_pairs_are_seeded_disjoint_and_distinct():
    labels = torch.arange(20)
    pairs = image_pairs(labels, 5, seed=3)
    flat = [i for pair in pairs for i in pair]
    assert len(set(flat)) == 10 and pairs == image_pairs(labels, 5, seed=3) and pairs != image_pairs(labels, 5, seed=4)
    with pytest.raises(ValueError, match="needs 22 test images"):
        image_pairs(labels, 11)


def test_shatter_measures_every_network_of_the_grid(small_splits):
    config = ShatterConfig(**SMALL)
    result = shatter(config, splits=small_splits)
    assert sorted(result.pairs["run"].unique()) == ["conv-d1", "conv-d3", "res-d1", "res-d3"]
    assert len(result.pairs) == 4 * config.pairs * (config.max_lag + 1)
    summary = result.summary
    assert list(summary.columns) == lessons.SUMMARY_COLUMNS
    assert (summary["pairs"] == config.pairs).all()
    np.testing.assert_allclose(summary.loc[summary["lag"] == 0, "mean"], 1.0, rtol=1e-12)
    assert summary["statistics"].str.contains("estimated from 2 training batches of 32 images").all()
    np.testing.assert_allclose(summary["distance"], summary["lag"] / (config.points - 1))
    # the gradient image: every point of the first pair on one pixel row of every channel
    assert len(result.images) == 4 * config.points * 3 * 32
    again = shatter(config, splits=small_splits)  # seeded: the same numbers
    np.testing.assert_array_equal(again.pairs["value"], result.pairs["value"])
    sentences = lessons.describe_shatter(summary)
    assert len(sentences) == 2 and "at depth 1" in sentences[0] and "2 image pairs, 16 points per line" in sentences[0]


def test_networks_without_batch_norm_say_so(small_splits):
    result = shatter(ShatterConfig(**{**SMALL, "blocks": ("res",), "depths": (2,), "norms": ("none",)}), splits=small_splits)
    assert (result.summary["statistics"] == "no BatchNorm, eval mode").all()


@pytest.mark.parametrize("points, pairs, max_lag, target, message", [
    (MIN_POINTS - 1, 4, 2, "logit", f"points must be an integer >= {MIN_POINTS}, got 7"),
    (0, 4, 2, "logit", "points must be an integer >= 8, got 0"),
    (64, MIN_PAIRS - 1, 4, "logit", f"pairs must be an integer >= {MIN_PAIRS}, got 1"),
    (64, 4, 0, "logit", "max_lag must be an integer >= 1"),
    (20, 4, 16, "logit", "points (20) must be at least twice max_lag (16)"),
    (64, 4, 4, "hessian", "unknown target 'hessian'; known: ['logit', 'loss']"),
])
def test_a_line_that_cannot_be_measured_is_refused(points, pairs, max_lag, target, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_line(points, pairs, max_lag, target)


# --- trained runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_splits):
    """A tiny trained run, a run without a checkpoint and a diverged run."""
    root = tmp_path_factory.mktemp("shatter-runs")
    config = TrainConfig(block="res", depth=2, width=4, epochs=1, batch_size=64, lr=3e-3, dataset="synthetic", device="cpu")
    train_run(config, root / "good", splits=small_splits, record=RecordConfig(every=0))
    bad = TrainConfig(block="conv", depth=2, width=4, norm="none", epochs=1, batch_size=64, lr=1e6, dataset="synthetic",
                      device="cpu")
    assert train_run(bad, root / "diverged", splits=small_splits, record=RecordConfig(every=0))["status"] == "diverged"
    (root / "probed").mkdir()  # what gradlab probe --out writes: options and a summary, no checkpoint
    runs.write_json(root / "probed" / runs.CONFIG, {"train": asdict(config)})
    runs.write_json(root / "probed" / runs.SUMMARY, {"status": "probe"})
    return root


def test_a_trained_run_is_measured_with_its_checkpoints_statistics(trained, small_splits):
    result = shatter_runs(trained / "good", points=16, pairs=2, max_lag=4, device="cpu", splits=small_splits)
    assert set(result.pairs["run"]) == {"good"} and (result.pairs["weights"] == "trained").all()
    assert result.summary["statistics"].str.startswith("the checkpoint's running statistics").all()


# --- the command line -------------------------------------------------------------------------


def _invoke(args):
    return CliRunner().invoke(main, ["shatter", *args], catch_exceptions=False)


def test_cli_prints_tables_and_the_reading(monkeypatch, small_splits, tmp_path):
    monkeypatch.setattr(shatter_module, "make_splits", lambda *a, **k: small_splits)
    args = ["--blocks", "conv,res", "--depths", "1,3", "--width", "4", "--points", "16", "--pairs", "2", "--max-lag", "4",
            "--stat-batches", "1", "--stat-batch-size", "32", "--dataset", "synthetic", "--device", "cpu"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert "Neighbouring-gradient similarity" in result.stdout and "synthetic data" in result.stdout
    assert result.stdout.count("the mean cosine similarity of input gradients at neighbouring points was") == 2
    as_json = json.loads(_invoke([*args, "--format", "json", "--out", str(tmp_path / "stored")]).stdout)
    assert set(as_json) == {"similarity", "autocorrelation", "reading"} and len(as_json["similarity"]) == 4
    pairs, images = lessons.read_shatter(tmp_path / "stored")  # what the report side reads, torch-free
    summary = lessons.summarise_shatter(pairs)
    assert lessons.similarity(summary)["mean"].tolist() == pytest.approx([r["mean"] for r in as_json["similarity"]])
    assert len(images) == 4 * 16 * 3 * 32 and lessons.read_shatter(tmp_path) is None


@pytest.mark.parametrize("args, message", [
    (["--points", "4"], "points must be an integer >= 8, got 4"),
    (["--pairs", "1"], "pairs must be an integer >= 2, got 1"),
    (["--pairs", "0"], "pairs must be an integer >= 2, got 0"),
    (["--target", "margin"], "unknown target 'margin'"),
    (["--depths", ""], "depths must not be empty"),
    (["{probed}"], "best.pt: missing, so the run (status probe) holds no trained network"),
    (["{diverged}"], "the run diverged (first non-finite loss at step 1"),
    (["{good}", "--blocks", "conv"], "--blocks describes networks at initialisation"),
])
def test_bad_input_is_one_line_and_exit_status_2(trained, args, message):
    paths = {name: str(trained / name) for name in ("good", "probed", "diverged")}
    extra = ["--device", "cpu"] if args[0].startswith("{") else ["--dataset", "synthetic", "--device", "cpu"]
    result = _invoke([a.format(**paths) for a in args] + extra)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_cli_on_a_run_stores_its_measurement_in_the_run_directory_for_the_report(trained, monkeypatch, small_splits,
                                                                                  tmp_path):
    monkeypatch.setattr(shatter_module, "make_splits", lambda *a, **k: small_splits)
    run = tmp_path / "good"
    shutil.copytree(trained / "good", run)
    result = _invoke([str(run), "--points", "16", "--pairs", "2", "--max-lag", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert f"stored in {run / lessons.SHATTER_FOLDER}" in result.stderr
    pairs, images = lessons.read_shatter(run / lessons.SHATTER_FOLDER)
    assert set(pairs["run"]) == {"good"} and (pairs["weights"] == "trained").all() and len(images)


def test_the_lessons_are_in_the_public_api():
    import gradlab
    from gradlab import lesion, shatter

    assert gradlab.shatter_networks is shatter.shatter and gradlab.ShatterConfig is shatter.ShatterConfig
    assert gradlab.shatter_runs is shatter.shatter_runs
    assert gradlab.lesion_study is lesion.lesion_study and gradlab.lesion_runs is lesion.lesion_runs
