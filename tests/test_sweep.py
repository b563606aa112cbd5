"""Sweeps: grid expansion, the sweep folder, resume after a kill, failed-cell isolation, executors."""
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

import gradlab
from gradlab import runs
from gradlab.recorder import RecordConfig
from gradlab.sweep import SWEEP, SweepGrid, cell_dir, cell_status, expand, run_sweep
from gradlab.train import TrainConfig, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMING = ["train_seconds", "images_per_s"]
# 256 images in 4 steps of 64, 1,000 validation images; the test split (10,000) is cheap at width 4.
BASE = TrainConfig(width=4, epochs=1, batch_size=64, lr=3e-3, dataset="synthetic", subset=256, val_fraction=0.02,
                   device="cpu")


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _history(run_dir: Path) -> pd.DataFrame:
    return runs.load_run(run_dir).history.drop(columns=TIMING)


# ---------------------------------------------------------------------------------------
# The grid


def test_expand_orders_cells_blocks_norms_depths_seeds():
    grid = SweepGrid(blocks=["conv", "res"], depths=[2, 32], seeds=[0, 1], norms=["batch", "none"])
    cells = expand(grid, BASE)
    assert grid.blocks == ("conv", "res")  # any sequence is stored as a tuple
    assert [c.name for c in cells[:8]] == [
        "conv-d2-s0", "conv-d2-s1", "conv-d32-s0", "conv-d32-s1",
        "conv-d2-s0-none", "conv-d2-s1-none", "conv-d32-s0-none", "conv-d32-s1-none"]
    assert cells[8].name == "res-d2-s0" and len(cells) == 16
    config = cells[7].config
    assert (config.block, config.depth, config.seed, config.norm) == ("conv", 32, 1, "none")
    assert replace(config, block="conv", depth=BASE.depth, seed=0, norm="batch") == BASE  # the rest is the base


def test_widths_are_an_axis_and_names_show_a_width_other_than_the_notebooks():
    grid = SweepGrid(blocks=["conv"], depths=[2, 8], widths=[16, 32], seeds=[0])
    cells = expand(grid, BASE)
    assert [c.name for c in cells] == ["conv-d2-w16-s0", "conv-d2-s0", "conv-d8-w16-s0", "conv-d8-s0"]
    assert [(c.config.depth, c.config.width) for c in cells] == [(2, 16), (2, 32), (8, 16), (8, 32)]
    # one width, as --width or as --widths: the names of before, so older sweeps resume
    assert [c.name for c in expand(SweepGrid(["conv"], [2]), replace(BASE, width=64))] == ["conv-d2-s0"]
    assert [c.name for c in expand(SweepGrid(["conv"], [2], widths=[64]), BASE)] == ["conv-d2-s0"]
    assert expand(SweepGrid(["conv"], [2], widths=[64]), BASE)[0].config.width == 64


def test_wider_deeper_trains_the_two_lines_not_the_product():
    grid = SweepGrid(blocks=["conv", "res"], depths=[2, 8, 16, 32], widths=[16, 32, 64, 128], shape="wider-deeper")
    cells = expand(grid, replace(BASE, width=32))
    assert len(cells) == 14 and len(expand(replace(grid, shape="product"), replace(BASE, width=32))) == 32
    assert [c.name for c in cells[:7]] == ["conv-d2-w16-s0", "conv-d2-s0", "conv-d2-w64-s0", "conv-d2-w128-s0",
                                           "conv-d8-s0", "conv-d16-s0", "conv-d32-s0"]
    pairs = {(c.config.depth, c.config.width) for c in cells if c.config.block == "res"}
    assert pairs == {(2, w) for w in (16, 32, 64, 128)} | {(d, 32) for d in (2, 8, 16, 32)}
    with pytest.raises(ValueError, match="must include the width the deeper line grows at, --width 4"):
        expand(grid, BASE)
    with pytest.raises(ValueError, match="give the widths"):
        expand(SweepGrid(["conv"], [2, 8], shape="wider-deeper"), BASE)


def test_a_width_sweep_resumes_and_loads_with_its_widths(tmp_path):
    grid = SweepGrid(blocks=("conv",), depths=(1,), widths=(4, 8))
    first = run_sweep(grid, BASE, tmp_path / "sweep")
    assert [r["name"] for r in first] == ["conv-d1-w4-s0", "conv-d1-w8-s0"]
    assert all(r["status"] == "complete" for r in first)
    again = run_sweep(grid, BASE, tmp_path / "sweep")
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    table = runs.load_sweep(tmp_path / "sweep").table().set_index("run")
    assert table.loc["conv-d1-w8-s0", "width"] == 8 and table.loc["conv-d1-w4-s0", "width"] == 4
    for width in (4, 8):  # beta = 3 (depth + 1) / width for a conv network: stem 3 convs, 2 per block (one of half width)
        row = table.loc[f"conv-d1-w{width}-s0"]
        assert row["beta"] == pytest.approx(3 * 2 / width)
        assert row["n_params"] == gradlab.count_parameters(gradlab.build_model("conv", 1, width))
    with pytest.raises(runs.RunError, match="grid.widths: stored"):
        run_sweep(replace(grid, widths=(4, 8, 16)), BASE, tmp_path / "sweep")


@pytest.mark.parametrize("grid, message", [
    (dict(blocks=(), depths=(2,)), "blocks must not be empty"),
    (dict(blocks=("conv",), depths=(2, 4, 2)), "depths lists 2 more than once"),
    (dict(blocks=("conv", "mlp"), depths=(2,)), "unknown block 'mlp'"),
    (dict(blocks=("conv",), depths=(2,), norms=("layer",)), "unknown norm 'layer'"),
    (dict(blocks=("conv",), depths=(-1,)), "depths: each must be an integer >= 0, got -1"),
    (dict(blocks=("conv",), depths=(2,), seeds=(1.5,)), "seeds: each must be an integer >= 0, got 1.5"),
    (dict(blocks=("conv",), depths=(2,), widths=(8, 5)), "widths: each must be an even integer >= 2, got 5"),
    (dict(blocks=("conv",), depths=(2,), widths=(0,)), "widths: each must be an even integer >= 2, got 0"),
    (dict(blocks=("conv",), depths=(2,), widths=(8, 8)), "widths lists 8 more than once"),
    (dict(blocks=("conv",), depths=(2,), shape="grid"), "unknown shape 'grid'"),
])
def test_a_bad_grid_names_the_list_and_the_value(grid, message):
    with pytest.raises(ValueError, match=message):
        expand(SweepGrid(**grid), BASE)


def test_a_bad_option_surfaces_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="blocks must be a sequence of values, got the string 'conv'"):
        SweepGrid(blocks="conv", depths=(2,))
    with pytest.raises(ValueError, match="width must be an even integer >= 2, got 5"):
        run_sweep(SweepGrid(("conv",), (2,)), replace(BASE, width=5), tmp_path / "sweep")
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        run_sweep(SweepGrid(("conv",), (2,)), BASE, tmp_path / "sweep", executor="dask")
    with pytest.raises(ValueError, match="jobs must be a positive integer, got 0"):
        run_sweep(SweepGrid(("conv",), (2,)), BASE, tmp_path / "sweep", jobs=0)
    with pytest.raises(ValueError, match="needs the ray executor"):
        run_sweep(SweepGrid(("conv",), (2,)), BASE, tmp_path / "sweep", ray_address="auto")
    assert not (tmp_path / "sweep").exists()


def test_cell_status_reads_summaries(tmp_path):
    assert cell_status(tmp_path / "missing") == "pending"
    (tmp_path / "c").mkdir()
    runs.write_json(tmp_path / "c" / runs.SUMMARY, {"status": "failed", "error": "worker died"})
    assert cell_status(tmp_path / "c") == "failed"  # a worker that died before writing config.json
    runs.write_json(tmp_path / "c" / runs.CONFIG, {})
    for status, expected in [("running", "running"), ("complete", "complete"), ("failed", "failed")]:
        runs.write_json(tmp_path / "c" / runs.SUMMARY, {"status": status})
        assert cell_status(tmp_path / "c") == expected
    (tmp_path / "c" / runs.SUMMARY).write_text("{trunc")
    assert cell_status(tmp_path / "c") == "failed"


# ---------------------------------------------------------------------------------------
# A local sweep, end to end

GRID = SweepGrid(blocks=("conv", "res"), depths=(1,), seeds=(3,))


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """Two cells in two worker processes with one torch thread each."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    seen = []
    results = run_sweep(GRID, BASE, out, jobs=2, on_cell_done=seen.append)
    return out, results, seen


def test_a_local_sweep_writes_a_run_directory_per_cell(local_sweep):
    out, results, seen = local_sweep
    names = ["conv-d1-s3", "res-d1-s3"]
    assert [r["name"] for r in results] == names and sorted(r["name"] for r in seen) == names
    assert all(r["status"] == "complete" and r["error"] is None and r["seconds"] > 0 for r in results)
    stored = runs.read_json(out / SWEEP)
    assert stored["cells"] == names
    assert stored["grid"] == {"blocks": ["conv", "res"], "depths": [1], "seeds": [3], "norms": ["batch"],
                              "models": ["deepcnn"], "widths": [], "shape": "product"}
    assert stored["base"] == json.loads(json.dumps(asdict(BASE))) and stored["record"] == asdict(RecordConfig())
    assert stored["versions"]["gradlab"] == gradlab.__version__
    for result, name in zip(results, names):
        run = runs.load_run(cell_dir(out, name))
        assert result["run_dir"] == str(run.path) and cell_status(run.path) == "complete"
        assert run.summary["status"] == "complete" and run.summary["test_acc"] == result["test_acc"]
        assert 0 <= result["test_acc"] <= 1 and run.summary["epochs_done"] == 1
        block, depth = name.split("-")[:2]
        assert run.train == json.loads(json.dumps(asdict(replace(BASE, block=block, depth=int(depth[1:]), seed=3))))
        assert run.config["hardware"]["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
        assert run.summary["n_params"] == gradlab.count_parameters(gradlab.build_model(block, int(depth[1:]), 4))
        assert list(run.history["epoch"]) == [0] and len(run.steps) == 4
        assert run.history["train_loss"].between(0, 10).all()
        assert set(run.records()["step"]) == {0, 1, 2, 3}  # the default RecordConfig records every step


def test_running_a_complete_sweep_again_touches_nothing(local_sweep):
    out, _, _ = local_sweep
    before = _files(out)
    results = run_sweep(GRID, BASE, out)
    assert [r["status"] for r in results] == ["skipped"] * 2
    assert all(r["test_acc"] is not None and r["seconds"] == 0 for r in results)
    assert _files(out) == before


def test_a_sweep_folder_refuses_other_options(local_sweep):
    out, _, _ = local_sweep
    with pytest.raises(runs.RunError, match=r"grid.depths: stored \[1\], given \[1, 2\]"):
        run_sweep(replace(GRID, depths=(1, 2)), BASE, out)
    with pytest.raises(runs.RunError, match="base.lr: stored 0.003, given 0.01"):
        run_sweep(GRID, replace(BASE, lr=1e-2), out)
    with pytest.raises(runs.RunError, match="record.every: stored 1, given 0"):
        run_sweep(GRID, BASE, out, record=RecordConfig(every=0))
    with pytest.raises(runs.RunError, match="is a run directory"):
        run_sweep(GRID, BASE, cell_dir(out, "conv-d1-s3"))
    before = _files(out / "runs")
    results = run_sweep(GRID, replace(BASE, eval_batch_size=512), out)  # where and how it runs may change
    assert [r["status"] for r in results] == ["skipped"] * 2 and _files(out / "runs") == before
    assert runs.read_json(out / SWEEP)["base"]["eval_batch_size"] == 512


# ---------------------------------------------------------------------------------------
# Resume and failures

KILL_SCRIPT = """
import sys
from gradlab.sweep import SweepGrid, run_sweep
from gradlab.train import TrainConfig
run_sweep(SweepGrid(("conv",), (1,), seeds=(0, 1)), TrainConfig(**{base!r}), sys.argv[1])
"""


def test_a_killed_sweep_resumes_without_finishing_a_cell_twice_or_losing_one(tmp_path):
    base = replace(BASE, epochs=3)
    out = tmp_path / "sweep"
    names = ["conv-d1-s0", "conv-d1-s1"]
    sweep = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(base=asdict(base)), str(out)], cwd=ROOT)
    try:  # kill it once the first cell is complete and the second has a checkpoint but is not finished
        deadline = time.monotonic() + 120
        first, second = cell_dir(out, names[0]), cell_dir(out, names[1])
        while not (cell_status(first) == "complete" and cell_status(second) == "running"
                   and (second / runs.LAST).exists()):
            assert sweep.poll() is None, "the sweep finished before it could be killed midway"
            assert time.monotonic() < deadline, "the sweep did not get midway in time"
            time.sleep(0.01)
        sweep.send_signal(signal.SIGKILL)
    finally:
        sweep.kill()
        sweep.wait()
    assert [cell_status(cell_dir(out, n)) for n in names] == ["complete", "running"]
    finished = (cell_dir(out, names[0]) / runs.LAST).stat().st_mtime_ns
    checkpointed = load_checkpoint(cell_dir(out, names[1]) / runs.LAST)["epoch"]

    results = run_sweep(SweepGrid(("conv",), (1,), seeds=(0, 1)), base, out)
    assert [r["status"] for r in results] == ["skipped", "complete"]
    assert (cell_dir(out, names[0]) / runs.LAST).stat().st_mtime_ns == finished  # not finished twice
    assert runs.load_run(cell_dir(out, names[1])).summary["resumed_from_epoch"] == checkpointed
    for name in names:  # none lost, no epoch or step twice
        run = runs.load_run(cell_dir(out, name))
        assert run.summary["status"] == "complete"
        assert list(run.history["epoch"]) == [0, 1, 2] and list(run.steps["step"]) == list(range(12))


def test_a_failing_cell_is_recorded_and_the_others_go_on(tmp_path):
    out = tmp_path / "sweep"
    grid = SweepGrid(blocks=("conv", "res"), depths=(1,))
    blocked = cell_dir(out, "res-d1-s0") / "samples.npz"  # a folder where train_run must write a file
    (blocked / "in-the-way").mkdir(parents=True)
    results = run_sweep(grid, BASE, out)
    assert [r["status"] for r in results] == ["complete", "failed"]
    assert results[1]["error"].startswith("IsADirectoryError") and results[1]["test_acc"] is None
    summary = runs.read_json(cell_dir(out, "res-d1-s0") / runs.SUMMARY)  # train_run left it "running"
    assert summary["status"] == "failed" and summary["error"] == results[1]["error"]
    assert cell_status(cell_dir(out, "res-d1-s0")) == "failed"

    shutil.rmtree(blocked)
    kept = _files(cell_dir(out, "conv-d1-s0"))
    results = run_sweep(grid, BASE, out)
    assert [r["status"] for r in results] == ["skipped", "complete"]  # only the failed cell again
    assert _files(cell_dir(out, "conv-d1-s0")) == kept


def test_a_diverging_cell_is_done_not_failed_and_the_others_go_on(tmp_path):
    out = tmp_path / "sweep"
    grid = SweepGrid(blocks=("conv",), depths=(2,), norms=("batch", "none"))
    base = replace(BASE, epochs=2, lr=1e6)  # Adam at 1e6: finite with BatchNorm, non-finite at step 1 without
    results = run_sweep(grid, base, out)
    assert [r["status"] for r in results] == ["complete", "diverged"]
    diverged = results[1]["diverged"]
    assert {k: diverged[k] for k in ("step", "epoch", "cause")} == {"step": 1, "epoch": 0, "cause": "activation"}
    records = runs.load_run(cell_dir(out, "conv-d2-s0-none")).records(metrics=["act_mean"])
    means = records[records["step"] == 1].set_index("position")["value"]
    assert not math.isfinite(means[diverged["position"]])  # the first probe point whose mean is not finite
    assert all(math.isfinite(v) for v in means[means.index < diverged["position"]])
    summary = runs.read_json(cell_dir(out, "conv-d2-s0-none") / runs.SUMMARY)
    assert summary["status"] == "diverged" and summary["diverged"] == diverged and "error" not in summary
    assert cell_status(cell_dir(out, "conv-d2-s0-none")) == "diverged"
    assert not (cell_dir(out, "conv-d2-s0-none") / runs.LAST).exists()  # stopped inside epoch 0: no checkpoint
    assert len(runs.load_run(cell_dir(out, "conv-d2-s0-none")).steps) == 2  # the steps up to the divergence
    before = _files(out / "runs")
    again = run_sweep(grid, base, out)
    assert [r["status"] for r in again] == ["skipped", "skipped"]  # done: not retried
    assert again[1]["diverged"] == diverged and _files(out / "runs") == before


def _kill_worker_when_started(run_dir: Path, name: str, killed: list) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not killed:
        if (run_dir / runs.SUMMARY).exists():
            for process in multiprocessing.active_children():
                if process.name == f"gradlab-cell-{name}":
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)
        time.sleep(0.01)


def test_a_dead_worker_process_fails_only_its_cell_and_epochs_may_grow(tmp_path):
    out = tmp_path / "sweep"
    grid = SweepGrid(blocks=("conv", "skip"), depths=(1,))
    killed = []
    killer = threading.Thread(target=_kill_worker_when_started,
                              args=(cell_dir(out, "conv-d1-s0"), "conv-d1-s0", killed))
    killer.start()
    try:
        results = run_sweep(grid, BASE, out, jobs=2, record=RecordConfig(every=0))
    finally:
        killed.append(None)  # stops the killer if the sweep raised
        killer.join()
    assert [r["status"] for r in results] == ["failed", "complete"]
    assert results[0]["error"].startswith("worker process killed by SIGKILL")
    assert runs.read_json(cell_dir(out, "conv-d1-s0") / runs.SUMMARY)["error"] == results[0]["error"]

    results = run_sweep(grid, replace(BASE, epochs=2), out, jobs=2, record=RecordConfig(every=0))  # epochs may grow
    assert [r["status"] for r in results] == ["complete", "complete"]
    for result in results:
        run = runs.load_run(result["run_dir"])
        assert run.summary["status"] == "complete" and list(run.history["epoch"]) == [0, 1]
    assert runs.load_run(results[1]["run_dir"]).summary["resumed_from_epoch"] == 1
    assert runs.read_json(out / SWEEP)["base"]["epochs"] == 2


# ---------------------------------------------------------------------------------------
# Ray


@pytest.mark.ray
def test_a_ray_sweep_lands_exactly_like_a_local_one(tmp_path, local_sweep):
    if os.environ.get("CI") == "true":
        import ray  # the dev extra installs ray: CI must run this test, not skip it
    else:
        ray = pytest.importorskip("ray")
    local, _, _ = local_sweep
    results = run_sweep(GRID, BASE, tmp_path / "sweep", executor="ray", jobs=2)
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert [r["status"] for r in results] == ["complete", "complete"]
    for result in results:
        ours, theirs = Path(result["run_dir"]), cell_dir(local, result["name"])
        assert _files(ours).keys() == _files(theirs).keys()
        # The same thread count (CPUs // 2) in both executors, so the same numbers.
        pd.testing.assert_frame_equal(_history(ours), _history(theirs))
        pd.testing.assert_frame_equal(runs.load_run(ours).steps, runs.load_run(theirs).steps)
        pd.testing.assert_frame_equal(runs.load_run(ours).records(), runs.load_run(theirs).records())
        assert result["test_acc"] == runs.load_run(theirs).summary["test_acc"]
