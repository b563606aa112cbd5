"""gradlab.analysis on constructed record frames whose answers are known by hand."""
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradlab import analysis, schema
from gradlab.analysis import (
    activation_profile,
    branch_skip_share,
    depth_scaling,
    describe_flow,
    flow_summary,
    gradient_profile,
    layer_table,
)

RES_BLOCKS = ("res", "resdown")


MODULE_TYPES = {"conv": "ConvBlock", "res": "ResBlock", "resdown": "ResDownBlock", "skip": "SkipBlock"}
STEM, HEAD = ("conv1", "conv2", "conv3"), "linear1"


def make_records(
    run="conv-d16-s0",
    block="conv",
    depth=16,
    gain=1.5,
    norm="batch",
    seed=0,
    steps=(0,),
    steps_per_epoch=10,
    g_last=1e-2,
    scale=None,
    optimizer=True,
    stack=None,
    stem=STEM,
    head=HEAD,
    module_type=None,
    model="deepcnn",
    width=64,
):
    """Records of one run whose grad_out_norm at stack block i is ``g_last * gain**(N-1-i)``.

    The probe points are ``stem``, the stack (``stack`` names, default the DeepCNN's
    ``layers.0 .. layers.{depth-1}``) and ``head``. Every probe point follows the same law
    through i = position - len(stem) (stem i < 0, head i = N), so the stem and head extend
    the geometric profile. ``scale(steps) -> factors`` multiplies every gradient norm at each
    step. One step's rows are built in Python, then tiled over steps with numpy.
    """
    stack = list(stack) if stack is not None else [f"layers.{i}" for i in range(depth)]
    depth = len(stack)
    kind = module_type or MODULE_TYPES.get(block, block)
    points = ([(layer, "stem", -1, "Conv2d") for layer in stem]
              + [(layer, "stack", i, kind) for i, layer in enumerate(stack)]
              + [(layer, "head", -1, "Linear") for layer in ([head] if head else [])])
    rows = []
    for position, (layer, role, index, module) in enumerate(points):
        grad_out = g_last * gain ** (depth - 1 - (position - len(stem)))
        metrics = {
            "act_mean": 0.1, "act_std": 1.0 + position, "act_nonpos_frac": 0.5,
            "act_chan_mean_sq": 0.01 * position, "act_chan_var": 1.0 + position,
            "grad_out_norm": grad_out, "grad_in_norm": grad_out * gain, "grad_gain": gain,
            "param_grad_norm": 0.1 * grad_out, "param_norm": 3.0, "nonfinite_grads": 0.0,
        }
        if optimizer:
            metrics["update_ratio"] = 1e-3
        if role == "stack" and block in RES_BLOCKS:
            metrics |= {
                "branch_chan_var": 0.5, "skip_chan_var": 2.0,
                "grad_in_branch_norm": 0.6 * grad_out * gain,
                "grad_in_skip_norm": 0.8 * grad_out * gain,
            }
        rows += [(layer, position, role, index, module, m, v) for m, v in metrics.items()]
    model_type = "DeepCNN" if model == "deepcnn" else "ResNet"
    rows += [("model", -1, "model", -1, model_type, "loss", 2.3),
             ("model", -1, "model", -1, model_type, "param_grad_norm", 1.0)]
    one = pd.DataFrame(rows, columns=["layer", "position", "role", "stack_index", "module_type", "metric", "value"])

    steps = np.asarray(list(steps), dtype=int)
    frame = one.iloc[np.tile(np.arange(len(one)), len(steps))].reset_index(drop=True)
    frame.insert(0, "step", np.repeat(steps, len(one)))
    frame.insert(1, "epoch", frame["step"] // steps_per_epoch)
    if scale is not None:
        grad = frame["metric"].str.startswith("grad_") & (frame["metric"] != "grad_gain")
        factor = np.repeat(np.asarray(scale(steps), dtype=float), len(one))
        frame["value"] = np.where(grad, frame["value"] * factor, frame["value"])
    meta = {"run": run, "model": model, "block": block, "depth": depth, "width": width, "norm": norm, "seed": seed}
    assert [*meta, *frame.columns] == [*schema.RUN_KEYS, *schema.RECORD_COLUMNS]
    return frame.assign(**meta)[[*meta, *frame.columns]]


RESNET18_STACK = [f"layer{stage}.{i}" for stage in (1, 2, 3, 4) for i in (0, 1)]


def make_resnet(run="r18", **changes):
    """A torchvision resnet18-like run: stem conv1, stack layer1.0 .. layer4.1 (BasicBlock), head fc."""
    return make_records(run, **{**dict(block="BasicBlock", stack=RESNET18_STACK, stem=("conv1",), head="fc",
                                       model="torchvision:resnet18", norm="batch", width=np.nan), **changes})


def make_runs(records, **columns):
    """The runs table matching ``records``: complete runs, accuracies from ``columns``."""
    runs = analysis.run_table(records)
    runs["width"] = 64
    runs["status"] = "complete"
    runs["epochs"] = 1
    for name in ("final_train_acc", "best_val_acc", "test_acc"):
        runs[name] = columns.get(name, np.nan)
    return runs


def set_value(records, layer, metric, value):
    records = records.copy()
    records.loc[(records["layer"] == layer) & (records["metric"] == metric), "value"] = value
    return records


def only_row(frame, **where):
    mask = np.ones(len(frame), dtype=bool)
    for column, value in where.items():
        mask &= frame[column] == value
    assert mask.sum() == 1, frame
    return frame.loc[mask].iloc[0]


# ------------------------------------------------------------------ verdicts


@pytest.mark.parametrize(
    "gain, verdict",
    [(1.5, "exploding"), (0.5, "vanishing"), (1.0, "stable"), (1.1, "stable")],
)
def test_flow_summary_of_a_geometric_profile(gain, verdict):
    records = make_records(gain=gain, depth=16)
    row = only_row(flow_summary(records), phase="init")
    assert row["first_to_last"] == pytest.approx(gain**15, rel=1e-12)
    assert row["gain_geomean"] == pytest.approx(gain, rel=1e-12)
    assert row["log_slope"] == pytest.approx(-math.log10(gain), abs=1e-12)
    assert row["first_grad"] == pytest.approx(1e-2 * gain**15)
    assert row["last_grad"] == pytest.approx(1e-2)
    assert row["verdict"] == verdict


def test_thresholds_are_inclusive():
    assert analysis.EXPLODING_RATIO == 10 and analysis.VANISHING_RATIO == 0.1
    records = pd.concat(
        [
            make_records("up", gain=10.0, depth=2),
            make_records("down", gain=0.1, depth=2),
            make_records("in", gain=9.99, depth=2),
        ]
    )
    verdicts = flow_summary(records, phases=["init"]).set_index("run")["verdict"]
    assert verdicts.to_dict() == {"down": "vanishing", "in": "stable", "up": "exploding"}


def test_exactly_zero_gradients_are_results_not_errors():
    base = make_records(depth=4, gain=1.0)
    first_zero = set_value(base, "layers.0", "grad_out_norm", 0.0).assign(run="first0")
    last_zero = set_value(base, "layers.3", "grad_out_norm", 0.0).assign(run="last0")
    both = set_value(set_value(base, "layers.0", "grad_out_norm", 0.0), "layers.3", "grad_out_norm", 0.0)
    gain_zero = set_value(base, "layers.2", "grad_gain", 0.0).assign(run="gain0")
    records = pd.concat([first_zero, last_zero, both.assign(run="both0"), gain_zero])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = flow_summary(records, phases=["init"]).set_index("run")
    assert flow.loc["first0", "first_to_last"] == 0
    assert flow.loc["first0", "verdict"] == "vanishing"
    assert flow.loc["last0", "first_to_last"] == np.inf
    assert flow.loc["last0", "verdict"] == "exploding"
    assert np.isnan(flow.loc["both0", "first_to_last"])  # 0/0: no ratio, but a result
    assert flow.loc["both0", "verdict"] == "vanishing"
    assert "vanished to 0 before it reached the blocks — vanishing." in describe_flow(flow.loc["both0"])
    assert flow.loc["gain0", "gain_geomean"] == 0
    assert flow.loc["gain0", "verdict"] == "stable"
    assert np.isnan(flow.loc["first0", "log_slope"])  # log10(0) is not a point


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs(bad):
    base = make_records(depth=4, gain=1.0)
    records = pd.concat(
        [
            set_value(base, "layers.0", "grad_out_norm", bad).assign(run="first"),
            set_value(base, "layers.3", "grad_out_norm", bad).assign(run="last"),
            set_value(base, "layers.1", "grad_gain", bad).assign(run="gain"),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # told that nothing diverged, a non-finite norm gives no ratio
        flow = flow_summary(records, phases=["init"], diverged=analysis.divergence(records.iloc[:0])).set_index("run")
        sentences = {run: describe_flow(row) for run, row in flow.iterrows()}
        found = flow_summary(records, phases=["init"]).set_index("run")
    assert found.loc["first", "verdict"] == "diverged at step 0 (layer layers.0)"
    assert found.loc["last", "verdict"] == "diverged at step 0 (layer layers.3)"
    assert found.loc["gain", "verdict"] == "stable"  # a ratio of norms is no evidence of divergence
    assert found.loc[["first", "last"], ["first_to_last", "gain_geomean", "log_slope"]].isna().all().all()
    assert flow.loc[["first", "last"], "verdict"].tolist() == ["non-finite"] * 2
    assert flow.loc[["first", "last"], "first_to_last"].isna().all()
    assert flow.loc["gain", "verdict"] == "stable"
    if np.isnan(bad):
        assert np.isnan(flow.loc["gain", "gain_geomean"])
    else:
        assert flow.loc["gain", "gain_geomean"] == np.inf
    assert sentences["first"].endswith("so they give no ratio — non-finite.")
    assert sentences["last"].endswith("— non-finite.") and "stable" in sentences["gain"]


@pytest.mark.parametrize("depth", [0, 1])
def test_shallow_nets_have_no_first_to_last(depth):
    records = make_records(depth=depth, gain=1.5)
    row = only_row(flow_summary(records), phase="init")
    assert np.isnan(row["first_to_last"]) and np.isnan(row["log_slope"])
    assert row["verdict"] == "n/a"
    if depth == 1:
        assert row["gain_geomean"] == pytest.approx(1.5)
    else:
        assert np.isnan(row["gain_geomean"])
    assert "n/a" in describe_flow(row)
    profile = gradient_profile(records)
    assert profile["layer"].tolist()[:3] == ["conv1", "conv2", "conv3"]
    if depth == 0:
        assert profile["relative"].isna().all()
    else:
        assert only_row(profile, layer="layers.0")["relative"] == 1


# ------------------------------------------------------------------ any model: roles, not names


def test_a_resnet18_like_run_is_judged_by_its_stack():
    records = make_resnet(gain=2.0, g_last=1e-3)
    row = only_row(flow_summary(records), phase="init")
    # stack_index 0 is layer1.0, the last (7) is layer4.1: 1e-3 * 2**7 over 1e-3
    assert (row["model"], row["block"], row["depth"]) == ("torchvision:resnet18", "BasicBlock", 8)
    assert row["first_grad"] == pytest.approx(1e-3 * 2.0**7) and row["last_grad"] == pytest.approx(1e-3)
    assert row["first_to_last"] == pytest.approx(2.0**7, rel=1e-12)
    assert row["gain_geomean"] == pytest.approx(2.0, rel=1e-12)
    assert row["log_slope"] == pytest.approx(-math.log10(2.0), abs=1e-12)
    assert row["verdict"] == "exploding"
    assert describe_flow(row).startswith("torchvision:resnet18, BasicBlock, depth 8 (batch norm) at initialisation: "
                                         "the gradient grows 128× from the last block to the first")
    profile = gradient_profile(records).set_index("layer")
    assert profile.index.tolist() == ["conv1", *RESNET18_STACK, "fc"]  # forward order, stem and head kept
    assert profile["position"].tolist() == list(range(10))
    assert profile.loc["layer4.1", "relative"] == 1 and profile.loc["layer1.0", "relative"] == pytest.approx(128)
    assert profile.loc["conv1", "relative"] == pytest.approx(256)
    assert profile.loc["fc", "relative"] == pytest.approx(0.5)
    table = layer_table(records, "r18")
    assert table["role"].tolist() == ["stem", *["stack"] * 8, "head"]
    assert table["stack_index"].tolist() == [-1, *range(8), -1]
    assert set(table.loc[table["role"] == "stack", "module_type"]) == {"BasicBlock"}
    assert only_row(table, layer="layer2.1")["relative"] == pytest.approx(2.0**4)


def test_layer_names_are_never_parsed():
    """The same DeepCNN records under other names give the same numbers: only role and stack_index count."""
    names = {f"layers.{i}": f"trunk.unit{7 - i}" for i in range(8)} | {"conv1": "a", "conv2": "b", "conv3": "c"}
    records = make_records(depth=8, gain=1.5, steps=[0, 10, 20])
    renamed = records.assign(layer=records["layer"].replace(names))
    for phase in ("init", "end"):
        expected, got = (flow_summary(r, phases=[phase]) for r in (records, renamed))
        pd.testing.assert_frame_equal(got, expected)
        ratios = gradient_profile(renamed, phase).set_index("layer")["relative"]
        assert ratios["trunk.unit7"] == pytest.approx(1.5**7) and ratios["trunk.unit0"] == 1
    poisoned = set_value(renamed, "trunk.unit5", "grad_out_norm", np.nan)
    assert analysis.divergence(poisoned)["layer"].tolist() == ["trunk.unit5"]


def test_a_mixed_sweep_has_one_row_per_run_and_a_cell_per_model_and_block():
    records = pd.concat([make_records("conv-d8-s0", depth=8, gain=1.5), make_records("res-d8-s0", block="res", depth=8,
                                                                                  gain=1.0),
                         make_resnet("r18-s0", gain=1.2), make_resnet("r18-s1", gain=1.3, seed=1)], ignore_index=True)
    flow = flow_summary(records, phases=["init"]).set_index("run")
    assert flow.index.tolist() == ["conv-d8-s0", "r18-s0", "r18-s1", "res-d8-s0"]
    assert flow["block"].tolist() == ["conv", "BasicBlock", "BasicBlock", "res"]
    assert flow["depth"].tolist() == [8, 8, 8, 8]
    assert flow.loc["r18-s1", "first_to_last"] == pytest.approx(1.3**7)
    scaling = depth_scaling(records, None)
    assert scaling[["model", "block", "depth"]].values.tolist() == [
        ["deepcnn", "conv", 8], ["deepcnn", "res", 8], ["torchvision:resnet18", "BasicBlock", 8]]
    resnet = only_row(scaling, block="BasicBlock")
    assert resnet["n_seeds"] == 2 and resnet["first_to_last"] == pytest.approx(np.sqrt(1.2**7 * 1.3**7))
    # without block and depth keys (a recorder's frame), both come from the stack rows
    bare = records.drop(columns=["block", "depth"])
    mixed = pd.concat([bare, make_resnet("mix", block="BasicBlock", module_type="Bottleneck").drop(
        columns=["block", "depth"])], ignore_index=True)
    mixed.loc[(mixed["run"] == "mix") & (mixed["stack_index"] < 2), "module_type"] = "BasicBlock"
    inferred = flow_summary(mixed, phases=["init"]).set_index("run")
    assert inferred.loc["r18-s0", ["block", "depth"]].tolist() == ["BasicBlock", 8]
    assert inferred.loc["conv-d8-s0", ["block", "depth"]].tolist() == ["ConvBlock", 8]
    assert inferred.loc["mix", "block"] == "BasicBlock/Bottleneck"
    assert depth_scaling(mixed, None)["n_seeds"].sum() == 5  # no row lost to a missing key


def test_a_run_without_a_stack_and_a_run_without_run_keys():
    stemless = make_records("solo", depth=3, stem=(), head=None)
    assert only_row(flow_summary(stemless), phase="init")["first_to_last"] == pytest.approx(1.5**2)
    keyless = make_resnet().drop(columns=["model", "block", "depth", "width", "norm", "seed"])
    scaling = depth_scaling(keyless, None)
    assert len(scaling) == 1 and scaling["n_seeds"].tolist() == [1] and scaling["depth"].tolist() == [8]
    assert scaling["block"].tolist() == ["BasicBlock"] and scaling["verdict"].tolist() == ["exploding"]


def test_legacy_records_are_refused_with_the_way_to_read_them():
    records = make_records(depth=2).drop(columns=["role", "stack_index", "module_type"])
    with pytest.raises(ValueError, match="legacy format.*gradlab.load_run"):
        flow_summary(records)


def test_sort_by_block():
    frame = pd.DataFrame({"block": ["skip", "BasicBlock", "conv", "res"], "model": ["deepcnn", "tv", "deepcnn", "a"]})
    assert analysis.sort_by_block(frame, ["block"])["block"].tolist() == ["conv", "res", "skip", "BasicBlock"]
    assert analysis.sort_by_block(frame, ["model", "block"])["block"].tolist() == ["conv", "skip", "res", "BasicBlock"]


# ------------------------------------------------------------------ phases


def test_init_is_the_first_recorded_step():
    records = make_records(depth=4, steps=[7, 20, 40], scale=lambda s: s.astype(float))
    # update_ratio starts later: its init is its own first recorded step.
    late = (records["metric"] == "update_ratio") & (records["step"] == 7)
    records = records.loc[~late]
    records.loc[records["metric"] == "update_ratio", "value"] = records["step"] * 1e-4
    table = layer_table(records, "conv-d16-s0", "init")
    assert only_row(table, layer="layers.3")["grad_out_norm"] == pytest.approx(1e-2 * 7)
    assert only_row(table, layer="layers.3")["update_ratio"] == pytest.approx(20e-4)


def test_epoch1_is_the_median_over_epoch_0_and_end_the_last_three_steps():
    steps = np.arange(0, 30)  # epochs of 10 steps
    spikes = {3: 1e6, 29: 1e6}  # a spike in epoch 0 and on the very last step

    def scale(s):
        return np.array([spikes.get(int(x), 1.0 + x) for x in s])

    records = make_records(depth=4, gain=2.0, steps=steps, scale=scale)
    profile = gradient_profile(records, phase="epoch1").set_index("layer")
    epoch0 = [spikes.get(x, 1.0 + x) for x in range(10)]
    assert profile.loc["layers.3", "value"] == pytest.approx(1e-2 * np.median(epoch0))
    assert profile.loc["layers.0", "relative"] == pytest.approx(8.0)
    end = gradient_profile(records, phase="end").set_index("layer")
    assert end.loc["layers.3", "value"] == pytest.approx(1e-2 * np.median([28.0, 29.0, 1e6]))
    phases = flow_summary(records)["phase"].tolist()
    assert phases == ["init", "epoch1", "end"]


def test_unknown_phase_is_a_value_error():
    with pytest.raises(ValueError, match="unknown phase 'start'.*init"):
        gradient_profile(make_records(depth=2), phase="start")


# ------------------------------------------------------------------ profiles


def test_gradient_profile_covers_the_whole_path():
    records = make_records(depth=16, gain=1.5)
    profile = gradient_profile(records)
    assert profile.columns.tolist() == analysis.PROFILE_COLUMNS
    assert profile["position"].tolist() == list(range(20))  # no model row
    relative = profile.set_index("layer")["relative"]
    assert relative["layers.15"] == 1
    assert relative["layers.0"] == pytest.approx(1.5**15)
    assert relative["conv1"] == pytest.approx(1.5**18)
    assert relative["linear1"] == pytest.approx(1 / 1.5)
    grad_in = gradient_profile(records, metric="grad_in_norm").set_index("layer")
    assert grad_in.loc["layers.15", "relative"] == 1


def test_activation_profile_is_long_and_has_branch_metrics_only_for_res():
    records = pd.concat([make_records("c", depth=3), make_records("r", block="res", depth=3)])
    profile = activation_profile(records)
    assert profile.columns.tolist() == analysis.VALUE_COLUMNS
    assert set(profile["metric"]) == set(analysis.ACTIVATION_METRICS)
    assert "model" not in set(profile["layer"])
    branch = profile.loc[profile["metric"] == "branch_chan_var"]
    assert set(branch["run"]) == {"r"} and set(branch["module_type"]) == {"ResBlock"}
    assert set(branch["role"]) == {"stack"} and set(branch["block"]) == {"res"}
    assert len(profile.loc[profile["run"] == "c"]) == 7 * 2


def test_branch_skip_share_by_hand():
    records = make_records("r", block="resdown", depth=3, gain=1.0, g_last=1.0)
    records = set_value(records, "layers.1", "grad_in_branch_norm", 0.0)
    records = set_value(records, "layers.1", "grad_in_skip_norm", 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        share = branch_skip_share(records).set_index("layer")
    assert share.index.tolist() == ["layers.0", "layers.1", "layers.2"]
    assert share.loc["layers.0", "branch_share"] == pytest.approx(0.36)  # .6² / (.6² + .8²)
    assert share.loc["layers.0", "skip_to_branch"] == pytest.approx(4 / 3)
    assert share.loc["layers.0", "grad_in_branch_norm"] == pytest.approx(0.6)
    assert np.isnan(share.loc["layers.1", "branch_share"])
    assert branch_skip_share(make_records(depth=3)).empty  # plain blocks have no parts


def test_layer_table_of_one_run_and_missing_metrics():
    records = pd.concat(
        [make_records("a", depth=4, gain=2.0, optimizer=False), make_records("b", depth=2)]
    )
    table = layer_table(records, "a", "init")
    assert table.columns.tolist() == analysis.LAYER_TABLE_COLUMNS
    assert table["layer"].tolist() == ["conv1", "conv2", "conv3", "layers.0", "layers.1",
                                       "layers.2", "layers.3", "linear1"]
    assert table["update_ratio"].isna().all()
    row = only_row(table, layer="layers.0")
    assert row["relative"] == pytest.approx(8.0)
    assert row["grad_in_norm"] / row["grad_out_norm"] == pytest.approx(row["grad_gain"])
    assert row["act_std"] == 4.0
    with pytest.raises(ValueError, match="unknown run 'zz'.*'a', 'b'"):
        layer_table(records, "zz", "init")


def test_empty_inputs_give_empty_frames_with_columns():
    empty = make_records(depth=2).iloc[:0]
    assert gradient_profile(empty).columns.tolist() == analysis.PROFILE_COLUMNS
    assert flow_summary(empty).columns.tolist() == analysis.FLOW_COLUMNS
    assert activation_profile(empty).columns.tolist() == analysis.VALUE_COLUMNS
    assert branch_skip_share(empty).columns.tolist() == analysis.SHARE_COLUMNS
    assert layer_table(empty, "x", "init").columns.tolist() == analysis.LAYER_TABLE_COLUMNS
    assert depth_scaling(empty, None).columns.tolist() == analysis.SCALING_COLUMNS
    assert depth_scaling(pd.DataFrame(), None).empty
    assert flow_summary(pd.DataFrame()).empty
    # a metric that was never recorded is no KeyError either
    assert gradient_profile(make_records(depth=2), metric="nope").empty


# ------------------------------------------------------------------ sweeps


def test_depth_scaling_aggregates_seeds_by_hand():
    gains, accs = [1.5, 2.0, 1.2], [0.40, 0.42, 0.47]
    records = pd.concat(
        [make_records(f"conv-d8-s{s}", depth=8, gain=g, seed=s) for s, g in enumerate(gains)]
        + [make_records("res-d8-s0", block="res", depth=8, gain=1.0)]
    )
    runs = make_runs(records)
    runs["test_acc"] = runs["run"].map(
        {f"conv-d8-s{s}": a for s, a in enumerate(accs)} | {"res-d8-s0": 0.6}
    )
    failed = {"run": "conv-d8-s3", "model": "deepcnn", "block": "conv", "depth": 8, "width": 64, "norm": "batch",
              "seed": 3, "status": "failed", "test_acc": np.nan}
    runs = pd.concat([runs, pd.DataFrame([failed])], ignore_index=True)

    scaling = depth_scaling(records, runs, phase="init")
    assert scaling.columns.tolist() == analysis.SCALING_COLUMNS
    assert scaling["block"].tolist() == ["conv", "res"]
    conv = only_row(scaling, block="conv")
    assert conv["n_seeds"] == 4 and conv["n_failed"] == 1 and conv["n_diverged"] == 0
    assert conv["test_acc_mean"] == pytest.approx(np.mean(accs))
    assert conv["test_acc_std"] == pytest.approx(np.std(accs, ddof=1))
    ratios = np.array(gains) ** 7
    assert conv["first_to_last"] == pytest.approx(np.exp(np.mean(np.log(ratios))))
    assert conv["first_to_last_gstd"] == pytest.approx(np.exp(np.std(np.log(ratios), ddof=1)))
    assert conv["gain_geomean"] == pytest.approx(np.exp(np.mean(np.log(gains))))
    assert conv["log_slope_mean"] == pytest.approx(-np.mean(np.log10(gains)))
    assert conv["verdict"] == "exploding (2/3)"  # 1.2**7 = 3.6 is stable; a failed run does not vote
    res = only_row(scaling, block="res")
    assert res["verdict"] == "stable" and res["n_seeds"] == 1 and np.isnan(res["test_acc_std"])


def test_depth_scaling_says_when_seeds_disagree():
    records = pd.concat(
        [make_records(f"s{s}", depth=6, gain=g, seed=s) for s, g in enumerate([2.0, 1.0, 1.8])]
    )
    scaling = depth_scaling(records, make_runs(records))
    assert only_row(scaling, depth=6)["verdict"] == "exploding (2/3)"
    tie = depth_scaling(records.loc[records["run"] != "s2"], None)
    assert tie["verdict"].tolist() == ["exploding (1/2)"]  # ties follow VERDICTS order


def test_depth_scaling_geometric_mean_with_a_zero_ratio():
    base = make_records("a", depth=3, gain=2.0)
    records = pd.concat([base, set_value(base, "layers.0", "grad_out_norm", 0.0).assign(run="b", seed=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = depth_scaling(records, None).iloc[0]
    assert row["first_to_last"] == 0
    assert row["verdict"] == "vanishing (1/2)"  # ratio 4 is stable; the tie goes by VERDICTS order


# ------------------------------------------------------------------ divergence


def poison(records, step, layer, metric, value):
    """``records`` with ``metric`` at ``layer`` set to ``value`` from ``step`` on (a run that trained on)."""
    records = records.copy()
    where = (records["step"] >= step) & (records["layer"] == layer) & (records["metric"] == metric)
    records.loc[where, "value"] = value
    return records


def test_divergence_is_found_in_records_where_it_first_appeared():
    base = make_records("g", depth=4, gain=1.5, steps=range(30), steps_per_epoch=10)
    # backward at step 15: inf at layers.2's output gradient, then NaN toward the input
    gradient = poison(base, 15, "layers.2", "grad_out_norm", np.inf)
    for layer in ("layers.0", "layers.1"):
        gradient = poison(gradient, 15, layer, "grad_out_norm", np.nan)
    gradient = poison(gradient, 15, "layers.2", "nonfinite_grads", 512.0)
    gradient = poison(gradient, 16, "model", "loss", np.nan)  # the step after: the loss too
    forward = poison(poison(base, 7, "conv2", "act_mean", np.inf), 7, "model", "loss", np.nan)
    forward = poison(forward, 7, "layers.3", "act_mean", np.nan).assign(run="a")
    loss = poison(base, 4, "model", "loss", np.inf).assign(run="l")
    counted = poison(base, 9, "layers.1", "nonfinite_grads", 3.0).assign(run="n")
    # overflowing second moments and 0/0 gains are not divergence
    quiet = poison(poison(base, 3, "conv1", "act_std", np.inf), 3, "layers.1", "grad_gain", np.nan).assign(run="q")
    records = pd.concat([gradient, forward, loss, counted, quiet], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = analysis.divergence(records).set_index("run")
    assert found.columns.tolist() == analysis.DIVERGENCE_COLUMNS[1:]
    assert sorted(found.index) == ["a", "g", "l", "n"]
    assert found.loc["g"].tolist() == [15, 1, "layers.2", 5, "gradient", "records"]
    assert found.loc["a"].tolist() == [7, 0, "conv2", 1, "activation", "records"]  # the forward pass comes first
    assert found.loc["l"].tolist() == [4, 0, "model", -1, "loss", "records"]
    assert found.loc["n"].tolist() == [9, 0, "layers.1", 4, "gradient", "records"]
    assert analysis.diverged_verdict(found.loc["g"]) == "diverged at step 15 (layer layers.2)"
    assert analysis.diverged_verdict(found.loc["l"]) == "diverged at step 4 (loss)"
    assert analysis.diverged_verdict({"step": np.nan}) == "diverged"


def test_divergence_from_the_summary_wins_and_records_fill_gaps():
    base = make_records("told", depth=3, steps=range(5))
    records = pd.concat([
        poison(base, 2, "layers.1", "grad_out_norm", np.nan),
        poison(base, 3, "model", "loss", np.nan).assign(run="bare"),
        base.assign(run="silent"),
        poison(base, 1, "model", "loss", np.nan).assign(run="probe"),
    ], ignore_index=True)
    runs = make_runs(records)
    runs["status"] = ["diverged", "complete", "diverged", "diverged"]  # run_table sorts: bare, probe, silent, told
    runs.loc[runs["run"] == "probe", "status"] = "probe"
    runs.loc[runs["run"] == "bare", "status"] = "diverged"
    runs = runs.assign(diverged_step=np.nan, diverged_epoch=np.nan, diverged_layer=None, diverged_position=np.nan,
                       diverged_cause=None)
    told = runs["run"] == "told"
    runs.loc[told, ["diverged_step", "diverged_epoch", "diverged_position"]] = [2, 0, 4]
    runs.loc[told, ["diverged_layer", "diverged_cause"]] = ["layers.1", "gradient"]
    found = analysis.divergence(records, runs).set_index("run")
    assert found.loc["told"].tolist() == [2, 0, "layers.1", 4, "gradient", "summary"]
    assert found.loc["bare"].tolist()[:5] == [3, 0, "model", -1, "loss"] and found.loc["bare", "source"] == "records"
    assert found.loc["probe", "source"] == "records"  # non-finite records whatever the status says
    assert np.isnan(found.loc["silent", "step"]) and found.loc["silent", "source"] == "summary"
    flow = flow_summary(records, runs, phases=["end"]).set_index("run")
    assert flow.loc["silent", "verdict"] == "diverged"
    assert flow.loc["told", "verdict"] == "diverged at step 2 (layer layers.1)"


def test_a_diverged_run_keeps_its_verdicts_before_the_divergence():
    # exploding at init; at step 15 (epoch 1) the gradient turns NaN and the run trains on with NaN
    base = make_records("r", depth=4, gain=3.0, steps=range(30), steps_per_epoch=10)
    records = base.copy()
    records.loc[(records["step"] >= 15) & records["metric"].isin(["grad_out_norm", "grad_in_norm"]),
                "value"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = flow_summary(records).set_index("phase")
    assert flow.loc["init", "verdict"] == "exploding" and flow.loc["init", "first_to_last"] == pytest.approx(27)
    assert flow.loc["epoch1", "verdict"] == "exploding"
    assert flow.loc["end", "verdict"] == "diverged at step 15 (layer linear1)"  # backward starts at the head
    assert flow.loc["end", ["first_to_last", "gain_geomean", "log_slope"]].isna().all()
    sentence = describe_flow(flow.loc["end"].to_dict() | {"phase": "end"})
    assert sentence == ("conv, depth 4 (batch norm) at the end of training: the run diverged at step 15 "
                        "(layer linear1), so its gradients give no ratio — diverged.")
    with_loss = poison(records, 15, "model", "loss", np.nan)  # the loss comes before the backward pass
    assert flow_summary(with_loss, phases=["end"])["verdict"].tolist() == ["diverged at step 15 (loss)"]
    # diverged within epoch 0: the epoch1 phase is diverged too, init is not
    early = poison(base, 5, "layers.3", "grad_out_norm", np.inf)
    phases = flow_summary(early).set_index("phase")["verdict"]
    assert phases.to_dict() == {"init": "exploding", "epoch1": "diverged at step 5 (layer layers.3)",
                                "end": "diverged at step 5 (layer layers.3)"}
    # a probe that is non-finite at its only step is diverged at init
    probe = poison(make_records("p", depth=4), 0, "model", "loss", np.nan)
    assert flow_summary(probe, phases=["init"])["verdict"].tolist() == ["diverged at step 0 (loss)"]


def test_depth_scaling_keeps_diverged_seeds_out_of_the_numbers():
    seeds = [make_records(f"s{s}", depth=4, gain=g, seed=s, steps=range(20)) for s, g in enumerate([3.0, 4.0, 1.5])]
    seeds[2] = poison(seeds[2], 12, "layers.1", "grad_out_norm", np.nan)
    records = pd.concat(seeds, ignore_index=True)
    runs = make_runs(records, test_acc=0.3)
    runs.loc[runs["run"] == "s2", "status"] = "diverged"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        init, end = (only_row(depth_scaling(records, runs, p), depth=4) for p in ("init", "end"))
    assert init["verdict"] == "exploding (2/3)" and init["n_ratios"] == 3 and init["n_diverged"] == 1
    assert end["n_diverged"] == 1 and end["n_ratios"] == 2
    assert end["first_to_last"] == pytest.approx(np.sqrt(3.0**3 * 4.0**3))  # the two finite seeds only
    assert end["verdict"] == "exploding (2/3)"  # the diverged seed votes "diverged"
    # every seed diverged: no number, and the verdict says where it first happened
    later = poison(poison(records, 9, "layers.3", "grad_out_norm", np.nan), 14, "model", "loss", np.nan)
    row = only_row(depth_scaling(later, runs, "end"), depth=4)
    assert row["n_ratios"] == 0 and np.isnan(row["first_to_last"]) and row["n_diverged"] == 3
    assert row["verdict"] == "diverged (3/3), first at step 9 (layer layers.3)"
    alone = only_row(depth_scaling(later.loc[later["run"] == "s1"], None, "end"), depth=4)
    assert alone["verdict"] == "diverged at step 9 (layer layers.3)"


def test_a_real_run_at_lr_1e8_diverges_and_is_found_with_or_without_its_summary(tmp_path, small_splits):
    """Adam at lr 1e8 without normalisation: the forward pass overflows at step 1; the run goes on
    (on_nonfinite=continue), so every later record is NaN."""
    from test_report_text import train_tiny

    from gradlab import runs
    from gradlab.report.text import runs_table

    run_dir = train_tiny(tmp_path / "conv-d3-s0-none", small_splits, norm="none", lr=1e8, on_nonfinite="continue")
    sweep = runs.load_sweep(run_dir)
    records, table = sweep.records(), runs_table(sweep)
    summary = sweep.runs[0].summary
    assert summary["status"] == "diverged" and summary["epochs_done"] == 2  # it trained on
    assert (summary["diverged"]["step"], summary["diverged"]["cause"]) == (1, "activation")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        told = analysis.divergence(records, table).iloc[0]
        found = analysis.divergence(records).iloc[0]  # the records alone: as for a probe
        flow = flow_summary(records, table).set_index("phase")
        end = depth_scaling(records, table, "end").iloc[0]
    assert (told["step"], told["layer"], told["source"]) == (1, summary["diverged"]["layer"], "summary")
    assert (found["step"], found["epoch"], found["cause"], found["source"]) == (1, 0, "activation", "records")
    # found: the lowest probe point whose activation mean is not finite at step 1
    step1 = records.loc[(records["step"] == 1) & (records["metric"] == "act_mean")].sort_values("position")
    first_bad = step1.loc[~np.isfinite(step1["value"]), "layer"].iloc[0]
    assert found["layer"] == first_bad and np.isfinite(step1.loc[step1["position"] < found["position"], "value"]).all()
    # before step 1 the net was a plain no-norm stack: its number-based verdict stands
    init = records.loc[(records["step"] == 0) & (records["metric"] == "grad_out_norm")].set_index("layer")["value"]
    assert flow.loc["init", "first_to_last"] == pytest.approx(init["layers.0"] / init["layers.2"])
    assert flow.loc["init", "verdict"] == "vanishing"
    where = f"diverged at step 1 (layer {summary['diverged']['layer']})"
    assert flow.loc["epoch1", "verdict"] == where and flow.loc["end", "verdict"] == where
    assert np.isnan(end["first_to_last"]) and end["n_ratios"] == 0 and end["n_diverged"] == 1
    assert end["verdict"] == where


# ------------------------------------------------------------------ sentences


@pytest.mark.parametrize(
    "gain, words",
    [
        (1.5, ["grows 438×", "×1.5 per block", "— exploding."]),
        (0.5, ["shrinks to 3.1e-05×", "×0.5 per block", "— vanishing."]),
        (1.0, ["changes only ×1 from the last", "(×1 per block), within 0.1–10× — stable."]),
    ],
)
def test_describe_flow_sentences(gain, words):
    row = only_row(flow_summary(make_records(depth=16, gain=gain)), phase="init")
    sentence = describe_flow(row)
    assert sentence.startswith("conv, depth 16 (batch norm) at initialisation: the gradient")
    for word in words:
        assert word in sentence, sentence


def test_describe_flow_zero_and_phase_words():
    base = make_records(depth=4, gain=1.0, norm="none", steps=[0, 10, 20])
    zero_first = flow_summary(set_value(base, "layers.0", "grad_out_norm", 0.0))
    zero_last = flow_summary(set_value(base, "layers.3", "grad_out_norm", 0.0))
    first = describe_flow(only_row(zero_first, phase="end"))
    assert first.startswith("conv, depth 4 (no normalisation) at the end of training:")
    assert "exactly 0 at the first block" in first and first.endswith("— vanishing.")
    last = describe_flow(only_row(zero_last, phase="epoch1"))
    assert "over the first epoch" in last and "exactly 0 at the last block" in last
    assert last.endswith("— exploding.")
    assert describe_flow(dict(block="res", depth=0, norm="batch", verdict="n/a")).endswith(
        "no blocks — n/a."
    )


# ------------------------------------------------------------------ hygiene


def test_analysis_and_report_do_not_import_torch():
    """With torch made unimportable, the report side and the run directory still import and work."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import gradlab.schema, gradlab.runs, gradlab.analysis, gradlab.report.text, gradlab.report.figures, "
        "gradlab.report.html\n"
        "from gradlab import load_run, load_sweep\n"
        "assert sys.modules['torch'] is None, 'torch imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def big_sweep(n_runs=45, rows_per_run=50_000):
    """A sweep-sized frame built by tiling: 45 runs of ~50k rows each."""
    frames = []
    for i in range(n_runs):
        block = ["conv", "res", "skip"][i % 3]
        depth = [4, 16, 32][(i // 3) % 3]
        one_step = len(make_records(block=block, depth=depth, steps=[0]))
        steps = np.arange(max(1, rows_per_run // one_step)) * 5
        frames.append(
            make_records(f"{block}-d{depth}-s{i // 9}", block=block, depth=depth, seed=i // 9,
                         gain=1.0 + 0.01 * i, steps=steps, steps_per_epoch=200)
        )
    return pd.concat(frames, ignore_index=True)


def test_a_sweep_sized_frame_is_analysed_vectorised():
    records = big_sweep()
    assert len(records) > 2_000_000
    runs = make_runs(records, test_acc=0.5)
    flow = flow_summary(records, runs)
    assert len(flow) == 45 * 3 and flow["verdict"].notna().all()
    scaling = depth_scaling(records, runs, phase="end")
    assert scaling["n_seeds"].sum() == 45
    assert len(gradient_profile(records, phase="epoch1")) == sum(
        3 + d + 1 for d in runs["depth"]
    )
