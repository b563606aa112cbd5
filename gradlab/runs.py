"""The run directory: the interface between the torch side and the report side.

A run directory holds

    config.json        every option, versions, device, dataset (and whether it is synthetic)
    summary.json       status running|complete|failed, accuracies, parameter count, wall time
    history.parquet    one row per epoch: losses, accuracies, timings
    steps.parquet      one row per optimizer step: the training loss (the notebook's loss curve)
    records.parquet/   the recorder's long-format rows, one Parquet part per flush
    last.pt, best.pt   checkpoints (written and read by gradlab.train; torch lives there, not here)

Every file is written atomically (temporary file, fsync, rename), so a crash leaves either the
old or the new version. ``records.parquet`` is a directory of parts named by their step range:
a crash loses at most the unflushed chunk, and everything written stays readable by
``pandas.read_parquet``. This module never imports torch.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

CONFIG, SUMMARY, HISTORY, STEPS, RECORDS = "config.json", "summary.json", "history.parquet", "steps.parquet", "records.parquet"
LAST, BEST = "last.pt", "best.pt"
RECORD_COLUMNS = ("step", "epoch", "layer", "position", "block", "metric", "value")


class RunError(ValueError):
    """A run directory that cannot be read or written: the message names the file and what to do."""


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through ``write(fileobj)`` to a temporary file beside ``path``, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True), binary=False)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a gradlab run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc}); the file is corrupt — rerun with --restart") from None


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    atomic_write(path, lambda f: pq.write_table(table, f))


def read_parquet(path: Path, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, columns=columns, filters=filters)
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a gradlab run directory?") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise RunError(f"{path}: cannot be read as Parquet ({exc}); the file is corrupt — rerun with --restart") from None


class RecordsWriter:
    """A recorder sink: each flush becomes one Parquet part in ``records.parquet/``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.folder = Path(run_dir) / RECORDS
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, columns: dict[str, np.ndarray]) -> None:
        steps = columns["step"]
        if len(steps) == 0:
            return
        table = pa.table({name: columns[name] for name in RECORD_COLUMNS})
        name = f"part-{int(steps.min()):010d}-{int(steps.max()):010d}.parquet"
        atomic_write(self.folder / name, lambda f: pq.write_table(table, f))

    def truncate(self, step: int) -> int:
        """Drop parts holding steps >= ``step`` (written after the checkpoint we resume from)."""
        dropped = 0
        for part in self.folder.glob("part-*.parquet"):
            first = int(part.name.split("-")[1])
            if first >= step:
                part.unlink()
                dropped += 1
        for tmp in self.folder.glob(".part-*.tmp"):
            tmp.unlink()
        return dropped


@dataclass
class Run:
    """A run directory loaded for analysis: plain dicts and pandas frames."""

    path: Path
    config: dict
    summary: dict
    history: pd.DataFrame
    steps: pd.DataFrame = field(repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train(self) -> dict:
        return self.config.get("train", {})

    def records(self, metrics: list[str] | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        """The recorder's rows, optionally only some metrics and columns (read column-wise)."""
        folder = self.path / RECORDS
        if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
            return pd.DataFrame({c: pd.Series(dtype=_RECORD_DTYPES[c]) for c in (columns or RECORD_COLUMNS)})
        filters = [("metric", "in", list(metrics))] if metrics else None
        return read_parquet(folder, columns=columns, filters=filters)


_RECORD_DTYPES = {"step": "int64", "epoch": "int64", "layer": "object", "position": "int64",
                  "block": "object", "metric": "object", "value": "float64"}


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory written by ``gradlab train`` (the only reader the reports use)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    config = read_json(path / CONFIG)
    summary = read_json(path / SUMMARY) if (path / SUMMARY).exists() else {"status": "running"}
    history = read_parquet(path / HISTORY) if (path / HISTORY).exists() else pd.DataFrame()
    steps = read_parquet(path / STEPS) if (path / STEPS).exists() else pd.DataFrame(columns=["step", "epoch", "loss"])
    return Run(path=path, config=config, summary=summary, history=history, steps=steps)


SWEEP = "sweep.json"
RUNS_FOLDER = "runs"
RUN_COLUMNS = ["run", "arch", "depth", "width", "norm", "seed", "status", "epochs", "epochs_done",
               "final_train_acc", "best_val_acc", "test_acc", "n_params", "wall_seconds", "dataset",
               "synthetic", "error"]


def _run_row(run: Run) -> dict:
    train, summary = run.train, run.summary
    return {"run": run.name, "arch": train.get("block"), "depth": train.get("depth"), "width": train.get("width"),
            "norm": train.get("norm"), "seed": train.get("seed"), "status": summary.get("status", "running"),
            "epochs": train.get("epochs"), "epochs_done": summary.get("epochs_done", 0),
            "final_train_acc": summary.get("final_train_acc", np.nan), "best_val_acc": summary.get("best_val_acc", np.nan),
            "test_acc": summary.get("test_acc", np.nan), "n_params": summary.get("n_params"),
            "wall_seconds": summary.get("wall_seconds", np.nan), "dataset": run.config.get("dataset"),
            "synthetic": run.config.get("synthetic"), "error": summary.get("error")}


@dataclass
class Sweep:
    """Several runs read together: a sweep directory, or a single run as a sweep of one."""

    path: Path
    config: dict  # sweep.json, or {} for a single run
    runs: list[Run]
    unreadable: dict[str, str]  # cell name -> why it could not be read

    def table(self) -> pd.DataFrame:
        """One row per readable run: its options, status and accuracies."""
        return pd.DataFrame([_run_row(r) for r in self.runs], columns=RUN_COLUMNS)

    def records(self, metrics: list[str] | None = None) -> pd.DataFrame:
        """Every run's records with the run's identity (run, arch, depth, norm, seed) in front."""
        frames = []
        for run in self.runs:
            frame = run.records(metrics=metrics)
            if frame.empty:
                continue
            train = run.train
            frames.append(frame.assign(run=run.name, arch=train["block"], depth=train["depth"],
                                       norm=train["norm"], seed=train["seed"]))
        if not frames:
            return pd.DataFrame(columns=["run", "arch", "depth", "norm", "seed", *RECORD_COLUMNS])
        combined = pd.concat(frames, ignore_index=True)
        return combined[["run", "arch", "depth", "norm", "seed", *RECORD_COLUMNS]]


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep directory (or one run directory). A corrupt cell is named, not fatal."""
    path = Path(path)
    if is_run_dir(path):
        return Sweep(path=path, config={}, runs=[load_run(path)], unreadable={})
    if not (path / SWEEP).is_file():
        raise RunError(f"{path}: neither a run directory (no {CONFIG}) nor a sweep directory (no {SWEEP})")
    config = read_json(path / SWEEP)
    runs, unreadable = [], {}
    for name in config.get("cells", []):
        cell = path / RUNS_FOLDER / name
        if not is_run_dir(cell):
            continue  # not started yet
        try:
            runs.append(load_run(cell))
        except RunError as exc:
            unreadable[name] = str(exc)
    return Sweep(path=path, config=config, runs=runs, unreadable=unreadable)
