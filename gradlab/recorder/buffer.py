"""The moment buffer: one preallocated row of moments per recorded step and probe point, kept
on the device, moved to the host in one copy per flush and turned into ``schema`` rows there.

Hooks run between large kernels, where every line of Python costs microseconds (cold caches),
so the bookkeeping of a step in progress (``StepState``) is plain integers and byte marks.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gradlab import schema, stats

Sink = Callable[[dict[str, np.ndarray]], Any]

# Moments kept on the device per probe point and step; ``metrics`` derives schema.METRICS from them.
FIELDS = (
    "act_sum", "act_chan_sum_sq", "act_sumsq", "act_nonpos",  # stats.activation_moments
    "branch_chan_sum_sq", "branch_sumsq",  # stats.channel_moments
    "skip_chan_sum_sq", "skip_sumsq",
    "grad_out_sumsq", "nonfinite",  # stats.grad_moments
    "grad_in_sumsq", "grad_in_branch_sumsq", "grad_in_skip_sumsq",
    "param_grad_sumsq", "param_sumsq", "update_sumsq",
    "loss",
)  # fmt: skip
F = {name: i for i, name in enumerate(FIELDS)}
NF = len(FIELDS)
ACT, BRANCH, SKIP = 0, 1, 2  # groups of tensors whose sizes the host keeps for the metrics
WRITTEN, COPIED = 1, 2  # marks of a cell: written by a hook, or to take another cell's value
_MARKS = [bytes([WRITTEN]) * n for n in range(5)]  # marks for 0 ... 4 consecutive cells


class StepState:
    """One recorded step in progress: its row of the device buffer, which cells are written,
    and what the backward pass needs from the forward pass."""

    def __init__(self, step: int, epoch: int, slot: torch.Tensor, host: np.ndarray | None, rows: int) -> None:
        self.step, self.epoch = step, epoch
        self.slot = slot  # 1-D device view of this step's [rows, fields] buffer row; hooks write into it
        self.host = host  # the same memory as numpy (a CPU buffer), else None
        # Where the compiled kernels write (a CPU buffer only; 0 elsewhere), and in which precision.
        self.address = slot.data_ptr() if slot.is_cpu else 0
        self.itemsize, self.f64 = slot.element_size(), int(slot.dtype == torch.float64)
        self.threads = torch.get_num_threads()  # asked once per step, not per kernel
        # Per cell (row * NF + field): 0, WRITTEN, or COPIED (takes the value of copies[cell]
        # at the step's end). A later write replaces an earlier mark: the last one wins.
        self.marks = bytearray(rows * NF)
        self.mark_view = np.frombuffer(self.marks, dtype=np.uint8)  # the same bytes, for marking many cells at once
        self.copies: dict[int, int] = {}
        self.flushes = 0  # the buffer's flush count when the step began
        self.sizes = [0] * (rows * 6)  # (numel, channels) per row and group: [rows, 3, 2]
        # The latest probe output, to notice an input that is the previous output: a weak
        # reference (identity only, keeps nothing alive), its row, tap and version.
        self.last_out: weakref.ref | None = None
        self.last_row: int | None = None
        self.last_tap: Any = None
        self.last_version = 0
        self.skip_grad: dict[int, tuple[torch.Tensor, tuple | None]] = {}  # identity row -> (skip gradient, layout)
        self.path_in: dict[int, torch.Tensor] = {}  # projection row -> the paths' input (a pre_relu mask)
        self.path_grad: dict[tuple[int, str], torch.Tensor] = {}  # (projection row, path) -> its input gradient

    def cells(self, row: int, first: str, n: int = 1) -> torch.Tensor:
        """The buffer view of ``n`` consecutive fields of ``row`` from ``first``, marked written."""
        i = row * NF + F[first]
        self.marks[i : i + n] = _MARKS[n]
        return self.slot[i] if n == 1 else self.slot[i : i + n]

    def at(self, row: int, first: str, n: int = 1) -> int:
        """The address of ``n`` consecutive fields of ``row`` from ``first`` (CPU buffers), marked written."""
        i = row * NF + F[first]
        self.marks[i : i + n] = _MARKS[n]
        return self.address + i * self.itemsize

    def copy(self, row: int, first: str, from_row: int, from_first: str, n: int = 1) -> None:
        """Let ``n`` fields of ``row`` take the values of ``from_row``'s at the step's end."""
        i, j = row * NF + F[first], from_row * NF + F[from_first]
        for k in range(n):
            self.marks[i + k] = COPIED
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
        return tuple(sorted((i, j) for i, j in self.copies.items() if self.marks[i] == COPIED))

    def bookkeeping(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Which cells hold a value (bool, rows x fields, flat) and the sizes ([rows, 3, 2])."""
        written = np.frombuffer(bytes(self.marks), dtype=np.uint8) != 0
        return written, np.array(self.sizes, dtype=np.int64).reshape(rows, 3, 2)

    def forget_backward(self) -> None:
        """Drop what the backward pass needed from the forward pass (the graph is done)."""
        self.skip_grad.clear()
        self.path_in.clear()
        self.path_grad.clear()


class MomentBuffer:
    """``flush_every`` recorded steps of moments, [steps, rows, FIELDS], on the device, and the
    rows' identities (row 0: the model's per-step row; row i + 1: the i-th probe point)."""

    def __init__(self, rows: dict[str, Sequence], flush_every: int, sink: Sink | None) -> None:
        self.rows = len(rows["layer"])
        self.identity = {  # the schema's probe-point columns, one entry per row
            "layer": np.array(rows["layer"], dtype=object),
            "position": np.array(rows["position"], dtype=np.int64),
            "role": np.array(rows["role"], dtype=object),
            "stack_index": np.array(rows["stack_index"], dtype=np.int64),
            "module_type": np.array(rows["module_type"], dtype=object),
        }
        self.flush_every, self.sink = flush_every, sink
        self.tensor: torch.Tensor | None = None
        self.host: np.ndarray | None = None  # the buffer's memory as numpy, when it is on the CPU
        self.flushes = 0  # flushes so far: a step that saw one has to move its row
        self.meta: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # step, epoch, written cells, sizes
        self.kept: list[dict[str, np.ndarray]] = []
        self._copy_index: dict[Any, tuple] = {}

    def begin(self, step: int, epoch: int, dtype: torch.dtype, device: torch.device) -> StepState:
        """A zeroed row for a new recorded step (the buffer reallocated for another dtype or device)."""
        if self.tensor is None or self.tensor.dtype != dtype or self.tensor.device != device:
            self.flush()
            shape = (self.flush_every, self.rows, NF)
            if device.type == "cpu":  # numpy's memory, so the host writes into it without a conversion
                self.host = np.zeros(shape, dtype=torch.empty((), dtype=dtype).numpy().dtype)
                self.tensor = torch.from_numpy(self.host)
            else:
                self.host, self.tensor = None, torch.zeros(shape, dtype=dtype, device=device)
        slot = self.tensor[len(self.meta)].view(-1)
        slot.zero_()
        host = None if self.host is None else self.host[len(self.meta)].reshape(-1)
        state = StepState(step, epoch, slot, host, self.rows)
        state.flushes = self.flushes
        return state

    def end(self, state: StepState) -> None:
        """Keep a finished step: settle its copied cells and its bookkeeping; flush when full."""
        if state.marks.count(0) == len(state.marks):  # nothing was measured
            return
        copies = state.pending_copies()
        if copies and state.host is not None:  # a CPU buffer: numpy indexing on the same memory
            dst, src = self._index(copies, None)
            state.host[dst] = state.host[src]
        elif copies:
            dst, src = self._index(copies, state.slot.device)
            state.slot.index_copy_(0, dst, state.slot.index_select(0, src))
        if state.flushes != self.flushes:  # a flush came in the middle of the step: its row moves
            self.tensor[len(self.meta)].view(-1).copy_(state.slot)
        self.meta.append((state.step, state.epoch, *state.bookkeeping(self.rows)))
        if len(self.meta) == self.flush_every:
            self.flush()

    def _index(self, pairs: tuple[tuple[int, int], ...], device: torch.device | None) -> tuple:
        """Destination and source cells of ``pairs`` as device index tensors (numpy arrays for
        ``device=None``), built once per layout of copies, not per step: a copy to the device waits."""
        key = (pairs, device)
        if key not in self._copy_index:
            sides = [np.array(side, dtype=np.int64) for side in zip(*pairs)]
            self._copy_index[key] = tuple(sides if device is None else (torch.from_numpy(a).to(device) for a in sides))
        return self._copy_index[key]

    def flush(self) -> None:
        """Move every kept step to the host in one copy and emit its rows."""
        if not self.meta:
            return
        meta, self.meta = self.meta, []
        self.flushes += 1
        # host sync: the one device -> host copy of this flush (astype copies out of the buffer)
        raw = self.tensor[: len(meta)].cpu().numpy().astype(np.float64)
        columns = self.columns(raw, meta)
        if self.sink is not None:
            self.sink(columns)
        else:
            self.kept.append(columns)

    def columns(self, raw: np.ndarray, meta: list) -> dict[str, np.ndarray]:
        """The schema's columns of the moments ``raw`` [steps, rows, FIELDS] of the steps ``meta``."""
        written = np.stack([m[2] for m in meta]).reshape(len(meta), self.rows, NF)
        sizes = np.stack([m[3] for m in meta]).astype(np.float64)  # [steps, rows, group, (numel, channels)]
        values, valid = metrics(raw, written, sizes)
        k, r, m = np.nonzero(valid)  # step-major, then position (model row first), then METRICS order
        steps = np.array([s for s, *_ in meta], dtype=np.int64)
        epochs = np.array([e for _, e, *_ in meta], dtype=np.int64)
        return {"step": steps[k], "epoch": epochs[k], **{c: v[r] for c, v in self.identity.items()},
                "metric": np.array(schema.METRIC_NAMES, dtype=object)[m], "value": values[k, r, m]}

    def frame(self):
        """The kept records as a pandas DataFrame with the schema's columns, sorted by step,
        position and METRICS order."""
        import pandas as pd  # lazily: the torch side never needs pandas

        self.flush()
        if self.kept:
            columns = {c: np.concatenate([chunk[c] for chunk in self.kept]) for c in schema.RECORD_COLUMNS}
        else:
            columns = schema.empty_columns()
        metric_order = pd.Categorical(columns["metric"], categories=schema.METRIC_NAMES).codes
        order = np.lexsort((metric_order, columns["position"], columns["step"]))
        return pd.DataFrame({c: columns[c][order] for c in schema.RECORD_COLUMNS})


def metrics(raw: np.ndarray, written: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """schema.METRICS values and validity, [steps, rows, metrics], from the moments [steps, rows, fields]."""
    f = {name: raw[..., i] for name, i in F.items()}
    w = {name: written[..., i] for name, i in F.items()}
    numel, chans = sizes[..., 0], sizes[..., 1]

    def chan_var(group: int, name: str) -> np.ndarray:
        moments = f[f"{name}_chan_sum_sq"], f[f"{name}_sumsq"]
        return stats.chan_var_from_moments(*moments, numel[..., group], chans[..., group])

    names = schema.METRIC_NAMES
    values = np.full(raw.shape[:2] + (len(names),), np.nan)
    valid = np.zeros(values.shape, dtype=bool)
    with np.errstate(all="ignore"):  # unwritten cells have zero sizes; 0/0 gains are NaN as arithmetic says
        act = stats.activation_metrics(raw[..., :4], numel[..., ACT], chans[..., ACT])
        grad_out, grad_in = np.sqrt(f["grad_out_sumsq"]), np.sqrt(f["grad_in_sumsq"])
        param = np.sqrt(f["param_sumsq"])
        derived = {
            "branch_chan_var": (chan_var(BRANCH, "branch"), w["branch_sumsq"]),
            "skip_chan_var": (chan_var(SKIP, "skip"), w["skip_sumsq"]),
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
        for name, value in zip(names[:5], act):
            derived[name] = (value, w["act_sum"])
    for i, name in enumerate(names):
        values[..., i], valid[..., i] = derived[name]
    return values, valid
