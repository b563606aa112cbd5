"""Shared fixtures: the real CIFAR-10 copy, and a small synthetic dataset for fast tests."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 files; CI must have them (fail), a developer may not (skip)."""
    root = Path(os.environ.get("GRADLAB_DATA") or ROOT / ".data")
    if not (root / "cifar-10-batches-py" / "batches.meta").is_file():
        message = f"no CIFAR-10 at {root}; run `make data` or set GRADLAB_DATA"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def small_splits():
    """400 train / 200 validation / 200 test synthetic images: trainer tests in a second."""
    from gradlab.data import Splits, synthetic_cifar10

    arrays = synthetic_cifar10(n_train=600, n_test=200, seed=0)
    return Splits(train=(arrays.train_images[:400], arrays.train_labels[:400]),
                  val=(arrays.train_images[400:], arrays.train_labels[400:]),
                  test=(arrays.test_images, arrays.test_labels),
                  classes=arrays.classes, synthetic=True, dataset="synthetic")


def train_tiny_sweep(out: Path, splits, blocks, depths):
    """Width-4 networks of ``blocks`` x ``depths``, two epochs on ``splits``, trained into
    ``out/runs/<cell>`` as gradlab.sweep lays them out; returns the cell names and the base
    TrainConfig (the caller writes sweep.json).
    One thread: width-4 nets are fastest so, and on a shared CPU two threads spin-wait for each
    other (measured: 3 s with one thread, 25-45 s with two while another process runs)."""
    from dataclasses import replace

    import torch

    from gradlab.sweep import cell_name
    from gradlab.train import TrainConfig, train_run

    base = TrainConfig(dataset="synthetic", width=4, epochs=2, batch_size=100, lr=3e-3, device="cpu",
                       eval_batch_size=4096)
    cells, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for block in blocks:
            for depth in depths:
                config = replace(base, block=block, depth=depth)
                cells.append(cell_name(config))
                train_run(config, out / "runs" / cells[-1], splits=splits)
    finally:
        torch.set_num_threads(threads)
    return cells, base


@pytest.fixture
def small_config():
    from gradlab.train import TrainConfig

    return TrainConfig(block="res", depth=2, width=8, epochs=3, batch_size=64, lr=3e-3, dataset="synthetic", device="cpu")


@pytest.fixture(params=["compiled", "eager"])
def backend(request):
    """Runs a test twice: CPU statistics by the compiled one-pass kernels (``gradlab.native``;
    CI must have them) and by eager PyTorch ops, the path of accelerators and of machines
    without a C compiler."""
    from gradlab import native

    if request.param == "eager":
        with native.disabled():
            yield request.param
        return
    if not native.available():
        message = f"no compiled kernels: {native.status()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield request.param
