"""TensorBoard output: a real training run written live and exported, read back with TensorBoard's
own reader (EventAccumulator) and served by a real `tensorboard` process."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

pytest.importorskip("tensorboard")  # the dev extra installs it: CI runs these tests

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradlab import load_run  # noqa: E402
from gradlab.cli import main  # noqa: E402
from gradlab.integrations import tensorboard as tb  # noqa: E402

TRAIN = ["--depth", "4", "--width", "8", "--epochs", "2", "--subset", "512", "--batch-size", "128",
         "--record-every", "2", "--device", "cpu", "--quiet"]


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of one TensorBoard run, by TensorBoard's reader (no sampling: size 0)."""
    reader = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


@pytest.fixture(scope="module")
def live(tmp_path_factory, cifar_root):
    """A real CIFAR-10 run trained by the CLI with --tensorboard: (run directory, its TensorBoard run)."""
    import torch

    root = tmp_path_factory.mktemp("tensorboard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["train", *TRAIN, "--data-root", str(cifar_root),
                                           "--out", str(root / "run"), "--tensorboard", str(root / "live")])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return root / "run", root / "live"


def expected_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """What the TensorBoard run should hold, computed from the run directory with plain pandas."""
    run = load_run(run_dir)
    records = run.records()
    width = max(2, len(str(records["position"].max())))
    tag = np.where(records["position"] < 0, records["metric"] + "/model",
                   records["metric"] + "/" + records["position"].map(lambda p: f"{p:0{width}d}") + "_" + records["layer"])
    out: dict[str, dict[int, float]] = {}
    for t, step, value in zip(tag, records["step"], records["value"]):
        out.setdefault(t, {})[int(step)] = value
    stack = records.loc[(records["metric"] == "grad_out_norm") & (records["role"] == "stack")]
    norms = stack.pivot(index="step", columns="stack_index", values="value")
    out["gradlab/first_to_last"] = (norms[0] / norms[norms.columns.max()]).to_dict()  # first block over last
    out["gradlab/loss"] = dict(zip(run.steps["step"], run.steps["loss"]))
    for name in ("train_loss", "train_acc", "val_acc"):
        out[f"gradlab/{name}"] = dict(zip(run.history["step"] - 1, run.history[name]))
    out["gradlab/test_acc"] = {run.summary["steps_done"] - 1: run.summary["test_acc"]}
    return out


def assert_equal_to_run(scalars: dict, run_dir: Path) -> None:
    expected = expected_scalars(run_dir)
    assert set(scalars) == set(expected)
    for tag, values in expected.items():
        steps = [step for step, _ in scalars[tag]]
        assert steps == sorted(values), tag  # every step once, in order
        got = np.array([v for _, v in scalars[tag]], dtype=np.float32)
        want = np.array([values[s] for s in steps], dtype=np.float32)  # TensorBoard's scalars are float32
        np.testing.assert_array_equal(got, want, err_msg=tag)


def test_a_live_run_in_tensorboard_equals_its_records(live):
    run_dir, logdir = live
    scalars = read_scalars(logdir)
    assert_equal_to_run(scalars, run_dir)
    assert len(scalars["gradlab/loss"]) == 8  # 2 epochs of 512 images in batches of 128
    grad_tags = sorted(t for t in scalars if t.startswith("grad_out_norm/") and not t.endswith("/model"))
    positions = [int(t.split("/")[1].split("_")[0]) for t in grad_tags]
    assert positions == sorted(positions) and grad_tags[0] == "grad_out_norm/00_conv1"  # name order = forward order


def test_an_export_equals_the_live_run_and_the_records(live, tmp_path):
    run_dir, logdir = live
    result = CliRunner().invoke(main, ["export", str(run_dir), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    exported = read_scalars(tmp_path / "tb" / "run")
    assert exported == read_scalars(logdir)
    assert_equal_to_run(exported, run_dir)
    # exporting again replaces the earlier export instead of doubling every step
    assert CliRunner().invoke(main, ["export", str(run_dir), "--tensorboard", str(tmp_path / "tb")]).exit_code == 0
    assert len(list((tmp_path / "tb" / "run").glob("events.out.tfevents.*"))) == 1
    assert read_scalars(tmp_path / "tb" / "run") == exported


def test_a_sweep_exports_one_tensorboard_run_per_cell(tmp_path, small_splits):
    from conftest import train_tiny_sweep

    cells, _ = train_tiny_sweep(tmp_path / "sweep", small_splits, ("conv", "res"), (2,))
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"cells": cells}))
    written = tb.export(tmp_path / "sweep", tmp_path / "tb")
    assert sorted(written) == sorted(cells)
    for cell in cells:
        scalars = read_scalars(tmp_path / "tb" / cell)
        assert sum(len(v) for v in scalars.values()) == written[cell].scalars
        assert written[cell].steps == max(step for values in scalars.values() for step, _ in values) + 1
        assert_equal_to_run(scalars, tmp_path / "sweep" / "runs" / cell)


def test_a_resumed_run_holds_each_step_once(tmp_path, small_splits):
    """A run that fails in its second epoch after records were flushed, then resumes from the
    first epoch's checkpoint: TensorBoard shows every step once, with the resumed values."""
    from gradlab.recorder import RecordConfig
    from gradlab.train import Callback, TrainConfig, train_run

    class Crash(Callback):
        def on_after_step(self, trainer) -> None:
            if trainer.step == 6:  # epoch 2 of 4 steps; steps 4 and 5 are flushed already
                raise RuntimeError("killed")

    config = TrainConfig(dataset="synthetic", depth=2, width=4, epochs=2, batch_size=100, device="cpu")
    record = RecordConfig(every=1, flush_every=1)
    with pytest.raises(RuntimeError, match="killed"):
        train_run(config, tmp_path / "run", record=record, splits=small_splits, callbacks=[Crash()],
                  tensorboard=tmp_path / "tb")
    summary = train_run(config, tmp_path / "run", record=record, splits=small_splits, tensorboard=tmp_path / "tb")
    assert summary["resumed_from_epoch"] == 1
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["loss/model"]] == list(range(8))
    records = load_run(tmp_path / "run").records()
    loss = records.loc[records["metric"] == "loss"].sort_values("step")
    assert [v for _, v in scalars["loss/model"]] == list(loss["value"].astype(np.float32))


def test_tags_sort_in_forward_order_past_position_99():
    positions = np.array([-1, 0, 7, 99, 100, 123])
    tags = tb.tags(np.array(["grad_out_norm"] * 6), np.array(["model", "a", "b", "c", "d", "e"]), positions,
                   tb.position_width(positions))
    assert list(tags) == ["grad_out_norm/model", "grad_out_norm/000_a", "grad_out_norm/007_b",
                          "grad_out_norm/099_c", "grad_out_norm/100_d", "grad_out_norm/123_e"]


def test_first_to_last_by_step_is_the_ratio_of_first_and_last_block():
    from gradlab.analysis import first_to_last_by_step

    rows = []
    for step, (first, last) in enumerate([(4.0, 2.0), (0.0, 0.0), (1.0, 0.0), (0.0, 5.0)]):
        for index, value in ((0, first), (1, 9.0), (2, last)):
            rows.append({"step": step, "role": "stack", "stack_index": index, "metric": "grad_out_norm",
                         "value": value})
        rows.append({"step": step, "role": "stem", "stack_index": -1, "metric": "grad_out_norm", "value": 7.0})
    ratio = first_to_last_by_step(pd.DataFrame(rows))
    assert list(ratio["step"]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(ratio["first_to_last"], [2.0, np.nan, np.inf, 0.0])  # 0/0 is no ratio


@pytest.mark.parametrize("args", [["train", *TRAIN, "--dataset", "synthetic", "--out", "{tmp}/run"],
                                  ["export", "{run}"]])
def test_without_the_extra_the_option_is_refused_with_the_install_command(args, tmp_path, live, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)  # import fails
    args = [a.format(tmp=tmp_path, run=live[0]) for a in args] + ["--tensorboard", str(tmp_path / "tb")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "pip install 'gradlab[tensorboard]'" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()  # refused before anything was written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tensorboard_serves_an_exported_sweep(live, tmp_path):
    """`tensorboard --logdir` on an export: its HTTP API lists the run and gradlab's tags."""
    tb.export(live[0], tmp_path / "tb")
    port = _free_port()
    command = [str(Path(sys.executable).with_name("tensorboard")), "--logdir", str(tmp_path / "tb"),
               "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        deadline, tags = time.monotonic() + 60, {}
        while time.monotonic() < deadline and "run" not in tags:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as reply:
                    tags = json.load(reply)
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.5)
        assert set(tags["run"]) == set(read_scalars(tmp_path / "tb" / "run"))
        query = urllib.parse.urlencode({"run": "run", "tag": "gradlab/loss"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?{query}", timeout=5) as reply:
            served = json.load(reply)  # [[wall_time, step, value], ...]
        assert [row[1] for row in served] == list(range(8))
    finally:
        server.terminate()
        server.wait(timeout=30)
