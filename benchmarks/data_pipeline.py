"""Images/s of gradlab's DeviceLoader against the notebook's PIL + DataLoader pipeline.

    python benchmarks/data_pipeline.py [--data-root DIR] [--batches N] [--reps R]

Both sides serve shuffled, normalised batches of 256 training images to the
same device. The notebook side is what its `datasets.CIFAR10(...,
transform=Compose([Resize(32), ToTensor(), Normalize(...)]))` behind a
`DataLoader(batch_size=256, shuffle=True)` does per image; torchvision's own
CIFAR10 class rejects this repo's re-encoded copy by checksum, so a small
Dataset repeats its `__getitem__` (Image.fromarray, then the transform) on the
same uint8 arrays. Repetitions are interleaved and the median is reported, so
load from other processes on the machine hits every pipeline alike. Each
timing includes creating the iterator (worker start-up for num_workers > 0),
as every epoch of the notebook pays it.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from gradlab.data import MEAN, STD, DataError, DeviceLoader, load_cifar10, resolve_data_root

BATCH_SIZE = 256  # the notebook's batch_size


class NotebookCifar(Dataset):
    """torchvision's CIFAR10.__getitem__ on given arrays: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images_hwc: np.ndarray, labels: list[int], transform: Callable):
        self.data = images_hwc
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        return self.transform(img), target


def time_batches(batches: Callable[[], Iterable], n_batches: int, device: torch.device) -> float:
    """Images per second over the first n_batches of a fresh iterator, moved to the device."""
    start = time.perf_counter()
    images = 0
    for x, y in itertools.islice(batches(), n_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a CPU-GPU sync point: count the queued work
    return images / (time.perf_counter() - start)


def pipelines(train_images: torch.Tensor, train_labels: torch.Tensor,
              device: torch.device) -> dict[str, Callable[[], Iterable]]:
    on_device = DeviceLoader(train_images.to(device), train_labels.to(device), BATCH_SIZE,
                             shuffle=True, seed=0)
    epochs = itertools.count()

    def gradlab_epoch() -> Iterable:
        on_device.set_epoch(next(epochs))
        return iter(on_device)

    notebook_transform = transforms.Compose([transforms.Resize(32),
                                             transforms.ToTensor(),
                                             transforms.Normalize(mean=MEAN, std=STD)])
    # torchvision stores CIFAR10.data as this HWC view of the file's CHW rows.
    dataset = NotebookCifar(train_images.numpy().transpose(0, 2, 3, 1),
                            train_labels.tolist(), notebook_transform)
    loaders = {workers: DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True,
                                   num_workers=workers) for workers in (0, 2)}
    return {
        "gradlab DeviceLoader": gradlab_epoch,
        "notebook DataLoader, 0 workers": lambda: iter(loaders[0]),
        "notebook DataLoader, 2 workers": lambda: iter(loaders[2]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None,
                        help="folder holding cifar-10-batches-py/ (default: $GRADLAB_DATA)")
    parser.add_argument("--batches", type=int, default=40, help="batches of 256 per timing")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions; median kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    try:
        arrays = load_cifar10(resolve_data_root(args.data_root), download=False)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = pipelines(arrays.train_images, arrays.train_labels, device)
    for batches in runs.values():  # warm-up: imports, allocator, first worker start
        time_batches(batches, 2, device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, batches in runs.items():
            rates[name].append(time_batches(batches, args.batches, device))

    medians = {name: statistics.median(r) for name, r in rates.items()}
    ours = medians["gradlab DeviceLoader"]
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {BATCH_SIZE}, "
          f"{args.batches} batches x {args.reps} interleaved reps (median)")
    print(f"{'pipeline':<32} {'images/s':>12} {'gradlab/this':>13}")
    for name, rate in medians.items():
        print(f"{name:<32} {rate:>12,.0f} {ours / rate:>12.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
