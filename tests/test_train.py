"""The trainer: determinism, exact resume, checkpoints, run directory."""
import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

import gradlab
from gradlab import runs
from gradlab.recorder import RecordConfig
from gradlab.train import Callback, RunFinished, load_checkpoint, train_run as train

TIMING = ["train_seconds", "images_per_s"]


class Interrupt(Exception):
    pass


class StopAt(Callback):
    """Simulates a crash at the start of one epoch (after the previous epoch's checkpoint)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise Interrupt


def _weights(run_dir, name="last.pt"):
    return load_checkpoint(run_dir / name)["model"]


def _history(run_dir):
    return pd.read_parquet(run_dir / runs.HISTORY).drop(columns=TIMING)


def test_two_runs_with_the_same_seed_are_identical(tmp_path, small_config, small_splits):
    a = train(small_config, tmp_path / "a", splits=small_splits)
    b = train(small_config, tmp_path / "b", splits=small_splits)
    pd.testing.assert_frame_equal(_history(tmp_path / "a"), _history(tmp_path / "b"))
    assert a["test_acc"] == b["test_acc"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(replace(small_config, seed=1), tmp_path / "c", splits=small_splits)
    assert not torch.equal(_weights(tmp_path / "c")["conv1.weight"], wa["conv1.weight"])


@pytest.mark.parametrize("crash_epoch", [1, 2])
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, small_config, small_splits, crash_epoch):
    whole = train(small_config, tmp_path / "whole", splits=small_splits)
    with pytest.raises(Interrupt):
        train(small_config, tmp_path / "split", splits=small_splits, callbacks=[StopAt(crash_epoch)])
    assert runs.load_run(tmp_path / "split").summary["status"] == "failed"
    resumed = train(small_config, tmp_path / "split", splits=small_splits)
    assert resumed["resumed_from_epoch"] == crash_epoch
    for name in ("last.pt", "best.pt"):
        w1, w2 = _weights(tmp_path / "whole", name), _weights(tmp_path / "split", name)
        assert all(torch.equal(w1[k], w2[k]) for k in w1), name
    pd.testing.assert_frame_equal(_history(tmp_path / "whole"), _history(tmp_path / "split"))
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "whole" / runs.STEPS), pd.read_parquet(tmp_path / "split" / runs.STEPS))
    for key in ("test_acc_best", "test_acc_last", "best_val_acc", "best_epoch", "steps_done"):
        assert resumed[key] == whole[key], key
    # Records: every recorded step exactly once, the same values as the uninterrupted run.
    rec_whole = runs.load_run(tmp_path / "whole").records().sort_values(["step", "position", "metric"], ignore_index=True)
    rec_split = runs.load_run(tmp_path / "split").records().sort_values(["step", "position", "metric"], ignore_index=True)
    pd.testing.assert_frame_equal(rec_whole, rec_split)


def test_run_directory_contents(tmp_path, small_config, small_splits):
    summary = train(small_config, tmp_path / "run", splits=small_splits)
    run = gradlab.load_run(tmp_path / "run")
    assert run.summary == summary and summary["status"] == "complete"
    assert run.config["train"]["block"] == "res" and run.config["synthetic"] is True
    assert run.config["versions"]["torch"] == torch.__version__
    assert summary["n_params"] == sum(p.numel() for p in gradlab.build_model("res", 2, 8).parameters())
    assert list(run.history["epoch"]) == [0, 1, 2]
    steps_per_epoch = 400 // 64 + 1
    assert len(run.steps) == 3 * steps_per_epoch and run.history["step"].iloc[-1] == 3 * steps_per_epoch
    assert run.history["train_loss"].tolist() == pytest.approx(run.steps.groupby("epoch")["loss"].mean().tolist())
    best_epoch = int(run.history["val_acc"].idxmax())
    assert summary["best_epoch"] == best_epoch and summary["best_val_acc"] == run.history["val_acc"].max()
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == best_epoch + 1  # epochs completed when it was written
    assert 0 <= summary["test_acc_best"] <= 1 and summary["wall_seconds"] > 0
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*.tmp"))


def test_a_finished_run_is_reported_not_retrained(tmp_path, small_config, small_splits):
    train(small_config, tmp_path / "run", splits=small_splits)
    mtime = (tmp_path / "run" / "last.pt").stat().st_mtime_ns
    with pytest.raises(RunFinished, match="already complete"):
        train(small_config, tmp_path / "run", splits=small_splits)
    assert (tmp_path / "run" / "last.pt").stat().st_mtime_ns == mtime
    longer = train(replace(small_config, epochs=4), tmp_path / "run", splits=small_splits)
    assert longer["epochs_done"] == 4 and longer["resumed_from_epoch"] == 3


def test_restart_trains_from_scratch(tmp_path, small_config, small_splits):
    first = train(small_config, tmp_path / "run", splits=small_splits)
    again = train(small_config, tmp_path / "run", splits=small_splits, restart=True)
    assert again["resumed_from_epoch"] is None and again["test_acc"] == first["test_acc"]


def test_resuming_with_other_options_is_refused(tmp_path, small_config, small_splits):
    train(replace(small_config, epochs=1), tmp_path / "run", splits=small_splits)
    with pytest.raises(runs.RunError, match=r"other options \(depth: stored 2, given 3; lr"):
        train(replace(small_config, depth=3, lr=1e-3), tmp_path / "run", splits=small_splits)


def test_out_that_is_a_file_is_refused(tmp_path, small_config, small_splits):
    (tmp_path / "file").write_text("x")
    with pytest.raises(runs.RunError, match="is a file"):
        train(small_config, tmp_path / "file", splits=small_splits)


def test_checkpoints_load_without_code_execution(tmp_path, small_config, small_splits):
    train(replace(small_config, epochs=1), tmp_path / "run", splits=small_splits, record=RecordConfig(every=0))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "epoch", "step", "rng", "best_val_acc", "history"}
    assert not (tmp_path / "run" / runs.RECORDS).exists()


def test_summary_and_config_are_plain_json(tmp_path, small_config, small_splits):
    train(replace(small_config, epochs=1), tmp_path / "run", splits=small_splits)
    for name in (runs.CONFIG, runs.SUMMARY):
        json.loads((tmp_path / "run" / name).read_text())


def test_tables_lost_after_the_last_checkpoint_are_rewritten_on_resume(tmp_path, small_config, small_splits):
    """As if killed after the last epoch's last.pt, before its tables and the final summary."""
    whole = train(small_config, tmp_path / "whole", splits=small_splits)
    run_dir = tmp_path / "run"
    train(small_config, run_dir, splits=small_splits)
    runs.write_parquet(run_dir / runs.HISTORY, pd.read_parquet(run_dir / runs.HISTORY).iloc[:-1])
    steps = pd.read_parquet(run_dir / runs.STEPS)
    runs.write_parquet(run_dir / runs.STEPS, steps[steps["epoch"] < 2])
    summary = runs.read_json(run_dir / runs.SUMMARY)
    runs.write_json(run_dir / runs.SUMMARY, {**summary, "status": "running"})
    (run_dir / ".last.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # an atomic write that a kill cut short
    resumed = train(small_config, run_dir, splits=small_splits)
    assert resumed["status"] == "complete" and resumed["test_acc"] == whole["test_acc"]
    pd.testing.assert_frame_equal(_history(run_dir), _history(tmp_path / "whole"))
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / runs.STEPS), pd.read_parquet(tmp_path / "whole" / runs.STEPS))
    assert not list(run_dir.glob(".*.tmp"))


def test_each_checkpoint_keeps_the_time_spent_so_far_so_a_killed_run_resumes_it(tmp_path, small_config, small_splits):
    """summary.json's wall_seconds is written with every checkpoint: a kill after it loses only the
    time since, and the resumed run adds its own time to what the checkpoint kept."""
    import time

    run_dir, seen = tmp_path / "run", []

    class Kill(Callback):
        def on_epoch_start(self, trainer, epoch) -> None:
            if epoch == 1:  # after the first checkpoint: what a SIGKILL here would leave on disk
                seen.append((runs.read_json(run_dir / runs.SUMMARY)["wall_seconds"], time.perf_counter() - began))
                raise KeyboardInterrupt

    began = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        train(small_config, run_dir, splits=small_splits, callbacks=[Kill()])
    kept, elapsed = seen[0]
    assert 0 < kept <= elapsed
    runs.write_json(run_dir / runs.SUMMARY, {**runs.read_json(run_dir / runs.SUMMARY), "wall_seconds": kept})
    began = time.perf_counter()
    resumed = train(small_config, run_dir, splits=small_splits)
    assert resumed["resumed_from_epoch"] == 1
    assert kept < resumed["wall_seconds"] <= kept + time.perf_counter() - began


def test_subset_applies_to_splits_given_by_the_caller(tmp_path, small_config, small_splits):
    """subset=N trains on the first N training images of the caller's splits too, as make_splits does."""
    config = replace(small_config, subset=100, epochs=1)
    summary = train(config, tmp_path / "run", splits=small_splits)
    assert runs.read_json(tmp_path / "run" / runs.CONFIG)["train_images"] == 100 < len(small_splits.train[1])
    assert summary["steps_done"] == -(-100 // config.batch_size)  # ceil: the last batch is partial
    assert len(small_splits.train[1]) == 400  # the caller's splits are left as they were


def test_a_restart_killed_midway_is_finished_by_the_same_command(tmp_path, small_config, small_splits):
    """--restart deletes config.json last: a kill while clearing leaves a run directory it clears again."""
    run_dir = tmp_path / "run"
    first = train(small_config, run_dir, splits=small_splits)
    for name in (runs.SUMMARY, runs.HISTORY, runs.LAST):  # the first files a restart deletes
        (run_dir / name).unlink()
    again = train(small_config, run_dir, splits=small_splits, restart=True)
    assert again["resumed_from_epoch"] is None and again["test_acc"] == first["test_acc"]
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == again["best_epoch"] + 1
