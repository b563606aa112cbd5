"""Compiled one-pass statistics for CPU tensors: the recorder's fast path on a CPU.

On a CPU every pass over an activation costs memory bandwidth, and the eager PyTorch ops
behind ``stats.activation_moments`` take four of them (channel sums, squares, a comparison,
its count) plus a launch each. ``moments.c`` reads each tensor once and computes all of a
probe point's moments in that pass, and writes them straight into the recorder's buffer. On
the development machine that is 3-5x less time for an activation's moments, and a gradient's
norm and non-finite count for the price of one dot product; the recorder's overhead drops from
1.12-1.23x a train step to 1.02-1.07x (``benchmarks/recorder_overhead.py``).

The C source ships with gradlab and is compiled on first use with the system's C compiler
(``$CC``, else ``cc``) into a per-user cache (``$GRADLAB_CACHE_DIR``, else
``$XDG_CACHE_HOME/gradlab``, else ``~/.cache/gradlab``), keyed by the source, the flags, the
compiler and the CPU: about 0.3 s once. It is built with ``-fopenmp`` when PyTorch runs on
GNU OpenMP, so the kernels bind to the libgomp PyTorch has already loaded and share its
thread pool. Where there is no compiler, or on another OS, or with ``GRADLAB_NATIVE=0``, the
statistics run as eager PyTorch ops instead: the same results, slower (``status()`` says why).

Only dense (contiguous or channels-last) float32 and bfloat16 CPU tensors are handled here;
``handles`` says which. Every function writes float64 or float32 results to a raw address.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("moments.c")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the C side's dtype codes
BASE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c11")
DISABLE_ENV = "GRADLAB_NATIVE"  # "0" turns the compiled kernels off

_ENTRY_POINTS = ("gl_activation_moments", "gl_grad_moments", "gl_relu_part_sumsq", "gl_sumsq_many")
_ARGS = 12  # int64 slots of the argument array every entry point takes
_ArgArray = ctypes.c_int64 * _ARGS  # the one argument of every entry point: int64 slots
_local = threading.local()  # one argument array per thread, reused call after call


def _args(*values: int) -> ctypes.Array:
    """This thread's argument array, filled with ``values`` (pointers as integers, 0 for NULL)."""
    args = getattr(_local, "args", None)
    if args is None:
        args = _local.args = _ArgArray()
    args[: len(values)] = values
    return args


class NativeError(RuntimeError):
    """A compiled kernel could not run (it could not allocate its per-thread sums)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("GRADLAB_CACHE_DIR"):
        return Path(os.environ["GRADLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradlab"


def _torch_uses_libgomp() -> bool:
    """True when PyTorch's OpenMP runtime is GNU libgomp, loaded in this process."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a binary built with -march=native runs only there."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    """The compiled library, built into the cache unless it is there already."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_signature(), platform.machine()]).encode()
    ).hexdigest()[:20]
    target = cache_dir() / f"moments-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built beside the target and renamed into place: concurrent builds never see half a file.
        fd, partial = tempfile.mkstemp(prefix=target.stem, suffix=".so.part", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run(
                [compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True, timeout=120, check=True
            )
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"{DISABLE_ENV}=0"
    if platform.system() != "Linux":
        return None, f"compiled kernels are built on Linux only (this is {platform.system()})"
    compiler = os.environ.get("CC") or "cc"
    flags = BASE_FLAGS + (("-fopenmp",) if _torch_uses_libgomp() else ())
    try:
        lib = ctypes.CDLL(str(_build(compiler, flags)))
    except FileNotFoundError:
        return None, f"no C compiler ({compiler!r} not found; install gcc, or set CC)"
    except subprocess.CalledProcessError as err:
        last = (err.stderr or err.stdout or "").strip().splitlines()
        return None, f"{compiler} could not build {SOURCE.name}: {last[-1] if last else err}"
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"could not build or load {SOURCE.name}: {err}"
    for name in _ENTRY_POINTS:  # typed: anything but this argument array raises ctypes.ArgumentError
        entry = getattr(lib, name)
        entry.argtypes, entry.restype = [_ArgArray], ctypes.c_int
    return lib, ""


_off = 0  # depth of ``disabled()`` blocks


def available() -> bool:
    """True when the compiled kernels are built and loaded (building them on first call), and
    not switched off by ``disabled()``."""
    return not _off and _load()[0] is not None


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block every statistic is taken by eager PyTorch ops, as on a machine without
    a C compiler: for side-by-side benchmarks and tests. Recorders created or stepping inside
    it take the eager path for the steps inside it. Not thread-safe (a process-wide switch)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def status() -> str:
    """One line: which implementation computes CPU statistics, and why."""
    return f"compiled ({SOURCE.name})" if available() else f"eager PyTorch ops ({status_reason()})"


def status_reason() -> str:
    """Why the compiled kernels are not in use ("" when they are)."""
    return "switched off by native.disabled()" if _off and _load()[0] is not None else _load()[1]


def plan(x: torch.Tensor, stride: tuple[int, ...] | None = None) -> tuple[int, int, int, int] | None:
    """``(dtype code, outer, channels, inner)`` when the kernels take ``x``, else None.

    They take non-empty float32 and bfloat16 CPU tensors that are contiguous or
    channels-last: ``x`` is then [outer, C, inner] in memory with channels on dim 1 (NCHW:
    (N, C, H*W); NHWC and [N, C]: (N*H*W or N, C, 1); a vector: (1, 1, n)). ``stride``:
    ``x.stride()`` when the caller has it already.

    The recorder asks this for every tensor it measures, inside hooks that run between large
    kernels, where every call into torch costs microseconds (cold caches): four calls here,
    and the layout arithmetic is cached per shape and stride.
    """
    code = DTYPES.get(x.dtype)
    if code is None or not x.is_cpu or not available():
        return None
    layout = _layout(x.shape, x.stride() if stride is None else stride)
    return None if layout is None else (code, *layout)


def _dense_in(shape: tuple[int, ...], stride: tuple[int, ...], order: tuple[int, ...]) -> bool:
    """True when the dims in ``order`` (innermost first) are packed without gaps (size-1 dims aside)."""
    expected = 1
    for d in order:
        if shape[d] != 1 and stride[d] != expected:
            return False
        expected *= shape[d]
    return True


@functools.lru_cache(maxsize=1024)
def _layout(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int, int] | None:
    """``(outer, channels, inner)`` of a non-empty tensor that is contiguous or channels-last."""
    n = math.prod(shape)
    if n == 0:
        return None
    if _dense_in(shape, stride, tuple(reversed(range(len(shape))))):
        if len(shape) <= 1:
            return 1, 1, n
        return shape[0], shape[1], n // (shape[0] * shape[1])
    if len(shape) == 4 and _dense_in(shape, stride, (1, 3, 2, 0)):
        return n // shape[1], shape[1], 1
    return None


def handles(*tensors: torch.Tensor) -> bool:
    """True when the kernels take these tensors together: each passes ``plan``, and all have
    one shape and one memory layout (dtypes may differ)."""
    first = tensors[0]
    for t in tensors:
        if plan(t) is None or (t is not first and (t.shape != first.shape or t.stride() != first.stride())):
            return False
    return True


def _lib() -> ctypes.CDLL:
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"compiled kernels unavailable: {_load()[1]}")
    return lib


def _check(code: int) -> None:
    if code != 0:
        raise NativeError("a compiled statistics kernel could not allocate its per-thread sums")


def _f64(out: torch.Tensor) -> int:
    if not out.is_cpu or out.dtype not in (torch.float32, torch.float64) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 or float64 CPU tensor, got {out.dtype} on {out.device}")
    return int(out.dtype == torch.float64)


# Raw forms for the recorder's hooks: results go to an address in a CPU buffer of float32
# (f64 = 0) or float64 (f64 = 1) values, and ``layout`` is the tensor's ``plan``.


def activation_moments_at(
    x: torch.Tensor, layout: tuple, address: int, f64: int, first: int = 0, count: int = 4, threads: int = 0
) -> None:
    """Entries ``first ... first + count - 1`` of ``[sum, sum over channels of (channel sum)^2,
    sum of squares, count <= 0]`` of ``x`` to ``count`` values at ``address``. ``threads``:
    0 asks torch for its thread count."""
    code, outer, c, inner = layout
    threads = threads or torch.get_num_threads()
    _check(_lib().gl_activation_moments(_args(x.data_ptr(), code, outer, c, inner, threads, first, count, address, f64)))


def grad_moments_at(
    g: torch.Tensor,
    layout: tuple,
    address: int,
    count: int,
    f64: int,
    other: torch.Tensor | None = None,
    diff_address: int = 0,
    threads: int = 0,
) -> None:
    """The first ``count`` (1 or 2) of ``[||g||^2, count of inf and NaN in g]`` to ``address``
    and, with ``other`` (same shape, strides and dtype), ``||g - other||^2`` to ``diff_address``."""
    code, outer, c, inner = layout
    _check(_lib().gl_grad_moments(_args(
        g.data_ptr(), 0 if other is None else other.data_ptr(), code, outer * c * inner,
        threads or torch.get_num_threads(), count, address, diff_address, f64,
    )))  # fmt: skip


# Tensor forms: results go to ``out``, a contiguous float32 or float64 CPU tensor.


def activation_moments(x: torch.Tensor, out: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Entries ``first, first + 1, ...`` (as many as ``out`` holds) of
    ``[sum, sum over channels of (channel sum)^2, sum of squares, count <= 0]`` into ``out``.
    ``first = 1`` with two entries gives ``stats.channel_moments``."""
    if first < 0 or first + out.numel() > 4:
        raise ValueError(f"entries {first}..{first + out.numel() - 1} of 4")
    activation_moments_at(x, plan(x), out.data_ptr(), _f64(out), first, out.numel())
    return out


def grad_moments(
    g: torch.Tensor, out: torch.Tensor, other: torch.Tensor | None = None, diff_out: torch.Tensor | None = None
) -> torch.Tensor:
    """The first ``out.numel()`` (1 or 2) of ``[||g||^2, count of inf and NaN in g]`` into
    ``out`` and, with ``other`` (same shape and strides), ``||g - other||^2`` into
    ``diff_out``, all in one pass."""
    if out.numel() not in (1, 2):
        raise ValueError(f"out holds 1 or 2 entries, not {out.numel()}")
    if (other is None) != (diff_out is None):
        raise ValueError("other and diff_out go together")
    f64 = _f64(out)
    if diff_out is not None and _f64(diff_out) != f64:
        raise ValueError("out and diff_out must have one dtype")
    if other is not None and other.dtype != g.dtype:
        other = other.to(g.dtype)
    diff_address = 0 if diff_out is None else diff_out.data_ptr()
    grad_moments_at(g, plan(g), out.data_ptr(), out.numel(), f64, other, diff_address)
    return out


def relu_part_sumsq(grad: torch.Tensor, relu_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``||grad where relu_out > 0, else 0||^2`` into ``out`` (one entry): ``stats.relu_part_sumsq``."""
    _check(_lib().gl_relu_part_sumsq(_args(
        grad.data_ptr(), DTYPES[grad.dtype], relu_out.data_ptr(), DTYPES[relu_out.dtype], grad.numel(),
        torch.get_num_threads(), out.data_ptr(), _f64(out),
    )))  # fmt: skip
    return out


def pointers(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The tensors' data addresses, uint64 (one vectorised pass: no per-tensor Python)."""
    return np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.uint64, count=len(tensors))


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def handles_all(tensors: Sequence[torch.Tensor]) -> bool:
    """True when the kernels can take this list as ``Tensors``: loaded, and every tensor dense
    float32 on the CPU."""
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not _dense(t):
            return False
    return available()


class Tensors:
    """A fixed list of dense float32 CPU tensors (a model's parameters) whose squared norms are
    taken every step: their addresses, sizes and strides are gathered once (``of`` checks
    them), so a step costs a few vectorised calls instead of several torch calls per tensor."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self.pointers = pointers(self.tensors)
        self.numel = np.fromiter(map(torch.Tensor.numel, self.tensors), dtype=np.int64, count=len(self.tensors))
        self.strides = list(map(torch.Tensor.stride, self.tensors))

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> Tensors | None:
        """The list, or None when the kernels cannot take it (``handles_all``)."""
        return cls(tensors) if handles_all(tensors) else None

    def sumsq(self, minus: Tensors | None = None, copy_to: Tensors | None = None) -> np.ndarray:
        """Squared norm of each tensor (of ``tensor - minus``), float64; with ``copy_to``, each
        tensor is copied there in the same pass. ``minus`` and ``copy_to``: lists laid out alike."""
        return _sumsq_raw(self.pointers, self.numel, minus, copy_to)

    def sumsq_like(self, others: Sequence[torch.Tensor]) -> np.ndarray | None:
        """Squared norms of tensors of these shapes and dtype and device (gradients: autograd
        gives them their parameters' ones), or None unless each has its tensor's strides."""
        if len(others) != len(self.tensors) or list(map(torch.Tensor.stride, others)) != self.strides:
            return None
        return _sumsq_raw(pointers(others), self.numel)

    def nonfinite_like(self, others: Sequence[torch.Tensor]) -> int | None:
        """The number of inf and NaN entries in tensors laid out like these (as ``sumsq_like``),
        or None when they are not."""
        if len(others) != len(self.tensors) or list(map(torch.Tensor.stride, others)) != self.strides:
            return None
        bad = np.empty(len(others), dtype=np.float64)
        _sumsq_raw(pointers(others), self.numel, bad=bad)
        return int(bad.sum())


class Watched:
    """``Tensors`` of a list whose tensors may move (``.to()``, ``.data =``): ``current()``
    checks their addresses in one vectorised pass and rebuilds the view when one moved."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self._where: np.ndarray | None = None
        self._view: Tensors | None = None

    def current(self) -> Tensors | None:
        """The list as ``Tensors``, or None when the kernels cannot take it (a verdict kept
        while the addresses stay) or are off."""
        if not available():
            return None
        where = pointers(self.tensors)
        if self._where is None or not np.array_equal(where, self._where):
            self._where, self._view = where, Tensors.of(self.tensors)
        return self._view


def _sumsq_raw(
    a: np.ndarray,
    numel: np.ndarray,
    minus: Tensors | None = None,
    copy_to: Tensors | None = None,
    bad: np.ndarray | None = None,
) -> np.ndarray:
    out = np.empty(len(a), dtype=np.float64)
    _check(_lib().gl_sumsq_many(_args(
        len(a), a.ctypes.data, 0 if minus is None else minus.pointers.ctypes.data,
        0 if copy_to is None else copy_to.pointers.ctypes.data, numel.ctypes.data, torch.get_num_threads(),
        out.ctypes.data, 0 if bad is None else bad.ctypes.data,
    )))  # fmt: skip
    return out
