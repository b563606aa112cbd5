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
