"""Process against process: what keeping freed memory is worth, and what a user of gradlab sees
against a user of the notebook.

    python benchmarks/allocator.py [--steps 8] [--reps 5] [--block conv] [--depth 6] [--threads 0]

The allocator setting is process-wide and cannot be undone inside a process, so this is the
one benchmark that compares processes: each repetition starts fresh worker processes in a
rotating order (gradlab's loop and the notebook's pipeline, each with glibc's default
allocator and with gradlab's setting; and gradlab as a user runs it: fp32 and bf16, with and
without the recorder on every step), and every worker reports the median images/s of its
timed epochs of ``--steps`` batches after a warm-up epoch. The last lines are what a user sees:
a gradlab process (which applies the setting) against a notebook process (which does not).
The other benchmarks apply the setting to both sides of their in-process comparisons, so
their ratios leave this gain out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (pipeline, freed memory kept, precision, recorder on)
WORKERS = [("gradlab", False, "fp32", False), ("gradlab", True, "fp32", False), ("notebook", False, "fp32", False),
           ("notebook", True, "fp32", False), ("gradlab", True, "fp32", True), ("gradlab", True, "bf16", False),
           ("gradlab", True, "bf16", True)]


def worker(args: argparse.Namespace) -> None:
    """One process: time ``--epochs`` epochs of ``--steps`` batches; print images/s as JSON."""
    import os

    os.environ["GRADLAB_KEEP_FREED_MEMORY"] = "1" if args.keep else "0"  # gradlab's Trainer reads it
    import torch

    from gradlab import runtime
    from gradlab.data import make_splits
    from gradlab.recorder import RecordConfig, RecorderCallback
    from gradlab.train import Trainer, TrainConfig

    runtime.keep_freed_memory()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from notebook import BATCH_SIZE, NotebookTrainer

    splits = make_splits("cifar10", None, seed=0, subset=args.steps * BATCH_SIZE, device=torch.device("cpu"))
    if args.worker == "notebook":
        run = NotebookTrainer(args.block, args.depth, 32, splits, torch.device("cpu")).train_model
    else:
        recorder = RecorderCallback(RecordConfig(every=1), sink=lambda columns: None) if args.record else None
        trainer = Trainer(TrainConfig(block=args.block, depth=args.depth, dataset="cifar10", precision=args.precision,
                                      subset=args.steps * BATCH_SIZE, device="cpu"),
                          callbacks=[recorder] if recorder else [], splits=splits)
        if recorder:
            recorder.on_fit_start(trainer)

        def run() -> None:
            if recorder:
                recorder.on_epoch_start(trainer, trainer.epoch)
            metrics = trainer.train_epoch()
            if recorder:
                recorder.on_epoch_end(trainer, trainer.epoch, metrics)  # the flush
            trainer.epoch += 1

    rates = []
    for epoch in range(args.epochs + 1):
        start = time.perf_counter()
        run()
        if epoch:  # the first epoch warms up
            rates.append(args.steps * BATCH_SIZE / (time.perf_counter() - start))
    print(json.dumps({"images_per_s": statistics.median(rates)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="batches of 256 per timed epoch")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per worker (after one warm-up)")
    parser.add_argument("--reps", type=int, default=5, help="worker launches per variant, interleaved")
    parser.add_argument("--block", default="conv")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in the workers; 0: default")
    parser.add_argument("--worker", choices=["gradlab", "notebook"], help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--steps", args.steps, "--epochs", args.epochs, "--block", args.block, "--depth", args.depth,
              "--threads", args.threads]
    from gradlab.train import cpu_has_bf16

    workers = [w for w in WORKERS if w[2] == "fp32" or cpu_has_bf16()]
    rates = {w: [] for w in workers}
    print(f"{args.block} depth {args.depth}, batch 256, gradlab channels-last, {args.steps} steps x "
          f"{args.epochs} epochs per worker, {args.reps} interleaved launches per variant (median images/s)")
    for rep in range(args.reps):
        shift = rep % len(workers)
        for name, keep, precision, record in workers[shift:] + workers[:shift]:
            command = [sys.executable, __file__, "--worker", name, "--keep", int(keep), "--precision", precision,
                       "--record", int(record), *common]
            out = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True).stdout
            rates[name, keep, precision, record].append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    med = {w: statistics.median(r) for w, r in rates.items()}
    for name in ("gradlab", "notebook"):
        default, kept = med[name, False, "fp32", False], med[name, True, "fp32", False]
        print(f"{name:<9} default allocator {default:>8,.0f}   freed memory kept {kept:>8,.0f}   {kept / default:.2f}x")
    notebook = med["notebook", False, "fp32", False]
    print(f"a gradlab process against a notebook process ({notebook:,.0f} images/s):")
    for name, keep, precision, record in workers:
        if name == "gradlab" and keep:
            rate = med[name, keep, precision, record]
            label = f"{precision}{' with the recorder' if record else ''}"
            print(f"  gradlab {label:<24}{rate:>8,.0f} images/s   {rate / notebook:.2f}x")


if __name__ == "__main__":
    main()
