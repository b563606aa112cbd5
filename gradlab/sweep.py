"""Sweeps: a grid of training runs, each an ordinary run directory, run locally or on Ray, resumable.

    SWEEP_DIR/
      sweep.json                              the grid, the base TrainConfig, the RecordConfig, cells, versions
      runs/<block>-d<depth>[-w<width>]-s<seed>[-<norm>]/  one run directory per DeepCNN cell: every single-run tool works on it
      runs/<model tag>-s<seed>/               one per cell of another model (tv-resnet18-s0, net-make_mlp-s0)

The grid is models x blocks x norms x depths x widths x seeds, where blocks, norms, depths and
widths shape the DeepCNN only: every other model (a torchvision name or a factory) is one cell per
seed, with the base's --model-arg options (which DeepCNN cells do not take). Without widths the
cells have the base's width (``--width``).

Shapes of the depth x width plane (``SweepGrid.shape``):

    product       every depth at every width
    wider-deeper  two lines through one base network (the shallowest depth at the base's width):
                  every width at the shallowest depth ("wider") and every depth at the base's
                  width ("deeper"); the cells of the product that lie on them, nothing else. So
                  ``--depths 2,8,16,32 --widths 16,32,64,128 --shape wider-deeper`` trains 7 cells
                  per block and norm, not 16. The widths must include the base's width.

A cell's name shows its width (``-w<width>`` after the depth) only in a sweep over several widths
and only when it differs from the notebook's 32 (``schema.NOTEBOOK_WIDTH``): ``conv-d2-w64-s0``
beside ``conv-d2-s0``. A sweep over one width names its cells as before, so sweeps made before
widths existed, at any width, keep their names and resume.

Running the same sweep again skips finished cells (complete or diverged), resumes partial ones
from their ``last.pt`` and reruns failed ones. A cell that fails (an exception, a worker process
that dies) is recorded as failed, with its reason, in its ``summary.json`` and in the results; a
cell whose run directory is refused (a corrupt file, another writer, other options) is reported
as failed and left exactly as it was; a cell whose loss or gradient turns non-finite is done,
with status diverged. The other cells go on. One sweep process at a time writes a sweep folder
(``gradlab.lock``), and before any cell starts the largest cells must fit in memory (``jobs`` of
them at once) and all of them on the disk.

Executors:

    local  ``jobs`` cells at once, each in a fresh spawned process with ``cpus // jobs`` torch
           threads, so the workers do not oversubscribe the cores. On a machine with k > 1 visible
           GPUs, worker slot i sees only GPU i % k (its CUDA_VISIBLE_DEVICES), so every cell on
           that slot uses that one GPU. With one cell at a time the cells run in this process
           instead (no start-up cost; an exception still fails only its cell).
    ray    every cell is a Ray task asking for ``node_cpus // jobs`` CPUs (``jobs``: cells at once
           per node) and, when the cell trains on CUDA, one GPU. The sweep folder and the data
           root must be on storage every node sees; a node that cannot see one fails its cell
           with a line naming the path and the node, and the other cells go on. A cell whose
           worker or node dies is retried once (it resumes from its last checkpoint on a live
           node); a head that goes away ends the sweep with ClusterLost, and running the sweep
           again once the cluster is back resumes it. Each cell's config.json names its node.

What the driver was told decides what every cell computes, on every node: before any cell
starts, the data root (--data-root, else $GRADLAB_DATA, else the cache) becomes an absolute path
in the base configuration, and the environment settings a worker reads (``CELL_ENVIRONMENT``:
the compiled kernels' cache folder and switch, the allocator setting) are stored in sweep.json
and set in every Ray worker before its cell starts. A Ray worker inherits its raylet's
environment, not the driver's, so without this a cluster would quietly train on other data, or
with other settings.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing
import os
import platform
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import MISSING, asdict, dataclass, fields, replace
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import __version__, native, resources, runs, specs
from .data import resolve_data_root
from .lock import RunLock
from .models import BLOCKS, NORMS, check_axes
from .schema import NOTEBOOK_WIDTH
from .train import RunFinished, TrainConfig, disk_estimate, finished, memory_estimate, resolve_device, train_run

SWEEP, RUNS = runs.SWEEP, runs.RUNS_FOLDER  # the layout is defined once, in runs.py
EXECUTORS = ("local", "ray")
DEFAULT_NORM = "batch"  # the notebook's; any other norm is part of the cell name
SHAPES = ("product", "wider-deeper")  # how depths and widths combine (module docstring)
# Environment variables a cell's worker reads, with the value that stands for "unset": the
# driver's values travel with every cell (gradlab.native, gradlab.runtime).
CELL_ENVIRONMENT = {native.DISABLE_ENV: "1", "GRADLAB_KEEP_FREED_MEMORY": "1"}
log = logging.getLogger("gradlab")


class ClusterLost(RuntimeError):
    """The Ray cluster's head went away mid-sweep; the message says how to resume."""


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep; every combination is one cell (one run directory)."""

    blocks: tuple[str, ...]  # BLOCKS names: conv | res | resdown | skip
    depths: tuple[int, ...]  # blocks per network, each >= 0
    seeds: tuple[int, ...] = (0,)  # each >= 0; seeds initialisation, the split and shuffling
    norms: tuple[str, ...] = (DEFAULT_NORM,)  # batch | none
    models: tuple[str, ...] = (specs.DEEPCNN,)  # model specs (gradlab.specs); blocks, depths, norms shape deepcnn
    widths: tuple[int, ...] = ()  # channels, each even and >= 2 (deepcnn); empty: the base's width alone
    shape: str = "product"  # product | wider-deeper: which depth x width cells are trained (SHAPES)

    def __post_init__(self) -> None:
        for f in fields(self):  # accept any sequence, store a tuple (hashable, and JSON writes it as a list)
            if f.name == "shape":
                continue
            value = getattr(self, f.name)
            if isinstance(value, str):
                raise ValueError(f"{f.name} must be a sequence of values, got the string {value!r}")
            try:
                object.__setattr__(self, f.name, tuple(value))
            except TypeError:
                raise ValueError(f"{f.name} must be a sequence of values, got {value!r}") from None

    def validate(self) -> None:
        """Raise ValueError naming the first bad list and value."""
        check_axes(**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("widths", "shape")})
        if self.widths:
            check_axes(widths=self.widths)
        for width in self.widths:
            if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
                raise ValueError(f"widths: each must be an even integer >= 2, got {width!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {list(SHAPES)}")
        if self.shape == "wider-deeper" and not self.widths:
            raise ValueError("shape wider-deeper grows the networks wider over the widths: give the widths")
        for model in self.models:
            try:
                specs.parse(model)
            except ValueError as exc:
                raise ValueError(f"models: {exc}") from None
        for block in self.blocks:
            if block not in BLOCKS:
                raise ValueError(f"blocks: unknown block {block!r}; known: {sorted(BLOCKS)}")
        for norm in self.norms:
            if norm not in NORMS:
                raise ValueError(f"norms: unknown norm {norm!r}; known: {list(NORMS)}")
        for name in ("depths", "seeds"):
            for value in getattr(self, name):
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{name}: each must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: the run directory's name and its full training configuration."""

    name: str  # deepcnn: <block>-d<depth>[-w<width>]-s<seed>[-<norm>] (cell_name); else <tag>-s<seed>
    config: TrainConfig


def cell_name(config: TrainConfig, width_axis: bool = False) -> str:
    """The run directory's name: ``-w<width>`` when the sweep is over several widths
    (``width_axis``) and the width is not the notebook's, ``-<norm>`` when the norm is not the default."""
    spec = config.spec()
    if spec.kind != "deepcnn":
        return f"{spec.tag}-s{config.seed}"
    width = f"-w{config.width}" if width_axis and config.width != NOTEBOOK_WIDTH else ""
    name = f"{config.block}-d{config.depth}{width}-s{config.seed}"
    return name if config.norm == DEFAULT_NORM else f"{name}-{config.norm}"


def plane(grid: SweepGrid, base_width: int) -> list[tuple[int, int]]:
    """The (depth, width) pairs of the grid's shape in depth x width order; ``base_width``: the
    base's width, the only width without ``grid.widths`` and the deeper line's width."""
    widths = grid.widths or (base_width,)
    pairs = list(itertools.product(grid.depths, widths))
    if grid.shape == "product":
        return pairs
    if base_width not in widths:
        raise ValueError(f"shape wider-deeper: the widths {list(widths)} must include the width the deeper line "
                         f"grows at, --width {base_width}, so that both lines start from the same network")
    shallowest = min(grid.depths)
    return [(depth, width) for depth, width in pairs if depth == shallowest or width == base_width]


def expand(grid: SweepGrid, base: TrainConfig) -> list[Cell]:
    """The cells in the order models x blocks x norms x depths x widths x seeds (blocks, norms,
    depths and widths for deepcnn only, the depth x width pairs by ``grid.shape``; other models get
    the base's model_args); every configuration is validated here, so a bad option (an odd width,
    say) surfaces before any cell trains."""
    grid.validate()
    if base.model_args and all(specs.parse(m).kind == "deepcnn" for m in grid.models):
        raise ValueError(f"--model-arg {base.model_args[0][0]}: model options are for torchvision and factory "
                         "models, and --models lists none")
    configs = []
    for model in grid.models:
        if specs.parse(model).kind == "deepcnn":
            configs += [replace(base, model=model, model_args=(), block=block, depth=depth, width=width, seed=seed,
                                norm=norm)
                        for block, norm, (depth, width), seed in itertools.product(
                            grid.blocks, grid.norms, plane(grid, base.width), grid.seeds)]
        else:
            configs += [replace(base, model=model, seed=seed) for seed in grid.seeds]
    width_axis = len(grid.widths) > 1
    cells, models = [], {}
    for config in configs:
        name = cell_name(config, width_axis)
        if models.setdefault(name, config.model) != config.model:
            raise ValueError(f"models {models[name]!r} and {config.model!r} would share the run name {name}; "
                             "rename a file or a factory")
        try:
            config.validate()
        except ValueError as exc:
            raise ValueError(f"cell {name}: {exc}") from None
        cells.append(Cell(name, config))
    return cells


def cell_dir(out: str | os.PathLike, name: str) -> Path:
    return Path(out) / RUNS / name


def _read_summary(run_dir: Path) -> dict:
    """The cell's summary.json, {} when it has none; a corrupt one reads as a failure."""
    path = Path(run_dir) / runs.SUMMARY
    if not path.is_file():
        return {}
    try:
        return runs.read_json(path)
    except runs.RunError as exc:
        return {"status": "failed", "error": str(exc)}


def cell_status(run_dir: str | os.PathLike) -> str:
    """complete | diverged | running (partial: started, not finished, resumable) | failed | pending (not started)."""
    summary = _read_summary(Path(run_dir))
    if summary.get("status") == "failed":  # also a worker that died before writing config.json
        return "failed"
    if not runs.is_run_dir(run_dir):
        return "pending"
    return summary["status"] if summary.get("status") in ("complete", "diverged") else "running"


def mark_failed(run_dir: str | os.PathLike, error: str) -> None:
    """Record a failure train_run could not record itself (its process died, say).

    Keeps a summary that already says failed (its reason is the first-hand one), complete or diverged.
    """
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    if summary.get("status") in ("failed", "complete", "diverged"):
        return
    summary.update(status="failed", error=error)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_json(run_dir / runs.SUMMARY, summary)
    except OSError:  # the run directory itself is unusable; the result still says why
        pass


def _result(name: str, run_dir: Path, status: str, summary: dict | None = None, error: str | None = None,
            seconds: float = 0.0, refused: bool = False) -> dict:
    summary = summary or {}
    return {"name": name, "status": status, "error": error, "test_acc": summary.get("test_acc"),
            "seconds": seconds, "run_dir": str(run_dir), "diverged": summary.get("diverged"), "refused": refused,
            "node": None, "retried": None}


LOCK_WAIT = 5.0  # seconds a cell waits for its run directory's lock: a killed sweep's worker may still be exiting


def run_cell(cell: Cell, run_dir: str | os.PathLike, record=None, threads: int | None = None,
             gpu: str | None = None, node: dict | None = None) -> dict:
    """Train one cell into ``run_dir``, resuming it; a failing cell returns status failed, never raises.

    Status complete, diverged (the cell is done: its loss or gradient became non-finite) or failed.
    A refused run directory (corrupt file, another writer, other options: a RunError before
    training) is failed with ``refused`` set, and nothing in it is changed.

    Top level, so that both executors can pickle it. ``threads``: torch's intra-op threads (None:
    leave them). ``gpu``: the CUDA_VISIBLE_DEVICES value this process sees (None: leave it); it
    only takes effect in a process that has not started CUDA yet, such as a fresh worker.
    ``node``: where the cell trains (see train_run), also returned as the result's ``node``.
    """
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    start = time.perf_counter()
    try:
        summary = train_run(cell.config, run_dir, record=record, lock_wait=LOCK_WAIT, node=node)
    except RunFinished:
        summary = _read_summary(run_dir)
        result = _result(cell.name, run_dir, summary.get("status", "complete"), summary,
                         seconds=time.perf_counter() - start)
    except runs.RunError as exc:  # refused before training: the cell's files stay as they are
        result = _result(cell.name, run_dir, "failed", error=str(exc), seconds=time.perf_counter() - start,
                         refused=True)
    except Exception as exc:  # one cell's failure must not stop the sweep
        error = f"{type(exc).__name__}: {exc}"
        mark_failed(run_dir, error)  # train_run records failures inside training; this covers the rest
        result = _result(cell.name, run_dir, "failed", error=error, seconds=time.perf_counter() - start)
    else:
        result = _result(cell.name, run_dir, summary["status"], summary, seconds=time.perf_counter() - start)
    return {**result, "node": node}


def run_sweep(grid: SweepGrid, base: TrainConfig, out: str | os.PathLike, record=None, executor: str = "local",
              jobs: int = 1, ray_address: str | None = None,
              on_cell_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every cell of ``grid`` (``base`` gives the other options) into the sweep folder ``out``.

    Finished cells (complete, or diverged) are skipped, partial ones resumed, failed ones rerun.
    ``on_cell_done(result)`` is called in this process once per cell, skipped ones first, then as
    each cell finishes. Returns one result per cell in grid order: name, status (complete |
    diverged | failed | skipped), error, test_acc, seconds (spent on the cell by this call),
    run_dir, diverged (the summary's diverged object or None), refused (a failed cell whose
    run directory was left untouched), node (where a Ray cell ran: host, ip, ray_node_id; None
    locally) and retried (why a Ray cell's first attempt was lost, or None). Raises RunError
    before any cell starts when another process writes the sweep folder, when it holds a sweep
    with other options, or when the cells cannot fit in memory or on the disk; ValueError when
    the Ray cluster cannot be joined; ClusterLost when its head goes away mid-sweep.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; known: {list(EXECUTORS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"a Ray address ({ray_address!r}) needs the ray executor")
    from .recorder import RecordConfig  # torch side; as in train_run

    record = record if record is not None else RecordConfig()
    replace(base, model_args=()).validate()  # the options every cell shares; expand checks model and model_args per cell
    base, environment = resolve_on_driver(base)
    cells = expand(grid, base)
    out = Path(out).resolve()  # absolute: workers may start in another directory, or on another node
    if out.exists() and not out.is_dir():
        raise runs.RunError(f"{out}: exists and is a file; --out must name a sweep folder")
    if runs.is_run_dir(out):
        raise runs.RunError(f"{out}: is a run directory; a sweep needs a folder of its own")
    with RunLock(out, what="sweep folder"):
        content = _sweep_json(out, grid, base, record, cells, environment)  # refuses another sweep; writes nothing yet
        results: dict[str, dict] = {}

        def done(result: dict) -> None:
            if result["status"] == "failed" and not result["refused"]:
                mark_failed(result["run_dir"], result["error"])
            results[result["name"]] = result
            if on_cell_done is not None:
                on_cell_done(result)

        todo = []
        for cell in cells:
            run_dir = cell_dir(out, cell.name)
            summary = _read_summary(run_dir)
            if runs.is_run_dir(run_dir) and finished(summary, cell.config):
                done(_result(cell.name, run_dir, "skipped", summary))
            else:
                todo.append((cell, run_dir))
        _check_resources(todo, record, jobs, base.device, out, memory=executor == "local")
        if content is not None:  # every check passed: the sweep folder changes from here on
            (out / RUNS).mkdir(parents=True, exist_ok=True)
            runs.write_json(out / SWEEP, content)
        if todo and executor == "ray":
            must_see = [out / SWEEP] + ([Path(base.data_root)] if base.data_root and Path(base.data_root).exists() else [])
            _run_ray(todo, record, jobs, ray_address, base.device, environment, must_see, done)
        elif len(todo) == 1 or (todo and jobs == 1):
            _run_here(todo, record, done)
        elif todo:
            _run_local(todo, record, min(jobs, len(todo)), base.device, done)
    return [results[cell.name] for cell in cells]


def resolve_on_driver(base: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
    """``base`` with an absolute data root (--data-root, else $GRADLAB_DATA, else the cache, as
    this process sees them; the synthetic dataset reads none), and the environment settings
    every worker must use: CELL_ENVIRONMENT as set here (its defaults where unset) and the
    compiled kernels' cache folder as an absolute GRADLAB_CACHE_DIR."""
    if base.dataset != "synthetic":
        base = replace(base, data_root=str(resolve_data_root(base.data_root).resolve()))
    environment = {name: os.environ.get(name, unset) for name, unset in CELL_ENVIRONMENT.items()}
    environment["GRADLAB_CACHE_DIR"] = str(native.cache_dir().expanduser().resolve())
    return base, environment


def _check_resources(todo: list[tuple[Cell, Path]], record, jobs: int, device: str, out: Path,
                     memory: bool = True) -> None:
    """ResourceError unless the ``jobs`` largest cells fit in this machine's memory at once
    (``memory``: the local executor; Ray's cells run on other nodes, and on several GPUs every
    worker checks its own) and every cell still to do fits on the disk (resumed cells count only
    what they still write)."""
    if not todo:
        return
    dev = resolve_device(device)  # counts GPUs without starting CUDA
    if memory and dev.type == "cuda" and jobs > 1 and len(todo) > 1:
        memory = False  # each worker checks its own GPU before its cell starts; CUDA stays off here
    probes = getattr(record, "probes", None)
    if memory:
        estimates = sorted(((memory_estimate(cell.config, dev, probes), cell) for cell, _ in todo),
                           key=lambda pair: pair[0].total)
        largest = [estimate for estimate, _ in estimates[-min(jobs, len(estimates)):]]
        total = resources.MemoryEstimate(*(sum(getattr(e, f.name) for e in largest)
                                           for f in fields(resources.MemoryEstimate)))
        biggest = estimates[-1][1]
        at_once = f", {len(largest)} at once," if len(largest) > 1 else ""
        resources.check_memory(total, dev, f"the sweep's largest cell ({biggest.name}, batches of "
                               f"{biggest.config.batch_size}){at_once}",
                               "use a smaller --batch-size, fewer --jobs, or smaller --depths, --width or models")
    need = 0
    for cell, run_dir in todo:
        done_steps, missing = 0, 2
        if (run_dir / runs.LAST).is_file():  # resumed: count only what is still to come
            summary = _read_summary(run_dir)
            done_steps = summary.get("steps_done", 0) if isinstance(summary.get("steps_done"), int) else 0
            missing = sum(not (run_dir / name).exists() for name in (runs.LAST, runs.BEST))
        need += disk_estimate(cell.config, record, done_steps, missing)
    resources.check_disk(need, out, f"the sweep's {len(todo)} cells to train")


def _jsonable(obj) -> object:
    return json.loads(json.dumps(obj))  # tuples become lists, as they are stored


def _sweep_json(out: Path, grid: SweepGrid, base: TrainConfig, record, cells: Sequence[Cell],
                environment: dict[str, str]) -> dict | None:
    """The content of sweep.json to write, None when the stored one is the same; RunError for a
    folder holding another sweep (or a corrupt sweep.json). ``environment`` (the settings every
    worker uses) is stored, and may change between runs of the sweep, as the data root may."""
    content = _jsonable({
        "grid": asdict(grid), "base": asdict(base), "record": asdict(record),
        "cells": [cell.name for cell in cells], "environment": environment,
        "versions": {"gradlab": __version__, "torch": torch.__version__, "python": platform.python_version()},
    })
    path = out / SWEEP
    if path.exists():
        stored = runs.read_json(path, fix=runs.SWEEP_HINT)
        differences = _differences(stored, content, base, record)
        if differences:
            raise runs.RunError(f"{out}: holds a sweep with other options ({'; '.join(differences)}); "
                                "use another --out")
        if stored == content:
            return None  # leave the file (and its mtime) alone
    return content


def _differences(stored: dict, given: dict, base: TrainConfig, record) -> list[str]:
    """What differs from the stored sweep, except the options a resumed run may change. A key
    missing from the stored sweep predates it and stands for its default (``models``: deepcnn)."""
    found = []
    for section, kind in (("grid", SweepGrid), ("record", type(record))):
        defaults = {f.name: _jsonable(f.default) for f in fields(kind) if f.default is not MISSING}
        old, new = stored.get(section) or {}, given[section]
        for key in sorted(set(old) | set(new)):
            was, now = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
            if was != now:
                found.append(f"{section}.{key}: stored {was!r}, given {now!r}")
    found += [f"base.{difference}" for difference in base.differences(stored.get("base") or {})]
    return found


# ---------------------------------------------------------------------------------------
# The local executor


def _cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_here(todo: list[tuple[Cell, Path]], record, done: Callable[[dict], None]) -> None:
    """One cell at a time in this process, with a lone worker's threads (every CPU)."""
    threads = torch.get_num_threads()
    try:
        for cell, run_dir in todo:
            done(run_cell(cell, run_dir, record, threads=_cpu_count()))
    finally:
        torch.set_num_threads(threads)  # the caller's setting


def _visible_gpus() -> list[str]:
    """CUDA_VISIBLE_DEVICES entries a worker may be given: the parent's own list, else every GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]  # counts without starting CUDA


def _exit_with(parent_pid: int) -> None:
    """End this worker when the sweep process dies (SIGKILL gives it no chance to stop us): an
    orphan would go on writing into a cell that the rerun of the sweep is training again."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="gradlab-parent-watch", daemon=True).start()


def _cell_process(send, parent_pid: int, cell: Cell, run_dir: str, record, threads: int, gpu: str | None) -> None:
    _exit_with(parent_pid)
    try:
        result = run_cell(cell, run_dir, record, threads, gpu)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the sweep process reports it
        return
    send.send(result)
    send.close()


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"worker process killed by {name}{hint}"
    return f"worker process exited with code {exitcode} before the cell finished"


def _run_local(todo: list[tuple[Cell, Path]], record, jobs: int, device: str, done: Callable[[dict], None]) -> None:
    """One spawned process per cell, ``jobs`` at a time.

    Not a ProcessPoolExecutor: one dead worker breaks the whole pool and fails every cell in
    flight, while a process per cell pins a death on its own cell, returns all its memory (GPU
    memory included) when the cell ends, and lets each slot keep its GPU. Spawn, not fork: a
    forked torch (threads, CUDA) is unsafe. A worker is named ``gradlab-cell-<cell name>``.
    """
    threads = max(1, _cpu_count() // jobs)
    gpus = _visible_gpus() if device != "cpu" else []
    context = multiprocessing.get_context("spawn")
    queue, free, running = deque(todo), list(range(jobs)), {}
    try:
        while queue or running:
            while queue and free:
                slot = free.pop(0)
                cell, run_dir = queue.popleft()
                gpu = gpus[slot % len(gpus)] if len(gpus) > 1 else None
                receive, send = context.Pipe(duplex=False)
                process = context.Process(target=_cell_process, name=f"gradlab-cell-{cell.name}",
                                          args=(send, os.getpid(), cell, str(run_dir), record, threads, gpu))
                process.start()
                send.close()  # the worker holds the only sending end: its death reads as end-of-file
                running[process.sentinel] = (slot, cell, run_dir, process, receive, time.perf_counter())
            for sentinel in wait_for_any(list(running)):
                slot, cell, run_dir, process, receive, start = running.pop(sentinel)
                process.join()
                result = _receive(receive)
                if result is None:
                    result = _result(cell.name, run_dir, "failed", error=_death(process.exitcode),
                                     seconds=time.perf_counter() - start)
                free.append(slot)
                done(result)
    finally:  # interrupted or failing: stop the workers; their cells stay resumable
        for _, _, _, process, receive, _ in running.values():
            process.terminate()
            process.join()
            receive.close()


def _receive(receive) -> dict | None:
    try:
        return receive.recv() if receive.poll() else None
    except (EOFError, OSError):
        return None
    finally:
        receive.close()


# ---------------------------------------------------------------------------------------
# The Ray executor


HEAD_GRACE = 5.0  # seconds the head may refuse connections before the sweep calls it gone (not a blip)
POLL_SECONDS = 1.0  # how often the driver checks on the head while cells run


def _ray_node() -> dict:
    """This Ray worker's node: host name, IP address and Ray node id (two nodes may share a host)."""
    import ray

    return {"host": platform.node(), "ip": ray.util.get_node_ip_address(),
            "ray_node_id": ray.get_runtime_context().get_node_id()}


def describe_node(node: dict) -> str:
    """``host (ip, Ray node 1a2b3c4d)``: how progress lines and errors name a cell's node."""
    return f"{node['host']} ({node['ip']}, Ray node {node['ray_node_id'][:8]})"


def _ray_cell(cell: Cell, run_dir: str, record, threads: int, environment: dict[str, str],
              must_see: list[str]) -> dict:
    """run_cell on a Ray worker, after checking that this node sees the sweep folder and the data
    root, with the driver's environment settings (a worker inherits its raylet's, not the driver's)."""
    node = _ray_node()
    for path in must_see:
        if not Path(path).exists():
            error = (f"{path} is not visible on Ray node {describe_node(node)}: the sweep folder and the data "
                     "root must be on storage every node sees")
            return {**_result(cell.name, Path(run_dir), "failed", error=error), "node": node}
    os.environ.update(environment)
    return run_cell(cell, run_dir, record, threads, node=node)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]  # Ray appends a whole traceback


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("the ray executor needs the optional extra: pip install 'gradlab[ray]'") from None
    return ray


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 (C++ code writes there, not to sys.stderr) into a discarded temporary file."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _join(ray, address: str) -> None:
    """ray.init on an existing cluster; ValueError with one line saying what to do when it fails."""
    fix = "check the address (the head's `ray start --head --port`) and that the head is running"
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit() and "://" not in address:  # HOST:PORT: refused at once, not after Ray's retries
        try:
            socket.create_connection((host, int(port)), timeout=HEAD_GRACE).close()
        except OSError as exc:
            raise ValueError(f"cannot join the Ray cluster at {address}: nothing answers there "
                             f"({exc.strerror or exc}); {fix}") from None
    try:
        with _quiet_stderr():  # Ray's C++ client warns there at every failed attempt; the error says it once
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        cause, chain = exc, []
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        # Ray reports a refused token as text inside a RuntimeError, not always as a chained exception
        if any(isinstance(e, ray.exceptions.AuthenticationError) or "InvalidAuthToken" in str(e) for e in chain):
            raise ValueError(f"the Ray cluster at {address} refused this machine's authentication token; give the "
                             "sweep the cluster's: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<what `ray get-auth-token` "
                             "prints on the head>") from None
        raise ValueError(f"cannot join the Ray cluster at {address} ({_first_line(exc)}); {fix}") from None


class _Head:
    """Whether the cluster's head (its GCS port) still answers; ClusterLost once it has not for HEAD_GRACE."""

    def __init__(self, gcs_address: str, shown: str) -> None:
        host, _, port = gcs_address.rpartition(":")
        self.where, self.shown, self.silent_since = (host, int(port)), shown, None

    def answers(self) -> bool:
        try:
            socket.create_connection(self.where, timeout=POLL_SECONDS).close()
        except OSError:
            return False
        return True

    def check(self, left: int, wait: bool = False) -> None:
        """Raise ClusterLost when the head has been silent HEAD_GRACE seconds (``wait``: wait that
        long now, before calling a lost task a lost node)."""
        while not self.answers():
            now = time.monotonic()
            self.silent_since = self.silent_since or now
            if now - self.silent_since >= HEAD_GRACE:
                raise ClusterLost(f"the Ray head at {self.shown} went away mid-sweep ({left} cells unfinished, "
                                  "kept resumable); start the cluster again and rerun the same command to resume")
            if not wait:
                return
            time.sleep(POLL_SECONDS)
        self.silent_since = None


def _run_ray(todo: list[tuple[Cell, Path]], record, jobs: int, address: str | None, device: str,
             environment: dict[str, str], must_see: list[Path], done: Callable[[dict], None]) -> None:
    if address is not None and "RAY_AUTH_MODE" not in os.environ and (
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_MODE"] = "token"  # a token given is a token meant; Ray reads the mode on import
    ray = _import_ray()
    started = not ray.is_initialized()
    if started and address is None:  # a local instance for this sweep only ("local": even where `ray start` ran)
        ray.init(address="local", num_cpus=_cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    elif started:
        _join(ray, address)
    pending: dict = {}
    head_lost = False
    try:
        head = _Head(ray.get_runtime_context().gcs_address, address or "of this sweep's Ray instance")
        node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
        node_cpus = [cpus for cpus in node_cpus if cpus > 0]
        if not node_cpus:
            raise ValueError("the Ray cluster has no node with a CPU to run cells on")
        cluster_gpus = ray.cluster_resources().get("GPU", 0)
        if device == "cuda" and cluster_gpus == 0:
            raise ValueError("device 'cuda' was asked for but the Ray cluster has no GPU; use --device cpu or auto")
        wants_gpu = device == "cuda" or (device == "auto" and cluster_gpus > 0)
        threads = max(1, min(node_cpus) // jobs)  # fits on every node, so no cell waits for a bigger one
        # No retries by Ray: a lost cell is resubmitted here, once, so that the sweep can say so.
        task = ray.remote(_ray_cell).options(num_cpus=threads, num_gpus=1 if wants_gpu else 0, max_retries=0)
        paths = [str(path) for path in must_see]

        def submit(cell: Cell, run_dir: Path, start: float, retried: str | None = None) -> None:
            ref = task.remote(cell, str(run_dir), record, threads, environment, paths)
            pending[ref] = (cell, run_dir, start, retried)

        for cell, run_dir in todo:
            submit(cell, run_dir, time.perf_counter())
        while pending:
            try:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            except ray.exceptions.RayError:
                head.check(len(pending), wait=True)
                raise
            if not ready:
                head.check(len(pending))
            for ref in ready:
                cell, run_dir, start, retried = pending.pop(ref)
                try:
                    result = {**ray.get(ref), "retried": retried}
                except ray.exceptions.RayError as exc:  # the worker died, or its node went away
                    pending[ref] = (cell, run_dir, start, retried)
                    head.check(len(pending), wait=True)  # a head going away loses every task: not the cells' fault
                    del pending[ref]
                    reason = f"Ray task failed: {type(exc).__name__}: {_first_line(exc)}"
                    if retried is None and not isinstance(exc, ray.exceptions.RayTaskError):
                        log.warning(f"{cell.name}: lost ({reason}); retrying it once on a live node")
                        submit(cell, run_dir, start, retried=reason)
                        continue
                    result = {**_result(cell.name, run_dir, "failed", error=reason,
                                        seconds=time.perf_counter() - start), "retried": retried}
                done(result)
    except ClusterLost:
        head_lost = True
        raise
    finally:
        if not head_lost:  # interrupted: cancel what is left; those cells stay resumable
            for ref in pending:
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
