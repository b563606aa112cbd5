"""Wall time of `gradlab shatter` and `gradlab lesion`, as a user runs them.

    python benchmarks/lessons_time.py [--reps 3] [--data-root DIR] [--depth 16]

``gradlab shatter`` with its defaults: conv, res and skip at depths 2, 8, 16 and 32 (width 32),
256 points per line, 8 image pairs, BatchNorm statistics from 4 training batches. ``gradlab
lesion --recompute`` of one run of depth ``--depth`` (res, width 32), trained first (not timed)
for one epoch on 512 images: the lesion's work (the whole test set per evaluation) does not
depend on how long the run was trained. Each repetition is a fresh process, so it pays the
interpreter and torch start-up and CIFAR-10 loading. Prints every time and the medians.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def gradlab(*args: str, quiet: bool = True) -> float:
    """Seconds that ``gradlab ARGS`` takes in a fresh process."""
    start = time.perf_counter()
    output = subprocess.DEVNULL if quiet else None
    subprocess.run([sys.executable, "-m", "gradlab.cli", *args], check=True, stdout=output, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args()
    data = ["--data-root", args.data_root] if args.data_root else []
    folder = Path(tempfile.mkdtemp(prefix="gradlab-lessons-"))
    try:
        run = folder / f"res-d{args.depth}"
        gradlab("train", "--block", "res", "--depth", str(args.depth), "--epochs", "1", "--subset", "512",
                "--record-every", "0", "--quiet", "--out", str(run), *data)
        times = {"shatter": [], "lesion": []}
        for _ in range(args.reps):
            times["shatter"].append(gradlab("shatter", "--device", "cpu", *data))
            print(f"gradlab shatter (conv, res, skip at depths 2, 8, 16, 32): {times['shatter'][-1]:.1f} s", flush=True)
            times["lesion"].append(gradlab("lesion", str(run), "--recompute", "--device", "cpu", *data))
            print(f"gradlab lesion (res, depth {args.depth}): {times['lesion'][-1]:.1f} s", flush=True)
        for name, values in times.items():
            print(f"{name}: median of {len(values)}: {statistics.median(values):.1f} s")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
