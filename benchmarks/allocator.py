"""What keeping freed memory (gradlab.runtime.keep_freed_memory) is worth, process against process.

    python benchmarks/allocator.py [--steps 8] [--reps 5] [--block conv] [--depth 6] [--threads 0]

The allocator setting is process-wide and cannot be undone inside a process, so this is the
one benchmark that compares processes: each repetition starts four fresh worker processes in
a rotating order (gradlab's loop and the notebook's pipeline, each with glibc's default
allocator and with gradlab's setting), and every worker reports the median images/s of its
timed epochs of ``--steps`` batches after a warm-up epoch. The last line is what a user sees:
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
WORKERS = [("gradlab", False), ("gradlab", True), ("notebook", False), ("notebook", True)]


def worker(args: argparse.Namespace) -> None:
    """One process: time ``--epochs`` epochs of ``--steps`` batches; print images/s as JSON."""
    import os

    os.environ["GRADLAB_KEEP_FREED_MEMORY"] = "1" if args.keep else "0"  # gradlab's Trainer reads it
    import torch

    from gradlab import runtime
    from gradlab.data import make_splits
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
        trainer = Trainer(TrainConfig(block=args.block, depth=args.depth, dataset="cifar10",
                                      subset=args.steps * BATCH_SIZE, device="cpu"), splits=splits)

        def run() -> None:
            trainer.train_epoch()
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
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--steps", args.steps, "--epochs", args.epochs, "--block", args.block, "--depth", args.depth,
              "--threads", args.threads]
    rates = {w: [] for w in WORKERS}
    print(f"{args.block} depth {args.depth}, batch 256, fp32 channels-last for gradlab, {args.steps} steps x "
          f"{args.epochs} epochs per worker, {args.reps} interleaved launches per variant (median images/s)")
    for rep in range(args.reps):
        for name, keep in WORKERS[rep % 4:] + WORKERS[: rep % 4]:
            command = [sys.executable, __file__, "--worker", name, "--keep", int(keep), *common]
            out = subprocess.run([str(c) for c in command], capture_output=True, text=True, check=True).stdout
            rates[name, keep].append(json.loads(out.strip().splitlines()[-1])["images_per_s"])
    med = {w: statistics.median(r) for w, r in rates.items()}
    for name in ("gradlab", "notebook"):
        print(f"{name:<9} default allocator {med[name, False]:>8,.0f}   freed memory kept {med[name, True]:>8,.0f}"
              f"   {med[name, True] / med[name, False]:.2f}x")
    print(f"a gradlab process against a notebook process: {med['gradlab', True]:,.0f} / "
          f"{med['notebook', False]:,.0f} images/s = {med['gradlab', True] / med['notebook', False]:.2f}x")


if __name__ == "__main__":
    main()
