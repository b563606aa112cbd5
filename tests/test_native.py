"""The compiled one-pass kernels and the eager ops behind stats.py, against float64 tensor ops."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gradlab import native, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {
    "nchw": lambda t: t,
    "nhwc": lambda t: t.to(memory_format=torch.channels_last),
}
# channel counts: one vector of 16, two and a remainder, fewer than a vector; small planes
SHAPES = [(8, 32, 6, 6), (5, 40, 3, 7), (3, 3, 9, 9), (2, 16, 1, 1)]


def tensor(shape, dtype, seed=0, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) + shift).to(dtype)


def activation_reference(x: torch.Tensor) -> list[float]:
    """[sum, sum over channels of (channel sum)^2, sum of squares, count <= 0] in float64."""
    d = x.double()
    chan = d.sum([i for i in range(d.dim()) if i != 1]) if d.dim() > 1 else d.sum().reshape(1)
    return [d.sum().item(), chan.square().sum().item(), d.square().sum().item(), (d <= 0).sum().item()]


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_activation_and_channel_moments(backend, dtype, shape, layout):
    base = tensor(shape, dtype)
    base.view(-1)[:7] = 0.0  # exact zeros: counted as <= 0
    x = LAYOUTS[layout](base)
    expect = activation_reference(x)
    close(stats.activation_moments(x), expect)
    close(stats.channel_moments(x), expect[1:3])
    out = torch.full((4,), -1.0)
    assert stats.activation_moments(x, out=out) is out  # written in place
    close(out, expect)
    if backend == "compiled":  # the compiled kernels also write float64 buffers
        out = torch.full((2,), -1.0, dtype=torch.float64)
        close(stats.channel_moments(x, out=out), expect[1:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_head_outputs_and_vectors(backend, dtype):
    head = tensor((33, 10), dtype, seed=1)  # [B, C]: channels contiguous
    close(stats.activation_moments(head), activation_reference(head))
    vector = tensor((1000,), dtype, seed=2)  # one channel
    close(stats.activation_moments(vector), activation_reference(vector))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gradient_moments_counts_and_parts(backend, dtype, layout):
    g = LAYOUTS[layout](tensor((6, 24, 5, 5), dtype, seed=3, shift=0.0))
    other = LAYOUTS[layout](tensor((6, 24, 5, 5), dtype, seed=4, shift=0.0))
    d, o = g.double(), other.double()
    close(stats.grad_moments(g), [d.square().sum().item(), 0.0])
    close(stats.sumsq(g), d.square().sum().item())
    close(stats.diff_sumsq(g, other), (d - o).square().sum().item())
    diff = torch.zeros(())
    close(stats.grad_moments(g, other=other, diff_out=diff), [d.square().sum().item(), 0.0])
    close(diff, (d - o).square().sum().item())
    relu_out = torch.relu(other)
    close(stats.relu_part_sumsq(g, relu_out), torch.where(o > 0, d, 0.0).square().sum().item())
    close(stats.relu_part_sumsq(g, relu_out.float()), torch.where(o > 0, d, 0.0).square().sum().item())

    bad = g.clone()
    flat = bad.permute(0, 2, 3, 1) if layout == "nhwc" else bad
    flat.reshape(-1)[[0, 5, 600]] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    moments = stats.grad_moments(bad)
    assert not math.isfinite(moments[0].item()) and moments[1].item() == 3


def test_a_finite_gradient_whose_squares_overflow_float32(backend):
    huge = torch.full((64,), 3e38)
    assert stats.grad_moments(huge).tolist() == [math.inf, 0.0]  # finite entries: none counted


def test_zero_and_underflowing_gradients_are_results():
    zeros = torch.zeros(4, 8, 3, 3)
    tiny = torch.full((4, 8, 3, 3), 1e-30)  # squares underflow float32 to exactly 0
    for t in (zeros, tiny):
        assert stats.grad_moments(t).tolist() == [0.0, 0.0]


@pytest.mark.skipif(not native.available(), reason="no compiled kernels")
def test_a_large_stem_activation_on_one_and_two_threads():
    """The stem's size: many float32 blocks summed in float64. The compiled kernels stay within
    1e-6 of float64 on any thread count; the eager float32 ops drift further (about 8e-6 here)."""
    x = tensor((64, 32, 32, 32), torch.float32, seed=5).to(memory_format=torch.channels_last)
    expect = activation_reference(x) + [x.double().square().sum().item(), 0.0]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            close(torch.cat([stats.activation_moments(x), stats.grad_moments(x)]), expect, rtol=1e-6)
    finally:
        torch.set_num_threads(threads)
    with native.disabled():
        close(torch.cat([stats.activation_moments(x), stats.grad_moments(x)]), expect, rtol=5e-5)


@pytest.mark.skipif(not native.available(), reason="no compiled kernels")
def test_tensor_lists_norms_differences_copies_and_nonfinite_counts():
    tensors = [tensor(s, torch.float32, seed=i) for i, s in enumerate([(16, 8, 3, 3), (16,), (0,), (10, 512)])]
    tensors[0] = tensors[0].to(memory_format=torch.channels_last)  # dense in another order
    view = native.Tensors.of(tensors)
    assert view is not None
    others = native.Tensors([torch.randn_like(t) for t in tensors])
    copies = native.Tensors([torch.empty_like(t) for t in tensors])
    close(view.sumsq(copy_to=copies), [t.double().square().sum().item() for t in tensors])
    assert all(torch.equal(c, t) for c, t in zip(copies.tensors, tensors))
    close(view.sumsq(minus=others), [(t.double() - o.double()).square().sum().item()
                                     for t, o in zip(tensors, others.tensors)])
    like = [torch.randn_like(t) for t in tensors]  # gradients: the tensors' strides
    close(view.sumsq_like(like), [g.double().square().sum().item() for g in like])
    like[3][2, 7], like[3][4, 0], like[0][1, 2, 0, 0] = math.nan, math.inf, -math.inf
    assert view.nonfinite_like(like) == 3
    assert view.sumsq_like([g.contiguous() for g in like]) is None  # another memory order: not taken
    assert view.nonfinite_like(like[:3]) is None
    assert native.Tensors.of([t.double() for t in tensors]) is None
    assert native.Tensors.of([tensors[3].t()]) is None  # strided: not dense


@pytest.mark.skipif(not native.available(), reason="no compiled kernels")
def test_watched_tensors_follow_a_parameter_that_moved():
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.full((5,), 2.0))]
    watched = native.Watched(params)
    first = watched.current()
    assert first is not None and watched.current() is first  # unchanged addresses: the same view
    params[1].data = torch.full((5,), 3.0)  # .data = moves it
    moved = watched.current()
    assert moved is not first
    close(moved.sumsq(), [12.0, 45.0])
    params[0].data = params[0].data.double()  # a dtype the kernels do not take
    assert watched.current() is None
    with native.disabled():
        params[0].data = params[0].data.float()
        assert watched.current() is None


def test_what_the_compiled_kernels_take():
    if not native.available():
        assert not native.handles(torch.zeros(4))
        return
    assert native.handles(torch.zeros(2, 3, 4, 4)) and native.handles(torch.zeros(2, 3, dtype=torch.bfloat16))
    assert native.handles(torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))
    assert not native.handles(torch.zeros(2, 3, 4, 4, dtype=torch.float64))  # eager float64
    assert not native.handles(torch.zeros(2, 3, 4, 4, dtype=torch.float16))
    assert not native.handles(torch.zeros(4, 6)[:, ::2])  # strided
    assert not native.handles(torch.zeros(0, 3))
    assert not native.handles(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4).to(memory_format=torch.channels_last))


FRESH = (
    "import json, torch; from gradlab import native, stats\n"
    "x = torch.arange(-12.0, 12.0).reshape(2, 3, 2, 2)\n"
    "print(json.dumps({'available': native.available(), 'status': native.status(),\n"
    "                  'moments': stats.activation_moments(x).tolist()}))\n"
)


def start_fresh(tmp_path, **env) -> subprocess.Popen:
    """gradlab's statistics in a new process with the given environment."""
    environment = {**os.environ, "GRADLAB_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.Popen([sys.executable, "-c", FRESH], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, cwd=ROOT)


def result(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return json.loads(out)


def run_fresh(tmp_path, **env) -> dict:
    return result(start_fresh(tmp_path, **env))


@pytest.mark.skipif(not native.available(), reason="no compiled kernels")
def test_entry_points_take_only_their_typed_argument_array():
    """A wrong argument raises before C runs, instead of being read as an address."""
    import ctypes

    if not native.available():
        pytest.skip(f"no compiled kernels: {native.status()}")
    lib = native._lib()
    for name in native._ENTRY_POINTS:
        entry = getattr(lib, name)
        with pytest.raises(ctypes.ArgumentError):
            entry(12345)
        with pytest.raises(ctypes.ArgumentError):
            entry((ctypes.c_int64 * 3)())
        with pytest.raises(TypeError):
            entry()
    out = torch.zeros(2, dtype=torch.float64)  # the right argument still works
    native.grad_moments(torch.full((8,), 2.0), out)
    assert out.tolist() == [32.0, 0.0]


def test_built_into_the_cache_once_and_without_a_compiler_falls_back(tmp_path):
    expect = activation_reference(torch.arange(-12.0, 12.0).reshape(2, 3, 2, 2))
    racing = [start_fresh(tmp_path) for _ in range(3)]  # first uses at once, as a sweep's workers
    for built in map(result, racing):
        assert built["available"] and built["status"].startswith("compiled") and built["moments"] == expect
    libraries = list((tmp_path / "cache").glob("moments-*.so"))
    assert len(libraries) == 1 and not list((tmp_path / "cache").glob("*.part"))
    stamp = libraries[0].stat().st_mtime_ns
    assert run_fresh(tmp_path)["available"] and libraries[0].stat().st_mtime_ns == stamp  # reused, not rebuilt

    missing = run_fresh(tmp_path, CC="/nonexistent/cc", GRADLAB_CACHE_DIR=str(tmp_path / "other"))
    assert not missing["available"] and "no C compiler" in missing["status"] and missing["moments"] == expect
    off = run_fresh(tmp_path, GRADLAB_NATIVE="0")
    assert not off["available"] and "GRADLAB_NATIVE=0" in off["status"] and off["moments"] == expect


def test_training_without_the_kernels_says_so_and_records_the_same_metrics(tmp_path, monkeypatch):
    """A machine without a C compiler: one note on stderr, and the records come from eager ops."""
    import pandas as pd
    from click.testing import CliRunner

    from gradlab.cli import main

    args = ["train", "--dataset", "synthetic", "--depth", "2", "--width", "8", "--epochs", "1", "--batch-size", "128",
            "--subset", "256", "--device", "cpu", "--quiet"]
    monkeypatch.setattr(native, "_load", lambda: (None, "no C compiler ('cc' not found; install gcc, or set CC)"))
    eager = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "eager")], catch_exceptions=False)
    assert eager.exit_code == 0, eager.output
    notes = [line for line in eager.stderr.splitlines() if "compiled kernels" in line]
    assert len(notes) == 1 and "no C compiler" in notes[0] and notes[0].startswith("gradlab: note:")
    monkeypatch.undo()
    if not native.available():
        return
    compiled = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "compiled")], catch_exceptions=False)
    assert compiled.exit_code == 0 and "compiled kernels" not in compiled.stderr
    frames = [pd.read_parquet(tmp_path / name / "records.parquet") for name in ("eager", "compiled")]
    assert len(frames[0]) == len(frames[1]) > 0
    torch.testing.assert_close(torch.tensor(frames[0].value.to_numpy()), torch.tensor(frames[1].value.to_numpy()),
                               rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.skipif(not native.available(), reason="no compiled kernels")
def test_the_source_also_builds_without_openmp(tmp_path):
    """Where PyTorch runs on another OpenMP runtime the kernels are built without -fopenmp:
    they must still build, load and count right, on one thread."""
    import ctypes

    library = tmp_path / "serial.so"
    subprocess.run([os.environ.get("CC") or "cc", *native.BASE_FLAGS, "-o", str(library), str(native.SOURCE)], check=True,
                   capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(library))
    g = tensor((4, 8, 3, 3), torch.float32, seed=6, shift=0.0)
    out = torch.zeros(2, dtype=torch.float64)
    code, outer, c, inner = native.plan(g)
    assert lib.gl_grad_moments(native._args(g.data_ptr(), 0, code, outer * c * inner, 2, 2, out.data_ptr(), 0, 1)) == 0
    close(out, [g.double().square().sum().item(), 0.0])
