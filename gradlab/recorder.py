"""Forward and backward hooks on every probe point: gradient norms and activation statistics
per block, every step, for a few percent of the step time.

``Recorder`` registers its hooks on enter and removes every one of them on exit::

    with Recorder(model, optimizer=opt) as rec:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            rec.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()  # the step advances here; without an optimizer, after each backward
    df = rec.frame()  # step, epoch, layer, position, block, metric, value

The trainer attaches the same object through ``RecorderCallback`` and its named events.

How it stays cheap: the hooks of a step that the schedule skips return at once. On a
recorded step every hook reduces its tensor to a few *moments* (sums, sums of squares,
counts; ``stats.py``) and writes them straight into this step's row of a preallocated
buffer: no per-hook results to gather, copy or stack. On a CPU the moments of a tensor come
from one pass of a compiled kernel (``native``), which reads the tensor once and writes to
the buffer's address; elsewhere, or without a C compiler, from eager ops with ``out=``.
Parameter norms are one pass per list of tensors. ``flush`` moves the buffer to the host in
one copy, the only host sync, every ``flush_every`` recorded steps, and turns the moments
into the published metrics in numpy. Gradient norms come from pre-hooks on the graph nodes
that made the probe points' outputs and inputs; a block's input is usually the previous
block's output, so one hook and one pass serve both, and a res block's branch part of the
input gradient (``grad - grad_out``) is measured in that same pass.

What is left of the cost on a CPU (``benchmarks/recorder_overhead.py``) is memory traffic:
each measured activation and gradient is read once more, and the stem's 32 MiB activation
and its gradient alone take about 2.4 % of the default model's step; the hooks' Python runs
between large kernels, where caches are cold and every call into torch costs microseconds,
so the hooks make as few of those calls as they can.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import operator
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from gradlab import native, probes as probe_specs, schema, stats
from gradlab.probes import ProbePoint

Schedule = Callable[[int], bool]
Sink = Callable[[dict[str, np.ndarray]], Any]

# The public record format (``schema``): one row per (step, probe point, metric).
COLUMNS = schema.RECORD_COLUMNS
METRICS = schema.METRIC_NAMES  # what each one is: schema.METRICS
MODEL_LAYER = schema.MODEL_LAYER  # layer and role of the per-step row; its position is -1
SCHEDULES = ("every", "log")

# Moments kept on the device per probe point and step; ``_metrics`` derives METRICS from them.
_FIELDS = (
    "act_sum", "act_chan_sum_sq", "act_sumsq", "act_nonpos",  # stats.activation_moments
    "branch_chan_sum_sq", "branch_sumsq",  # stats.channel_moments
    "skip_chan_sum_sq", "skip_sumsq",
    "grad_out_sumsq", "nonfinite",  # stats.grad_moments
    "grad_in_sumsq", "grad_in_branch_sumsq", "grad_in_skip_sumsq",
    "param_grad_sumsq", "param_sumsq", "update_sumsq",
    "loss",
)  # fmt: skip
_F = {name: i for i, name in enumerate(_FIELDS)}
_ACT, _BRANCH, _SKIP = 0, 1, 2  # groups of tensors whose sizes the host keeps for the metrics


# ---------------------------------------------------------------------------------------
# Schedules: which steps are recorded


def every(n: int) -> Schedule:
    """Record steps 0, n, 2n, ...; ``n = 0`` records nothing."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"every must be an integer >= 0 (0 disables recording), got {n!r}")
    if n == 0:
        return lambda step: False
    return lambda step: step % n == 0


def logspaced(per_decade: int = 10) -> Schedule:
    """Record step 0 and the steps ``round(10 ** (k / per_decade))`` for k = 0, 1, 2, ...

    Evenly spaced in log(step), about ``per_decade`` steps for every factor of 10; the
    default gives 0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, ...
    Dense early, when the gradient flow changes fastest, and sparse later.
    """
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
        raise ValueError(f"per_decade must be an integer >= 1, got {per_decade!r}")

    def scheduled(step: int) -> bool:
        if step <= 1:
            return step >= 0
        k = round(per_decade * math.log10(step))
        return any(math.floor(10 ** (j / per_decade) + 0.5) == step for j in (k - 1, k, k + 1))

    return scheduled


def _as_schedule(every_n: int | Schedule) -> Schedule:
    return every_n if callable(every_n) else every(every_n)


@dataclass(frozen=True)
class RecordConfig:
    """What the recorder records and how often it moves records to the host."""

    every: int = 1  # record every N-th step; 0 disables
    schedule: str = "every"  # "every" | "log": 0, 1, 2, ..., 8, 10, 13, 16, 20, ... (every > 0 switches it on)
    flush_every: int = 64  # recorded steps held on the device between host syncs
    probes: tuple[str, ...] | None = None  # module names or globs to record; None: probes.select's default

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"every must be an integer >= 0 (0 disables recording), got {self.every!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if isinstance(self.flush_every, bool) or not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {self.flush_every!r}")
        if self.probes is not None:
            probes = (self.probes,) if isinstance(self.probes, str) else tuple(self.probes)
            if not probes or not all(isinstance(p, str) and p.strip() for p in probes):
                raise ValueError(f"probes must be module names or globs, got {self.probes!r}")
            object.__setattr__(self, "probes", probes)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def make_schedule(self) -> Schedule:
        """The schedule callable this configuration describes."""
        if self.schedule == "log" and self.every > 0:
            return logspaced()
        return every(self.every)


# ---------------------------------------------------------------------------------------
# The recorder


class _Tap:
    """The roles of one hooked activation tensor: output of row ``out_of``, input of row
    ``in_of``, or the branch output of row ``skip_of`` (whose gradient is that identity
    block's skip gradient); and, when the compiled kernels measured it in the forward pass, its layout
    (``native.plan``) and strides, which its gradient shares unless its strides differ
    (autograd gives a gradient the tensor's dtype, device and shape)."""

    __slots__ = ("out_of", "in_of", "skip_of", "layout", "stride")

    def __init__(self, out_of: int | None = None, in_of: int | None = None, seen: tuple = (None, None),
                 skip_of: int | None = None) -> None:
        self.out_of, self.in_of, self.skip_of = out_of, in_of, skip_of
        self.layout, self.stride = seen


_NF = len(_FIELDS)
_GRAD = torch.Tensor.grad.__get__  # p.grad without attribute lookup: 4x faster inside a hook
_WRITTEN, _COPIED = 1, 2  # marks of a cell: written by a hook, or to take another cell's value
_MARKS = [bytes([_WRITTEN]) * n for n in range(5)]  # marks for 0 ... 4 consecutive cells


class _StepState:
    """One recorded step in progress: its row of the device buffer, which cells are written,
    and what the backward pass needs from the forward pass.

    Hooks run between large kernels, where every line of Python costs microseconds (cold
    caches), so the bookkeeping here is plain integers and byte marks."""

    def __init__(self, step: int, epoch: int, slot: torch.Tensor, host: np.ndarray | None, rows: int) -> None:
        self.step, self.epoch = step, epoch
        self.slot = slot  # 1-D device view of this step's [rows, fields] buffer row; hooks write into it
        self.host = host  # the same memory as numpy (a CPU buffer), else None
        # Where the compiled kernels write (a CPU buffer only; 0 elsewhere), and in which precision.
        self.address = slot.data_ptr() if slot.is_cpu else 0
        self.itemsize, self.f64 = slot.element_size(), int(slot.dtype == torch.float64)
        self.threads = torch.get_num_threads()  # asked once per step, not per kernel
        # Per cell (row * _NF + field): 0, _WRITTEN, or _COPIED (takes the value of copies[cell]
        # at the step's end). A later write replaces an earlier mark: the last one wins.
        self.marks = bytearray(rows * _NF)
        self.mark_view = np.frombuffer(self.marks, dtype=np.uint8)  # the same bytes, for marking many cells at once
        self.copies: dict[int, int] = {}
        self.flushes = 0  # the recorder's flush count when the step began
        self.sizes = [0] * (rows * 6)  # (numel, channels) per row and group: [rows, 3, 2]
        # The latest probe output, to notice an input that is the previous output: a weak
        # reference (identity only, keeps nothing alive), its row and its tap.
        self.last_out: weakref.ref | None = None
        self.last_row: int | None = None
        self.last_version = 0
        self.last_tap: _Tap | None = None
        self.skip_grad: dict[int, tuple[torch.Tensor, tuple | None]] = {}  # identity row -> (skip gradient, layout)
        self.path_in: dict[int, torch.Tensor] = {}  # projection row -> the paths' input (a pre_relu mask)
        self.path_grad: dict[tuple[int, str], torch.Tensor] = {}  # (projection row, path) -> its input gradient

    def cells(self, row: int, first: str, n: int = 1) -> torch.Tensor:
        """The buffer view of ``n`` consecutive fields of ``row`` from ``first``, marked written."""
        i = row * _NF + _F[first]
        self.marks[i : i + n] = _MARKS[n]
        return self.slot[i] if n == 1 else self.slot[i : i + n]

    def at(self, row: int, first: str, n: int = 1) -> int:
        """The address of ``n`` consecutive fields of ``row`` from ``first`` (CPU buffers), marked written."""
        i = row * _NF + _F[first]
        self.marks[i : i + n] = _MARKS[n]
        return self.address + i * self.itemsize

    def copy(self, row: int, first: str, from_row: int, from_first: str, n: int = 1) -> None:
        """Let ``n`` fields of ``row`` take the values of ``from_row``'s at the step's end."""
        i, j = row * _NF + _F[first], from_row * _NF + _F[from_first]
        for k in range(n):
            self.marks[i + k] = _COPIED
            self.copies[i + k] = j + k

    def size(self, row: int, group: int, numel: int, channels: int) -> None:
        """Keep the number of entries and of channels of the tensor measured for ``row`` in ``group``."""
        k = (row * 3 + group) * 2
        self.sizes[k], self.sizes[k + 1] = numel, channels

    def size_like(self, row: int, group: int, from_row: int, from_group: int) -> None:
        """The sizes of ``row``'s ``group`` are those of ``from_row``'s ``from_group``."""
        k, j = (row * 3 + group) * 2, (from_row * 3 + from_group) * 2
        self.sizes[k : k + 2] = self.sizes[j : j + 2]

    def pending_copies(self) -> tuple[tuple[int, int], ...]:
        """(cell, source cell) of the copies no later write replaced, in a stable order."""
        return tuple(sorted((i, j) for i, j in self.copies.items() if self.marks[i] == _COPIED))

    def bookkeeping(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Which cells hold a value (bool, rows x fields, flat) and the sizes ([rows, 3, 2])."""
        written = np.frombuffer(bytes(self.marks), dtype=np.uint8) != 0
        return written, np.array(self.sizes, dtype=np.int64).reshape(rows, 3, 2)


class Recorder:
    """Forward and backward statistics of every probe point, on the steps ``every`` selects.

    ``every``: an int N (record steps 0, N, 2N, ...; 0 records nothing) or a schedule
    callable (``every``, ``logspaced``). ``optimizer``: when given, a step ends with
    ``optimizer.step()`` and the parameter update is measured; without one, every backward
    pass is one step. ``sink``: a callable that receives each flush's columns (a dict of
    numpy arrays keyed by COLUMNS); without one the records are kept for ``frame()``.
    ``probes``: which modules to measure: names or globs, a function ``(name, module) ->
    bool``, or ``ProbePoint`` objects (``probes.select``; by default the model's declared
    points, else the automatic rule). Residual blocks are split into branch and skip by
    their declared decomposition (``probes.Residual``), never by guessing.

    A forward pass in training mode with gradients enabled belongs to step ``step``;
    evaluation passes (``no_grad``, ``inference_mode``, ``model.eval()``) are not recorded.
    If one step runs several forward passes, the last one's statistics are kept.

    Device memory: the moment buffer (flush_every x probe points x moments), a scratch
    buffer of two chunks of the largest activation (``stats.CHUNK``), and with an optimizer
    a copy of the parameters for the update norm.
    """

    def __init__(
        self,
        model: nn.Module,
        every: int | Schedule = 1,
        optimizer: torch.optim.Optimizer | None = None,
        sink: Sink | None = None,
        flush_every: int = 64,
        start_step: int = 0,
        probes: probe_specs.Selection = None,
    ) -> None:
        self.schedule: Schedule = _as_schedule(every)
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        self.model, self.optimizer, self.sink, self.flush_every = model, optimizer, sink, flush_every
        self.probes: list[ProbePoint] = probe_specs.select(model, probes)
        # Row 0 is the model's per-step row (position -1); row i + 1 is the i-th probe point.
        self._layers = np.array([MODEL_LAYER] + [p.name for p in self.probes], dtype=object)
        self._roles = np.array([MODEL_LAYER] + [p.role for p in self.probes], dtype=object)
        self._stack = np.array([schema.NOT_IN_STACK] + [p.stack_index for p in self.probes], dtype=np.int64)
        self._types = np.array([type(model).__name__] + [p.module_type for p in self.probes], dtype=object)
        self._positions = np.array([schema.MODEL_POSITION] + [p.position for p in self.probes], dtype=np.int64)
        # Per row, what the gradient hooks do for a residual block (None: not one): the skip
        # gradient is the block's output gradient ("out": an identity with nothing after the
        # addition), the branch output's gradient ("branch": an identity followed by, say, a
        # ReLU) or the parts through two paths ("paths": a projection).
        self._residual = [None] + [p.residual for p in self.probes]
        self._skip_grad = [None] + [_skip_gradient(p.residual) for p in self.probes]
        self._params = list(model.parameters())
        self._state: _StepState | None = None  # the recorded step in progress
        self.epoch = 0
        self.step = start_step
        self._active = False
        self._handles: list[Any] = []  # module and optimizer hooks, from enter to exit
        self._grad_handles: list[Any] = []  # tensor and graph-node hooks of the current backward
        self._end_queued = False
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # stats' temporaries
        self._layouts: dict[Any, Any] = {}  # cached device index tensors and owner matrices
        self._before: list[torch.Tensor] | None = None  # the parameters before the optimizer step
        self._before_kinds: tuple | None = None
        self._before_store: list[torch.Tensor] = []
        # The compiled kernels' view of the parameters, and of a buffer for their values before
        # the step (built for that view of the parameters).
        self._watched = native.Watched(self._params)
        self._before_view: tuple[native.Tensors, native.Tensors] | None = None
        self._compiled_before: tuple[native.Tensors, native.Tensors] | None = None
        self._buffer: torch.Tensor | None = None
        self._host: np.ndarray | None = None  # the buffer's memory as numpy, when it is on the CPU
        self._flushes = 0  # flushes so far: a step that saw one has to move its row
        self._meta: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # step, epoch, written cells, sizes
        self._kept: list[dict[str, np.ndarray]] = []

    # -- step and schedule ------------------------------------------------------------

    @property
    def step(self) -> int:
        """Index of the current training step (settable, e.g. on resume)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        self._on = bool(self.schedule(self._step))  # asked once per step, not per hook
        if self._state is not None:  # set during a step: renumber it, or drop it if unscheduled
            if self._on:
                self._state.step = self._step
            else:
                self._state = None

    # -- enter and exit ----------------------------------------------------------------

    def __enter__(self) -> Recorder:
        if self._active:
            raise RuntimeError("this Recorder is already active")
        try:
            for row, probe in enumerate(self.probes, start=1):
                self._hook(probe.module, functools.partial(self._on_probe_forward, row))
                residual = probe.residual
                if residual is None:
                    continue
                sub = functools.partial(probe_specs.submodule, probe.module)
                self._hook(sub(residual.branch), functools.partial(self._on_branch_forward, row))
                if residual.skip is not None:
                    self._hook(sub(residual.skip), functools.partial(self._on_skip_forward, row))
                    for path, name in (("branch", residual.entry), ("skip", residual.skip)):
                        self._handles.append(sub(name).register_forward_pre_hook(
                            functools.partial(self._on_path_input, row, path)))
            if self.optimizer is None:
                self._hook(self.model, self._on_model_forward)
            else:
                self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_pre_step))
                self._handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_post_step))
        except BaseException:
            self._remove_hooks()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and flush what is buffered; an unfinished step is dropped. Idempotent."""
        was_active, self._active = self._active, False
        self._remove_hooks()
        self._state = None
        self._end_queued = False
        if was_active:
            self.flush()

    def _hook(self, module: nn.Module, fn: Callable[..., None]) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def _remove_hooks(self) -> None:
        self._remove_grad_hooks()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _remove_grad_hooks(self) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles.clear()

    # -- step bookkeeping --------------------------------------------------------------

    def _live(self, module: nn.Module) -> bool:
        return self._on and module.training and torch.is_grad_enabled()

    def _begin(self) -> _StepState:
        """The recorded step in progress, opened on its first measurement: its buffer row is
        zeroed, and the hooks write their moments straight into it."""
        if self._state is None:
            rows = len(self.probes) + 1
            dtype, device = self._buffer_kind()
            if self._buffer is None or self._buffer.dtype != dtype or self._buffer.device != device:
                self.flush()
                shape = (self.flush_every, rows, _NF)
                if device.type == "cpu":  # numpy's memory, so the host writes into it without a conversion
                    self._host = np.zeros(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype)
                    self._buffer = torch.from_numpy(self._host)
                else:
                    self._host, self._buffer = None, torch.zeros(shape, dtype=dtype, device=device)
            slot = self._buffer[len(self._meta)].view(-1)
            slot.zero_()
            host = None if self._host is None else self._host[len(self._meta)].reshape(-1)
            self._state = _StepState(self._step, self.epoch, slot, host, rows)
            self._state.flushes = self._flushes
        return self._state

    def _buffer_kind(self) -> tuple[torch.dtype, torch.device]:
        """float64 for a float64 model, float32 otherwise (bf16 autocast included); the parameters' device."""
        if not self._params:
            return torch.float32, torch.device("cpu")
        p = self._params[0]
        return stats.stat_dtype(p.dtype), p.device

    def _scratch_for(self, t: torch.Tensor) -> torch.Tensor:
        """One scratch buffer per device and dtype, grown to the largest tensor seen."""
        key = (t.device, t.dtype)
        scratch = self._scratch.get(key)
        if scratch is None or (scratch.numel() < 2 * t.numel() and scratch.numel() < stats.scratch_numel(t)):
            scratch = self._scratch[key] = stats.new_scratch(t)
        return scratch

    def _end_step(self) -> None:
        """Close the current step: settle its copied cells, keep its bookkeeping and advance ``step``."""
        state, self._state = self._state, None
        self._remove_grad_hooks()
        if state is not None and state.marks.count(0) < len(state.marks):  # something was measured
            copies = state.pending_copies()
            if copies and state.host is not None:  # a CPU buffer: numpy indexing on the same memory
                dst, src = self._copy_index(copies, None)
                state.host[dst] = state.host[src]
            elif copies:
                dst, src = self._copy_index(copies, state.slot.device)
                state.slot.index_copy_(0, dst, state.slot.index_select(0, src))
            if state.flushes != self._flushes:  # a flush came in the middle of the step: its row moves
                self._buffer[len(self._meta)].view(-1).copy_(state.slot)
            self._meta.append((state.step, state.epoch, *state.bookkeeping(len(self.probes) + 1)))
            if len(self._meta) == self.flush_every:
                self.flush()
        self.step = self._step + 1

    def _copy_index(self, pairs: tuple[tuple[int, int], ...], device: torch.device | None) -> tuple:
        """Destination and source cells of ``pairs`` as device index tensors (numpy arrays for
        ``device=None``), built once per layout of copies, not per step: a copy to the device waits."""
        key = ("copies", pairs, device)
        if key not in self._layouts:
            sides = [np.array(side, dtype=np.int64) for side in zip(*pairs)]
            self._layouts[key] = tuple(sides if device is None else (torch.from_numpy(a).to(device) for a in sides))
        return self._layouts[key]

    # -- forward hooks -----------------------------------------------------------------

    def _on_probe_forward(self, row: int, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._on and module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
            return
        state = self._state or self._begin()
        seen = self._moments(state, row, "act_sum", _ACT, output)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        # The previous probe point's output, unchanged since (an in-place op would bump its version).
        same = x is not None and state.last_out is not None and state.last_out() is x and x._version == state.last_version
        seen_x = (None, None)
        if x is not None and self._skip_grad[row] in ("out", "branch"):  # an identity: the skip is the input
            if same:
                state.copy(row, "skip_chan_sum_sq", state.last_row, "act_chan_sum_sq", 2)
                state.size_like(row, _SKIP, state.last_row, _ACT)
            else:
                seen_x = self._moments(state, row, "skip_chan_sum_sq", _SKIP, x)
        if x is not None and x.requires_grad:
            if same and state.last_tap is not None and state.last_tap.in_of is None:
                state.last_tap.in_of = row  # one hook serves the previous output and this input
            else:
                self._tap(x, _Tap(in_of=row, seen=seen_x))
        state.last_out, state.last_row, state.last_version = weakref.ref(output), row, output._version
        state.last_tap = self._tap(output, _Tap(out_of=row, seen=seen)) if output.requires_grad else None

    def _moments(self, state: _StepState, row: int, field: str, group: int, x: torch.Tensor) -> tuple:
        """Moments of ``x`` into ``row``'s cells from ``field`` (``act_sum``: all four of
        ``stats.activation_moments``; a ``*_chan_sum_sq`` field: the two of
        ``stats.channel_moments``), and its sizes for ``group``. Returns ``(layout, strides)``
        when the compiled kernels took ``x``, else ``(None, None)``."""
        first, count = (0, 4) if field == "act_sum" else (1, 2)
        stride = x.stride()
        layout = native.plan(x, stride) if state.address else None
        if layout is None:
            fn = stats.activation_moments if count == 4 else stats.channel_moments
            self._measure(fn, x.detach(), state.cells(row, field, count))
            state.size(row, group, x.numel(), stats.channels(x))
            return None, None
        # one compiled pass, straight into the buffer
        native.activation_moments_at(x, layout, state.at(row, field, count), state.f64, first, count, state.threads)
        _, outer, channels, inner = layout
        state.size(row, group, outer * channels * inner, channels)
        return layout, stride

    def _measure(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, out: torch.Tensor) -> None:
        """``fn(x)`` by eager ops, written into the buffer view ``out``, with a scratch for temporaries."""
        if out.dtype == stats.stat_dtype(x.dtype):
            fn(x, scratch=self._scratch_for(x), out=out)
        else:  # e.g. a float32 tensor in a float64 model: measured in its own precision, then stored
            out.copy_(fn(x, scratch=self._scratch_for(x)).reshape(-1)[: out.numel()].reshape(out.shape))

    def _on_branch_forward(self, row: int, module: nn.Module, args: tuple, output: Any) -> None:
        """A residual block's branch just before the addition; with an operation after the
        addition, the branch output's gradient is the skip gradient of an identity block."""
        if not (self._on and module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
            return
        state = self._state or self._begin()
        seen = self._moments(state, row, "branch_chan_sum_sq", _BRANCH, output)
        if self._skip_grad[row] == "branch" and output.requires_grad:
            self._tap(output, _Tap(skip_of=row, seen=seen))

    def _on_skip_forward(self, row: int, module: nn.Module, args: tuple, output: Any) -> None:
        """A residual block's projection on the skip path."""
        if self._live(module) and isinstance(output, torch.Tensor):
            self._moments(self._state or self._begin(), row, "skip_chan_sum_sq", _SKIP, output)

    def _on_path_input(self, row: int, path: str, module: nn.Module, args: tuple) -> tuple | None:
        """The input of a projection block's branch entry or skip module: an alias of it (a view,
        no copy) gets its own graph node, whose gradient is this path's part of the gradient."""
        if not self._live(module) or not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return None
        state = self._begin()
        x = args[0]
        if self._residual[row].pre_relu:
            state.path_in[row] = x.detach()  # the ReLU's output: its mask; saved by the ReLU anyway
        alias = x.view_as(x)
        self._grad_handles.append(alias.grad_fn.register_prehook(functools.partial(self._on_path_grad, row, path)))
        return (alias, *args[1:])

    def _on_model_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Without an optimizer the step ends with the backward pass; an unrecorded step needs
        one hook to see that end (a recorded step's tensor hooks see it anyway)."""
        if self._on or not module.training or not torch.is_grad_enabled():
            return
        if isinstance(output, torch.Tensor) and output.requires_grad:
            self._grad_handles.append(output.register_hook(self._on_any_grad))

    def _tap(self, tensor: torch.Tensor, tap: _Tap) -> _Tap:
        """Hook ``tensor``'s gradient. A pre-hook on the node that made it (which receives the
        gradients of all of the node's outputs) costs half the torch calls of
        ``Tensor.register_hook``; a leaf has no node and gets a tensor hook."""
        node = tensor.grad_fn
        if node is None:
            self._grad_handles.append(tensor.register_hook(functools.partial(self._on_leaf_grad, tap)))
        else:
            self._grad_handles.append(node.register_prehook(functools.partial(self._on_grad, tap, tensor.output_nr)))
        return tap

    # -- backward hooks ----------------------------------------------------------------

    def _queue_end(self) -> None:
        if not self._end_queued:
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_any_grad(self, grad: torch.Tensor) -> None:
        self._queue_end()

    def _on_leaf_grad(self, tap: _Tap, grad: torch.Tensor) -> None:
        self._on_grad(tap, 0, (grad,))

    def _on_grad(self, tap: _Tap, index: int, grads: tuple) -> None:
        """The gradient ``grads[index]`` of a tapped tensor (None: no gradient reached it)."""
        if not self._end_queued:
            self._queue_end()
        state, grad = self._state, grads[index]
        if state is None or grad is None:
            return
        layout = None
        if state.address:
            stride = grad.stride()
            layout = tap.layout if tap.layout is not None and stride == tap.stride else native.plan(grad, stride)
        if tap.skip_of is not None:  # an identity block's skip gradient: the branch output's
            self._grad_norm(state, grad, layout, tap.skip_of, "grad_in_skip_sumsq", 1)
            state.skip_grad[tap.skip_of] = (grad, layout)
            return
        out_row, in_row = tap.out_of, tap.in_of
        # An identity block's input gradient is its skip gradient plus the branch's part, so the
        # branch part is grad - skip gradient: measured in the same pass.
        skip, skip_layout = state.skip_grad.pop(in_row, (None, None)) if in_row is not None else (None, None)
        if out_row is not None:  # norm and non-finite count of the output gradient
            field, count = "grad_out_sumsq", 2
        else:  # only an input: its norm
            field, count = "grad_in_sumsq", 1
        row = out_row if out_row is not None else in_row
        self._grad_norm(state, grad, layout, row, field, count, skip, skip_layout, in_row)
        if out_row is not None and self._skip_grad[out_row] == "out":
            state.skip_grad[out_row] = (grad, layout)  # equal layouts: one dtype and one order in memory
        if in_row is not None:
            if out_row is not None:  # the same gradient: the norm is already measured
                state.copy(in_row, "grad_in_sumsq", out_row, "grad_out_sumsq")
            if skip is not None and self._skip_grad[in_row] == "out":  # the skip part is grad_out itself
                state.copy(in_row, "grad_in_skip_sumsq", in_row, "grad_out_sumsq")
            elif self._skip_grad[in_row] == "paths":
                self._path_parts(state, in_row)

    def _grad_norm(self, state: _StepState, grad: torch.Tensor, layout: tuple | None, row: int, field: str,
                   count: int, skip: torch.Tensor | None = None, skip_layout: tuple | None = None,
                   branch_row: int | None = None) -> None:
        """``count`` moments of ``grad`` (its squared norm, and its non-finite count) into ``row``'s
        cells from ``field``; with ``skip``, ``||grad - skip||^2`` into ``branch_row``'s branch part."""
        if layout is not None and (skip is None or skip_layout == layout):  # one compiled pass
            branch = 0 if skip is None else state.at(branch_row, "grad_in_branch_sumsq")
            native.grad_moments_at(grad, layout, state.at(row, field, count), count, state.f64, skip, branch,
                                   state.threads)
            return
        branch = None if skip is None else state.cells(branch_row, "grad_in_branch_sumsq")
        other = None if skip is None else skip.detach()
        self._measure(functools.partial(stats.grad_moments, other=other, diff_out=branch), grad.detach(),
                      state.cells(row, field, count))

    def _on_path_grad(self, row: int, path: str, grads: tuple) -> None:
        """The gradient of a projection block's path input alias: that path's part."""
        state = self._state
        if state is not None and grads and grads[0] is not None:
            state.path_grad[row, path] = grads[0].detach()

    def _path_parts(self, state: _StepState, row: int) -> None:
        """A projection block's branch and skip parts of its input gradient; with ``pre_relu``
        both paths passed the block's leading ReLU, whose mask each part then takes."""
        branch = state.path_grad.pop((row, "branch"), None)
        skip = state.path_grad.pop((row, "skip"), None)
        relu_out = state.path_in.pop(row, None)
        if branch is None or skip is None or (relu_out is None and self._residual[row].pre_relu):
            return
        parts = state.cells(row, "grad_in_branch_sumsq", 2)
        for i, path in enumerate((branch, skip)):
            if relu_out is not None:
                self._measure(functools.partial(stats.relu_part_sumsq, relu_out=relu_out), path, parts[i])
            else:
                self._measure(stats.grad_moments, path, parts[i])

    def _on_backward_end(self) -> None:
        self._end_queued = False
        self._remove_grad_hooks()  # the graph is done: no tensor keeps a hook of ours
        state = self._state
        if state is not None:
            state.skip_grad.clear()
            state.path_in.clear()
            state.path_grad.clear()
        if self.optimizer is None:
            if self._on:
                self._param_moments(self._begin(), keep_before=False)
            self._end_step()

    # -- parameters and the optimizer ---------------------------------------------------

    def _on_optimizer_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._on:
            self._param_moments(self._begin(), keep_before=True)

    def _on_optimizer_post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        state = self._state
        if self._on and state is not None:
            with torch.no_grad():
                if self._compiled_before is not None:  # one compiled pass: ||after - before||^2
                    params, before = self._compiled_before
                    self._add_param_rows(state, params.sumsq(minus=before), None, "update_sumsq")
                elif self._before is not None:
                    self._add_param_rows(state, self._squares(self._params, minus=self._before), None, "update_sumsq")
        self._before = self._compiled_before = None
        self._end_step()

    def _param_moments(self, state: _StepState, keep_before: bool) -> None:
        """Parameter and gradient norms per probe point and of the whole model.

        One pass per list of tensors (``_squares``, or the compiled kernels' ``native.Tensors``
        on a CPU), then one small matrix product sums the squares per probe point. With
        ``keep_before`` the parameters are copied, in the same pass, into a buffer kept between
        steps, for the update norm after the optimizer step."""
        self._before = self._compiled_before = None
        if not self._params:
            return
        with torch.no_grad():
            grads = list(map(_GRAD, self._params))
            complete = all(map(operator.is_not, grads, itertools.repeat(None)))
            compiled = self._compiled_params()
            squares = compiled[0].sumsq_like(grads) if compiled is not None and complete else None
            if squares is not None:
                self._add_param_rows(state, squares, None, "param_grad_sumsq")
            elif not complete and any(g is not None for g in grads):  # frozen parameters have none
                present = tuple(g is not None for g in grads)
                self._add_param_rows(state, self._squares([g for g in grads if g is not None]), present, "param_grad_sumsq")
            elif complete:
                self._add_param_rows(state, self._squares(grads), None, "param_grad_sumsq")
            if compiled is not None:
                params, before = compiled
                self._add_param_rows(state, params.sumsq(copy_to=before if keep_before else None), None, "param_sumsq")
                self._compiled_before = compiled if keep_before else None
            else:
                before = self._before_buffer(self._params) if keep_before else None
                self._add_param_rows(state, self._squares(self._params, copy_to=before), None, "param_sumsq")
                self._before = before

    def _compiled_params(self) -> tuple[native.Tensors, native.Tensors] | None:
        """The parameters and a before-the-step buffer as ``native.Tensors``, built once and
        rebuilt when a parameter moved (``.to()``, ``.data =``); None when the kernels cannot
        take them (an accelerator, another dtype), a verdict kept for the same addresses."""
        params = self._watched.current()
        if params is None:
            return None
        if self._before_view is None or self._before_view[0] is not params:
            self._before_view = (params, native.Tensors([torch.empty_like(p) for p in self._params]))
        return self._before_view

    @staticmethod
    def _squares(
        tensors: list[torch.Tensor], minus: list[torch.Tensor] | None = None, copy_to: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Squared L2 norm of each tensor (of ``tensor - minus``), copying each to ``copy_to`` on
        the way, by fused ``_foreach`` kernels: the path where ``native.Tensors`` cannot go (an
        accelerator, another dtype, frozen parameters). ``minus`` is scratch: it is overwritten."""
        if copy_to is not None:
            torch._foreach_copy_(copy_to, tensors)
        if minus is not None:
            torch._foreach_sub_(minus, tensors)  # minus - tensors: the same norm as tensors - minus
            tensors = minus
        return stats.param_sumsq(tensors)

    def _before_buffer(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like the parameters for their values before the optimizer step,
        allocated once (reallocated when the model moves or changes dtype)."""
        kinds = tuple((p.shape, p.dtype, p.device) for p in params)
        if self._before_kinds != kinds:
            self._before_kinds, self._before_store = kinds, [torch.empty_like(p) for p in params]
        return self._before_store

    def _add_param_rows(
        self, state: _StepState, squares: torch.Tensor | np.ndarray, present: tuple[bool, ...] | None, field: str
    ) -> None:
        """Squared norms of the (present) parameters or gradients summed per probe point into
        the step's buffer row; for gradients also over the whole model (row 0). ``squares``: a
        device tensor, or float64 numpy from the compiled kernels (a CPU buffer)."""
        with_model = field == "param_grad_sumsq"
        if isinstance(squares, np.ndarray):
            rows, owners = self._param_rows_host(present, with_model)
            if rows:
                state.host.reshape(-1, _NF)[rows, _F[field]] = owners @ squares
        else:
            rows, index, owners = self._param_rows(present, with_model, squares.dtype, squares.device)
            if rows:
                column = state.slot.view(-1, _NF)[:, _F[field]]
                column.index_copy_(0, index, (owners @ squares).to(column.dtype))
        if rows:
            state.mark_view[np.asarray(rows) * _NF + _F[field]] = _WRITTEN

    def _param_rows_host(self, present: tuple[bool, ...] | None, with_model: bool) -> tuple[list[int], np.ndarray]:
        """``_param_rows`` for the host: the rows and a float64 numpy owner matrix."""
        key = ("host rows", present, with_model)
        if key not in self._layouts:
            rows, _, owners = self._param_rows(present, with_model, torch.float64, torch.device("cpu"))
            self._layouts[key] = (rows, np.array(owners.tolist(), dtype=np.float64).reshape(len(rows), -1))
        return self._layouts[key]

    def _present(self, present: tuple[bool, ...] | None) -> list[torch.nn.Parameter]:
        return [p for i, p in enumerate(self._params) if present is None or present[i]]

    def _param_rows(
        self, present: tuple[bool, ...] | None, with_model: bool, dtype: torch.dtype, device: torch.device
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Rows that own at least one of the parameters ``present`` marks, those rows as a device
        index, and the 0/1 matrix that sums per-parameter values into them (row 0, ``with_model``:
        all of them)."""
        key = ("rows", present, with_model, dtype, device)
        if key not in self._layouts:
            index = {id(p): i for i, p in enumerate(self._present(present))}
            members = [list(index.values())] if with_model else [[]]
            for probe in self.probes:
                members.append([index[id(p)] for p in probe.module.parameters() if id(p) in index])
            rows = [row for row, m in enumerate(members) if m]
            owners = torch.zeros(len(rows), len(index), dtype=dtype)
            for i, row in enumerate(rows):
                owners[i, members[row]] = 1.0
            # Built once per set of parameters: the copies to the device wait on them.
            self._layouts[key] = (rows, torch.tensor(rows, device=device), owners.to(device))
        return self._layouts[key]

    def record_loss(self, loss: torch.Tensor) -> None:
        """Keep the step's loss (detached, on the device; no sync) when the step is recorded."""
        if self._active and self._on:
            self._begin().cells(0, "loss").copy_(loss.detach())

    # -- flush and frame -----------------------------------------------------------------

    def flush(self) -> None:
        """Move every buffered step to the host in one copy and emit its rows."""
        if not self._meta:
            return
        meta, self._meta = self._meta, []
        self._flushes += 1
        # host sync: the one device -> host copy of this flush (astype copies out of the buffer)
        raw = self._buffer[: len(meta)].cpu().numpy().astype(np.float64)
        columns = self._columns(raw, meta)
        if self.sink is not None:
            self.sink(columns)
        else:
            self._kept.append(columns)

    def _columns(self, raw: np.ndarray, meta: list) -> dict[str, np.ndarray]:
        rows = len(self.probes) + 1
        written = np.stack([m[2] for m in meta]).reshape(len(meta), rows, len(_FIELDS))
        sizes = np.stack([m[3] for m in meta]).astype(np.float64)  # [steps, rows, group, (numel, channels)]
        values, valid = _metrics(raw, written, sizes)
        k, r, m = np.nonzero(valid)  # step-major, then position (model row first), then METRICS order
        steps = np.array([s for s, *_ in meta], dtype=np.int64)
        epochs = np.array([e for _, e, *_ in meta], dtype=np.int64)
        return {
            "step": steps[k],
            "epoch": epochs[k],
            "layer": self._layers[r],
            "position": self._positions[r],
            "role": self._roles[r],
            "stack_index": self._stack[r],
            "module_type": self._types[r],
            "metric": np.array(METRICS, dtype=object)[m],
            "value": values[k, r, m],
        }

    def frame(self):
        """The kept records as a pandas DataFrame with COLUMNS, sorted by step, position and
        METRICS order (flushes first). With a sink the records went there, and this is empty."""
        import pandas as pd  # lazily: the torch side never needs pandas

        self.flush()
        if self._kept:
            columns = {c: np.concatenate([chunk[c] for chunk in self._kept]) for c in COLUMNS}
        else:
            columns = empty_columns()
        metric_order = pd.Categorical(columns["metric"], categories=METRICS).codes
        order = np.lexsort((metric_order, columns["position"], columns["step"]))
        return pd.DataFrame({c: columns[c][order] for c in COLUMNS})


def _skip_gradient(residual: probe_specs.Residual | None) -> str | None:
    """Where a residual block's skip gradient comes from (see ``Recorder._skip_grad``)."""
    if residual is None:
        return None
    if residual.skip is not None:
        return "paths"
    return "out" if residual.post is None else "branch"


empty_columns = schema.empty_columns


def _metrics(raw: np.ndarray, written: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """METRICS values and validity, [steps, rows, metrics], from the moments [steps, rows, fields]."""
    f = {name: raw[..., i] for name, i in _F.items()}
    w = {name: written[..., i] for name, i in _F.items()}
    numel, chans = sizes[..., 0], sizes[..., 1]

    def chan_var(group: int, name: str) -> np.ndarray:
        moments = f[f"{name}_chan_sum_sq"], f[f"{name}_sumsq"]
        return stats.chan_var_from_moments(*moments, numel[..., group], chans[..., group])

    values = np.full(raw.shape[:2] + (len(METRICS),), np.nan)
    valid = np.zeros(values.shape, dtype=bool)
    with np.errstate(all="ignore"):  # unwritten cells have zero sizes; 0/0 gains are NaN as arithmetic says
        act = stats.activation_metrics(raw[..., :4], numel[..., _ACT], chans[..., _ACT])
        grad_out, grad_in = np.sqrt(f["grad_out_sumsq"]), np.sqrt(f["grad_in_sumsq"])
        param = np.sqrt(f["param_sumsq"])
        derived = {
            "branch_chan_var": (chan_var(_BRANCH, "branch"), w["branch_sumsq"]),
            "skip_chan_var": (chan_var(_SKIP, "skip"), w["skip_sumsq"]),
            "grad_out_norm": (grad_out, w["grad_out_sumsq"]),
            "grad_in_norm": (grad_in, w["grad_in_sumsq"]),
            "grad_gain": (grad_in / grad_out, w["grad_in_sumsq"] & w["grad_out_sumsq"]),
            "grad_in_branch_norm": (np.sqrt(f["grad_in_branch_sumsq"]), w["grad_in_branch_sumsq"]),
            "grad_in_skip_norm": (np.sqrt(f["grad_in_skip_sumsq"]), w["grad_in_skip_sumsq"]),
            "nonfinite_grads": (f["nonfinite"], w["nonfinite"]),
            "param_grad_norm": (np.sqrt(f["param_grad_sumsq"]), w["param_grad_sumsq"]),
            "param_norm": (param, w["param_sumsq"]),
            "update_ratio": (np.sqrt(f["update_sumsq"]) / param, w["update_sumsq"] & w["param_sumsq"]),
            "loss": (f["loss"], w["loss"]),
        }
        for name, value in zip(METRICS[:5], act):
            derived[name] = (value, w["act_sum"])
    for i, name in enumerate(METRICS):
        values[..., i], valid[..., i] = derived[name]
    return values, valid


# ---------------------------------------------------------------------------------------
# The trainer's adapter


class RecorderCallback:
    """Records a training run through the trainer's named events.

    Creates the Recorder at fit start (continuing the trainer's step numbering on resume),
    keeps its epoch, records each step's loss, flushes at every epoch end (before the
    trainer writes its checkpoint) and removes every hook at fit end, or in ``close()``.
    """

    def __init__(self, config: RecordConfig | None = None, sink: Sink | None = None) -> None:
        self.config = RecordConfig() if config is None else config
        self.sink = sink
        self.recorder: Recorder | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self.close()
        if not self.config.enabled:
            return  # no hooks at all: zero cost
        recorder = Recorder(
            trainer.model,
            every=self.config.make_schedule(),
            optimizer=trainer.optimizer,
            sink=self.sink,
            flush_every=self.config.flush_every,
            start_step=trainer.step,
            probes=self.config.probes,
        )
        recorder.epoch = getattr(trainer, "epoch", 0)
        if recorder._buffer_kind()[1].type == "cpu" and not native.available():  # built here, once
            logging.getLogger("gradlab").warning(
                "gradient statistics by eager PyTorch ops, not the compiled kernels (%s): "
                "recording costs about twice as much; see README, Performance", native.status_reason()
            )
        self.recorder = recorder.__enter__()

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.recorder is not None:
            self.recorder.epoch = epoch
            self.recorder.step = trainer.step

    def on_after_forward(self, trainer: Any, loss: torch.Tensor) -> None:
        if self.recorder is not None:
            if self.recorder.step != trainer.step:  # e.g. a step the trainer skipped
                self.recorder.step = trainer.step
            self.recorder.record_loss(loss)

    def on_after_backward(self, trainer: Any) -> None:
        pass  # the recorder's own hooks measured the backward pass

    def on_after_step(self, trainer: Any) -> None:
        pass  # the optimizer's step hooks closed the step

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Any) -> None:
        if self.recorder is not None:
            self.recorder.flush()

    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and flush; safe to call again, and after a failed run."""
        if self.recorder is not None:
            self.recorder.close()

    def frame(self):
        """The records kept by the recorder (empty with a sink or before fit start)."""
        if self.recorder is None:
            import pandas as pd

            return pd.DataFrame(empty_columns())
        return self.recorder.frame()
