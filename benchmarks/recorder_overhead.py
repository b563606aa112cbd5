"""Train-step time with the recorder at every=1 against no recorder, and against a naive recorder.

Four copies of one model (a DeepCNN, or with ``--model`` any model gradlab can build; same initial weights, each with its own Adam) train side by
side in one process on one synthetic batch: bare; with ``gradlab.recorder.Recorder`` (all
metrics, every step) as it runs on a CPU, its statistics by the compiled one-pass kernels
(``gradlab.native``); the same recorder with eager PyTorch ops instead (``native.disabled()``:
a machine without a C compiler, and the code path of an accelerator); and the obvious naive
recorder (plain torch ops and ``.item()`` in every hook). Each repetition runs ``--steps`` steps of every variant in a
rotating order; a variant's ratio is the median over repetitions of its time over the bare
model's time in the same repetition (pairs close in time and a median shrug off the load
spikes of a shared machine).

    python benchmarks/recorder_overhead.py --reps 20 --steps 2 --depths 6 32 --blocks conv res
        [--model torchvision:resnet18] [--precision fp32|bf16] [--no-channels-last] [--threads T]
        [--tensorboard] [--flush-every N]

``--tensorboard`` adds a fifth copy: the recorder whose flushes also go to a
``gradlab.integrations.tensorboard.TensorBoardSink`` (as ``gradlab train --tensorboard``), so
its ratio against the plain recorder's is the sink's cost. A flush happens every
``--flush-every`` recorded steps (the trainer's 64 by default); its cost is per recorded row, so
a smaller N puts flushes inside the timed steps of a short benchmark without changing the cost
per step.

The models run as gradlab's trainer runs them: channels-last activations by default, and
with ``--precision bf16`` under bfloat16 autocast (the recorder's statistics stay float32).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from gradlab import native, runtime
from gradlab.probes import select
from gradlab.recorder import Recorder
from gradlab.specs import ModelSpec


class NaiveRecorder:
    """The obvious implementation: module hooks that compute each statistic and call ``.item()``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.rows, self.handles = model, [], []

    def __enter__(self) -> NaiveRecorder:
        for probe in select(self.model):
            self.handles.append(probe.module.register_forward_hook(self._forward(probe.name)))
            self.handles.append(probe.module.register_full_backward_hook(self._backward(probe.name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _forward(self, name: str):
        def hook(module, args, output):
            if not module.training or not torch.is_grad_enabled():
                return
            with torch.no_grad():
                out = output.float()
                dims = [d for d in range(out.dim()) if d != 1]
                self.rows.append((name, "act_mean", out.mean().item()))
                self.rows.append((name, "act_std", out.std(correction=0).item()))
                self.rows.append((name, "act_nonpos_frac", (out <= 0).float().mean().item()))
                self.rows.append((name, "act_chan_mean_sq", out.mean(dims).square().mean().item()))
                self.rows.append((name, "act_chan_var", out.var(dims, correction=0).mean().item()))
                norm = torch.linalg.vector_norm
                self.rows.append((name, "param_norm", norm(torch.stack([norm(p) for p in module.parameters()])).item()))

        return hook

    def _backward(self, name: str):
        def hook(module, grad_input, grad_output):
            g_out = grad_output[0].float()
            out_norm = torch.linalg.vector_norm(g_out).item()
            self.rows.append((name, "grad_out_norm", out_norm))
            self.rows.append((name, "nonfinite_grads", (~torch.isfinite(g_out)).sum().item()))
            if grad_input and grad_input[0] is not None:
                in_norm = torch.linalg.vector_norm(grad_input[0].float()).item()
                self.rows.append((name, "grad_in_norm", in_norm))
                self.rows.append((name, "grad_gain", in_norm / out_norm if out_norm else float("nan")))

        return hook


def train_steps(model, optimizer, x, y, steps: int, recorder=None, bf16: bool = False,
                eager: bool = False) -> list[tuple[float, float]]:
    """(wall seconds, process CPU seconds) of each of ``steps`` optimizer steps; ``eager``:
    statistics by eager PyTorch ops (``native.disabled()``), as without a C compiler."""
    with native.disabled() if eager else contextlib.nullcontext():
        return _train_steps(model, optimizer, x, y, steps, recorder, bf16)


def _train_steps(model, optimizer, x, y, steps, recorder, bf16) -> list[tuple[float, float]]:
    times = []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        if recorder is not None and hasattr(recorder, "record_loss"):
            recorder.record_loss(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def time_kernels(model, optimizer, x, y, recorder, bf16: bool, steps: int = 6) -> float:
    """Median seconds per step spent inside the compiled kernels (the memory traffic of reading
    every measured tensor once more: the part of the overhead no change to the hooks removes),
    timed around each call into the library for a few extra steps after the measurement."""
    lib = native._load()[0]
    if lib is None:
        return math.nan
    spent = [0.0]

    class Timed:
        def __getattr__(self, name):
            entry = getattr(lib, name)

            def call(args):
                start = time.perf_counter()
                try:
                    return entry(args)
                finally:
                    spent[0] += time.perf_counter() - start

            return call

    loaded, native._lib = native._lib, Timed
    per_step = []
    try:
        for _ in range(steps):
            spent[0] = 0.0
            train_steps(model, optimizer, x, y, 1, recorder, bf16)
            per_step.append(spent[0])
    finally:
        native._lib = loaded
    return statistics.median(per_step)


def measure(block: str, depth: int, args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """By clock (0: wall, 1: process CPU time): the bare model's median seconds per step, and
    for the recorders the median over repetitions of their step time over the bare one's."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    spec = ModelSpec.parse(args.model)
    base = spec.build(block=block, depth=depth, width=args.width) if spec.kind == "deepcnn" else spec.build()
    base = base.to(memory_format=memory_format)
    variants = ("none", "recorder", "eager", "naive") + (("tensorboard",) if args.tensorboard else ())
    models = {name: copy.deepcopy(base) for name in variants}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=memory_format)
    bf16 = args.precision == "bf16"
    y = torch.randint(0, 10, (args.batch,))
    kept = []  # the recorder's flushed columns; a real sink would write them to disk
    flush = args.flush_every
    recorders = {
        "none": None,
        "recorder": Recorder(models["recorder"], every=1, optimizer=optimizers["recorder"], sink=kept.append,
                             flush_every=flush),
        "eager": Recorder(models["eager"], every=1, optimizer=optimizers["eager"], sink=kept.append, flush_every=flush),
        "naive": NaiveRecorder(models["naive"]),
    }
    board = None
    if args.tensorboard:
        from gradlab.integrations.tensorboard import TensorBoardSink

        board = TensorBoardSink(tempfile.mkdtemp(prefix="gradlab-bench-tb-"))

        def both(columns) -> None:
            kept.append(columns)
            board(columns)

        recorders["tensorboard"] = Recorder(models["tensorboard"], every=1, optimizer=optimizers["tensorboard"],
                                            sink=both, flush_every=flush)
    for r in recorders.values():
        if r is not None:
            r.__enter__()
    try:
        for name in models:  # warm-up: allocator, oneDNN primitives, the recorder's layouts
            train_steps(models[name], optimizers[name], x, y, 2, recorders[name], bf16, name == "eager")
        times = {name: [] for name in models}  # per repetition: (wall, cpu) seconds per step
        names = list(models)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
            for name in order:
                steps = train_steps(models[name], optimizers[name], x, y, args.steps, recorders[name], bf16,
                                    name == "eager")
                times[name].append(tuple(statistics.fmean(s[clock] for s in steps) for clock in (0, 1)))
        kernel_seconds = time_kernels(models["recorder"], optimizers["recorder"], x, y, recorders["recorder"], bf16)
    finally:
        for r in recorders.values():
            if r is not None:
                r.__exit__(None, None, None)
        if board is not None:
            board.close()
    result = {("none", clock): statistics.median(t[clock] for t in times["none"]) for clock in (0, 1)}
    result["kernels", 0] = kernel_seconds / result["none", 0]
    for name in variants[1:]:  # ratios within each repetition, then their median
        for clock in (0, 1):
            result[name, clock] = statistics.median(t[clock] / b[clock] for t, b in zip(times[name], times["none"]))
    if args.tensorboard:  # the sink's own cost: against the plain recorder in the same repetition
        for clock in (0, 1):
            result["tb_vs_recorder", clock] = statistics.median(
                t[clock] / r[clock] for t, r in zip(times["tensorboard"], times["recorder"]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deepcnn",
                        help="deepcnn (over --blocks and --depths), or torchvision:NAME, file.py:factory")
    parser.add_argument("--reps", type=int, default=20, help="repetitions; medians over them")
    parser.add_argument("--steps", type=int, default=2, help="train steps per repetition and variant")
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 32])
    parser.add_argument("--blocks", nargs="+", default=["conv", "res"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, as --precision bf16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="NHWC activations, gradlab's default")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also time the recorder with the TensorBoard sink (needs gradlab[tensorboard])")
    parser.add_argument("--flush-every", type=int, default=64, help="recorded steps per flush (the trainer's: 64)")
    args = parser.parse_args()
    # The naive recorder's hook on conv1, whose input needs no gradient, warns once per step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runtime.keep_freed_memory()  # as gradlab's trainer does on a CPU
    layout = "channels-last" if args.channels_last else "NCHW"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, {layout}, "
          f"width {args.width}, batch {args.batch}, "
          f"{args.reps} reps x {args.steps} steps, medians")
    print("step time over the bare model's, median over repetitions of the ratio within each;")
    print("wall clock, and in brackets process CPU time, which other load on a shared machine disturbs less")
    print(f"statistics: {native.status()}")
    print("kernels: the recorder's time inside its compiled kernels, over the bare step (its floor)")
    if args.model != "deepcnn":  # one model: blocks and depths are the DeepCNN's options
        args.blocks, args.depths = [args.model], [0]
    board = f" {'+tensorboard':>18} {'tb/recorder':>18}" if args.tensorboard else ""
    print(f"{'block':>7} {'depth':>5} {'bare ms':>9} {'recorder':>18} {'kernels':>8} {'eager ops':>18} "
          f"{'naive (.item())':>18}{board}")
    for block in args.blocks:
        for depth in args.depths:
            t = measure(block, depth, args)
            names = ("recorder", "eager", "naive") + (("tensorboard", "tb_vs_recorder") if args.tensorboard else ())
            recorder, eager, naive, *tb = (f"{t[name, 0]:6.3f}x ({t[name, 1]:.3f}x)" for name in names)
            print(f"{block:>7} {depth:>5} {t['none', 0] * 1e3:9.1f} {recorder:>18} {t['kernels', 0]:7.1%} "
                  f"{eager:>18} {naive:>18}" + "".join(f" {x:>18}" for x in tb), flush=True)


if __name__ == "__main__":
    main()
