"""How far bf16 autocast moves what gradlab measures: fp32 and bf16 runs side by side.

    python benchmarks/precision.py [--block conv] [--depth 6] [--epochs 2] [--subset 10000] [--out DIR]

Two real CIFAR-10 runs with the same seed, options and data, one per precision, every step
recorded. Printed: accuracies and wall time of each; for each recorded metric the median
relative difference |bf16 - fp32| / |fp32| over probe points at step 0 (the same weights, so
this is bf16's rounding alone) and at the last step (two trajectories apart by then, so this
is how far the runs drifted); and the first-to-last gradient ratio of both at both ends.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from gradlab.recorder import RecordConfig
from gradlab.runs import load_sweep
from gradlab.train import TrainConfig, cpu_has_bf16, train_run

METRICS = ("grad_out_norm", "grad_in_norm", "grad_gain", "act_std", "act_chan_var", "param_grad_norm", "update_ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="conv")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--out", default=None, help="keep the two runs here (default: a temporary folder)")
    args = parser.parse_args()
    if not cpu_has_bf16():
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bf16 needs CUDA or a CPU with AVX512-BF16/AMX; this machine has neither")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        seconds = {}
        for precision in ("fp32", "bf16"):
            config = TrainConfig(block=args.block, depth=args.depth, epochs=args.epochs, subset=args.subset,
                                 precision=precision)
            start = time.perf_counter()
            train_run(config, root / "runs" / precision, record=RecordConfig(every=1))
            seconds[precision] = time.perf_counter() - start
        sweep = load_sweep(root / "runs" / "fp32"), load_sweep(root / "runs" / "bf16")
        summaries = {p: s.runs[0].summary for p, s in zip(("fp32", "bf16"), sweep)}
        records = {p: s.records(metrics=list(METRICS)) for p, s in zip(("fp32", "bf16"), sweep)}
    print(f"{args.block} depth {args.depth}, {args.epochs} epochs on {args.subset:,} images, every step recorded")
    for p in ("fp32", "bf16"):
        s = summaries[p]
        print(f"{p}: best validation {100 * s['best_val_acc']:.2f} %, test (best checkpoint) "
              f"{100 * s['test_acc_best']:.2f} %, {seconds[p]:.1f} s")
    last = int(min(r["step"].max() for r in records.values()))
    print(f"\nmedian |bf16 - fp32| / |fp32| over probe points   step 0   step {last}")
    keys = ["step", "layer", "metric"]
    merged = records["fp32"].merge(records["bf16"], on=keys, suffixes=("_fp32", "_bf16"))
    merged = merged[merged["layer"] != "model"]
    for metric in METRICS:
        cells = []
        for step in (0, last):
            at = merged[(merged["metric"] == metric) & (merged["step"] == step)]
            rel = (at["value_bf16"] - at["value_fp32"]).abs() / at["value_fp32"].abs()
            cells.append(f"{np.nanmedian(rel.to_numpy()):8.2%}" if len(at) else "     n/a")
        print(f"  {metric:<46}{cells[0]}   {cells[1]}")
    print("\nfirst-to-last gradient ratio (first block / last block)   fp32      bf16")
    for step in (0, last):
        ratios = []
        for p in ("fp32", "bf16"):
            r = records[p]
            at = r[(r["metric"] == "grad_out_norm") & (r["step"] == step) & r["layer"].str.startswith("layers.")]
            ratios.append(at.sort_values("position")["value"].iloc[0] / at.sort_values("position")["value"].iloc[-1])
        print(f"  step {step:<52}{ratios[0]:8.3g}  {ratios[1]:8.3g}")


if __name__ == "__main__":
    main()
