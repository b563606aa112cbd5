"""How the recorder measures: moments of activations, gradients and parameters written into a
step's buffer row. Chosen once per buffer (``backend_for``), never per hook:

``Eager``
    PyTorch ops with ``out=`` into the buffer (``stats``): accelerators, float64 models,
    machines without a C compiler.
``Compiled``
    The compiled one-pass kernels (``native``) on a CPU buffer: each tensor is read once for
    all its moments, which go straight to the buffer's address. A tensor they cannot take
    (another dtype or memory layout) is measured by the eager ops instead.

Parameter norms are one pass per list of tensors (``_foreach`` kernels, or ``native.Tensors``),
then one small matrix product sums the squares per probe point.
"""
from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from gradlab import native, stats

from .buffer import ACT, NF, WRITTEN, F, StepState

_GRAD = torch.Tensor.grad.__get__  # p.grad without attribute lookup: 4x faster inside a hook


class Eager:
    """Moments by eager PyTorch ops, written into the buffer with ``out=``."""

    compiled = False

    def __init__(self, params: list[nn.Parameter], owners: Sequence[Sequence[nn.Parameter]]) -> None:
        self.params = params
        self.owners = owners  # per probe point (row - 1): the parameters it owns
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # stats' temporaries
        self._rows: dict = {}  # cached owner matrices and row indices
        self._before: list[torch.Tensor] | None = None  # the parameters before the optimizer step
        self._compiled_before = None  # the same, as the compiled kernels keep it
        self._before_kinds: tuple | None = None
        self._before_store: list[torch.Tensor] = []

    # -- activations and gradients ---------------------------------------------------------

    def layout(self, x: torch.Tensor, known: tuple | None = None, stride: tuple | None = None) -> tuple | None:
        """The compiled kernels' plan for ``x`` (None: eager ops take it)."""
        return None

    def activation(self, state: StepState, row: int, field: str, group: int, x: torch.Tensor) -> tuple:
        """Moments of ``x`` into ``row``'s cells from ``field`` (``act_sum``: the four of
        ``stats.activation_moments``; a ``*_chan_sum_sq`` field: the two of
        ``stats.channel_moments``) and its sizes for ``group``. Returns ``(layout, strides)``
        when the compiled kernels took ``x``, else ``(None, None)``."""
        count = 4 if field == "act_sum" else 2
        fn = stats.activation_moments if count == 4 else stats.channel_moments
        self.measure(fn, x.detach(), state.cells(row, field, count))
        state.size(row, group, x.numel(), stats.channels(x))
        return None, None

    def grad(self, state: StepState, grad: torch.Tensor, layout: tuple | None, row: int, field: str, count: int,
             skip: torch.Tensor | None = None, skip_layout: tuple | None = None, branch_row: int | None = None) -> None:
        """``count`` moments of ``grad`` (its squared norm, and its non-finite count) into ``row``'s
        cells from ``field``; with ``skip``, ``||grad - skip||^2`` into ``branch_row``'s branch part."""
        branch = None if skip is None else state.cells(branch_row, "grad_in_branch_sumsq")
        other = None if skip is None else skip.detach()
        self.measure(functools.partial(stats.grad_moments, other=other, diff_out=branch), grad.detach(),
                     state.cells(row, field, count))

    def parts(self, state: StepState, row: int, branch: torch.Tensor, skip: torch.Tensor,
              relu_out: torch.Tensor | None) -> None:
        """Squared norms of a projection block's two parts of its input gradient, each through
        the leading ReLU's mask when ``relu_out`` is given."""
        cells = state.cells(row, "grad_in_branch_sumsq", 2)
        for i, path in enumerate((branch, skip)):
            if relu_out is not None:
                self.measure(functools.partial(stats.relu_part_sumsq, relu_out=relu_out), path, cells[i])
            else:
                self.measure(stats.grad_moments, path, cells[i])

    def measure(self, fn: Callable[..., torch.Tensor], x: torch.Tensor, out: torch.Tensor) -> None:
        """``fn(x)`` by eager ops, written into the buffer view ``out``, with a scratch for temporaries."""
        if out.dtype == stats.stat_dtype(x.dtype):
            fn(x, scratch=self._scratch_for(x), out=out)
        else:  # e.g. a float32 tensor in a float64 model: measured in its own precision, then stored
            out.copy_(fn(x, scratch=self._scratch_for(x)).reshape(-1)[: out.numel()].reshape(out.shape))

    def _scratch_for(self, t: torch.Tensor) -> torch.Tensor:
        """One scratch buffer per device and dtype, grown to the largest tensor seen."""
        key = (t.device, t.dtype)
        scratch = self._scratch.get(key)
        if scratch is None or (scratch.numel() < 2 * t.numel() and scratch.numel() < stats.scratch_numel(t)):
            scratch = self._scratch[key] = stats.new_scratch(t)
        return scratch

    # -- parameters --------------------------------------------------------------------------

    def params_before_step(self, state: StepState, keep_before: bool) -> None:
        """Parameter and gradient norms per probe point and of the whole model; with
        ``keep_before`` the parameters are copied, in the same pass, for the update norm."""
        self._before = None
        if not self.params:
            return
        with torch.no_grad():
            grads = list(map(_GRAD, self.params))
            self._grad_rows(state, grads)
            before = self._before_buffer() if keep_before else None
            self.add_rows(state, self._squares(self.params, copy_to=before), None, "param_sumsq")
            self._before = before

    def update_after_step(self, state: StepState) -> None:
        """``||theta_after - theta_before||^2`` per probe point, from the copy kept before the step."""
        if self._before is not None:
            with torch.no_grad():
                self.add_rows(state, self._squares(self.params, minus=self._before), None, "update_sumsq")
        self._before = None

    def forget_before(self) -> None:
        """Drop the copy of the parameters (a step that was not recorded after all)."""
        self._before = self._compiled_before = None

    def _grad_rows(self, state: StepState, grads: list[torch.Tensor | None]) -> None:
        complete = all(map(operator.is_not, grads, itertools.repeat(None)))
        if complete:
            self.add_rows(state, self._squares(grads), None, "param_grad_sumsq")
        elif any(g is not None for g in grads):  # frozen parameters have none
            present = tuple(g is not None for g in grads)
            self.add_rows(state, self._squares([g for g in grads if g is not None]), present, "param_grad_sumsq")

    @staticmethod
    def _squares(
        tensors: list[torch.Tensor], minus: list[torch.Tensor] | None = None, copy_to: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Squared L2 norm of each tensor (of ``tensor - minus``), copying each to ``copy_to`` on
        the way, by fused ``_foreach`` kernels. ``minus`` is scratch: it is overwritten."""
        if copy_to is not None:
            torch._foreach_copy_(copy_to, tensors)
        if minus is not None:
            torch._foreach_sub_(minus, tensors)  # minus - tensors: the same norm as tensors - minus
            tensors = minus
        return stats.param_sumsq(tensors)

    def _before_buffer(self) -> list[torch.Tensor]:
        """Tensors shaped like the parameters for their values before the optimizer step,
        allocated once (reallocated when the model moves or changes dtype)."""
        kinds = tuple((p.shape, p.dtype, p.device) for p in self.params)
        if self._before_kinds != kinds:
            self._before_kinds, self._before_store = kinds, [torch.empty_like(p) for p in self.params]
        return self._before_store

    def add_rows(self, state: StepState, squares: torch.Tensor | np.ndarray, present: tuple[bool, ...] | None,
                 field: str) -> None:
        """Squared norms of the (present) parameters or gradients summed per probe point into
        the step's buffer row; for gradients also over the whole model (row 0). ``squares``: a
        device tensor, or float64 numpy from the compiled kernels (a CPU buffer)."""
        with_model = field == "param_grad_sumsq"
        if isinstance(squares, np.ndarray):
            rows, owners = self._rows_host(present, with_model)
            if rows:
                state.host.reshape(-1, NF)[rows, F[field]] = owners @ squares
        else:
            rows, index, owners = self._owner_rows(present, with_model, squares.dtype, squares.device)
            if rows:
                column = state.slot.view(-1, NF)[:, F[field]]
                column.index_copy_(0, index, (owners @ squares).to(column.dtype))
        if rows:
            state.mark_view[np.asarray(rows) * NF + F[field]] = WRITTEN

    def _rows_host(self, present: tuple[bool, ...] | None, with_model: bool) -> tuple[list[int], np.ndarray]:
        """``_owner_rows`` for the host: the rows and a float64 numpy owner matrix."""
        key = ("host rows", present, with_model)
        if key not in self._rows:
            rows, _, owners = self._owner_rows(present, with_model, torch.float64, torch.device("cpu"))
            self._rows[key] = (rows, np.array(owners.tolist(), dtype=np.float64).reshape(len(rows), -1))
        return self._rows[key]

    def _owner_rows(
        self, present: tuple[bool, ...] | None, with_model: bool, dtype: torch.dtype, device: torch.device
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Rows that own at least one of the parameters ``present`` marks, those rows as a device
        index, and the 0/1 matrix that sums per-parameter values into them (row 0, ``with_model``:
        all of them)."""
        key = ("rows", present, with_model, dtype, device)
        if key not in self._rows:
            kept = [p for i, p in enumerate(self.params) if present is None or present[i]]
            index = {id(p): i for i, p in enumerate(kept)}
            members = [list(index.values())] if with_model else [[]]
            for owned in self.owners:
                members.append([index[id(p)] for p in owned if id(p) in index])
            rows = [row for row, m in enumerate(members) if m]
            owners = torch.zeros(len(rows), len(index), dtype=dtype)
            for i, row in enumerate(rows):
                owners[i, members[row]] = 1.0
            # Built once per set of parameters: the copies to the device wait on them.
            self._rows[key] = (rows, torch.tensor(rows, device=device), owners.to(device))
        return self._rows[key]


class Compiled(Eager):
    """The compiled one-pass kernels on a CPU buffer, with the eager ops for what they cannot take."""

    compiled = True

    def __init__(self, params: list[nn.Parameter], owners: Sequence[Sequence[nn.Parameter]]) -> None:
        super().__init__(params, owners)
        # The kernels' view of the parameters, and of a buffer for their values before the step
        # (built for that view of the parameters).
        self._watched = native.Watched(params)
        self._view: tuple[native.Tensors, native.Tensors] | None = None

    def layout(self, x: torch.Tensor, known: tuple | None = None, stride: tuple | None = None) -> tuple | None:
        """``known`` (the layout of the forward tensor whose gradient ``x`` is) when the strides
        agree, else ``native.plan``."""
        strides = x.stride()
        return known if known is not None and strides == stride else native.plan(x, strides)

    def activation(self, state: StepState, row: int, field: str, group: int, x: torch.Tensor) -> tuple:
        stride = x.stride()
        layout = native.plan(x, stride)
        if layout is None:
            return super().activation(state, row, field, group, x)
        first, count = (0, 4) if field == "act_sum" else (1, 2)
        native.activation_moments_at(x, layout, state.at(row, field, count), state.f64, first, count, state.threads)
        _, outer, channels, inner = layout
        state.size(row, group, outer * channels * inner, channels)
        return layout, stride

    def grad(self, state: StepState, grad: torch.Tensor, layout: tuple | None, row: int, field: str, count: int,
             skip: torch.Tensor | None = None, skip_layout: tuple | None = None, branch_row: int | None = None) -> None:
        if layout is None or (skip is not None and skip_layout != layout):
            return super().grad(state, grad, layout, row, field, count, skip, skip_layout, branch_row)
        branch = 0 if skip is None else state.at(branch_row, "grad_in_branch_sumsq")  # one pass for both
        native.grad_moments_at(grad, layout, state.at(row, field, count), count, state.f64, skip, branch, state.threads)

    def params_before_step(self, state: StepState, keep_before: bool) -> None:
        view = self._params_view()
        if view is None:  # the kernels cannot take these parameters: the eager path
            self._compiled_before = None
            return super().params_before_step(state, keep_before)
        self._before = None
        with torch.no_grad():
            grads = list(map(_GRAD, self.params))
            squares = view[0].sumsq_like(grads) if all(g is not None for g in grads) else None
            if squares is not None:
                self.add_rows(state, squares, None, "param_grad_sumsq")
            else:
                self._grad_rows(state, grads)
            params, before = view
            self.add_rows(state, params.sumsq(copy_to=before if keep_before else None), None, "param_sumsq")
            self._compiled_before = view if keep_before else None

    def update_after_step(self, state: StepState) -> None:
        if self._compiled_before is None:
            return super().update_after_step(state)
        params, before = self._compiled_before  # one compiled pass: ||after - before||^2
        self.add_rows(state, params.sumsq(minus=before), None, "update_sumsq")
        self._compiled_before = None

    def _params_view(self) -> tuple[native.Tensors, native.Tensors] | None:
        """The parameters and a before-the-step buffer as ``native.Tensors``, built once and
        rebuilt when a parameter moved (``.to()``, ``.data =``); None when the kernels cannot
        take them (an accelerator, another dtype), a verdict kept for the same addresses."""
        params = self._watched.current()
        if params is None:
            return None
        if self._view is None or self._view[0] is not params:
            self._view = (params, native.Tensors([torch.empty_like(p) for p in self.params]))
        return self._view


def backend_for(device: torch.device, params: list[nn.Parameter], owners: Sequence[Sequence[nn.Parameter]]) -> Eager:
    """The compiled kernels for a CPU buffer when they are built here, else eager ops."""
    if device.type == "cpu" and native.available():
        return Compiled(params, owners)
    return Eager(params, owners)


__all__ = ["ACT", "Compiled", "Eager", "backend_for"]
