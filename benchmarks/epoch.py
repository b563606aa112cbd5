"""An epoch end to end (train + validation + recording + checkpoint): gradlab against the notebook.

    python benchmarks/epoch.py [--subset 10000] [--reps 3] [--block conv] [--depth 6] [--width 32]
                               [--threads 0] [--device auto] [--data-root DIR]

The notebook's epoch is its training-loop cell: ``ModelTrainer.train_model()`` (for each batch
of a ``DataLoader(shuffle=True, batch_size=256, num_workers=0)`` over the per-image PIL
transforms: forward, CrossEntropyLoss, zero_grad, backward, Adam step, ``loss.item()`` appended
to a logger), then ``evaluate_model("train")`` and ``evaluate_model("val")`` (under no_grad,
batches of 256, ``(fx.argmax(1) == y).sum().item()`` per batch), then ``torch.save`` of a
checkpoint (model and optimizer state_dicts, epoch, best accuracy) when validation improves.

gradlab's epoch is ``gradlab.train.train_run(TrainConfig(..., epochs=k), out_dir,
record=RecordConfig(every=1))`` called with one more epoch each time, which resumes the run
directory and trains exactly one epoch. The epoch is timed inside that call, from the trainer's
``on_epoch_start`` event to its ``on_fit_end`` event, so it holds the train steps with every
step recorded, validation, the records flush, ``best.pt`` (on improvement) and ``last.pt``,
the history and steps tables and the summary, and the recorder's close. What a call adds once
per run, not per epoch (loading and verifying the checkpoints to resume, the test evaluation
at its end), is printed beside it as "whole call". Each side's epoch is also split into its
train steps (the notebook's train_model; gradlab's ``train_seconds`` of the epoch's history
row, recording included) and the rest.

Both sides train on the same ``--subset`` of the training split and validate on the
notebook's 5,000 images; the notebook also evaluates the training subset every epoch, as its
cell does (gradlab counts training accuracy during the train steps). Repetitions are
interleaved in a rotating order and the ratio is the median over repetitions of the ratio
within each; one untimed epoch per side comes first (gradlab's creates the run directory).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from gradlab.data import DataError, Splits, make_splits
from gradlab.models import check_architecture
from gradlab.recorder import RecordConfig
from gradlab.train import Callback, TrainConfig, cpu_has_bf16, resolve_device, train_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook import BATCH_SIZE, LR, NotebookTrainer  # noqa: E402  (sibling scripts, not a package)
from roofline import header, sync  # noqa: E402


class NotebookEpoch(NotebookTrainer):
    """The notebook's training-loop cell, one epoch per call."""

    epoch = 0

    def run_epoch(self) -> tuple[float, float, float]:
        """Seconds of one pass of the notebook's training-loop cell: (the pass, its train_model, the pass)."""
        sync(self.device)
        start = time.perf_counter()
        self.train_model()
        sync(self.device)
        train = time.perf_counter() - start
        self.evaluate_model(train_test_val="train")
        valid_acc = self.evaluate_model(train_test_val="val")
        if valid_acc > self.best_valid_acc:
            self.save_checkpoint(self.epoch, valid_acc)
        sync(self.device)
        self.epoch += 1
        seconds = time.perf_counter() - start
        return seconds, train, seconds


class _EpochTimer(Callback):
    """From on_epoch_start to on_fit_end: the epoch, its evaluation, records flush and checkpoints.

    train_run orders the callbacks recorder, divergence check, these, checkpointer; so at
    on_fit_end the checkpointer has written the epoch and the recorder has flushed and closed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.end = self.train_seconds = None

    def on_epoch_start(self, trainer, epoch: int) -> None:
        sync(self.device)
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        self.train_seconds = metrics["train_seconds"]  # Trainer.train_epoch's own clock: the train steps

    def on_fit_end(self, trainer) -> None:
        sync(self.device)
        self.end = time.perf_counter()


class GradlabEpochs:
    """train_run into one run directory, one more epoch per call."""

    def __init__(self, config: TrainConfig, splits: Splits, out_dir: Path, device: torch.device) -> None:
        self.config, self.splits, self.out_dir, self.device = config, splits, out_dir, device
        self.epochs = 0

    def run_epoch(self) -> tuple[float, float, float]:
        """Seconds of (the epoch, its train steps, the whole train_run call)."""
        self.epochs += 1
        timer = _EpochTimer(self.device)
        sync(self.device)
        start = time.perf_counter()
        summary = train_run(replace(self.config, epochs=self.epochs), self.out_dir, record=RecordConfig(every=1),
                            callbacks=[timer], splits=self.splits)
        sync(self.device)
        call = time.perf_counter() - start
        if summary["epochs_done"] != self.epochs or timer.start is None:
            raise RuntimeError(f"train_run did not train epoch {self.epochs}: {summary}")
        return timer.end - timer.start, timer.train_seconds, call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=10000, help="training images per epoch (default: 10000)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved timed epochs per side; medians (default: 3)")
    parser.add_argument("--block", default="conv", help="default: conv, the notebook's ConvBlock")
    parser.add_argument("--depth", type=int, default=6, help="default: 6, the notebook's")
    parser.add_argument("--width", type=int, default=32, help="default: 32, the notebook's")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--data-root", default=None, help="folder holding cifar-10-batches-py/ (default: $GRADLAB_DATA)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    base = TrainConfig(block=args.block, depth=args.depth, width=args.width, dataset="cifar10",
                       data_root=args.data_root, subset=args.subset, device=args.device, channels_last=True,
                       batch_size=BATCH_SIZE, lr=LR)
    try:
        check_architecture(args.depth, args.width, args.block)
        base.validate()
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    precisions = ["fp32"] + (["bf16"] if device.type == "cuda" or cpu_has_bf16() else [])

    print(header(device))
    print(f"{args.block} depth {args.depth} width {args.width}, batch {BATCH_SIZE}, {args.subset:,} training and "
          f"{base.split_sizes()[1]:,} validation images per epoch, {args.reps} interleaved repetitions (medians)")
    if "bf16" not in precisions:
        print("gradlab bf16 skipped: this CPU has neither AVX512-BF16 nor AMX")
    try:
        splits = make_splits("cifar10", args.data_root, seed=0, subset=args.subset, device=device, download=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="gradlab-epoch-") as tmp:
        tmp = Path(tmp)
        notebook = NotebookEpoch(args.block, args.depth, args.width, splits, device, tmp)
        sides = {"notebook (NCHW fp32, PIL DataLoader)": notebook}
        for precision in precisions:
            sides[f"gradlab train_run, {precision}"] = GradlabEpochs(replace(base, precision=precision), splits,
                                                                      tmp / precision, device)
        for side in sides.values():  # warm-up: gradlab's creates the run directory; both build their kernels
            side.run_epoch()
        names = list(sides)
        epoch_s: dict[str, list[float]] = {name: [] for name in names}
        train_s: dict[str, list[float]] = {name: [] for name in names}
        call_s: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                epoch, train, call = sides[name].run_epoch()
                epoch_s[name].append(epoch)
                train_s[name].append(train)
                call_s[name].append(call)
            times = ", ".join(f"{name.split(',')[-1].strip().split(' ')[0]} {epoch_s[name][-1]:.2f} s" for name in names)
            print(f"  repetition {rep + 1}/{args.reps}: {times}", file=sys.stderr, flush=True)

    reference = names[0]
    print()
    print(f"{'epoch':<38} {'s/epoch':>8} {'train steps':>11} {'the rest':>8} {'whole call':>10} {'notebook/this':>13}")
    for name in names:
        ratio = statistics.median(n / t for n, t in zip(epoch_s[reference], epoch_s[name]))  # within each rep
        rest = statistics.median(e - t for e, t in zip(epoch_s[name], train_s[name]))
        call = "" if name == reference else f"{statistics.median(call_s[name]):.2f}"
        print(f"{name:<38} {statistics.median(epoch_s[name]):>8.2f} {statistics.median(train_s[name]):>11.2f} "
              f"{rest:>8.2f} {call:>10} {ratio:>12.2f}x")
    print(f"notebook: train_model, then the rest: evaluate_model(train), evaluate_model(val) and torch.save when "
          f"validation improved ({notebook.checkpoints} of {notebook.epoch} epochs did).")
    print("gradlab: train steps with every step recorded (Trainer.train_epoch's train_seconds), then the rest: "
          "validation, records flush, best.pt/last.pt, tables, summary; 'whole call' adds the resume and the "
          "test evaluation that a run pays once.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
