"""The run directory: the interface between the torch side and the report side.

A run directory holds

    config.json        every option, versions, device, dataset (and whether it is synthetic)
    summary.json       status running|complete|diverged|failed, accuracies, parameter count, wall
                       time; a diverged run's "diverged": {step, epoch, layer, position, cause}
    history.parquet    one row per epoch: losses, accuracies, timings
    steps.parquet      one row per optimizer step: the training loss (the notebook's loss curve)
    records.parquet/   the recorder's long-format rows, one Parquet part per flush (page checksums),
                       columns ``schema.RECORD_COLUMNS``; parts in the legacy format of gradlab <= 0.3
                       (``schema.LEGACY_RECORD_COLUMNS``) are upgraded when read (``upgrade_records``)
    last.pt, best.pt   checkpoints with a content digest (written and read by gradlab.train; torch
                       lives there, not here)
    gradlab.lock       while a process writes the run: its pid and host (gradlab.lock)

Every file is written atomically (temporary file, fsync, rename), so a crash leaves either the
old or the new version. ``records.parquet`` is a directory of parts named by their step range:
a crash loses at most the unflushed chunk, and everything written stays readable by
``pandas.read_parquet``. A file that cannot be read raises ``RunError`` naming the file and
what to do. This module never imports torch.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from gradlab import schema
from gradlab.schema import (DEFAULT_MODEL, LEGACY_RECORD_COLUMNS, POOL_IMAGES, RECORD_COLUMNS, RECORD_DTYPES,
                            RUN_KEYS, UNKNOWN)

CONFIG, SUMMARY, HISTORY, STEPS, RECORDS = "config.json", "summary.json", "history.parquet", "steps.parquet", "records.parquet"
LAST, BEST = "last.pt", "best.pt"
# What to do about a corrupt or foreign file in a run directory.
RESTART_HINT = "to train the run again, rerun with --restart (a sweep cell: delete its folder and rerun the sweep)"


class RunError(ValueError):
    """A run directory that cannot be read or written: the message names the file and what to do."""


# --- the fault-injection hook of tests/test_faults.py --------------------------------------------

FAULT_PAUSE = "GRADLAB_FAULT_PAUSE"  # "POINT:N": the N-th arrival of this process at POINT pauses
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named moment (``step``, ``evaluate``, ``write:<file>``) where a test may kill gradlab.

    Returns at once unless the environment sets GRADLAB_FAULT_PAUSE=POINT:N; then the N-th
    arrival at POINT writes ``gradlab-fault: POINT:N`` to stderr and sleeps, so that the test's
    SIGKILL lands exactly there (inside a checkpoint write, a records flush, an evaluation...).
    """
    spec = os.environ.get(FAULT_PAUSE)
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if str(_fault_counts[name]) == nth:
        print(f"gradlab-fault: {spec}", file=sys.stderr, flush=True)
        time.sleep(600)


def _fault_name(path: Path) -> str:
    return "write:records" if path.parent.name == RECORDS else f"write:{path.name}"


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write through ``write(fileobj)`` to a temporary file beside ``path``, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        fault_point(_fault_name(path))  # written, not yet renamed: the old version is still in place
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


def read_json(path: Path, fix: str = RESTART_HINT) -> Any:
    """The JSON object stored at ``path``; RunError naming the file and ``fix`` when it is not one."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a gradlab run directory?") from None
    except IsADirectoryError:
        raise RunError(f"{path}: is a folder, not a file; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc}); the file is corrupt: {fix}") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: holds a JSON {type(obj).__name__}, not an object; the file is corrupt: {fix}")
    return obj


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    atomic_write(path, lambda f: pq.write_table(table, f))


def read_parquet(path: Path, columns: list[str] | None = None, filters=None) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, columns=columns, filters=filters)
    except FileNotFoundError:
        raise RunError(f"{path}: missing; is this a gradlab run directory?") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise RunError(f"{path}: cannot be read as Parquet ({reason}); the file is corrupt: {RESTART_HINT}") from None


class RecordsWriter:
    """A recorder sink: each flush becomes one Parquet part in ``records.parquet/``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.folder = Path(run_dir) / RECORDS
        if self.folder.exists() and not self.folder.is_dir():
            raise RunError(f"{self.folder}: is a file, not a folder of parts; the run directory is "
                           f"damaged: {RESTART_HINT}")
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, columns: dict[str, np.ndarray]) -> None:
        steps = columns["step"]
        if len(steps) == 0:
            return
        if is_legacy(columns):  # the legacy layout: upgraded as on load, so every new part is current
            legacy = pd.DataFrame({name: columns[name] for name in LEGACY_RECORD_COLUMNS})
            columns = {name: values.to_numpy() for name, values in upgrade_records(legacy).items()}
        table = pa.table({name: columns[name] for name in RECORD_COLUMNS})
        name = f"part-{int(steps.min()):010d}-{int(steps.max()):010d}.parquet"
        # Page checksums: a resume's check_records tells a garbled part from a good one.
        atomic_write(self.folder / name, lambda f: pq.write_table(table, f, write_page_checksum=True))

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


def check_records(run_dir: str | os.PathLike, before_step: int) -> int:
    """Read every records part that a resume keeps (those starting before ``before_step``) in full.

    Returns the number of rows; RunError naming the first part that is truncated, garbled or
    holds other steps than its name says. Reads nothing when the run has no records.
    """
    folder = Path(run_dir) / RECORDS
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{folder}: is a file, not a folder of parts; the run directory is damaged: {RESTART_HINT}")
    rows = 0
    for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else ():
        try:
            first, last = (int(n) for n in part.stem.split("-")[1:3])
        except ValueError:
            raise RunError(f"{part}: not a records part written by gradlab; {RESTART_HINT}") from None
        if first >= before_step:
            continue  # written after the checkpoint: a resume drops it
        try:
            steps = pq.read_table(part, page_checksum_verification=True).column("step")
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            reason = (str(exc).splitlines() or [""])[0]
            raise RunError(f"{part}: cannot be read as Parquet ({reason}); the records are corrupt: {RESTART_HINT}") from None
        bounds = pc.min_max(steps).as_py()
        if len(steps) and (bounds["min"], bounds["max"]) != (first, last):
            raise RunError(f"{part}: holds steps other than its name says; the records are corrupt: {RESTART_HINT}")
        rows += len(steps)
    return rows


def remove_temporary(run_dir: str | os.PathLike) -> int:
    """Delete the temporary files of atomic writes that a killed process left behind."""
    found = [*Path(run_dir).glob(".*.tmp"), *Path(run_dir, RECORDS).glob(".*.tmp")]
    for tmp in found:
        tmp.unlink(missing_ok=True)
    return len(found)


# --- the legacy record format (gradlab <= 0.3) ----------------------------------------------------
# The one place that reads meaning into layer names. Records then carried a block kind instead of
# role, stack_index and module_type, and the only model was the DeepCNN, whose block stack is
# ``layers.0 .. layers.{N-1}`` (stem conv1..conv3, head linear1, the per-step rows ``model``).
LEGACY_MODULE_TYPES = {"conv": "ConvBlock", "res": "ResBlock", "resdown": "ResDownBlock", "skip": "SkipBlock",
                       "stem": "Conv2d", "head": "Linear", "model": "DeepCNN"}  # block kind -> module_type
LEGACY_STACK_LAYER = r"^layers\.(\d+)$"  # the DeepCNN's stack: stack_index is the number
LEGACY_ROLES = ("stem", "head", schema.MODEL_LAYER)  # kinds that are roles; every other kind is a stack block


def is_legacy(columns) -> bool:
    """Whether records with these column names are in the legacy format (a block kind, no role)."""
    return "block" in columns and "role" not in columns


def upgrade_records(frame: pd.DataFrame) -> pd.DataFrame:
    """Records in the legacy format as records of ``schema.RECORD_COLUMNS`` (other frames unchanged).

    The ``model`` rows get role ``model``; block kinds ``stem`` and ``head`` become those roles;
    a block kind (conv, res, resdown, skip) becomes role ``stack`` with stack_index N from its
    layer ``layers.N``; module_type comes from ``LEGACY_MODULE_TYPES``. Columns other than the
    record columns are kept after them. ValueError for a kind or a stack layer name that gradlab
    never wrote.
    """
    if not is_legacy(frame.columns):
        return frame
    kind = frame["block"].astype(str)
    unknown = sorted(set(kind) - set(LEGACY_MODULE_TYPES))
    if unknown:
        raise ValueError(f"legacy records with unknown block kind(s) {unknown}; known: {sorted(LEGACY_MODULE_TYPES)}")
    model = (frame["layer"].astype(str) == schema.MODEL_LAYER) | (kind == schema.MODEL_LAYER)
    kind = kind.mask(model, schema.MODEL_LAYER)
    stack = ~kind.isin(LEGACY_ROLES)
    index = pd.to_numeric(frame["layer"].astype(str).str.extract(LEGACY_STACK_LAYER, expand=False), errors="coerce")
    if (stack & index.isna()).any():
        odd = sorted(set(frame.loc[stack & index.isna(), "layer"].astype(str)))[:5]
        raise ValueError(f"legacy records with stack blocks named {odd}; the DeepCNN's are layers.N")
    upgraded = frame.drop(columns="block").assign(
        role=kind.where(~stack, "stack").astype(object),
        stack_index=index.where(stack, schema.NOT_IN_STACK).astype("int64"),
        module_type=kind.map(LEGACY_MODULE_TYPES).astype(object),
    )
    present = [c for c in RECORD_COLUMNS if c in upgraded.columns]
    return upgraded[[*present, *(c for c in upgraded.columns if c not in present)]]


# The activation statistics whose non-finite value means the forward pass broke at a probe point.


def locate_nonfinite(records: pd.DataFrame) -> dict | None:
    """Where one step's records first show a non-finite value at a probe point: {layer, position,
    cause}, or None when they do not tell (the loss alone is no probe point).

    ``schema.first_nonfinite`` over the probe rows (position >= 0): the first probe point in
    forward order whose activation is non-finite (cause ``activation``); else the highest
    position with a non-finite gradient, the first one the backward pass reaches (``gradient``).
    """
    probes = records.loc[pd.to_numeric(records["position"], errors="coerce") >= 0]
    found = schema.first_nonfinite(probes, by=())
    if found.empty:
        return None
    row = found.iloc[0]
    return {"layer": str(row["layer"]), "position": int(row["position"]), "cause": str(row["cause"])}


def _empty_records(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=RECORD_DTYPES.get(c, "object")) for c in columns})


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def _unreadable(folder: Path, part: Path, exc: Exception) -> RunError:
    reason = (str(exc).splitlines() or [""])[0]
    return RunError(f"{folder}: cannot be read as Parquet ({part.name}: {reason}); the file is corrupt: {RESTART_HINT}")


def read_records(folder: Path, parts: list[Path], metrics: list[str] | None = None,
                 columns: list[str] | None = None) -> pd.DataFrame:
    """The rows of ``parts`` (of the records folder ``folder``) in the current format, legacy parts
    upgraded; only ``metrics`` and ``columns`` when given. RunError naming the folder and the part."""
    wanted = list(columns or RECORD_COLUMNS)
    groups: list[tuple[bool, list[Path]]] = []  # consecutive parts of one format, read together
    for part in parts:
        try:
            legacy = is_legacy(pq.read_schema(part).names)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _unreadable(folder, part, exc) from None
        if groups and groups[-1][0] == legacy:
            groups[-1][1].append(part)
        else:
            groups.append((legacy, [part]))
    where = pc.field("metric").isin(list(metrics)) if metrics else None
    frames = []
    for legacy, group in groups:
        read = list(LEGACY_RECORD_COLUMNS) if legacy else wanted
        try:
            frame = ds.dataset(group, format="parquet").to_table(columns=read, filter=where).to_pandas()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise _unreadable(folder, group[0], exc) from None
        if legacy:
            try:
                frame = upgrade_records(frame)[wanted]
            except ValueError as exc:
                raise RunError(f"{folder}: {exc}; the records are corrupt: {RESTART_HINT}") from None
        frames.append(frame)
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty_records(wanted)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


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
        """The recorder's rows, optionally only some metrics and columns (read column-wise);
        legacy parts are upgraded to ``schema.RECORD_COLUMNS``."""
        folder = self.path / RECORDS
        return read_records(folder, _parts(folder), metrics=metrics, columns=columns)

    @functools.cached_property
    def stack(self) -> pd.DataFrame:
        """The run's block stack: ``layer, stack_index, module_type`` in stack order, from the first
        records part that holds stack rows (every recorded step covers every probe point); empty
        without records."""
        folder = self.path / RECORDS
        for part in _parts(folder):
            rows = read_records(folder, [part], columns=["layer", "role", "stack_index", "module_type"])
            rows = rows.loc[rows["role"] == "stack"]
            if len(rows):
                rows = rows.drop_duplicates("stack_index").sort_values("stack_index", kind="stable")
                return rows[["layer", "stack_index", "module_type"]].reset_index(drop=True)
        return _empty_records(["layer", "stack_index", "module_type"])

    def identity(self) -> dict:
        """The run keys (``schema.RUN_KEYS``), never None: ``model`` is config train.model
        (absent: ``deepcnn``, the only model of older runs). A DeepCNN's block, depth and width
        are its options; another model's ``block`` is its stack's module type(s)
        (``schema.stack_block``), ``depth`` the number of stack probe points (0 when its records
        cannot tell) and ``width`` NaN. ``norm`` is a DeepCNN's option; for another model the
        normalisation the trainer found in it (config ``model.norm``), else ``schema.UNKNOWN``."""
        train = self.train
        model = str(train.get("model") or DEFAULT_MODEL)
        if model == DEFAULT_MODEL and train.get("block") is not None and train.get("depth") is not None:
            block, depth, width = train["block"], train["depth"], train.get("width", np.nan)
        else:
            try:
                stack = self.stack
            except RunError:  # the report names the unreadable records; the run keeps its place
                stack = _empty_records(["module_type"])
            block, depth, width = schema.stack_block(stack["module_type"]), len(stack), np.nan
        norm = train.get("norm") if model == DEFAULT_MODEL else (self.config.get("model") or {}).get("norm")
        return {"run": self.name, "model": model, "block": block, "depth": depth, "width": width,
                "norm": UNKNOWN if norm is None else norm, "seed": train.get("seed")}


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
SWEEP_HINT = ("delete it and rerun the same gradlab sweep command to write it again "
              "(finished cells are kept; each cell checks its own options)")
RUN_COLUMNS = [*RUN_KEYS, "status", "epochs", "epochs_done", "steps", "train_images", "batch_size",
               "final_train_acc", "best_val_acc", "test_acc", "n_params", "beta", "wall_seconds", "wall_lower_bound",
               "dataset", "synthetic", "error"]


def train_images(config: dict) -> int | None:
    """The training images a run drew its batches from: config.json's ``train_images``; in a config
    written before gradlab recorded it, counted from the options as ``TrainConfig.split_sizes``
    does (its ``subset``, else the pool less the validation split); None when neither says."""
    if config.get("train_images") is not None:
        return int(config["train_images"])
    train = config.get("train") or {}
    if train.get("subset") is not None:
        return int(train["subset"])
    fraction = train.get("val_fraction")
    return None if fraction is None else POOL_IMAGES - round(POOL_IMAGES * fraction)


def _number(value) -> float:
    """A number a JSON file holds, as a float; NaN for anything else (missing, null, text, a bool)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _beta(run: Run) -> float:
    """Hanin's β of the run's network as the torch side stored it (summary, else config); NaN for
    runs written before gradlab stored it."""
    return _number(run.summary.get("beta", run.config.get("beta")))


def _wall_seconds(run: Run) -> tuple[float, bool]:
    """The run's wall time and whether it is only a lower bound. A run killed and resumed by an
    older gradlab (one that wrote the wall time only at the end) kept only its last process's
    time in summary.json (and 0 while it ran), less than the training time its epochs measured
    (history's ``train_seconds``); then that sum stands in, a lower bound (it leaves out
    evaluation and checkpoints)."""
    wall = _number(run.summary.get("wall_seconds"))
    if np.isnan(wall) or "train_seconds" not in run.history:
        return wall, False
    trained = float(pd.to_numeric(run.history["train_seconds"], errors="coerce").sum())
    return (trained, True) if trained > wall else (wall, False)


def _run_row(run: Run) -> dict:
    train, summary = run.train, run.summary
    steps = summary.get("steps_done", len(run.steps) if len(run.steps) else None)  # older runs: their loss rows
    wall, lower_bound = _wall_seconds(run)
    return {**run.identity(), "status": summary.get("status", "running"),
            "epochs": train.get("epochs"), "epochs_done": summary.get("epochs_done", 0),
            "steps": steps, "train_images": train_images(run.config), "batch_size": train.get("batch_size"),
            "final_train_acc": summary.get("final_train_acc", np.nan), "best_val_acc": summary.get("best_val_acc", np.nan),
            "test_acc": summary.get("test_acc", np.nan), "n_params": summary.get("n_params"),
            "beta": _beta(run),
            "wall_seconds": wall, "wall_lower_bound": lower_bound, "dataset": run.config.get("dataset"),
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
        """Every run's records with the run keys (``schema.RUN_KEYS``: run, model, block, depth,
        width, norm, seed; ``Run.identity``) in front."""
        frames = []
        for run in self.runs:
            frame = run.records(metrics=metrics)
            if frame.empty:
                continue
            frames.append(frame.assign(**run.identity()))
        if not frames:
            return pd.DataFrame(columns=[*RUN_KEYS, *RECORD_COLUMNS])
        combined = pd.concat(frames, ignore_index=True)
        return combined[[*RUN_KEYS, *RECORD_COLUMNS]]

    def steps(self) -> pd.DataFrame:
        """Every run's loss per optimizer step (``Run.steps``) with the run keys in front: what
        ``report.figures.training_curves`` draws in its upper panels."""
        return self._per_run("steps")

    def history(self) -> pd.DataFrame:
        """Every run's row per epoch (``Run.history``) with the run keys in front: the lower
        panels of ``report.figures.training_curves``."""
        return self._per_run("history")

    def _per_run(self, frame: str) -> pd.DataFrame:
        frames = [getattr(run, frame) for run in self.runs]
        keyed = [f.assign(**run.identity()) for run, f in zip(self.runs, frames) if not f.empty]
        if not keyed:
            return pd.DataFrame(columns=list(RUN_KEYS))
        combined = pd.concat(keyed, ignore_index=True)
        return combined[[*RUN_KEYS, *(c for c in combined.columns if c not in RUN_KEYS)]]


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep directory (or one run directory). A corrupt cell is named, not fatal."""
    path = Path(path)
    if is_run_dir(path):
        return Sweep(path=path, config={}, runs=[load_run(path)], unreadable={})
    if not (path / SWEEP).is_file():
        raise RunError(f"{path}: neither a run directory (no {CONFIG}) nor a sweep directory (no {SWEEP})")
    config = read_json(path / SWEEP, fix=SWEEP_HINT)
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
