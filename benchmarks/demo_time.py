"""Wall time of `gradlab demo`, data loading included, as a user runs it.

    python benchmarks/demo_time.py [--reps 3]

Each repetition runs the command in a fresh process and a fresh working folder (nothing to
resume), so it pays the interpreter and torch start-up, CIFAR-10 loading, probing, training
and the HTML report. Prints every time and the median.
"""
import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    gradlab = Path(sys.executable).with_name("gradlab")
    times = []
    for _ in range(args.reps):
        folder = tempfile.mkdtemp(prefix="gradlab-demo-")
        start = time.perf_counter()
        subprocess.run([str(gradlab), "demo"], cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
        shutil.rmtree(folder)
        print(f"gradlab demo: {times[-1]:.1f} s", flush=True)
    print(f"median of {len(times)}: {statistics.median(times):.1f} s")


if __name__ == "__main__":
    main()
