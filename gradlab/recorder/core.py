"""The Recorder: the hooks' lifecycle and what each hook does on a recorded step.

Its parts: ``buffer.MomentBuffer`` keeps the moments and flushes them; ``measure`` computes
them (compiled kernels or eager ops, chosen once); this module registers the hooks on enter,
removes every one of them on every exit path, and routes each tensor a hook sees to its
probe point's row.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from gradlab import probes as probe_specs
from gradlab import schema, stats
from gradlab.probes import ProbePoint

from .buffer import ACT, BRANCH, SKIP, MomentBuffer, Sink, StepState
from .measure import Eager, backend_for
from .schedule import Schedule, every as every_n_steps


class _Tap:
    """The roles of one hooked activation tensor: output of row ``out_of``, input of row
    ``in_of``, or the branch output of row ``skip_of`` (whose gradient is that identity
    block's skip gradient); and, when the compiled kernels measured it in the forward pass,
    its layout (``native.plan``) and strides, which its gradient shares unless its strides
    differ (autograd gives a gradient the tensor's dtype, device and shape)."""

    __slots__ = ("out_of", "in_of", "skip_of", "layout", "stride")

    def __init__(self, out_of: int | None = None, in_of: int | None = None, seen: tuple = (None, None),
                 skip_of: int | None = None) -> None:
        self.out_of, self.in_of, self.skip_of = out_of, in_of, skip_of
        self.layout, self.stride = seen


def _skip_source(residual: probe_specs.Residual | None) -> str | None:
    """Where a residual block's skip gradient comes from: the block's output gradient ("out":
    an identity with nothing after the addition), the branch output's gradient ("branch": an
    identity followed by, say, a ReLU), or the parts through two paths ("paths": a projection)."""
    if residual is None:
        return None
    if residual.skip is not None:
        return "paths"
    return "out" if residual.post is None else "branch"


class Recorder:
    """Forward and backward statistics of every probe point, on the steps ``every`` selects.

    ``every``: an int N (record steps 0, N, 2N, ...; 0 records nothing) or a schedule
    callable (``every``, ``logspaced``). ``optimizer``: when given, a step ends with
    ``optimizer.step()`` and the parameter update is measured; without one, every backward
    pass is one step. ``sink``: a callable that receives each flush's columns (a dict of
    numpy arrays keyed by ``schema.RECORD_COLUMNS``); without one the records are kept for
    ``frame()``. ``probes``: which modules to measure: names or globs, a function
    ``(name, module) -> bool``, or ``ProbePoint`` objects (``probes.select``; by default the
    model's declared points, else the automatic rule). Residual blocks are split into branch
    and skip by their declared decomposition (``probes.Residual``), never by guessing.

    ``manual_steps``: the caller ends each step instead of an optimizer's hooks or the backward
    pass: ``before_update()`` once the step's gradients are complete, ``after_update()`` once
    the parameters are updated. For loops that run forward and backward inside
    ``optimizer.step(closure)`` (Lightning's automatic optimisation), where an optimizer's step
    pre-hook fires before the gradients exist; and for gradient accumulation, where several
    backward passes make one step.

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
        manual_steps: bool = False,
    ) -> None:
        if manual_steps and optimizer is not None:
            raise ValueError("manual_steps=True: the caller's before_update() and after_update() end each step, "
                             "so pass no optimizer (its step hooks would end the steps too)")
        self.manual_steps = bool(manual_steps)
        self.schedule: Schedule = every if callable(every) else every_n_steps(every)
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {flush_every!r}")
        self.model, self.optimizer, self.sink, self.flush_every = model, optimizer, sink, flush_every
        self.probes: list[ProbePoint] = probe_specs.select(model, probes)
        # Row 0 is the model's per-step row; row i + 1 is the i-th probe point.
        self._moments = MomentBuffer({
            "layer": [schema.MODEL_LAYER] + [p.name for p in self.probes],
            "position": [schema.MODEL_POSITION] + [p.position for p in self.probes],
            "role": [schema.MODEL_LAYER] + [p.role for p in self.probes],
            "stack_index": [schema.NOT_IN_STACK] + [p.stack_index for p in self.probes],
            "module_type": [type(model).__name__] + [p.module_type for p in self.probes],
        }, flush_every, sink)
        self._residual = [None] + [p.residual for p in self.probes]
        self._skip_source = [None] + [_skip_source(p.residual) for p in self.probes]
        self._params = list(model.parameters())
        self._owners = [list(p.module.parameters()) for p in self.probes]
        self._measure: Eager | None = None  # chosen with the buffer's device
        self._state: StepState | None = None  # the recorded step in progress
        self.epoch = 0
        self.step = start_step
        self._active = False
        self._handles: list[Any] = []  # module and optimizer hooks, from enter to exit
        self._grad_handles: list[Any] = []  # tensor and graph-node hooks of the current backward
        self._end_queued = False

    @property
    def _buffer(self) -> torch.Tensor | None:
        """The device buffer of moments, [flush_every, rows, fields] (None before a recorded step)."""
        return self._moments.tensor

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
            if self.manual_steps:
                pass  # before_update() and after_update() mark the step
            elif self.optimizer is None:
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

    def _begin(self) -> StepState:
        """The recorded step in progress, opened on its first measurement: its buffer row is
        zeroed, and the hooks write their moments straight into it."""
        if self._state is None:
            dtype, device = self._buffer_kind()
            before = self._moments.tensor
            self._state = self._moments.begin(self._step, self.epoch, dtype, device)
            if self._measure is None or self._moments.tensor is not before:  # a new buffer: choose how to measure
                self._measure = backend_for(device, self._params, self._owners)
        return self._state

    def _buffer_kind(self) -> tuple[torch.dtype, torch.device]:
        """float64 for a float64 model, float32 otherwise (bf16 autocast included); the parameters' device."""
        if not self._params:
            return torch.float32, torch.device("cpu")
        p = self._params[0]
        return stats.stat_dtype(p.dtype), p.device

    def _end_step(self) -> None:
        """Close the current step: keep its moments and advance ``step``."""
        state, self._state = self._state, None
        self._remove_grad_hooks()
        if state is not None:
            self._moments.end(state)
        self.step = self._step + 1

    # -- forward hooks -----------------------------------------------------------------

    def _on_probe_forward(self, row: int, module: nn.Module, args: tuple, output: Any) -> None:
        if not (self._on and module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
            return
        state = self._state or self._begin()
        measure = self._measure
        seen = measure.activation(state, row, "act_sum", ACT, output)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        # The previous probe point's output, unchanged since (an in-place op would bump its version).
        same = x is not None and state.last_out is not None and state.last_out() is x and x._version == state.last_version
        seen_x = (None, None)
        if x is not None and self._skip_source[row] in ("out", "branch"):  # an identity: the skip is the input
            if same:
                state.copy(row, "skip_chan_sum_sq", state.last_row, "act_chan_sum_sq", 2)
                state.size_like(row, SKIP, state.last_row, ACT)
            else:
                seen_x = measure.activation(state, row, "skip_chan_sum_sq", SKIP, x)
        if x is not None and x.requires_grad:
            if same and state.last_tap is not None and state.last_tap.in_of is None:
                state.last_tap.in_of = row  # one hook serves the previous output and this input
            else:
                self._tap(x, _Tap(in_of=row, seen=seen_x))
        state.last_out, state.last_row, state.last_version = weakref.ref(output), row, output._version
        state.last_tap = self._tap(output, _Tap(out_of=row, seen=seen)) if output.requires_grad else None

    def _on_branch_forward(self, row: int, module: nn.Module, args: tuple, output: Any) -> None:
        """A residual block's branch just before the addition; with an operation after the
        addition, the branch output's gradient is the skip gradient of an identity block."""
        if not (self._on and module.training and torch.is_grad_enabled()) or not isinstance(output, torch.Tensor):
            return
        state = self._state or self._begin()
        seen = self._measure.activation(state, row, "branch_chan_sum_sq", BRANCH, output)
        if self._skip_source[row] == "branch" and output.requires_grad:
            self._tap(output, _Tap(skip_of=row, seen=seen))

    def _on_skip_forward(self, row: int, module: nn.Module, args: tuple, output: Any) -> None:
        """A residual block's projection on the skip path."""
        if self._live(module) and isinstance(output, torch.Tensor):
            self._measure.activation(self._state or self._begin(), row, "skip_chan_sum_sq", SKIP, output)

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
        measure = self._measure
        layout = measure.layout(grad, tap.layout, tap.stride)
        if tap.skip_of is not None:  # an identity block's skip gradient: the branch output's
            measure.grad(state, grad, layout, tap.skip_of, "grad_in_skip_sumsq", 1)
            state.skip_grad[tap.skip_of] = (grad, layout)
            return
        out_row, in_row = tap.out_of, tap.in_of
        # An identity block's input gradient is its skip gradient plus the branch's part, so the
        # branch part is grad - skip gradient: measured in the same pass.
        skip, skip_layout = state.skip_grad.pop(in_row, (None, None)) if in_row is not None else (None, None)
        if out_row is not None:  # norm and non-finite count of the output gradient
            measure.grad(state, grad, layout, out_row, "grad_out_sumsq", 2, skip, skip_layout, in_row)
            if self._skip_source[out_row] == "out":
                state.skip_grad[out_row] = (grad, layout)  # equal layouts: one dtype and one order in memory
        else:  # only an input: its norm
            measure.grad(state, grad, layout, in_row, "grad_in_sumsq", 1, skip, skip_layout, in_row)
        if in_row is not None:
            if out_row is not None:  # the same gradient: the norm is already measured
                state.copy(in_row, "grad_in_sumsq", out_row, "grad_out_sumsq")
            if skip is not None and self._skip_source[in_row] == "out":  # the skip part is grad_out itself
                state.copy(in_row, "grad_in_skip_sumsq", in_row, "grad_out_sumsq")
            elif self._skip_source[in_row] == "paths":
                self._path_parts(state, in_row)

    def _on_path_grad(self, row: int, path: str, grads: tuple) -> None:
        """The gradient of a projection block's path input alias: that path's part."""
        state = self._state
        if state is not None and grads and grads[0] is not None:
            state.path_grad[row, path] = grads[0].detach()

    def _path_parts(self, state: StepState, row: int) -> None:
        """A projection block's branch and skip parts of its input gradient; with ``pre_relu``
        both paths passed the block's leading ReLU, whose mask each part then takes."""
        branch = state.path_grad.pop((row, "branch"), None)
        skip = state.path_grad.pop((row, "skip"), None)
        relu_out = state.path_in.pop(row, None)
        if branch is None or skip is None or (relu_out is None and self._residual[row].pre_relu):
            return
        self._measure.parts(state, row, branch, skip, relu_out)

    def _on_backward_end(self) -> None:
        self._end_queued = False
        self._remove_grad_hooks()  # the graph is done: no tensor keeps a hook of ours
        state = self._state
        if state is not None:
            state.forget_backward()
        if self.optimizer is None and not self.manual_steps:
            if self._on:
                self._measure_params(self._begin(), keep_before=False)
            self._end_step()

    # -- parameters and the optimizer ---------------------------------------------------

    def _on_optimizer_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._before_update()

    def _on_optimizer_post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._after_update()

    def before_update(self) -> None:
        """``manual_steps``: the step's gradients are complete and the parameters not yet updated.
        Measures the parameter and gradient norms and keeps the parameters for the update norm."""
        self._check_manual("before_update")
        if self._active:
            self._before_update()

    def after_update(self) -> None:
        """``manual_steps``: the parameters are updated. Measures the update norm, keeps the step's
        records and advances ``step``."""
        self._check_manual("after_update")
        if self._active:
            self._after_update()

    def _check_manual(self, name: str) -> None:
        if not self.manual_steps:
            raise RuntimeError(f"{name}() is for a Recorder made with manual_steps=True; this one ends its steps "
                               "with the optimizer's step hooks or the backward pass")

    def _before_update(self) -> None:
        if self._on:
            self._measure_params(self._begin(), keep_before=True)

    def _after_update(self) -> None:
        state = self._state
        if self._measure is not None:
            if self._on and state is not None:
                self._measure.update_after_step(state)
            self._measure.forget_before()
        self._end_step()

    def _measure_params(self, state: StepState, keep_before: bool) -> None:
        """Parameter and gradient norms per probe point and of the whole model."""
        self._measure.params_before_step(state, keep_before)

    def record_loss(self, loss: torch.Tensor) -> None:
        """Keep the step's loss (detached, on the device; no sync) when the step is recorded."""
        if self._active and self._on:
            self._begin().cells(0, "loss").copy_(loss.detach())

    # -- flush and frame -----------------------------------------------------------------

    def flush(self) -> None:
        """Move every buffered step to the host in one copy and emit its rows (the one host sync)."""
        self._moments.flush()

    def frame(self):
        """The kept records as a pandas DataFrame with ``schema.RECORD_COLUMNS``, sorted by step,
        position and METRICS order (flushes first). With a sink the records went there, and this
        is empty."""
        return self._moments.frame()
