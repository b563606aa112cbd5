"""gradlab.runs: records of any model, legacy run directories upgraded on load, the run keys."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_analysis import make_records, make_resnet

from gradlab import analysis, runs, schema


def legacy_rows(depth=3, block="res", steps=(0, 1), g_last=1e-2, gain=2.0):
    """Records as gradlab <= 0.3 wrote them for a DeepCNN: ``block`` (the kind) instead of role,
    stack_index and module_type."""
    layers = ["conv1", "conv2", "conv3", *(f"layers.{i}" for i in range(depth)), "linear1"]
    kinds = ["stem"] * 3 + [block] * depth + ["head"]
    rows = []
    for step in steps:
        for position, (layer, kind) in enumerate(zip(layers, kinds)):
            grad = g_last * gain ** (depth - 1 - (position - 3))
            rows += [(step, 0, layer, position, kind, "grad_out_norm", grad),
                     (step, 0, layer, position, kind, "grad_gain", gain),
                     (step, 0, layer, position, kind, "act_mean", 0.1)]
        rows.append((step, 0, "model", -1, "model", "loss", 2.3))
    return pd.DataFrame(rows, columns=list(schema.LEGACY_RECORD_COLUMNS))


def write_part(run_dir, frame):
    """One records part written as the old RecordsWriter did: pyarrow, page checksums, named by steps."""
    folder = run_dir / runs.RECORDS
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{int(frame['step'].min()):010d}-{int(frame['step'].max()):010d}.parquet"
    table = pa.table({c: frame[c].to_numpy() for c in frame.columns})
    pq.write_table(table, folder / name, write_page_checksum=True)


def make_run_dir(path, train, records=None, status="complete"):
    """A run directory as the trainer writes it; another model's norm is in the model section."""
    path.mkdir(parents=True)
    config = {"train": train, "dataset": "synthetic", "synthetic": True}
    if train.get("model", "deepcnn") != "deepcnn" and "norm" in train:
        config["model"] = {"spec": train["model"], "norm": train["norm"]}
    runs.write_json(path / runs.CONFIG, config)
    runs.write_json(path / runs.SUMMARY, {"status": status, "epochs_done": 1, "test_acc": 0.3})
    if records is not None:
        write_part(path, records)
    return path


def test_a_legacy_run_directory_loads_upgraded(tmp_path):
    train = {"block": "res", "depth": 3, "width": 8, "norm": "batch", "seed": 2}  # no "model": an old run
    run_dir = make_run_dir(tmp_path / "res-d3-s2", train, legacy_rows())
    run = runs.load_run(run_dir)
    records = run.records()
    assert records.columns.tolist() == list(schema.RECORD_COLUMNS)
    one = records.loc[(records["step"] == 0) & (records["metric"] == "grad_out_norm")].set_index("layer")
    assert one["role"].tolist() == ["stem"] * 3 + ["stack"] * 3 + ["head"]
    assert one["stack_index"].tolist() == [-1, -1, -1, 0, 1, 2, -1]
    assert one["module_type"].tolist() == ["Conv2d"] * 3 + ["ResBlock"] * 3 + ["Linear"]
    model = records.loc[records["layer"] == "model"].iloc[0]
    assert (model["role"], model["stack_index"], model["module_type"]) == ("model", -1, "DeepCNN")
    assert str(records["stack_index"].dtype) == "int64"
    assert runs.check_records(run_dir, before_step=10) == len(records)
    only = run.records(metrics=["grad_gain"], columns=["layer", "role", "stack_index", "value"])
    assert only.columns.tolist() == ["layer", "role", "stack_index", "value"] and len(only) == 2 * 7
    assert run.identity() == {"run": "res-d3-s2", "model": "deepcnn", "block": "res", "depth": 3, "width": 8,
                              "norm": "batch", "seed": 2}
    sweep = runs.load_sweep(run_dir)
    assert sweep.table()[list(schema.RUN_KEYS)].iloc[0].tolist() == ["res-d3-s2", "deepcnn", "res", 3, 8, "batch", 2]
    flow = analysis.flow_summary(sweep.records(), sweep.table(), phases=["init"]).iloc[0]
    assert flow["first_to_last"] == pytest.approx(4.0) and flow["verdict"] == "stable"  # 2**2 over three blocks


def test_a_run_resumed_across_the_upgrade_reads_both_formats(tmp_path):
    train = {"block": "conv", "depth": 2, "width": 8, "norm": "none", "seed": 0}
    run_dir = make_run_dir(tmp_path / "conv-d2-s0-none", train, legacy_rows(depth=2, block="conv", steps=(0, 1)))
    current = runs.upgrade_records(legacy_rows(depth=2, block="conv", steps=(2, 3)))
    runs.RecordsWriter(run_dir)({c: current[c].to_numpy() for c in schema.RECORD_COLUMNS})
    records = runs.load_run(run_dir).records()
    assert sorted(set(records["step"])) == [0, 1, 2, 3]
    stack = records.loc[records["role"] == "stack"]
    assert set(stack["module_type"]) == {"ConvBlock"} and sorted(set(stack["stack_index"])) == [0, 1]
    assert runs.check_records(run_dir, before_step=10) == len(records)


def test_the_writer_writes_the_current_columns_even_from_legacy_input(tmp_path):
    legacy = legacy_rows(depth=2, block="skip")
    runs.RecordsWriter(tmp_path)({c: legacy[c].to_numpy() for c in schema.LEGACY_RECORD_COLUMNS})
    (part,) = (tmp_path / runs.RECORDS).glob("part-*.parquet")
    assert pq.read_schema(part).names == list(schema.RECORD_COLUMNS)
    written = pq.read_table(part).to_pandas()
    assert set(written.loc[written["role"] == "stack", "module_type"]) == {"SkipBlock"}


def test_legacy_records_gradlab_never_wrote_are_named(tmp_path):
    odd = legacy_rows(depth=2).replace({"block": {"res": "attention"}})
    run_dir = make_run_dir(tmp_path / "odd", {"block": "res", "depth": 2}, odd)
    with pytest.raises(runs.RunError, match=r"records\.parquet: legacy records with unknown block kind\(s\) "
                                            r"\['attention'\].*--restart"):
        runs.load_run(run_dir).records()
    misnamed = legacy_rows(depth=2).replace({"layer": {"layers.1": "blocks.1"}})
    with pytest.raises(ValueError, match=r"stack blocks named \['blocks.1'\]"):
        runs.upgrade_records(misnamed)


def test_a_corrupt_part_names_the_folder_and_the_part(tmp_path):
    run_dir = make_run_dir(tmp_path / "r", {"block": "res", "depth": 3}, legacy_rows())
    (run_dir / runs.RECORDS / "part-0000000005-0000000005.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(runs.RunError, match=r"records\.parquet: cannot be read as Parquet "
                                            r"\(part-0000000005-0000000005\.parquet: .*--restart"):
        runs.load_run(run_dir).records()


def test_the_run_keys_of_another_model_come_from_its_stack(tmp_path):
    resnet = make_resnet(steps=[0, 5]).drop(columns=list(schema.RUN_KEYS))
    train = {"model": "torchvision:resnet18", "block": "conv", "depth": 6, "width": 32, "norm": "batch", "seed": 1}
    run_dir = make_run_dir(tmp_path / "r18", train, resnet)
    bare = make_run_dir(tmp_path / "bare", {"model": "file.py:make", "seed": 0})  # no records, no norm
    run = runs.load_run(run_dir)
    assert run.stack["layer"].tolist() == [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)]
    assert run.stack["stack_index"].tolist() == list(range(8))
    identity = run.identity()
    assert identity | {"width": None} == {"run": "r18", "model": "torchvision:resnet18", "block": "BasicBlock",
                                          "depth": 8, "width": None, "norm": "batch", "seed": 1}
    assert np.isnan(identity["width"])  # a DeepCNN option, meaningless here
    # --norm shapes a DeepCNN alone: another model's train.norm is the option's default, not a fact
    runs.write_json(run_dir / runs.CONFIG, {"train": train, "model": {"spec": train["model"]}})
    assert runs.load_run(run_dir).identity()["norm"] == schema.UNKNOWN
    assert runs.load_run(bare).identity() | {"width": 0} == {"run": "bare", "model": "file.py:make",
                                                            "block": schema.UNKNOWN, "depth": 0, "width": 0,
                                                            "norm": schema.UNKNOWN, "seed": 0}


def test_a_mixed_sweep_has_one_row_per_run_with_its_block_and_depth(tmp_path):
    root = tmp_path / "mixed"
    cells = {"conv-d4-s0": ({"block": "conv", "depth": 4, "width": 8, "norm": "batch", "seed": 0},
                            make_records(depth=4)),
             "r18-s0": ({"model": "torchvision:resnet18", "norm": "batch", "seed": 0}, make_resnet()),
             "mix-s0": ({"model": "file.py:make", "seed": 0},
                        make_resnet(module_type="Bottleneck").assign(
                            module_type=lambda f: f["module_type"].mask(f["stack_index"] == 0, "BasicBlock")))}
    for name, (train, records) in cells.items():
        make_run_dir(root / runs.RUNS_FOLDER / name, train, records.drop(columns=list(schema.RUN_KEYS)))
    runs.write_json(root / runs.SWEEP, {"cells": list(cells)})
    sweep = runs.load_sweep(root)
    table = sweep.table().set_index("run")
    assert table.loc[list(cells), ["model", "block", "depth", "norm"]].values.tolist() == [
        ["deepcnn", "conv", 4, "batch"], ["torchvision:resnet18", "BasicBlock", 8, "batch"],
        ["file.py:make", "BasicBlock/Bottleneck", 8, schema.UNKNOWN]]
    records = sweep.records(metrics=["grad_out_norm", "grad_gain"])
    assert records.columns.tolist() == [*schema.RUN_KEYS, *schema.RECORD_COLUMNS]
    assert records.groupby(["model", "block", "depth", "norm"]).ngroups == 3  # no key is NaN: no row dropped
    scaling = analysis.depth_scaling(records, sweep.table())
    assert scaling["n_seeds"].sum() == 3 and len(scaling) == 3


def test_locate_nonfinite_on_current_records():
    rows = make_records(depth=3).loc[lambda f: f["step"] == 0].copy()
    rows.loc[(rows["layer"] == "layers.1") & (rows["metric"] == "nonfinite_grads"), "value"] = 7.0
    rows.loc[(rows["layer"] == "layers.2") & (rows["metric"] == "grad_in_norm"), "value"] = np.inf
    assert runs.locate_nonfinite(rows) == {"layer": "layers.2", "position": 5, "cause": "gradient"}
    rows.loc[(rows["layer"] == "conv2") & (rows["metric"] == "act_mean"), "value"] = np.nan
    assert runs.locate_nonfinite(rows) == {"layer": "conv2", "position": 1, "cause": "activation"}
    loss_only = make_records(depth=3).assign(value=lambda f: f["value"].mask(f["metric"] == "loss", np.nan))
    assert runs.locate_nonfinite(loss_only) is None


def test_the_runs_table_holds_each_runs_training_budget(tmp_path):
    assert runs.train_images({"train_images": 400, "train": {"subset": 5}}) == 400  # what the trainer drew from
    assert runs.train_images({"train": {"subset": 10_000, "val_fraction": 0.1}}) == 10_000  # older configs
    assert runs.train_images({"train": {"val_fraction": 0.1}}) == 45_000
    assert runs.train_images({"train": {"val_fraction": 0.04}}) == 48_000
    assert runs.train_images({}) is None
    train = {"block": "conv", "depth": 3, "width": 8, "norm": "batch", "seed": 0, "epochs": 2, "batch_size": 256,
             "subset": 10_000, "val_fraction": 0.1}
    make_run_dir(tmp_path / "run", train)
    runs.write_json(tmp_path / "run" / runs.SUMMARY, {"status": "complete", "epochs_done": 2, "steps_done": 80})
    row = runs.load_sweep(tmp_path / "run").table().iloc[0]
    assert (row["epochs_done"], row["steps"], row["train_images"], row["batch_size"]) == (2, 80, 10_000, 256)


def test_a_sweeps_steps_and_history_carry_each_runs_keys_in_front(tmp_path):
    root = tmp_path / "sweep"
    for name, depth, losses in (("conv-d2-s0", 2, [2.3, 2.1]), ("conv-d8-s0", 8, [2.3, 2.2, 2.0])):
        run_dir = make_run_dir(root / runs.RUNS_FOLDER / name,
                               {"block": "conv", "depth": depth, "width": 8, "norm": "batch", "seed": 0})
        runs.write_parquet(run_dir / runs.STEPS, pd.DataFrame({"step": range(len(losses)), "epoch": 0, "loss": losses}))
        runs.write_parquet(run_dir / runs.HISTORY, pd.DataFrame({"epoch": [0], "train_acc": [0.2], "val_acc": [0.1]}))
    make_run_dir(root / runs.RUNS_FOLDER / "res-d2-s0", {"block": "res", "depth": 2, "width": 8, "norm": "batch",
                                                         "seed": 0})  # no step finished yet: no rows
    runs.write_json(root / runs.SWEEP, {"cells": ["conv-d2-s0", "conv-d8-s0", "res-d2-s0"]})
    sweep = runs.load_sweep(root)
    steps, history = sweep.steps(), sweep.history()
    assert steps.columns.tolist() == [*schema.RUN_KEYS, "step", "epoch", "loss"]
    assert steps.groupby("run")["loss"].apply(list).to_dict() == {"conv-d2-s0": [2.3, 2.1],
                                                                  "conv-d8-s0": [2.3, 2.2, 2.0]}
    assert history.columns.tolist() == [*schema.RUN_KEYS, "epoch", "train_acc", "val_acc"]
    assert history[["run", "depth"]].values.tolist() == [["conv-d2-s0", 2], ["conv-d8-s0", 8]]
    empty = runs.Sweep(path=root, config={}, runs=[], unreadable={})
    assert empty.steps().empty and empty.steps().columns.tolist() == list(schema.RUN_KEYS)


def test_a_wall_time_below_the_measured_training_time_is_replaced_by_it_and_marked_a_lower_bound(tmp_path):
    """An older gradlab kept only the last process's wall time of a resumed run (and 0 while it
    ran): the epochs' measured training time stands in, marked as a lower bound."""
    from gradlab.report.html import _wall_words

    root = tmp_path / "sweep"
    cases = {"conv-d2-s0": (100.0, [30.0, 40.0]),  # consistent: kept
             "conv-d8-s0": (50.0, [300.0, 310.0]),  # resumed under the old trainer: 610 s at least
             "conv-d16-s0": (None, [5.0])}  # no wall time recorded: stays unknown
    for name, (wall, seconds) in cases.items():
        run_dir = make_run_dir(root / runs.RUNS_FOLDER / name, {"block": "conv", "depth": int(name[6:-3]), "width": 8,
                                                                "norm": "batch", "seed": 0})
        summary = {"status": "complete", "epochs_done": len(seconds)} | ({"wall_seconds": wall} if wall else {})
        runs.write_json(run_dir / runs.SUMMARY, summary)
        runs.write_parquet(run_dir / runs.HISTORY, pd.DataFrame({"epoch": range(len(seconds)),
                                                                 "train_seconds": seconds}))
    runs.write_json(root / runs.SWEEP, {"cells": list(cases)})
    table = runs.load_sweep(root).table().set_index("run")
    assert table.loc["conv-d2-s0", ["wall_seconds", "wall_lower_bound"]].tolist() == [100.0, False]
    assert table.loc["conv-d8-s0", ["wall_seconds", "wall_lower_bound"]].tolist() == [610.0, True]
    assert np.isnan(table.loc["conv-d16-s0", "wall_seconds"]) and not table.loc["conv-d16-s0", "wall_lower_bound"]
    words = _wall_words(table["wall_seconds"].dropna(), table["wall_lower_bound"].loc[table["wall_seconds"].notna()])
    assert words.startswith("710 s of training in total, longest run 610 s (at least: 1 run written by an older")
    assert _wall_words(pd.Series([100.0]), pd.Series([False])) == "100 s of training in total, longest run 100 s"
