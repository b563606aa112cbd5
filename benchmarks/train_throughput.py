"""Training images/s: gradlab's loop against the notebook's DataLoader-with-PIL pipeline.

    python benchmarks/train_throughput.py [--data-root DIR] [--steps N] [--reps R]
        [--configs conv:6,res:6,conv:32] [--threads T] [--record]

Both sides train the same DeepCNN (width 32, batch 256, Adam lr 1e-4, cross-entropy) on the
real CIFAR-10 training images. The notebook side draws batches from `DataLoader(shuffle=True)`
over the PIL transform pipeline (Resize, ToTensor, Normalize) with num_workers 0, as the
notebook does; gradlab's side draws uint8 batches from the device and normalises them there.
`--record` adds gradlab's recorder (every step) to gradlab's side. Repetitions of N steps are
interleaved and medians reported, so other load on the machine hits both sides alike.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import NotebookCifar  # noqa: E402  (the notebook's per-image pipeline)

from gradlab.data import MEAN, STD, DeviceLoader, load_cifar10, resolve_data_root  # noqa: E402
from gradlab.models import build_model  # noqa: E402
from gradlab.recorder import Recorder  # noqa: E402

BATCH = 256


def _batches(loader):
    """Endless batches, a new shuffled epoch whenever one runs out."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def _time_steps(model, optimizer, batches, steps: int) -> float:
    """Images/s over `steps` optimizer steps (loss read once at the end: one host sync)."""
    start = time.perf_counter()
    for x, y in itertools.islice(batches, steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # host sync: count all queued work
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--configs", default="conv:6", help="block:depth pairs, comma separated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--record", action="store_true", help="also time gradlab with the recorder on")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    arrays = load_cifar10(resolve_data_root(args.data_root), download=False)
    images, labels = arrays.train_images, arrays.train_labels
    notebook = DataLoader(NotebookCifar(images.numpy().transpose(0, 2, 3, 1), labels.tolist(),
                                        transforms.Compose([transforms.Resize(32), transforms.ToTensor(),
                                                            transforms.Normalize(MEAN, STD)])),
                          batch_size=BATCH, shuffle=True, num_workers=0)
    ours = DeviceLoader(images, labels, BATCH, shuffle=True, seed=0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"{args.steps} steps x {args.reps} interleaved reps (median images/s)")
    print(f"{'model':<12}{'notebook':>10}{'gradlab':>10}{'ratio':>8}" + (f"{'+recorder':>11}{'ratio':>8}" if args.record else ""))
    for spec in args.configs.split(","):
        block, depth = spec.split(":")
        torch.manual_seed(0)
        model = build_model(block, int(depth), 32)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        sides = {"notebook": _batches(notebook), "gradlab": _batches(ours)}
        if args.record:
            sides["recorded"] = _batches(ours)
        results = {name: [] for name in sides}
        _time_steps(model, optimizer, sides["gradlab"], 2)  # warm-up: allocator, kernels
        for _ in range(args.reps):
            for name, batches in sides.items():
                if name == "recorded":
                    with Recorder(model, optimizer=optimizer, flush_every=64):
                        results[name].append(_time_steps(model, optimizer, batches, args.steps))
                else:
                    results[name].append(_time_steps(model, optimizer, batches, args.steps))
        med = {name: statistics.median(v) for name, v in results.items()}
        line = f"{spec:<12}{med['notebook']:>10.0f}{med['gradlab']:>10.0f}{med['gradlab'] / med['notebook']:>7.2f}x"
        if args.record:
            line += f"{med['recorded']:>11.0f}{med['recorded'] / med['notebook']:>7.2f}x"
        print(line)


if __name__ == "__main__":
    main()
