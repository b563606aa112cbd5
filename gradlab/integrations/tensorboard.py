"""gradlab's records as TensorBoard scalars, written with TensorBoard's own event writer.

Two ways in, one set of scalars:

- ``TensorBoardSink``: beside ``records.parquet`` while a run trains (``gradlab train
  --tensorboard DIR``). The recorder hands it each flush's rows, already on the host, so it
  adds no host sync; the trainer hands it each epoch's losses and accuracies.
- ``export``: from stored runs (``gradlab export RUN_OR_SWEEP --tensorboard DIR``), one
  TensorBoard run per gradlab run, so a whole sweep can be browsed and compared.

The step axis is the optimizer step (0-based, as in the records). The tags:

``{metric}/{position}_{layer}``
    every recorded metric of every probe point, the position zero-padded first
    (``grad_out_norm/03_layers.0``) so that TensorBoard's name order is the forward order
``{metric}/model``
    the whole model's rows (``loss/model``, ``grad_norm/model``, ...) on recorded steps
``gradlab/loss``
    the training loss of every step
``gradlab/train_loss``, ``gradlab/train_acc``, ``gradlab/val_acc``
    per epoch, at the epoch's last step
``gradlab/first_to_last``
    per recorded step: ``grad_out_norm`` at the stack's first block over its last
    (``analysis.first_to_last_by_step``, the report's headline ratio one step at a time)
``gradlab/test_acc``
    (export) the finished run's test accuracy, at its last step

Values are TensorBoard's scalars: float32. Torch-free; the ``tensorboard`` package is an extra
(``pip install 'gradlab[tensorboard]'``), and without it ``require`` says so.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from gradlab import analysis, runs, schema

INSTALL = "pip install 'gradlab[tensorboard]'"
HEADLINE = "gradlab"  # the tag prefix of the run's headline scalars
EPOCH_METRICS = ("train_loss", "train_acc", "val_acc")  # history columns written per epoch
TEST_ACC = f"{HEADLINE}/test_acc"
LIVE_SUFFIX = ".gradlab"  # event files written while training
EXPORT_SUFFIX = ".gradlab-export"  # event files written by export; a new export replaces them


def require() -> None:
    """ImportError with the install command when the ``tensorboard`` package is missing."""
    try:
        import tensorboard.summary.writer.event_file_writer  # noqa: F401
    except ImportError:
        raise ImportError(f"TensorBoard output needs the tensorboard package: {INSTALL}") from None


def position_width(positions: Iterable[int]) -> int:
    """Digits of the zero-padded position in tags: enough for the largest, at least 2."""
    top = max((int(p) for p in positions), default=0)
    return max(2, len(str(top)))


def tags(metric: np.ndarray, layer: np.ndarray, position: np.ndarray, width: int) -> np.ndarray:
    """The tag of each record row: ``metric/position_layer``, or ``metric/model`` on model rows."""
    position = np.asarray(position, dtype=np.int64)
    model = position < 0
    out = np.empty(len(metric), dtype=object)
    out[model] = [f"{m}/{schema.MODEL_LAYER}" for m in np.asarray(metric)[model]]
    out[~model] = [f"{m}/{p:0{width}d}_{name}" for m, p, name in
                   zip(np.asarray(metric)[~model], position[~model], np.asarray(layer)[~model])]
    return out


class ScalarWriter:
    """One TensorBoard run (a folder of event files): scalars grouped into one event per step."""

    def __init__(self, logdir: str | os.PathLike, suffix: str = LIVE_SUFFIX) -> None:
        require()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = Path(logdir)
        self._writer = EventFileWriter(str(self.logdir), filename_suffix=suffix)

    def _event(self, step: int, wall_time: float | None = None, **fields):
        from tensorboard.compat.proto import event_pb2

        return event_pb2.Event(step=int(step), wall_time=time.time() if wall_time is None else wall_time, **fields)

    def scalars(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        """Write ``values`` (tag -> number) at ``step``."""
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                                             for tag, v in values.items()])
        self._writer.add_event(self._event(step, wall_time, summary=summary))

    def rows(self, steps: np.ndarray, row_tags: np.ndarray, values: np.ndarray, wall_time: float | None = None) -> None:
        """Write long-format rows (step, tag, value), one event per step."""
        steps = np.asarray(steps)
        if len(steps) == 0:
            return
        order = np.argsort(steps, kind="stable")
        steps, row_tags, values = steps[order], np.asarray(row_tags)[order], np.asarray(values, dtype=np.float64)[order]
        starts = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
        for start, end in zip(starts, np.r_[starts[1:], len(steps)]):
            self.scalars(steps[start], dict(zip(row_tags[start:end], values[start:end])), wall_time)

    def restart_at(self, step: int) -> None:
        """A resumed run redoes the steps from ``step``: TensorBoard discards what this run wrote
        there before (a ``SessionLog.START`` event, as a restarted TensorFlow job writes)."""
        from tensorboard.compat.proto import event_pb2

        self._writer.add_event(self._event(step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _record_rows(records: pd.DataFrame | Mapping[str, np.ndarray], width: int | None = None):
    """(steps, tags, values) of the record rows and of the per-step headline ratio."""
    frame = records if isinstance(records, pd.DataFrame) else pd.DataFrame(dict(records))
    width = position_width(frame["position"]) if width is None else width
    row_tags = tags(frame["metric"].to_numpy(), frame["layer"].to_numpy(), frame["position"].to_numpy(), width)
    ratio = analysis.first_to_last_by_step(frame)
    steps = np.r_[frame["step"].to_numpy(np.int64), ratio["step"].to_numpy(np.int64)]
    all_tags = np.r_[row_tags, np.full(len(ratio), schema.HEADLINE_RATIO, dtype=object)]
    values = np.r_[frame["value"].to_numpy(np.float64), ratio["first_to_last"].to_numpy(np.float64)]
    return steps, all_tags, values


def epoch_scalars(history: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, tags, values) of the per-epoch metrics, each at its epoch's last step."""
    if history.empty or "step" not in history:
        return np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0)
    present = [name for name in EPOCH_METRICS if name in history]
    long = history.melt(id_vars=["step"], value_vars=present, var_name="metric").dropna(subset=["value"])
    return (long["step"].to_numpy(np.int64) - 1, (HEADLINE + "/" + long["metric"]).to_numpy(object),
            long["value"].to_numpy(np.float64))


def step_losses(first_step: int, losses: Iterable[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, tags, values) of the per-step training loss from ``first_step`` on."""
    values = np.asarray(list(losses), dtype=np.float64)
    return (np.arange(first_step, first_step + len(values), dtype=np.int64),
            np.full(len(values), f"{HEADLINE}/loss", dtype=object), values)


class TensorBoardSink:
    """A recorder sink that writes each flush as TensorBoard scalars, and the trainer's epochs.

    ``logdir`` is one TensorBoard run. ``start_step``: where a resumed run starts again (what
    was written from there on before is discarded by TensorBoard). Call ``close`` at the end.
    """

    def __init__(self, logdir: str | os.PathLike, start_step: int = 0) -> None:
        self.writer = ScalarWriter(logdir, suffix=LIVE_SUFFIX)
        self._width: int | None = None  # fixed by the first flush, so every flush tags alike
        if start_step > 0:
            self.writer.restart_at(start_step)

    def __call__(self, columns: Mapping[str, np.ndarray]) -> None:
        if len(columns["step"]) == 0:
            return
        if self._width is None:
            self._width = position_width(columns["position"])
        self.writer.rows(*_record_rows(columns, self._width))

    def epoch(self, metrics: Mapping[str, float], losses: Iterable[float], first_step: int) -> None:
        """One finished epoch: its metrics (``EPOCH_METRICS`` and ``step``, the steps done) and
        the loss of each of its steps, the first being ``first_step``."""
        self.writer.rows(*step_losses(first_step, losses))
        self.writer.rows(*epoch_scalars(pd.DataFrame([dict(metrics)])))
        self.writer.flush()

    def finished(self, last_step: int, test_acc: float) -> None:
        """The finished run's test accuracy, at its last step."""
        self.writer.scalars(last_step, {TEST_ACC: test_acc})

    def close(self) -> None:
        self.writer.close()


class Exported(NamedTuple):
    scalars: int  # values written
    steps: int  # steps on the axis (the last step + 1): TensorBoard shows 1,000 per tag unless told more


def write_run(run: runs.Run, logdir: str | os.PathLike) -> Exported:
    """Write one stored run as a TensorBoard run in ``logdir``, replacing an earlier export there."""
    logdir = Path(logdir)
    for old in logdir.glob(f"events.out.tfevents.*{EXPORT_SUFFIX}") if logdir.is_dir() else ():
        old.unlink()
    records = run.records()
    wall_time = time.time()
    parts = [_record_rows(records)] if len(records) else []
    if len(run.steps):
        parts.append(step_losses(0, run.steps.sort_values("step")["loss"]))
    parts.append(epoch_scalars(run.history))
    test_acc, steps_done = run.summary.get("test_acc"), run.summary.get("steps_done")
    if test_acc is not None and steps_done:
        parts.append((np.array([steps_done - 1]), np.array([TEST_ACC], dtype=object),
                      np.array([test_acc], dtype=np.float64)))
    steps, row_tags, values = (np.concatenate(column) for column in zip(*parts))
    writer = ScalarWriter(logdir, suffix=EXPORT_SUFFIX)
    try:
        writer.rows(steps, row_tags, values, wall_time=wall_time)
    finally:
        writer.close()
    return Exported(len(values), int(steps.max()) + 1 if len(steps) else 0)


def export(path: str | os.PathLike, logdir: str | os.PathLike) -> dict[str, Exported]:
    """Export a run or a sweep directory to ``logdir``, one TensorBoard run per gradlab run
    (``logdir/<run name>``); returns what was written per run. A sweep's unreadable cells
    are skipped (``runs.load_sweep`` names them)."""
    require()
    sweep = runs.load_sweep(path)
    if not sweep.runs:
        raise runs.RunError(f"{path}: holds no readable run to export")
    return {run.name: write_run(run, Path(logdir) / run.name) for run in sweep.runs}
