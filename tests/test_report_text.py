"""gradlab.report.text: number formatting, the four formats and the whole report."""
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from test_analysis import RESNET18_STACK, make_records, make_resnet, make_runs, set_value

from gradlab import analysis
from gradlab.report.text import (
    FORMATS,
    MISSING,
    accuracy_sentences,
    budget_words,
    depth_scaling_table,
    format_number,
    render,
    report_text,
    short_names,
)
from gradlab.runs import load_run


@pytest.mark.parametrize(
    "x, text",
    [
        (0, "0"),
        (0.0, "0"),
        (41.234, "41.2"),
        (1.5, "1.5"),
        (1.0, "1"),
        (-2.5, "-2.5"),
        (0.012345, "0.0123"),
        (0.001, "0.001"),
        (99.96, "100"),
        (4123.4, "4123"),
        (99999.4, "99999"),
        (123456.0, "1.23e5"),
        (4.1e3 * 1e3, "4.1e6"),
        (0.000123, "1.23e-4"),
        (2e-5, "2e-5"),
        (-3.14159e-7, "-3.14e-7"),
        (7, "7"),
        (np.int64(123456), "123456"),
        (np.float32(0.5), "0.5"),
        (float("nan"), MISSING),
        (None, MISSING),
        (float("inf"), "inf"),
        (-np.inf, "-inf"),
    ],
)
def test_format_number(x, text):
    assert format_number(x) == text


@pytest.fixture
def small():
    return pd.DataFrame({"name": ["a", "bb"], "value": [1.5, 1234.5678], "n": [1, 10]})


def test_render_table_aligns_numbers_right(small):
    assert render(small, "table") == (
        "name  value   n\n"
        "----  -----  --\n"
        "a       1.5   1\n"
        "bb     1235  10"
    )


def test_render_markdown_is_a_pipe_table(small):
    assert render(small, "markdown") == (
        "| name | value |   n |\n"
        "| ---- | ----: | --: |\n"
        "| a    |   1.5 |   1 |\n"
        "| bb   |  1235 |  10 |"
    )
    assert "a \\| b" in render(pd.DataFrame({"x": ["a | b"]}), "markdown")


@pytest.fixture
def awkward():
    return pd.DataFrame(
        {
            "run": ["a", "b", "c", "d"],
            "depth": [1, 2, 3, 4],
            "value": [0.1 + 0.2, 1e-300, np.inf, np.nan],
            "other": [-np.inf, 1 / 3, 2.0, 12345678.9],
        }
    )


def test_render_csv_round_trips_full_precision(awkward):
    back = pd.read_csv(io.StringIO(render(awkward, "csv")))
    pd.testing.assert_frame_equal(back, awkward, check_dtype=False, check_exact=True)
    assert back["depth"].dtype == np.int64


def test_render_json_is_valid_records(awkward):
    rows = json.loads(render(awkward, "json"))
    assert rows[0] == {"run": "a", "depth": 1, "value": 0.1 + 0.2, "other": "-inf"}
    assert rows[1]["value"] == 1e-300 and rows[1]["other"] == 1 / 3
    assert rows[2]["value"] == "inf" and rows[3]["value"] is None


def test_render_keeps_named_index_and_flattens_columns():
    frame = pd.DataFrame({"depth": [4, 8], "conv": ["x", "y"]}).set_index("depth")
    assert render(frame, "csv").splitlines()[0] == "depth,conv"
    wide = pd.DataFrame([[1.0, 2.0]], columns=pd.MultiIndex.from_tuples([("a", "x"), ("a", "y")]))
    assert render(wide, "table").splitlines()[0].split() == ["a", "/", "x", "a", "/", "y"]


def test_unknown_format_lists_the_known_ones(small):
    with pytest.raises(ValueError, match=r"unknown format 'xml'; known: \['table', 'markdown', 'csv', 'json'\]"):
        render(small, "xml")
    with pytest.raises(ValueError, match="unknown format"):
        report_text(make_records(depth=2), None, "html")


def test_render_of_an_empty_frame():
    empty = pd.DataFrame(columns=["a", "b"])
    assert render(empty, "table") == "a  b\n-  -"
    assert json.loads(render(empty, "json")) == []


# ------------------------------------------------------------------ depth scaling


def sweep(norms=("batch",)):
    """conv explodes (gain 1.5), res is stable (gain 1.0); depths 4 and 16; res-d4 missing."""
    frames = []
    for norm in norms:
        for block, gain in (("conv", 1.5), ("res", 1.0)):
            for depth in (4, 16):
                if block == "res" and depth == 4:
                    continue
                frames.append(make_records(f"{block}-{norm}-d{depth}-s0", block=block, depth=depth,
                                           gain=gain, norm=norm, steps=[0, 10, 20]))
    records = pd.concat(frames, ignore_index=True)
    runs = make_runs(records)
    runs["test_acc"] = np.where(runs["block"] == "conv", 0.412, 0.6)
    return records, runs


def test_depth_scaling_table_pivots_for_people():
    records, runs = sweep()
    runs.loc[runs["run"] == "conv-batch-d4-s0", "status"] = "diverged"
    table = depth_scaling_table(analysis.depth_scaling(records, runs))
    assert table.index.name == "depth" and table.index.tolist() == [4, 16]
    assert table.columns.tolist() == ["conv", "res"]
    assert table.loc[16, "conv"] == "test 41.2% · ratio 438 · exploding"
    assert table.loc[16, "res"] == "test 60% · ratio 1 · stable"
    assert table.loc[4, "conv"] == "test 41.2% · ratio 3.38 · stable · 1 diverged"
    assert table.loc[4, "res"] == MISSING
    assert render(table, "table").splitlines()[0].split() == ["depth", "conv", "res"]


def test_depth_scaling_table_with_two_norms():
    records, runs = sweep(norms=("batch", "none"))
    table = depth_scaling_table(analysis.depth_scaling(records, runs))
    assert table.columns.tolist() == ["conv / batch", "conv / none", "res / batch", "res / none"]
    assert depth_scaling_table(analysis.depth_scaling(records.iloc[:0], runs.iloc[:0])).empty


# ------------------------------------------------------------------ the report


@pytest.fixture
def report_inputs():
    records, runs = sweep()
    # conv-d16 at the end: the last block underflows to 0 -> ratio inf, still "exploding"
    end = records["step"] >= 10
    zeroed = set_value(records.loc[end], "layers.15", "grad_out_norm", 0.0)
    records = pd.concat([records.loc[~end], zeroed], ignore_index=True)
    runs["dataset"] = "cifar10"
    return records, runs


def test_report_table(report_inputs):
    text = report_text(*report_inputs, fmt="table")
    lines = text.splitlines()
    assert lines[0] == (
        "gradlab report: 3 runs · blocks: conv, res · depths: 4, 16 · norms: batch · seeds: 0"
        " · dataset: cifar10"
    )
    assert "Depth scaling at initialisation (first recorded step)" in text
    assert "Depth scaling at the end of training (median of the last 3 recorded steps)" in text
    assert "Gradient flow per layer at initialisation: conv-batch-d16-s0 (conv, depth 16, batch norm)" in text
    assert "Gradient flow per layer at initialisation: res-batch-d16-s0 (res, depth 16, batch norm)" in text
    assert "conv-batch-d4-s0 (" not in text  # only the deepest run of each block type
    sentences = [line for line in lines if line.startswith(("conv, depth", "res, depth"))]
    assert len(sentences) == 2
    assert "grows 438×" in sentences[0] and sentences[0].endswith("exploding.")
    assert sentences[1].endswith("stable.")
    assert "test 41.2% · ratio inf · exploding" in text  # the end table


def test_report_markdown(report_inputs):
    text = report_text(*report_inputs, fmt="markdown")
    assert text.startswith("# gradlab report: 3 runs")
    assert "## Verdicts at initialisation" in text
    assert "| depth | conv" in text and "| layers.15 |" in text.replace("  ", " ").replace("  ", " ")
    assert "- conv, depth 16 (batch norm) at initialisation: the gradient grows 438×" in text


def test_report_csv_sections_parse(report_inputs):
    records, runs = report_inputs
    text = report_text(records, runs, fmt="csv")
    assert text.startswith("# gradlab report: 3 runs")
    sections = {}
    for block in text.strip().split("\n\n")[1:]:
        name, _, body = block.partition("\n")
        sections[name.removeprefix("# ")] = pd.read_csv(io.StringIO(body), comment="#")
    assert list(sections) == ["depth_scaling", "layers", "flow", "diverged", "unreadable", "budget", "width_depth",
                              "spread"]
    assert sections["diverged"].empty and sections["unreadable"].columns.tolist() == ["cell", "reason"]
    scaling = sections["depth_scaling"]
    expected = pd.concat([analysis.depth_scaling(records, runs, p) for p in ("init", "end")])
    np.testing.assert_array_equal(scaling["first_to_last"], expected["first_to_last"])
    assert scaling.loc[(scaling["phase"] == "end") & (scaling["depth"] == 16)
                       & (scaling["block"] == "conv"), "first_to_last"].item() == np.inf
    assert set(sections["layers"]["run"]) == {"conv-batch-d16-s0", "res-batch-d16-s0"}
    assert len(sections["layers"]) == 2 * 20
    assert sections["flow"]["sentence"].str.contains("— exploding.").sum() == 1


def test_report_json_is_one_object(report_inputs):
    report = json.loads(report_text(*report_inputs, fmt="json"))
    assert list(report) == ["header", "depth_scaling", "layers", "flow", "diverged", "unreadable", "budget",
                            "width_depth", "spread"]
    assert report["diverged"] == [] and report["unreadable"] == []
    assert report["width_depth"] == [] and report["spread"] == []  # one width, one seed: nothing to compare
    assert report["header"]["runs"] == 3 and report["header"]["dataset"] == ["cifar10"]
    assert report["header"]["depths"] == [4, 16] and report["header"]["status"] == {"complete": 3}
    end_conv = [r for r in report["depth_scaling"]
                if r["phase"] == "end" and r["block"] == "conv" and r["depth"] == 16]
    assert end_conv[0]["first_to_last"] == "inf" and end_conv[0]["verdict"] == "exploding"
    assert report["flow"][0]["first_to_last"] == pytest.approx(1.5**15)
    assert {r["layer"] for r in report["layers"]} >= {"conv1", "layers.15", "linear1"}


def test_report_of_one_run_without_runs_table():
    text = report_text(make_records("solo", depth=5, gain=0.5, norm="none"), None)
    assert text.startswith("gradlab report: 1 run · blocks: conv · depths: 5")
    assert "solo (conv, depth 5, no normalisation)" in text
    assert "shrinks to 0.0625× from the last block to the first (×0.5 per block) — vanishing." in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_of_nothing(fmt):
    text = report_text(pd.DataFrame(), None, fmt=fmt)
    if fmt == "json":
        report = json.loads(text)
        assert report["header"] == {"runs": 0, "models": [], "blocks": [], "depths": [], "widths": [], "norms": [],
                                    "seeds": []}
        assert report["flow"] == [] and report["depth_scaling"] == []
    else:
        assert "gradlab report: 0 runs · blocks: –" in text


# ------------------------------------------------------------------ real runs that went wrong

DIVERGED_STEP, DIVERGED_LAYER = 5, "layers.1"  # where the simulated divergence starts (epoch 1: 4 steps an epoch)


def train_tiny(out, splits, **changes):
    """One real training run: width 4, depth 3, 2 epochs of 4 steps on 400 synthetic images."""
    import torch

    from gradlab.train import TrainConfig, train_run

    config = TrainConfig(**{**dict(block="conv", depth=3, width=4, epochs=2, batch_size=100, lr=3e-3,
                                   dataset="synthetic", device="cpu", eval_batch_size=4096), **changes})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # width-4 nets: one thread is fastest on a shared CPU
    try:
        train_run(config, out, splits=splits)
    finally:
        torch.set_num_threads(threads)
    return out


def diverge(run_dir, step=DIVERGED_STEP, layer=DIVERGED_LAYER):
    """A real run edited into what the trainer's divergence contract leaves with --on-nonfinite
    continue: summary status "diverged" with where it started, and from ``step`` on every
    gradient metric and the loss NaN, with nonfinite_grads > 0 at ``layer`` and below it."""
    from gradlab import runs

    run = runs.load_run(run_dir)
    records = run.records()
    position = int(records.loc[records["layer"] == layer, "position"].iloc[0])
    epoch = int(records.loc[records["step"] == step, "epoch"].iloc[0])
    later = records["step"] >= step
    gradients = records["metric"].isin(["grad_out_norm", "grad_in_norm", "grad_gain", "grad_in_branch_norm",
                                        "grad_in_skip_norm", "param_grad_norm", "update_ratio", "loss"])
    records.loc[later & gradients, "value"] = np.nan
    below = (records["metric"] == "nonfinite_grads") & records["position"].between(0, position)
    records.loc[later & below, "value"] = 384.0
    for part in (run_dir / runs.RECORDS).glob("part-*.parquet"):
        part.unlink()
    runs.RecordsWriter(run_dir)({c: records[c].to_numpy() for c in runs.RECORD_COLUMNS})
    steps = run.steps.assign(loss=run.steps["loss"].where(run.steps["step"] < step))
    runs.write_parquet(run_dir / runs.STEPS, steps)
    history = run.history.assign(train_loss=run.history["train_loss"].where(run.history["epoch"] < epoch))
    runs.write_parquet(run_dir / runs.HISTORY, history)
    summary = run.summary | {"status": "diverged", "diverged": {"step": step, "epoch": epoch, "layer": layer,
                                                                 "position": position, "cause": "gradient"}}
    runs.write_json(run_dir / runs.SUMMARY, summary)
    return summary


def broken_sweep(root, splits):
    """A real sweep of five cells: two healthy, one diverged (a real run edited as above), one
    trained for real at lr 1e8 without normalisation (NaN loss from step 1), one whose
    config.json is corrupt and one whose records are corrupt."""
    import shutil

    from gradlab import runs

    cells = {"conv-d3-s0": {}, "conv-d3-s1": dict(seed=1), "res-d3-s0": dict(block="res"),
             "conv-d3-s0-none": dict(norm="none", lr=1e8), "res-d3-s1": dict(block="res", seed=1)}
    for name, changes in cells.items():
        train_tiny(root / runs.RUNS_FOLDER / name, splits, **changes)
    diverge(root / runs.RUNS_FOLDER / "conv-d3-s1")
    (root / runs.RUNS_FOLDER / "res-d3-s1" / runs.CONFIG).write_text('{"train": {"block": ')  # cut off mid-write
    shutil.copytree(root / runs.RUNS_FOLDER / "res-d3-s0", root / runs.RUNS_FOLDER / "skip-d3-s0")
    for part in (root / runs.RUNS_FOLDER / "skip-d3-s0" / runs.RECORDS).glob("part-*.parquet"):
        part.write_bytes(b"PAR1 not really parquet")
    runs.write_json(root / runs.SWEEP, {"cells": [*cells, "skip-d3-s0"]})
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory, small_splits):
    from gradlab.report.text import sweep_frames
    from gradlab.runs import load_sweep

    root = broken_sweep(tmp_path_factory.mktemp("broken") / "broken-sweep", small_splits)
    return root, sweep_frames(load_sweep(root))


def test_sweep_frames_name_the_unreadable_cells_and_keep_the_others(broken):
    root, (records, runs, unreadable) = broken
    assert sorted(runs["run"]) == ["conv-d3-s0", "conv-d3-s0-none", "conv-d3-s1", "res-d3-s0"]
    assert sorted(unreadable) == ["res-d3-s1", "skip-d3-s0"]
    assert "config.json: not valid JSON" in unreadable["res-d3-s1"]
    assert "records.parquet" in unreadable["skip-d3-s0"] and "cannot be read as Parquet" in unreadable["skip-d3-s0"]
    assert set(records["run"]) == set(runs["run"])
    told = runs.set_index("run").loc["conv-d3-s1"]
    assert told["status"] == "diverged" and told["diverged_step"] == DIVERGED_STEP
    assert told["diverged_layer"] == DIVERGED_LAYER and told["diverged_cause"] == "gradient"


def test_the_report_marks_diverged_runs_and_lists_unreadable_cells(broken):
    root, (records, runs, unreadable) = broken
    text = report_text(records, runs, unreadable=unreadable)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)  # no NaN anywhere a number is expected
    lines = text.splitlines()
    assert lines[0] == ("gradlab report: 4 runs (2 complete, 2 diverged) · blocks: conv, res · depths: 3 · "
                        "norms: batch, none · seeds: 0, 1 · dataset: synthetic · 2 unreadable cells")
    assert "Unreadable cells (left out of this report)" in text
    assert f"res-d3-s1: {root}/runs/res-d3-s1/config.json: not valid JSON" in text
    assert f"skip-d3-s0: {root}/runs/skip-d3-s0/records.parquet: cannot be read as Parquet" in text
    assert ("conv-d3-s1 (conv, depth 3, batch norm) diverged at step 5, epoch 1: the first non-finite gradient "
            "appeared at layers.1 (from its summary.json)") in lines
    # the real lr-1e8 run: the trainer stopped it at step 1, where the forward pass overflowed
    where = load_run(root / "runs" / "conv-d3-s0-none").summary["diverged"]
    assert (where["step"], where["epoch"], where["cause"]) == (1, 0, "activation")
    assert (f"conv-d3-s0-none (conv, depth 3, no normalisation) diverged at step 1, epoch 0: the first non-finite "
            f"activation appeared at {where['layer']} (from its summary.json)") in lines
    # at the end, conv / batch / depth 3 has one finite seed (s0) and one diverged (s1)
    s0 = records.loc[(records["run"] == "conv-d3-s0") & (records["metric"] == "grad_out_norm")]
    last3 = s0.loc[s0["step"] >= s0["step"].max() - 2].groupby("layer")["value"].median()
    ratio = last3["layers.0"] / last3["layers.2"]
    accuracy = runs.set_index("run").loc[["conv-d3-s0", "conv-d3-s1"], "test_acc"]
    cell = (f"test {format_number(100 * accuracy.mean())}±{format_number(100 * accuracy.std())}% · "
            f"ratio {format_number(ratio)} · diverged (1/2), first at step 5 (layer layers.1) · 1 diverged")
    end = text.split("Depth scaling at the end of training")[1].split("\n\n")[1]
    assert cell in end
    assert f"test {MISSING} · diverged at step 1 (layer {where['layer']}) · 1 diverged" in end  # the verdict says why
    assert ("Gradient flow per layer at initialisation: conv-d3-s0-none (conv, depth 3, no normalisation) — "
            f"diverged at step 1 (layer {where['layer']})") in text


def test_the_machine_formats_carry_divergence_and_unreadable_cells(broken):
    root, (records, runs, unreadable) = broken
    report = json.loads(report_text(records, runs, fmt="json", unreadable=unreadable))
    diverged = {row["run"]: row for row in report["diverged"]}
    assert sorted(diverged) == ["conv-d3-s0-none", "conv-d3-s1"]
    assert diverged["conv-d3-s1"] == {
        "run": "conv-d3-s1", "model": "deepcnn", "block": "conv", "depth": 3, "width": 4, "norm": "batch", "seed": 1,
        "status": "diverged", "step": 5,
        "epoch": 1, "layer": "layers.1", "position": 4, "cause": "gradient", "source": "summary"}
    where = load_run(root / "runs" / "conv-d3-s0-none").summary["diverged"]
    assert diverged["conv-d3-s0-none"] == {
        "run": "conv-d3-s0-none", "model": "deepcnn", "block": "conv", "depth": 3, "width": 4, "norm": "none",
        "seed": 0, "status": "diverged",
        "step": 1, "epoch": 0, "layer": where["layer"], "position": where["position"], "cause": "activation",
        "source": "summary"}
    assert [row["cell"] for row in report["unreadable"]] == ["res-d3-s1", "skip-d3-s0"]
    assert report["header"]["unreadable"] == ["res-d3-s1", "skip-d3-s0"]
    end = [r for r in report["depth_scaling"] if r["phase"] == "end" and r["norm"] == "none"]
    assert end[0]["first_to_last"] is None and end[0]["n_ratios"] == 0 and end[0]["n_diverged"] == 1


# ------------------------------------------------------------------ any model: names and roles


def test_short_names_drop_a_shared_path_and_keep_every_name_apart():
    assert short_names(["conv1", "layers.0", "layers.1", "linear1"]) == {
        "conv1": "conv1", "layers.0": "layers.0", "layers.1": "layers.1", "linear1": "linear1"}
    wrapped = ["backbone.conv1", "backbone.layer1.0", "backbone.layer1.1", "backbone.fc"]
    assert short_names(wrapped) == {"backbone.conv1": "conv1", "backbone.layer1.0": "layer1.0",
                                    "backbone.layer1.1": "layer1.1", "backbone.fc": "fc"}
    assert short_names(["encoder", "encoder.block"]) == {"encoder": "encoder", "encoder.block": "encoder.block"}
    assert short_names(["a.b", "a.b"]) == {"a.b": "a.b"}  # one name once
    long = ["model.transformer.encoder.layers.0.self_attn", "model.transformer.encoder.layers.1.self_attn",
            "model.transformer.decoder.layers.1.self_attn", "model.head"]
    shorts = short_names(long, width=12)  # nothing fits in 12: the fewest parts that tell the names apart
    assert shorts == {long[0]: "…0.self_attn", long[1]: "…encoder.layers.1.self_attn",
                      long[2]: "…decoder.layers.1.self_attn", long[3]: "head"}
    roomy = short_names(long, width=27)  # as many parts as fit in 27
    assert roomy == {long[0]: "…encoder.layers.0.self_attn", long[1]: "…encoder.layers.1.self_attn",
                     long[2]: "…decoder.layers.1.self_attn", long[3]: "head"}
    for mapping in (shorts, roomy):  # each short name ends its own name and no other
        assert len(set(mapping.values())) == len(mapping)
        for name, short in mapping.items():
            ending = short.removeprefix("…")
            assert [n for n in long if n == ending or n.endswith("." + ending)] == [name]
    assert short_names([]) == {}


def test_the_report_of_a_resnet18_like_run_names_its_modules():
    records = make_resnet("r18-s0", gain=2.0, g_last=1e-3, steps=[0, 10, 20])
    text = report_text(records)
    assert text.startswith("gradlab report: 1 run · models: torchvision:resnet18 · blocks: BasicBlock · depths: 8")
    assert ("Gradient flow per layer at initialisation: r18-s0 (torchvision:resnet18, BasicBlock, depth 8, "
            "batch norm)") in text
    table = text.split("batch norm)\n")[1].split("\n\n")[1].splitlines()
    assert table[0].split()[:5] == ["layer", "position", "role", "stack_index", "module_type"]
    assert [line.split()[:5] for line in table[2:]] == [
        ["conv1", "0", "stem", MISSING, "Conv2d"],
        *[[name, str(i + 1), "stack", str(i), "BasicBlock"] for i, name in enumerate(RESNET18_STACK)],
        ["fc", "9", "head", MISSING, "Linear"]]
    assert ("torchvision:resnet18, BasicBlock, depth 8 (batch norm) at initialisation: the gradient grows 128× from "
            "the last block to the first (×2 per block) — exploding.") in text
    report = json.loads(report_text(records, fmt="json"))
    assert report["header"]["models"] == ["torchvision:resnet18"] and report["header"]["blocks"] == ["BasicBlock"]
    layers = {row["layer"]: row for row in report["layers"]}
    assert list(layers) == ["conv1", *RESNET18_STACK, "fc"]
    assert (layers["layer3.1"]["role"], layers["layer3.1"]["stack_index"]) == ("stack", 5)
    assert (layers["fc"]["role"], layers["fc"]["stack_index"]) == ("head", -1)  # machine formats: the tidy values
    assert layers["layer1.0"]["relative"] == pytest.approx(128)
    (scaling,) = [r for r in report["depth_scaling"] if r["phase"] == "init"]
    assert (scaling["model"], scaling["block"], scaling["depth"], scaling["verdict"]) == (
        "torchvision:resnet18", "BasicBlock", 8, "exploding")
    assert scaling["first_to_last"] == pytest.approx(128)


def test_a_mixed_report_has_a_column_and_a_layer_table_per_network():
    records = pd.concat([make_records("conv-d8-s0", depth=8, gain=1.5),
                         make_resnet("r18-s0", gain=1.2), make_resnet("r18-s1", gain=1.2, seed=1)], ignore_index=True)
    runs = make_runs(records, test_acc=0.5)
    table = depth_scaling_table(analysis.depth_scaling(records, runs))
    assert table.columns.tolist() == ["conv", "torchvision:resnet18, BasicBlock"]
    assert table.loc[8, "torchvision:resnet18, BasicBlock"] == "test 50±0% · ratio 3.58 · stable"
    text = report_text(records, runs)
    assert text.splitlines()[0] == ("gradlab report: 3 runs · models: deepcnn, torchvision:resnet18 · "
                                    "blocks: BasicBlock, conv · depths: 8 · norms: batch · seeds: 0, 1")
    assert "conv-d8-s0 (conv, depth 8, batch norm)" in text and "r18-s0 (torchvision:resnet18, BasicBlock" in text
    assert "r18-s1 (" not in text  # the deepest run of each network, lowest seed
    layers = report_text(records, runs, fmt="csv").split("# layers\n")[1].split("\n\n")[0]
    layers = pd.read_csv(io.StringIO(layers))
    assert layers.loc[layers["run"] == "r18-s0", "layer"].tolist() == ["conv1", *RESNET18_STACK, "fc"]


def test_long_module_names_are_shortened_in_tables_for_people_only():
    stack = [f"model.backbone.stages.{i // 2}.blocks.{i % 2}.mixer" for i in range(4)]
    records = make_records("deep", block="MixerBlock", stack=stack, stem=("model.backbone.stem",),
                           head="model.head.fc", model="file.py:make")
    text = report_text(records)
    layers = text.split("batch norm)\n")[1].split("\n\n")[1].splitlines()[2:]
    assert [line.split()[0] for line in layers] == [  # "model." dropped, then as many parts as fit in 24
        "backbone.stem", "…stages.0.blocks.0.mixer", "…stages.0.blocks.1.mixer", "…stages.1.blocks.0.mixer",
        "…stages.1.blocks.1.mixer", "head.fc"]
    report = json.loads(report_text(records, fmt="json"))
    assert [row["layer"] for row in report["layers"]][1:5] == stack



# ------------------------------------------------------------------ accuracies name their training budget


def budget_runs(steps=40, train_images=10_000, epochs_done=1, **accuracies):
    """The sweep() runs table with a training budget and test accuracies {run: accuracy}."""
    records, runs = sweep()
    runs = runs.assign(steps=steps, train_images=train_images, epochs_done=epochs_done)
    for run, accuracy in accuracies.items():
        runs.loc[runs["run"] == run.replace("_", "-"), "test_acc"] = accuracy
    return records, runs


def test_budget_words_name_steps_images_and_epochs():
    assert budget_words(32, 2048, 2) == "32 optimizer steps on 2,048 training images (2 epochs)"
    assert budget_words(1, 1, 1) == "1 optimizer step on 1 training image (1 epoch)"
    assert budget_words(40, None, float("nan")) == "40 optimizer steps"
    assert budget_words(None, 45_000, 30) == "45,000 training images (30 epochs)"
    assert budget_words() == "an unrecorded training budget"


def test_an_accuracy_comparison_across_depths_names_its_budget_and_a_net_at_chance_is_too_short_to_tell():
    records, runs = budget_runs(steps=40, conv_batch_d16_s0=0.1)
    sentences = accuracy_sentences(runs)
    assert sentences == [
        "conv: test accuracy falls 31.2 points from depth 4 to 16: 41.2 % at depth 4 and 10.0 % at depth 16, each "
        "after 40 optimizer steps on 10,000 training images (1 epoch). Depth 16 is still at chance (10 %) after "
        "only 40 optimizer steps: too short a budget to tell whether this depth can learn.",
        "res: test accuracy 60.0 % at depth 16, after 40 optimizer steps on 10,000 training images (1 epoch).",
    ]
    text = report_text(records, runs, fmt="table")
    assert "Test and train accuracy against depth, at the training budget" in text
    assert all(sentence in text for sentence in sentences)
    assert "Training budget: 40 optimizer steps on 10,000 training images (1 epoch), every run" in text
    assert "A short training budget: 40 optimizer steps on 10,000 training images per run, fewer than 500." in text
    assert "- " + sentences[0] in report_text(records, runs, fmt="markdown")


def test_at_chance_after_a_long_budget_is_stated_without_blaming_the_budget():
    records, runs = budget_runs(steps=5280, train_images=45_000, epochs_done=30, conv_batch_d16_s0=0.11)
    sentence = accuracy_sentences(runs)[0]
    assert sentence.endswith("each after 5,280 optimizer steps on 45,000 training images (30 epochs). "
                             "Depth 16 is at chance (10 %) after 5,280 optimizer steps.")
    assert "too short" not in sentence
    text = report_text(records, runs, fmt="table")
    assert "A short training budget" not in text and "Training budget: 5,280 optimizer steps" in text


def test_train_accuracy_against_depth_is_said_at_its_budget_and_never_for_a_run_still_training():
    """He et al.'s degradation is about training error: the last epoch's train accuracy gets its own
    sentence per network. A running run's train accuracy is its latest checkpoint's, not its
    budget's last epoch's, so it is named as missing rather than compared."""
    records, runs = budget_runs(steps=5280, train_images=45_000, epochs_done=30)
    runs["final_train_acc"] = runs["depth"].map({4: 0.781, 16: 0.372})
    train = accuracy_sentences(runs, metric="final_train_acc")
    assert train == [
        "conv: train accuracy in the last epoch falls 40.9 points from depth 4 to 16: 78.1 % at depth 4 and "
        "37.2 % at depth 16, each after 5,280 optimizer steps on 45,000 training images (30 epochs).",
        "res: train accuracy in the last epoch 37.2 % at depth 16, after 5,280 optimizer steps on 45,000 training "
        "images (30 epochs).",
    ]
    text = report_text(records, runs, fmt="table")
    assert all(sentence in text for sentence in train)
    assert text.index(accuracy_sentences(runs)[0]) < text.index(train[0])  # test accuracy first

    still = runs["run"] == "conv-batch-d16-s0"
    runs.loc[still, ["status", "steps", "epochs_done", "test_acc"]] = ["running", 176, 1, np.nan]
    conv = accuracy_sentences(runs, metric="final_train_acc")[0]
    assert conv == ("conv: train accuracy in the last epoch 78.1 % at depth 4 after 5,280 optimizer steps on 45,000 "
                    "training images (30 epochs); depth 16 has no train accuracy in the last epoch (running after "
                    "176 optimizer steps on 45,000 training images (1 epoch)).")
    assert runs.loc[still, "final_train_acc"].item() == 0.372  # the caller's table is left as it was
    with pytest.raises(ValueError, match="unknown accuracy 'best_val_acc'"):
        accuracy_sentences(runs, metric="best_val_acc")


def test_depths_trained_at_different_budgets_name_each_budget():
    records, runs = budget_runs(conv_batch_d16_s0=0.3)
    runs.loc[runs["run"] == "conv-batch-d4-s0", ["steps", "epochs_done"]] = [80, 2]
    runs = pd.concat([runs, runs.loc[runs["block"] == "res"].assign(run="res-batch-d16-s1", seed=1, test_acc=0.64)])
    conv, res = accuracy_sentences(runs)
    assert conv == ("conv: test accuracy falls 11.2 points from depth 4 to 16: 41.2 % at depth 4 after 80 optimizer "
                    "steps on 10,000 training images (2 epochs) and 30.0 % at depth 16 after 40 optimizer steps on "
                    "10,000 training images (1 epoch).")
    assert res.startswith("res: test accuracy 62.0 % at depth 16 (mean of 2 seeds), each after 40 optimizer steps")
    budget = report_text(records, runs, fmt="table").splitlines()[2]
    assert budget == ("Training budgets: 40 optimizer steps on 10,000 training images (1 epoch): 3 runs; "
                      "80 optimizer steps on 10,000 training images (2 epochs): 1 run")


def test_a_run_without_an_accuracy_and_a_runs_table_without_a_budget_are_said_as_such():
    records, runs = sweep()
    runs.loc[runs["run"] == "conv-batch-d4-s0", ["status", "test_acc"]] = ["diverged", np.nan]
    conv = accuracy_sentences(runs)[0]
    assert conv == ("conv: test accuracy 41.2 % at depth 16, after an unrecorded training budget; depth 4 has no test "
                    "accuracy (diverged).")
    assert accuracy_sentences(runs.assign(test_acc=np.nan)) == []  # a probe: nothing trained, nothing to compare
    assert "Training budget" not in report_text(records, None)


def test_the_machine_formats_carry_each_runs_budget(report_inputs):
    records, runs = report_inputs
    runs = runs.assign(steps=[40, 40, 12], train_images=10_000, epochs_done=1)
    budget = {r["run"]: r for r in json.loads(report_text(records, runs, fmt="json"))["budget"]}
    assert budget["conv-batch-d4-s0"]["steps"] == 40 and budget["conv-batch-d4-s0"]["train_images"] == 10_000
    assert budget["res-batch-d16-s0"]["short_budget"] is True and budget["res-batch-d16-s0"]["at_chance"] is False


def test_real_runs_report_the_budget_they_trained_for(broken):
    root, (records, runs, unreadable) = broken
    healthy = runs.set_index("run").loc["conv-d3-s0"]
    budget = healthy[["steps", "train_images", "batch_size", "epochs_done"]].tolist()
    assert budget == [8, 400, 100, 2]  # 2 epochs of 4 steps of 100 on the 400 images of small_splits
    text = report_text(records, runs, unreadable=unreadable)
    assert "8 optimizer steps on 400 training images (2 epochs)" in text


def test_width_sentences_state_the_measured_ratios_and_exact_zeros():
    from gradlab.report.text import width_sentences

    rows = []
    for block, norm, ratios in (("conv", "batch", [2700.0, 2650.0, 2200.0]), ("conv", "none", [0.0, 0.0, 0.0]),
                                ("res", "batch", [8.1, 8.0, 7.9])):
        for width, ratio in zip((8, 32, 128), ratios):
            rows.append({"phase": "init", "model": "deepcnn", "block": block, "norm": norm, "depth": 32,
                         "width": width, "first_to_last": ratio, "n_seeds": 3})
    effect = analysis.width_effect(pd.DataFrame(rows))
    assert (effect["n_seeds"] == 3).all()
    one_seed = width_sentences(analysis.width_effect(pd.DataFrame(rows).assign(n_seeds=1)))
    assert "(3 widths)" in one_seed[0] and "seeds" not in one_seed[0]  # one seed: no mean to speak of
    conv = effect.loc[(effect["block"] == "conv") & (effect["norm"] == "batch")].iloc[0]
    assert (conv["narrow"], conv["wide"], conv["ratio_narrow"], conv["ratio_wide"]) == (8, 128, 2700.0, 2200.0)
    sentences = width_sentences(effect, {"init": "at initialisation (3 batches of 256 images, 3 seeds)"})
    assert sentences[0] == ("conv (batch norm), depth 32, at initialisation (3 batches of 256 images, 3 seeds): "
                            "first-to-last gradient ratio 2700 at width 8 and 2200 at width 128 (3 widths, geometric "
                            "mean over 3 seeds), ×0.815 from the narrowest to the widest.")
    assert "exactly 0 at every width from 8 to 128" in sentences[1]
    contrast = [s for s in sentences if s.startswith("At initialisation")]
    assert contrast == [f"At initialisation (3 batches of 256 images, 3 seeds), depth 32, batch norm: going from width "
                        f"8 to 128 moved a block type's ratio by at most ×1.23; at the same width the block types' "
                        f"ratios differed by up to ×{format_number(2700 / 8.1)} (conv and res)."]


def test_width_depth_picks_the_wider_and_the_deeper_line_and_averages_seeds():
    rows = []
    for seed, acc in ((0, 0.4), (1, 0.5)):
        for depth, width in ((2, 16), (2, 32), (2, 64), (8, 32), (16, 32)):
            rows.append({"run": f"conv-d{depth}-w{width}-s{seed}", "model": "deepcnn", "block": "conv",
                         "norm": "batch", "depth": depth, "width": width, "seed": seed,
                         "n_params": depth * 1000 + width, "beta": 3 * (depth + 1) / width, "test_acc": acc})
    lines = analysis.width_depth(pd.DataFrame(rows))
    assert list(zip(lines["direction"], lines["depth"], lines["width"])) == [
        ("wider", 2, 16), ("wider", 2, 32), ("wider", 2, 64), ("deeper", 2, 32), ("deeper", 8, 32), ("deeper", 16, 32)]
    assert (lines["test_acc_mean"] == 0.45).all() and (lines["n_seeds"] == 2).all()
    assert lines["test_acc_std"].iloc[0] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    runs = pd.DataFrame(rows).assign(steps=40, train_images=2048, epochs_done=2, status="complete")
    text = report_text(pd.DataFrame(), runs)
    assert "Width against depth" in text and "grown wider at depth 2, test accuracy went from 45.0 % at width 16" in text
    assert "after 40 optimizer steps on 2,048 training images (2 epochs)" in text
    assert len(analysis.width_depth(pd.DataFrame(rows).query("width == 32"))) == 0  # one width: no wider line
