"""gradlab probe and gradlab demo: measurements at initialisation, and the one-command lesson."""
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from gradlab import analysis, runs
from gradlab.cli import main
from gradlab.data import DeviceLoader
from gradlab.demo import DemoConfig, run_demo
from gradlab.models import build_model
from gradlab.probe import ProbeConfig, probe
from gradlab.report.text import ratio_table, report_text


def _config(**changes):
    base = dict(blocks=("conv", "res"), depths=(1, 3), width=8, batch_size=32, batches=2, dataset="synthetic", device="cpu")
    return ProbeConfig(**{**base, **changes})


def test_probe_averages_autograd_gradient_norms_over_the_batches(small_splits, tmp_path):
    config = _config()
    records, table, synthetic = probe(config, splits=small_splits, out=tmp_path / "probe")
    assert synthetic and sorted(table["run"]) == ["conv-d1", "conv-d3", "res-d1", "res-d3"]
    batches = list(DeviceLoader(*small_splits.train, batch_size=32, shuffle=True, seed=0, drop_last=True))[:2]
    torch.manual_seed(0)
    model = build_model("conv", 3, 8).train()
    expected = []
    for x, y in batches:
        outputs = {}
        handles = [model.layers[i].register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i in range(3)]
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [outputs[0], outputs[2]])
        expected.append([g.norm().item() for g in grads])
        for h in handles:
            h.remove()
    got = records.query("run == 'conv-d3' and metric == 'grad_out_norm'").set_index("layer")["value"]
    assert got["layers.0"] == pytest.approx(sum(e[0] for e in expected) / 2, rel=1e-5)
    assert got["layers.2"] == pytest.approx(sum(e[1] for e in expected) / 2, rel=1e-5)
    assert set(records["step"]) == {0}
    # The stored sweep reads back like any sweep, with the same numbers.
    sweep = runs.load_sweep(tmp_path / "probe")
    assert sorted(r.name for r in sweep.runs) == sorted(table["run"])
    stored = sweep.records(metrics=["grad_out_norm"]).query("run == 'conv-d3'").set_index("layer")["value"]
    assert stored["layers.0"] == got["layers.0"]


def test_probe_sees_the_physics_without_normalisation(small_splits):
    """No BatchNorm: the plain stack vanishes and the residual stack does not (Glorot & Bengio 2010)."""
    records, table, _ = probe(_config(blocks=("conv", "res"), depths=(12,), norms=("none",)), splits=small_splits)
    flow = analysis.flow_summary(records, table, phases=("init",)).set_index("block")
    assert flow.loc["conv", "first_to_last"] < flow.loc["res", "first_to_last"]
    assert flow.loc["conv", "verdict"] == "vanishing"
    assert flow.loc["res", "verdict"] == "stable"


@pytest.mark.parametrize("changes, message", [
    (dict(depths=()), "depths must not be empty"),
    (dict(depths=(2, 2)), "depths lists 2 more than once"),
    (dict(blocks=("dense",)), "unknown block 'dense'"),
    (dict(width=5), "width must be an even integer"),
])
def test_bad_probe_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes).validate()


def test_probe_cli_prints_ratios_bars_and_sentences(tmp_path):
    args = ["probe", "--blocks", "conv,skip", "--depths", "2,6", "--width", "8", "--batch-size", "16",
            "--batches", "1", "--dataset", "synthetic", "--device", "cpu", "--norm", "batch,none"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "note: synthetic data" in out and "conv / none" in out and "skip-d6-none" in out
    assert out.count("(batch norm) at initialisation") == 4 and out.count("(no normalisation) at initialisation") == 4
    as_json = CliRunner().invoke(main, args + ["--format", "json"], catch_exceptions=False)
    rows = json.loads(as_json.stdout)
    assert {r["run"] for r in rows} == {"conv-d2", "conv-d6", "skip-d2", "skip-d6",
                                        "conv-d2-none", "conv-d6-none", "skip-d2-none", "skip-d6-none"}
    bad = CliRunner().invoke(main, ["probe", "--depths", "2,x"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1


def test_probe_shatter_adds_the_neighbouring_gradient_similarity_and_stores_it(tmp_path):
    from gradlab import lessons

    args = ["probe", "--blocks", "conv,res", "--depths", "2,6", "--width", "8", "--batch-size", "32",
            "--batches", "1", "--dataset", "synthetic", "--device", "cpu", "--shatter"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "probe"), "--html", str(tmp_path / "p.html")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Neighbouring-gradient similarity at initialisation" in out
    assert out.count("the mean cosine similarity of input gradients at neighbouring points was") == 2
    assert "running statistics estimated from 1 training batches of 32 images" in out
    pairs, _ = lessons.read_shatter(tmp_path / "probe" / lessons.SHATTER_FOLDER)  # where the report reads it
    assert set(pairs["run"]) == {"conv-d2", "conv-d6", "res-d2", "res-d6"}
    assert 'id="shatter"' in (tmp_path / "p.html").read_text()
    rows = json.loads(CliRunner().invoke(main, [*args, "--format", "json"], catch_exceptions=False).stdout)
    stored = lessons.similarity(lessons.summarise_shatter(pairs)).set_index("run")
    assert {r["run"] for r in rows} == set(stored.index)
    for row in rows:  # the same networks, seed and data: the same similarity as stored
        assert -1 <= row["similarity"] <= 1 and row["similarity_std"] >= 0
        assert row["similarity"] == pytest.approx(stored.loc[row["run"], "mean"])
    bad = CliRunner().invoke(main, ["probe", "--model", "torchvision:resnet18", "--shatter", "--dataset", "synthetic"])
    assert bad.exit_code == 2 and "--shatter measures the deepcnn networks" in bad.stderr


def test_demo_measures_trains_and_reports(tmp_path):
    config = DemoConfig(probe_depths=(1, 4), train_depths=(1, 3), width=4, probe_batch_size=16, subset=128,
                        epochs=1, batch_size=64, shatter_depths=(1, 4), shatter_points=16, shatter_pairs=2,
                        shatter_max_lag=4, lesion_images=100, data_root=str(tmp_path / "no-data"), device="cpu",
                        work_dir=str(tmp_path / "work"), html=str(tmp_path / "demo.html"))
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("offline")

    original, torchvision.datasets.CIFAR10 = torchvision.datasets.CIFAR10, offline
    try:
        result = run_demo(config)
    finally:
        torchvision.datasets.CIFAR10 = original
    assert result.synthetic and "GRADLAB_DATA" in result.data_note
    assert sorted(result.probe_flow["run"]) == sorted(f"{b}-d{d}{n}" for b in ("conv", "res", "skip")
                                                      for d in (1, 4) for n in ("", "-none"))
    assert list(result.trained["run"]) == ["conv-d1-s0", "conv-d3-s0", "res-d1-s0", "res-d3-s0", "skip-d1-s0", "skip-d3-s0"]
    assert (result.trained["status"] == "complete").all()
    html = result.html.read_text()
    assert "synthetic" in html.lower() and result.html.stat().st_size > 10_000
    similarity = result.shatter_summary.loc[result.shatter_summary["lag"] == 1]
    assert sorted(similarity["run"]) == ["conv-d1", "conv-d4", "res-d1", "res-d4", "skip-d1", "skip-d4"]
    assert (similarity["weights"] == "init").all()
    assert set(result.lesion["run"]) == set(result.trained["run"]) and (result.lesion["images"] == 100).all()
    assert 'id="shatter"' in html and 'id="lesion"' in html


def test_a_probe_whose_gradient_underflows_to_exactly_zero_reports_it(small_splits):
    """64 plain blocks without normalisation: the gradient vanishes to exactly 0 (float32 underflow)
    long before the input. A result to report, not a divergence, a crash or a divide warning."""
    records, table, _ = probe(_config(blocks=("conv",), depths=(64,), norms=("none",), width=4, batch_size=16,
                                      batches=1), splits=small_splits)
    grads = records.query("metric == 'grad_out_norm'").set_index("layer")["value"]
    gains = records.query("metric == 'grad_gain' and layer.str.startswith('layers.')", engine="python")["value"]
    assert grads["layers.0"] == 0 and grads["layers.63"] > 0
    assert (gains == 0).sum() >= 1 and gains.isna().any()  # where it hit 0, then 0/0 below it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert analysis.divergence(records, table).empty
        flow = analysis.flow_summary(records, table, phases=("init",))
        text = report_text(records, table)
        cells = ratio_table(flow)
    row = flow.iloc[0]
    assert row["first_grad"] == 0 and row["last_grad"] == grads["layers.63"]
    assert row["first_to_last"] == 0 and row["gain_geomean"] == 0 and np.isnan(row["log_slope"])
    assert row["verdict"] == "vanishing"
    assert analysis.describe_flow(row).startswith(
        "conv, depth 64 (no normalisation) at initialisation: the gradient underflows to exactly 0 at the first block")
    assert cells.loc[0, "conv"] == "0 · vanishing"
    assert "ratio 0 · vanishing" in text and not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_a_probe_that_overflows_is_marked_diverged(small_splits, tmp_path, monkeypatch):
    """Weights scaled by 1e6 without normalisation: the forward pass overflows at initialisation."""
    import gradlab.models

    def huge(*args, **kwargs):
        model = build_model(*args, **kwargs)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1e6)
        return model

    monkeypatch.setattr(gradlab.models, "build_model", huge)  # what gradlab.specs builds deepcnn with
    records, table, _ = probe(_config(blocks=("conv",), depths=(4,), norms=("none",)), splits=small_splits,
                              out=tmp_path / "probe")
    act = records.query("metric == 'act_mean'").sort_values("position")
    first = act.loc[~np.isfinite(act["value"])].iloc[0]  # the lowest probe point whose activations overflowed
    assert np.isfinite(act.loc[act["position"] < first["position"], "value"]).all()
    row = table.iloc[0]
    assert row["status"] == "diverged"
    assert (row["diverged_step"], row["diverged_layer"], row["diverged_cause"]) == (0, first["layer"], "activation")
    summary = runs.load_sweep(tmp_path / "probe").runs[0].summary
    assert summary["status"] == "diverged"
    assert summary["diverged"] == {"step": 0, "epoch": 0, "layer": first["layer"], "position": int(first["position"]),
                                   "cause": "activation"}
    flow = analysis.flow_summary(records, table, phases=("init",)).iloc[0]
    assert flow["verdict"] == f"diverged at step 0 (layer {first['layer']})" and np.isnan(flow["first_to_last"])
    text = report_text(records, table)
    assert (f"conv-d4-none (conv, depth 4, no normalisation) diverged at step 0, epoch 0: the first non-finite "
            f"activation appeared at {first['layer']} (from its summary.json)") in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_hanin_beta_by_hand():
    from gradlab.models import hanin_beta

    for width in (4, 8, 32):
        for depth in (0, 2, 5):
            # stem: 3 convs of width w; conv/res blocks: w/2 then w; skip blocks: w/2 and w/2; the head is the output
            assert hanin_beta(build_model("conv", depth, width)) == pytest.approx(3 / width + depth * (2 / width + 1 / width))
            assert hanin_beta(build_model("res", depth, width)) == pytest.approx(3 * (depth + 1) / width)
            assert hanin_beta(build_model("skip", depth, width)) == pytest.approx(3 / width + depth * 4 / width)
    assert hanin_beta(torch.nn.Linear(3, 4)) == 0.0  # the output layer alone: no hidden layer


def test_a_probe_over_widths_and_seeds_names_its_networks_and_shares_its_batches(small_splits, tmp_path):
    config = _config(blocks=("conv", "res"), depths=(3,), widths=(4, 8), seeds=(0, 1, 2), norms=("batch", "none"),
                     batch_size=16, batches=1)
    records, table, _ = probe(config, splits=small_splits, out=tmp_path / "probe")
    assert list(table["run"][:6]) == ["conv-d3-w4-s0", "conv-d3-w4-s1", "conv-d3-w4-s2",
                                      "conv-d3-w8-s0", "conv-d3-w8-s1", "conv-d3-w8-s2"]
    assert len(table) == 24 and set(table["width"]) == {4, 8} and set(table["seed"]) == {0, 1, 2}
    assert (table["beta"] == 3 * 4 / table["width"]).all()  # conv and res, depth 3
    stored = runs.load_sweep(tmp_path / "probe").table().set_index("run")
    assert stored.loc["res-d3-w8-s2-none", "beta"] == pytest.approx(1.5)
    assert stored.loc["res-d3-w8-s2-none", "n_params"] == table.set_index("run").loc["res-d3-w8-s2-none", "n_params"]
    # seed 0 of the grid is the single-seed probe's network: same initialisation, same batches, same numbers
    single, _, _ = probe(_config(blocks=("conv",), depths=(3,), width=8, batch_size=16, batches=1), splits=small_splits)
    grid = records.query("run == 'conv-d3-w8-s0' and metric == 'grad_out_norm'").set_index("layer")["value"]
    alone = single.query("metric == 'grad_out_norm'").set_index("layer")["value"]
    pd.testing.assert_series_equal(grid.sort_index(), alone.sort_index(), check_names=False)
    # the spread over seeds, recomputed with numpy from the flow rows
    flow = analysis.flow_summary(records, table, phases=("init",))
    spread = analysis.seed_spread(flow).set_index(["block", "norm", "depth", "width"])
    for (block, norm, width), rows in flow.groupby(["block", "norm", "width"]):
        ratios = rows["first_to_last"].to_numpy(float)
        usable = ratios[np.isfinite(ratios) & (ratios > 0)]
        row = spread.loc[(block, norm, 3, width)]
        assert row["n_seeds"] == 3 and row["n_used"] == len(usable)
        assert row["n_zero"] == (ratios == 0).sum() and row["n_nonfinite"] == (~np.isfinite(ratios)).sum()
        if len(usable) >= 2:
            assert row["log_ratio_std"] == pytest.approx(np.std(np.log(usable), ddof=1))
        else:
            assert np.isnan(row["log_ratio_std"])
        assert row["beta"] == pytest.approx(12 / width)


def test_spread_counts_zero_and_non_finite_ratios_and_never_takes_their_log():
    flow = pd.DataFrame({"run": list("abcdef"), "phase": "init", "model": "deepcnn", "block": "conv", "norm": "none",
                         "depth": 32, "width": 8, "seed": range(6), "beta": 12.375, "n_params": 100,
                         "first_to_last": [0.0, 0.0, np.nan, np.inf, 1e-3, 1e-2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = analysis.seed_spread(flow).iloc[0]
    assert (row["n_seeds"], row["n_zero"], row["n_nonfinite"], row["n_used"]) == (6, 2, 2, 2)
    assert row["log_ratio_std"] == pytest.approx(np.std(np.log([1e-3, 1e-2]), ddof=1))
    alone = analysis.seed_spread(flow.assign(first_to_last=[0.0] * 5 + [1e-3])).iloc[0]
    assert alone["n_used"] == 1 and np.isnan(alone["log_ratio_std"])  # one usable seed: no spread


def test_spread_trend_is_spearman_rho():
    spread = pd.DataFrame({"model": "deepcnn", "block": "res", "norm": "batch", "depth": [8] * 4,
                           "width": [8, 16, 32, 64], "beta": [3.4, 1.7, 0.8, 0.4], "log_ratio_std": [0.5, 0.3, 0.31, 0.1]})
    rho = analysis.spread_trend(spread)["rho"].iloc[0]
    x, y = pd.Series([3.4, 1.7, 0.8, 0.4]).rank(), pd.Series([0.5, 0.3, 0.31, 0.1]).rank()
    assert rho == pytest.approx(np.corrcoef(x, y)[0, 1]) and rho == pytest.approx(0.8)


def test_probe_cli_over_widths_and_seeds_shows_the_ratio_against_width(tmp_path):
    args = ["probe", "--blocks", "conv,res", "--depths", "2,4", "--widths", "4,8", "--seeds", "0,1",
            "--norm", "batch,none", "--batch-size", "16", "--batches", "1", "--dataset", "synthetic", "--device", "cpu",
            "--html", str(tmp_path / "p.html")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "by depth and width" in out and "geometric mean over 2 seeds" in out
    header = next(line for line in out.splitlines() if line.startswith("depth"))
    assert header.split()[:2] == ["depth", "width"]
    assert out.count("at initialisation (1 batch of 16 images, 2 seeds): first-to-last gradient ratio") == 8
    assert "Spread over 2 seeds at initialisation" in out and "Spearman" in out
    html = (tmp_path / "p.html").read_text()
    section = html[html.index('id="width-depth"'):]
    section = section[:section.index("</section>")]
    assert section.count("<img") == 2 and "Hanin" in section and "first-to-last gradient ratio" in section
