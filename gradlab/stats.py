"""Pure tensor -> tensor statistics for the recorder: no hooks, no state, no host sync.

Every function returns tensors on the input's device, so nothing here waits for an
accelerator; the one value read back is ``grad_moments``'s norm on a CPU, where the device
is the host and reading costs nothing (``reads_are_free``). Results go to a new tensor or,
with ``out``, in place into a caller's buffer. Sums are taken in float32, or float64 for a float64 input: a bf16 model under
autocast still gets float32 statistics.

The recorder stores *moments* (sums, sums of squares, counts) on the device and turns
them into the published metrics once per flush with ``activation_metrics`` and
``chan_var_from_moments``, which work on numpy arrays as well as on tensors. One pass
gives sum and sum of squares; variances come from E[x^2] - E[x]^2, accurate while |mean|
is not far above the standard deviation.

On a CPU, dense float32 and bfloat16 tensors go to compiled kernels (``native``) that read
each tensor once for all its moments and write them straight into ``out``; the eager ops
below are the path for accelerators, other dtypes and layouts, and machines without a C
compiler. Speed on a CPU shapes two more choices for those ops. Temporaries go to a caller-owned ``scratch`` buffer
(see ``new_scratch``): freshly allocated memory costs page faults that can dwarf the
arithmetic (on the development machine, up to 16 ms for the passes over a 30 MB stem
activation with fresh temporaries, 2-3 ms with a reused scratch). Large tensors are reduced
in batch chunks of about ``CHUNK`` elements, which bounds that scratch whatever the
activation size. Without ``scratch`` the functions allocate what they need; the results
are the same.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from gradlab import native

CHUNK = 1 << 19  # elements per chunk (2 MiB of float32); smaller chunks cost more launches than they save


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bf16, fp16) is summed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(x: torch.Tensor) -> int | None:
    """Samples per chunk of ``x`` (about CHUNK elements); None: ``x`` is one chunk."""
    if x.dim() == 0 or x.numel() <= CHUNK or x.shape[0] < 2:
        return None
    return max(1, CHUNK * x.shape[0] // x.numel())


def _chunks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x`` split along the batch dimension into pieces of at most about CHUNK elements."""
    rows = _chunk_rows(x)
    return (x,) if rows is None else torch.split(x, rows)


def scratch_numel(x: torch.Tensor) -> int:
    """Elements of scratch that every function here needs for ``x``: two of its largest chunks."""
    rows = _chunk_rows(x)
    return 2 * (x.numel() if rows is None else rows * (x.numel() // x.shape[0]))


def new_scratch(x: torch.Tensor) -> torch.Tensor:
    """A scratch buffer for ``x``: ``scratch_numel(x)`` elements of ``stat_dtype(x.dtype)`` on its device.

    Every function with a ``scratch`` argument takes such a buffer (or a larger one of the
    same dtype and device) and uses it for its temporaries; the caller keeps it between calls.
    """
    return torch.empty(scratch_numel(x), dtype=stat_dtype(x.dtype), device=x.device)


def _dense(x: torch.Tensor) -> bool:
    """Contiguous in NCHW or in channels-last (NHWC) order: ``_flat`` is then a view."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``x`` in memory order (a copy only for strided, non-dense tensors)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC order is contiguous
    return x.reshape(-1)


Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (chunk, its 1-D view, spare 1-D buffer)


def _single_chunk(x: torch.Tensor, scratch: torch.Tensor | None) -> Chunk | None:
    """The common case, ``(x, its 1-D view, a spare buffer)``: ``x`` small, contiguous and
    already in the statistic dtype, so it is used in place. None when it must be chunked."""
    n = x.numel()
    if n <= CHUNK and x.dtype == stat_dtype(x.dtype) and _dense(x):
        flat = _flat(x)
        spare = scratch[:n] if scratch is not None and scratch.dtype == x.dtype else torch.empty_like(flat)
        return x, flat, spare
    return None


def _stat_chunks(x: torch.Tensor, scratch: torch.Tensor | None) -> Iterator[Chunk]:
    """``(chunk, flat, spare)`` per chunk: the chunk in the statistic dtype, its 1-D view and a
    free 1-D buffer of the same size for temporaries. Use each chunk before asking for the next:
    converted chunks share one region of the scratch."""
    if scratch is None:
        scratch = new_scratch(x)
    for chunk in _chunks(x):
        n = chunk.numel()
        if chunk.dtype != scratch.dtype:  # bf16 / fp16: convert into the second half of the scratch,
            # in the chunk's own memory order (NCHW or NHWC): a straight copy, not a transpose
            strides = chunk.stride() if _dense(chunk) else torch.empty(chunk.shape, device="meta").stride()
            chunk = scratch[n : 2 * n].as_strided(chunk.shape, strides).copy_(chunk)
        yield chunk, _flat(chunk), scratch[:n]


def _out(out: torch.Tensor | None, n: int, x: torch.Tensor) -> torch.Tensor:
    """``out`` (n values, written in place), or a new tensor of n in ``x``'s statistic dtype."""
    return torch.empty(n, dtype=stat_dtype(x.dtype), device=x.device) if out is None else out


def _native(out: torch.Tensor | None, *tensors: torch.Tensor) -> bool:
    """True when the compiled one-pass kernels (``native``) take these tensors and ``out``."""
    if out is not None and (out.device.type != "cpu" or not out.is_contiguous() or out.dtype not in (torch.float32, torch.float64)):
        return False
    return native.handles(*tensors)


def _sum_into(parts: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Sum per-chunk partial results (tensors of ``out``'s shape) into ``out``."""
    return torch.sum(torch.stack(parts), 0, out=out)


# Every measuring function takes an optional ``out``: a tensor of its result's shape (often a
# view into the recorder's buffer) that it writes in place, so results need no copy or stack.


def sumsq(x: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of squares ``||x||^2``, a 0-d tensor: one fused pass (a dot product), no temporaries
    unless ``x`` must be converted to the statistic dtype."""
    if _native(out, x):
        return native.grad_moments(x, _out(out, 1, x).view(1)).view(())
    if x.dtype == stat_dtype(x.dtype):
        flat = _flat(x)
        return torch.dot(flat, flat) if out is None else torch.dot(flat, flat, out=out)
    out = _out(out, 1, x).view(())
    return _sum_into([torch.dot(flat, flat) for _, flat, _ in _stat_chunks(x, scratch)], out)


def diff_sumsq(
    a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``||a - b||^2`` for tensors of one shape, a 0-d tensor: the residual branch part of an input gradient."""
    out = _out(out, 1, a).view(())
    if _native(out, a, b):
        native.grad_moments(a, torch.empty(1, dtype=out.dtype), other=b, diff_out=out.view(1))
        return out
    single = _single_chunk(a, scratch) if b.stride() == a.stride() else None
    if single is not None:
        _, flat, spare = single
        torch.sub(flat, _flat(b), out=spare)
        return torch.dot(spare, spare, out=out)
    parts = []
    for (chunk, _, spare), other in zip(_stat_chunks(a, scratch), _chunks(b)):
        torch.sub(chunk, other, out=spare.view(chunk.shape))
        parts.append(torch.dot(spare, spare))
    return _sum_into(parts, out)


def relu_part(grad: torch.Tensor, relu_out: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient at a ReLU's input from ``grad`` at its output ``relu_out``.

    Autograd's own ``threshold_backward``: the entries where ``relu_out <= 0`` become 0,
    exactly as the backward pass of ``F.relu`` computes them.
    """
    if out is None:
        return torch.ops.aten.threshold_backward(grad, relu_out, 0)
    return torch.ops.aten.threshold_backward.grad_input(grad, relu_out, 0, grad_input=out)


def relu_part_sumsq(
    grad: torch.Tensor, relu_out: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``||relu_part(grad, relu_out)||^2``, a 0-d tensor: one path's share of a ReLU's input gradient."""
    out = _out(out, 1, grad).view(())
    if _native(out, grad, relu_out):
        native.relu_part_sumsq(grad, relu_out, out.view(1))
        return out
    parts = []
    for (chunk, _, spare), mask_from in zip(_stat_chunks(grad, scratch), _chunks(relu_out)):
        relu_part(chunk, mask_from.to(chunk.dtype), out=spare.view(chunk.shape))
        parts.append(torch.dot(spare, spare))
    return _sum_into(parts, out)


def reads_are_free(device: torch.device) -> bool:
    """True where the device is the host (CPU): a kernel has finished when it returns, so
    reading a value it computed is no synchronisation. On an accelerator reading waits for
    the device, and statistics must stay there."""
    return device.type == "cpu"


def grad_moments(
    g: torch.Tensor,
    scratch: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    diff_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[||g||^2, number of inf and NaN entries]``, a float tensor of 2 (an ``out`` of one entry
    takes the norm alone); with ``other`` (shaped like ``g``) also ``||g - other||^2``,
    written to ``diff_out`` (one entry).

    The compiled kernels (``native``, CPU) take all of it in one pass over ``g`` and ``other``.
    Without them, any inf or NaN entry makes the sum of squares non-finite, so on the host
    (CPU) the exact count is taken only then: one pass for a healthy gradient instead of
    three. (A finite gradient whose square sum overflows is counted too, and counts 0.) On an
    accelerator the count is always computed on the device, where it is cheap and nothing waits.
    """
    if (other is None) != (diff_out is None):
        raise ValueError("other and diff_out go together")
    out = _out(out, 2, g)
    if _native(out, g) and (other is None or (_native(diff_out, g, other) and diff_out.dtype == out.dtype)):
        native.grad_moments(g, out, other, None if diff_out is None else diff_out.view(1))
        return out
    if other is not None:
        if diff_out.dtype == stat_dtype(g.dtype):
            diff_sumsq(g, other, scratch, out=diff_out)
        else:
            diff_out.copy_(diff_sumsq(g, other, scratch).reshape(diff_out.shape))
    norm, *count = out.view(-1)
    sumsq(g, scratch, out=norm)
    if not count:  # the norm alone
        return out
    # not a host sync: reads_are_free (the CPU computed this value before returning)
    if reads_are_free(g.device) and math.isfinite(norm.item()):
        count[0].zero_()
        return out
    nonfinite_count(g, scratch, out=count[0])
    return out


def nonfinite_count(g: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Number of inf and NaN entries of ``g``, a 0-d float tensor (exact below 2**24 entries)."""
    out = _out(out, 1, g).view(())
    parts = []
    for _, flat, spare in _stat_chunks(g, scratch):
        # g - g is 0 where g is finite and NaN where it is inf or NaN; x != x marks the NaNs.
        # Float 0/1 outputs: comparisons into bool tensors are several times slower on CPU.
        torch.sub(flat, flat, out=spare)
        parts.append(torch.ne(spare, spare, out=spare).sum())
    return _sum_into(parts, out)


def _channel_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum of each channel (dim 1) over batch and space, a tensor of C.

    For a contiguous [B, C, ...] tensor: sums over space of each (sample, channel) row, then
    over the batch; on a CPU up to twice as fast as one reduction over dims (0, 2, 3). A
    channels-last tensor is summed over (0, 2, 3) directly: column sums, as fast.
    """
    if x.dim() > 2 and x.is_contiguous():
        return x.view(x.shape[0], x.shape[1], -1).sum(2).sum(0)
    return x.sum(tuple(d for d in range(x.dim()) if d != 1)) if x.dim() > 1 else x.sum().reshape(1)


def channels(x: torch.Tensor) -> int:
    """Size of the channel dimension (1); 1 for a 1-d tensor."""
    return x.shape[1] if x.dim() > 1 else 1


def channel_moments(x: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[sum over channels of (channel sum)^2, sum of squares]``, a float tensor of 2.

    All channels hold the same number of entries, so the mean channel variance is
    E[x^2] - mean over channels of (channel mean)^2: see ``chan_var_from_moments``.
    """
    out = _out(out, 2, x)
    if _native(out, x):
        return native.activation_moments(x, out, first=1)
    if x.dtype == stat_dtype(x.dtype):  # no temporaries: whole-tensor passes
        chan = _channel_sums(x)
        torch.dot(chan, chan, out=out[0])
        sumsq(x, out=out[1])
        return out
    sums, squares = [], []
    for chunk, flat, _ in _stat_chunks(x, scratch):
        sums.append(_channel_sums(chunk))
        squares.append(torch.dot(flat, flat))
    chan = torch.stack(sums).sum(0)
    torch.dot(chan, chan, out=out[0])
    _sum_into(squares, out[1])
    return out


def activation_moments(x: torch.Tensor, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[sum, sum over channels of (channel sum)^2, sum of squares, count <= 0]``, a tensor of 4.

    Channels are dimension 1; the statistics run over batch and space. Each chunk of ``x``
    is read from memory once (later passes hit the cache); ``activation_metrics`` turns the
    moments into the five published activation statistics.
    """
    out = _out(out, 4, x)
    if _native(out, x):
        return native.activation_moments(x, out)
    single = _single_chunk(x, scratch)
    if single is not None:
        chunk, flat, spare = single
        chan = _channel_sums(chunk)
        torch.dot(flat, flat, out=out[2])
        # A float 0/1 tensor, not bool: comparisons into bool tensors are slow on CPU.
        torch.sum(torch.le(flat, 0, out=spare), 0, out=out[3])
    else:
        sums, rest = [], []
        for chunk, flat, spare in _stat_chunks(x, scratch):
            sums.append(_channel_sums(chunk))
            rest.append(torch.stack((torch.dot(flat, flat), torch.le(flat, 0, out=spare).sum())))
        chan = torch.stack(sums).sum(0)
        _sum_into(rest, out[2:4])
    torch.sum(chan, 0, out=out[0])
    torch.dot(chan, chan, out=out[1])
    return out


def _clip0(v):
    """max(v, 0) for tensors and numpy arrays alike (NaN stays NaN): rounding can make E[x^2] - m^2 < 0."""
    return (v + abs(v)) / 2


def chan_var_from_moments(chan_sum_sq, sq, numel, n_channels):
    """Mean channel variance from ``channel_moments``'s two entries (tensors or numpy arrays)."""
    per_channel = numel / n_channels
    return _clip0(sq / numel - chan_sum_sq / (n_channels * per_channel * per_channel))


def activation_metrics(moments, numel, n_channels):
    """``(act_mean, act_std, act_nonpos_frac, act_chan_mean_sq, act_chan_var)`` from moments.

    ``moments`` holds ``activation_moments``'s four entries along its last axis (a tensor
    or a numpy array); ``numel`` and ``n_channels`` are the sizes of the measured tensor.
    Standard deviation and variances are population ones (divided by the count).
    """
    total, chan_sum_sq, sq, nonpos = (moments[..., i] for i in range(4))
    per_channel = numel / n_channels
    mean = total / numel
    second = sq / numel
    chan_mean_sq = chan_sum_sq / (n_channels * per_channel * per_channel)
    return mean, _clip0(second - mean * mean) ** 0.5, nonpos / numel, chan_mean_sq, _clip0(second - chan_mean_sq)


def chan_var(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels (dim 1) of the channel variance over batch and space, a 0-d tensor."""
    return chan_var_from_moments(*channel_moments(x), x.numel(), channels(x))


def param_sumsq(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of each tensor, a float tensor of ``len(tensors)``: one ``_foreach_norm``.

    float32 unless every tensor is float64. ``tensors`` must not be empty.
    """
    tensors = list(tensors)
    dtype = torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()
