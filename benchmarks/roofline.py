"""Roofline: the fraction of the machine's matmul peak that the train step reaches.

FLOPs per image x images/s of the train step, against the best matmul GFLOP/s of the same
machine, dtype and thread count.

    python benchmarks/roofline.py [--configs conv:6,conv:32] [--width 32] [--steps 4] [--reps 3]
                                  [--threads 0] [--device auto] [--sizes auto] [--top 10] [--data-root DIR]

For each model (``--configs block:depth``, width ``--width``, batch 256: the notebook's model is
conv:6) and precision (fp32; bf16 where ``gradlab.train.cpu_has_bf16()`` or CUDA):

* FLOPs of one full train step, forward and backward, from ``torch.utils.flop_counter``
  (matmuls and convolutions only: BatchNorm, ReLU, pooling, the loss and Adam are not counted);
* images/s of gradlab's own loop: ``Trainer.train_epoch()`` of a Trainer built with
  ``TrainConfig(dataset="cifar10", subset=steps * 256, precision=..., channels_last=True)``;
* the same for the notebook's pipeline: the NCHW fp32 model fed by its DataLoader over the
  per-image PIL transforms (notebook.py, 0 workers), Adam, and
  ``loss.item()`` every step;
* the best GFLOP/s of square matmuls (``--sizes``) in the same dtype and thread count.

Train timings and matmul peaks run interleaved in one process, in a rotating order; the
fraction of peak is the median over repetitions of (achieved / peak) within each repetition,
so the load of other processes on a shared machine hits both sides of each ratio alike. Then
a torch.profiler summary of one train step of the first model per pipeline and precision
shows where the rest of the time goes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gradlab.data import DataError, Splits, make_splits
from gradlab.models import check_architecture
from gradlab.train import Callback, Trainer, TrainConfig, cpu_has_bf16, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook import BATCH_SIZE, LR, NotebookTrainer  # noqa: E402  (a sibling script, not a package)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"cpu": (512, 1024, 2048, 4096), "cuda": (1024, 2048, 4096, 8192)}
MIN_MATMUL_SECONDS = 0.2  # each matmul timing runs at least this long


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point: count the queued work


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def header(device: torch.device) -> str:
    where = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"torch {torch.__version__}, device {device}{where}, CPU {cpu_model()}, "
            f"{torch.get_num_threads()} threads, native CPU bf16: {cpu_has_bf16()}")


# ---------------------------------------------------------------------------------------
# Matmul peak


class MatmulPeak:
    """Best GFLOP/s of square matmuls in one dtype; sizes and iteration counts fixed at warm-up."""

    def __init__(self, dtype: torch.dtype, sizes: tuple[int, ...], device: torch.device) -> None:
        self.device = device
        self.cases = []
        for n in sizes:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            out = torch.empty(n, n, dtype=dtype, device=device)
            torch.mm(a, b, out=out)  # warm-up: the BLAS's buffers and kernels
            seconds = self._time(a, b, out, 1)
            self.cases.append((a, b, out, max(1, round(MIN_MATMUL_SECONDS / max(seconds, 1e-9)))))

    def _time(self, a, b, out, iters: int) -> float:
        sync(self.device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync(self.device)
        return time.perf_counter() - start

    def __call__(self) -> float:
        """The best GFLOP/s over the sizes, each timed once."""
        return max(2 * len(a) ** 3 * iters / self._time(a, b, out, iters) / 1e9 for a, b, out, iters in self.cases)


# ---------------------------------------------------------------------------------------
# Train steps: gradlab's loop and the notebook's


def train_step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.autocast) -> int:
    """FLOPs of forward + backward on one batch (matmuls and convolutions; see the docstring)."""
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class _StepProfiler(Callback):
    """Advances a torch.profiler schedule after every optimizer step of gradlab's loop."""

    def __init__(self, profiler: torch.profiler.profile) -> None:
        self.profiler = profiler

    def on_after_step(self, trainer: Trainer) -> None:
        self.profiler.step()


class GradlabSide:
    """gradlab's real train step: Trainer.train_epoch() over ``steps`` batches of 256."""

    def __init__(self, block: str, depth: int, width: int, precision: str, splits: Splits, args) -> None:
        config = TrainConfig(block=block, depth=depth, width=width, dataset="cifar10", data_root=args.data_root,
                             subset=len(splits.train[1]), precision=precision, channels_last=True,
                             device=args.device, batch_size=BATCH_SIZE, lr=LR)
        self.trainer = Trainer(config, splits=splits)
        self.n_images = len(splits.train[1])

    def flops_per_image(self) -> float:
        trainer = self.trainer
        trainer.model.train()
        x, y = next(iter(trainer.train_loader))
        return train_step_flops(trainer.model, x, y, trainer.autocast()) / len(y)

    def images_per_s(self) -> float:
        sync(self.trainer.device)
        start = time.perf_counter()
        self.trainer.train_epoch()  # ends in a host sync (the epoch's losses)
        sync(self.trainer.device)
        return self.n_images / (time.perf_counter() - start)

    def profile(self, profiler: torch.profiler.profile) -> None:
        self.trainer.callbacks = [_StepProfiler(profiler)]
        try:
            self.trainer.train_epoch()
        finally:
            self.trainer.callbacks = []


class NotebookSide(NotebookTrainer):
    """The notebook's train_model(): NCHW fp32 model, DataLoader over PIL transforms, Adam,
    CrossEntropyLoss, and loss.item() appended to a logger every step."""

    def flops_per_image(self) -> float:
        self.model.train()
        x, y = next(iter(self.train_loader))
        return train_step_flops(self.model, x.to(self.device), y.to(self.device),
                                torch.autocast(self.device.type, enabled=False)) / len(y)

    def images_per_s(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.train_model()
        sync(self.device)
        return self.n_images / (time.perf_counter() - start)

    def profile(self, profiler: torch.profiler.profile) -> None:
        self.train_model(on_step=profiler.step)


# ---------------------------------------------------------------------------------------
# Measurement


@dataclass
class Variant:
    model: str  # block:depth
    precision: str
    pipeline: str
    side: GradlabSide | NotebookSide
    flops_per_image: float


def measure(variants: list[Variant], peaks: dict[str, MatmulPeak], reps: int) -> tuple[dict, dict]:
    """Per repetition, in a rotating order: every variant's images/s and every dtype's matmul peak."""
    jobs = [("variant", i) for i in range(len(variants))] + [("peak", p) for p in peaks]
    rates = {i: [] for i in range(len(variants))}
    peak_rates = {p: [] for p in peaks}
    for rep in range(reps):
        shift = rep % len(jobs)
        for kind, key in jobs[shift:] + jobs[:shift]:
            if kind == "variant":
                rates[key].append(variants[key].side.images_per_s())
            else:
                peak_rates[key].append(peaks[key]())
        print(f"  repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    return rates, peak_rates


def print_roofline(variants: list[Variant], rates: dict, peak_rates: dict) -> None:
    print(f"{'model':<8} {'precision':<9} {'pipeline':<34} {'GFLOP/image':>11} {'images/s':>9} "
          f"{'GFLOP/s':>8} {'matmul peak':>11} {'of peak':>8}")
    for i, v in enumerate(variants):
        peaks = peak_rates[v.precision]
        achieved = [r * v.flops_per_image / 1e9 for r in rates[i]]
        fraction = statistics.median(a / p for a, p in zip(achieved, peaks))  # within each repetition
        print(f"{v.model:<8} {v.precision:<9} {v.pipeline:<34} {v.flops_per_image / 1e9:>11.4f} "
              f"{statistics.median(rates[i]):>9,.0f} {statistics.median(achieved):>8.1f} "
              f"{statistics.median(peaks):>11.1f} {fraction:>8.1%}")


def print_profile(title: str, side: GradlabSide | NotebookSide, n_steps: int, device: torch.device, top: int) -> None:
    """Top ops of one profiled train step (the second of the epoch when there are two), by self time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    warmup = 1 if n_steps >= 2 else 0
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=1, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        side.profile(profiler)
    events = profiler.key_averages()
    steps = [e for e in events if e.key.startswith("ProfilerStep")]
    ops = [e for e in events if not e.key.startswith("ProfilerStep")]
    step_us = sum(e.cpu_time_total for e in steps) or sum(e.self_cpu_time_total for e in ops)
    on_gpu = device.type == "cuda"
    key = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    print(f"\n{title}: one train step, {step_us / 1e3:.1f} ms wall under the profiler; "
          f"top {top} ops by self {'CUDA' if on_gpu else 'CPU'} time")
    print(f"  {'op':<44} {'self CPU ms':>11} {'share':>6}" + (f" {'self CUDA ms':>12} {'share':>6}" if on_gpu else ""))
    for e in sorted(ops, key=key, reverse=True)[:top]:
        line = f"  {e.key[:44]:<44} {e.self_cpu_time_total / 1e3:>11.2f} {e.self_cpu_time_total / step_us:>6.1%}"
        if on_gpu:
            line += f" {e.self_device_time_total / 1e3:>12.2f} {e.self_device_time_total / step_us:>6.1%}"
        print(line)
    outside = sum(e.self_cpu_time_total for e in steps)
    if steps:
        print(f"  {'(outside any op: Python, data loading)':<44} {outside / 1e3:>11.2f} {outside / step_us:>6.1%}")


def parse_configs(text: str) -> list[tuple[str, int]]:
    configs = []
    for item in text.split(","):
        block, _, depth = item.strip().partition(":")
        try:
            configs.append((block, int(depth)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected block:depth, got {item!r}") from None
    return configs


def parse_sizes(text: str) -> tuple[int, ...] | None:
    if text == "auto":
        return None
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or comma-separated integers, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=parse_configs, default=parse_configs("conv:6,conv:32"),
                        help="models as block:depth, comma-separated (default: conv:6,conv:32)")
    parser.add_argument("--width", type=int, default=32, help="channels (default: 32, the notebook's)")
    parser.add_argument("--steps", type=int, default=4, help="train steps of 256 images per timing (default: 4)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions; medians (default: 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="square matmul sizes, comma-separated (default: auto, 512..4096 on CPU, 1024..8192 on CUDA)")
    parser.add_argument("--top", type=int, default=10, help="ops per profile (default: 10)")
    parser.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py/ (default: $GRADLAB_DATA)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.reps < 1:
        parser.error("--steps and --reps must be at least 1")
    try:
        device = resolve_device(args.device)
        for block, depth in args.configs:
            check_architecture(depth, args.width, block)
    except ValueError as e:
        parser.error(str(e))
    sizes = args.sizes or SIZES[device.type]
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" or cpu_has_bf16() else [])

    print(header(device))
    print(f"batch {BATCH_SIZE}, width {args.width}, {args.steps} steps per timing, {args.reps} interleaved "
          f"repetitions (medians); matmul sizes {', '.join(map(str, sizes))}")
    if device.type == "cuda":  # fp32 convolutions run in TF32 unless this is off; measure the peak alike
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        print(f"CUDA: cuDNN TF32 {torch.backends.cudnn.allow_tf32}; the fp32 matmul peak is measured with "
              f"TF32 {torch.backends.cuda.matmul.allow_tf32}, as the fp32 convolutions run")
    if "bf16" not in precisions:
        print("bf16 skipped: this CPU has neither AVX512-BF16 nor AMX")
    try:
        splits = make_splits("cifar10", args.data_root, seed=0, subset=args.steps * BATCH_SIZE, device=device,
                             download=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    variants = []
    for block, depth in args.configs:
        name = f"{block}:{depth}"
        for precision in precisions:
            side = GradlabSide(block, depth, args.width, precision, splits, args)
            variants.append(Variant(name, precision, "gradlab Trainer (NHWC, device data)", side, side.flops_per_image()))
        side = NotebookSide(block, depth, args.width, splits, device)
        variants.append(Variant(name, "fp32", "notebook (NCHW, PIL DataLoader)", side, side.flops_per_image()))
    peaks = {p: MatmulPeak(DTYPES[p], sizes, device) for p in precisions}
    for v in variants:  # warm-up: allocator, oneDNN primitives, the recorder-free loop
        v.side.images_per_s()

    rates, peak_rates = measure(variants, peaks, args.reps)
    print()
    print_roofline(variants, rates, peak_rates)
    print("FLOPs: matmuls and convolutions of forward + backward (torch.utils.flop_counter); BatchNorm, ReLU, "
          "pooling, the loss and the Adam step are not counted. images/s include each side's data pipeline.")

    first = variants[0].model
    for v in variants:
        if v.model == first:
            print_profile(f"{v.model} {v.precision}, {v.pipeline}", v.side, args.steps, device, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
