"""CIFAR-10 on the device: a safe reader, seeded splits, uint8 batches, synthetic data.

The images stay uint8 from disk to device and are normalised per batch on the
device, as airbench's `CifarLoader` does ("uint8 is faster to move and process
than preprocessed floats"). The reader parses the official
`cifar-10-batches-py` layout itself, so copies with other checksums (such as
the JPEG re-encoded one these machines carry) load, and its unpickler builds
nothing but uint8 numpy arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:  # numpy >= 2 moved the pickle helpers into numpy._core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "CLASSES", "MEAN", "STD", "DATASETS", "DataError", "CifarArrays", "Splits", "DeviceLoader",
    "default_data_root", "resolve_data_root", "load_cifar10", "synthetic_cifar10", "make_splits",
    "normalize", "sample_grid_images",
]

CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck")
MEAN = (0.485, 0.456, 0.406)  # the notebook's Normalize (ImageNet statistics)
STD = (0.229, 0.224, 0.225)
DATASETS = ("cifar10", "synthetic")

FOLDER = "cifar-10-batches-py"  # the name inside the official archive
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
BATCH_IMAGES = 10_000  # images per file in the official layout
IMAGE_SHAPE = (3, 32, 32)
HOW_TO_FIX = ("pass --data-root DIR or set the GRADLAB_DATA environment variable to a folder "
              f"that holds {FOLDER}/, or use the synthetic dataset (--dataset synthetic)")


class DataError(ValueError):
    """Missing, malformed or unsafe data; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class CifarArrays:
    train_images: Tensor  # uint8 [50000, 3, 32, 32], contiguous, CPU
    train_labels: Tensor  # int64 [50000]
    test_images: Tensor   # uint8 [10000, 3, 32, 32]
    test_labels: Tensor   # int64 [10000]
    classes: tuple[str, ...]


@dataclass
class Splits:
    train: tuple[Tensor, Tensor]  # (uint8 images, int64 labels) on the device
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classes: tuple[str, ...]
    synthetic: bool  # True: images from synthetic_cifar10, not CIFAR-10
    dataset: str     # one of DATASETS


# ---------------------------------------------------------------------------
# Where the data lives

def default_data_root() -> Path:
    """`$GRADLAB_DATA`, else `$XDG_CACHE_HOME/gradlab/data`, else `~/.cache/gradlab/data`."""
    env = os.environ.get("GRADLAB_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    cache = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return cache / "gradlab" / "data"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The given folder, or `default_data_root()` when None."""
    if data_root is None:
        return default_data_root()
    return Path(data_root).expanduser()


# ---------------------------------------------------------------------------
# Safe unpickling

_NDARRAY_TOKEN = object()  # stands in for numpy.ndarray, so a stream cannot call ndarray(shape)


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, ints, strings and uint8 numpy arrays, and nothing else.

    Every global the stream names goes through `find_class`; only the few
    functions numpy's own ndarray pickles use are allowed, each behind a
    checking wrapper, so a crafted file cannot call os.system, eval, etc.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # py2 str -> bytes, as the CIFAR page loads them
        self.path = path
        self.allowed = {
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,   # numpy < 2 pickles
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,  # numpy >= 2 pickles
            ("numpy", "ndarray"): _NDARRAY_TOKEN,  # only ever an argument of _reconstruct
            ("numpy", "dtype"): self._dtype,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,   # pickle protocol 5
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("_codecs", "encode"): self._latin1_encode,  # bytes written by Python 3, protocol 2
        }

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise self._refuse(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise self._refuse(f"persistent id {pid!r}")

    def _refuse(self, what: str) -> DataError:
        return DataError(f"{self.path}: refused to unpickle {what}; a CIFAR-10 file holds only "
                         "uint8 arrays, lists and strings, so this file is not one and may be "
                         f"malicious: delete it and get CIFAR-10 from a trusted source")

    def _reconstruct(self, subtype, shape, dtype):
        # numpy writes _reconstruct(ndarray, (0,), b'b') and fills the array in BUILD.
        if subtype is not _NDARRAY_TOKEN or tuple(shape) != (0,):
            raise self._refuse(f"numpy _reconstruct{(subtype, shape)!r}")
        return _np_reconstruct(np.ndarray, (0,), dtype)

    def _dtype(self, spec, align=False, copy=False):
        if spec not in ("u1", b"u1"):
            raise self._refuse(f"a numpy array of dtype {spec!r} (only uint8 is allowed)")
        return np.dtype("u1", False, True)  # a copy: BUILD then sets its state

    def _frombuffer(self, buffer, dtype, shape, order):
        if (not isinstance(buffer, (bytes, bytearray)) or dtype != np.uint8
                or order not in ("C", "F")):
            raise self._refuse("numpy _frombuffer with unexpected arguments")
        return np.frombuffer(buffer, np.uint8).reshape(shape, order=order)

    def _latin1_encode(self, text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise self._refuse(f"_codecs.encode(..., {encoding!r})")
        return text.encode("latin1")


def _corrupt(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; delete {path.parent} and run again to download a fresh "
                     "copy (or rebuild it), or point --data-root / GRADLAB_DATA at a good copy")


def _unpickle(path: Path) -> dict[str, object]:
    """One layout file as a dict with str keys, read by the restricted unpickler."""
    if not path.is_file():
        raise _corrupt(path, "file is missing")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # a garbled stream can fail in pickle, numpy or anywhere in between
        first_line = (str(e).splitlines() or [""])[0]
        raise _corrupt(path, f"cannot be unpickled ({type(e).__name__}: {first_line})") from e
    if not isinstance(obj, dict):
        raise _corrupt(path, f"holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [10000, 3072] images, int64 [10000] labels) of one batch file."""
    batch = _unpickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if type(data) is not np.ndarray:
        raise _corrupt(path, "has no 'data' array")
    dt = data.dtype
    if dt != np.uint8 or dt.names is not None or dt.hasobject or dt.itemsize != 1:
        raise _corrupt(path, f"'data' has dtype {dt}, expected uint8")
    if data.shape != (BATCH_IMAGES, math.prod(IMAGE_SHAPE)):
        raise _corrupt(path, f"'data' has shape {data.shape}, expected "
                             f"({BATCH_IMAGES}, {math.prod(IMAGE_SHAPE)})")
    if isinstance(labels, np.ndarray) and labels.ndim == 1:
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not all(type(v) is int for v in labels):
        raise _corrupt(path, "'labels' is not a list of ints")
    if len(labels) != BATCH_IMAGES:
        raise _corrupt(path, f"'labels' has {len(labels)} entries, expected {BATCH_IMAGES}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise _corrupt(path, f"'labels' range over {labels.min()}..{labels.max()}, "
                             f"expected 0..{len(CLASSES) - 1}")
    return data, labels


def _read_classes(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get("label_names")
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise _corrupt(path, "'label_names' is not a list of strings")
    if len(names) != len(CLASSES):
        raise _corrupt(path, f"'label_names' has {len(names)} entries, expected {len(CLASSES)}")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names)


def _to_tensors(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Tensor, Tensor]:
    images = np.concatenate([d for d, _ in parts])  # a fresh, writable, contiguous copy
    labels = np.concatenate([y for _, y in parts])
    return torch.from_numpy(images).view(-1, *IMAGE_SHAPE), torch.from_numpy(labels)


def _download(root: Path) -> None:
    """Fetch and extract the official archive into root with torchvision, or raise DataError."""
    created = not root.exists()
    try:
        from torchvision import datasets  # imported late: slow, and only needed here

        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            datasets.CIFAR10(str(root), train=train, download=True)
    except Exception as e:  # offline, proxy, disk full, checksum ... all mean the same to the user
        if created:  # leave no empty folder behind a failed download
            try:
                root.rmdir()
            except OSError:
                pass
        first_line = (str(e).splitlines() or [""])[0]
        raise DataError(f"CIFAR-10 is not in {root / FOLDER} and downloading it failed "
                        f"({type(e).__name__}: {first_line}); {HOW_TO_FIX}") from e


def load_cifar10(root: str | os.PathLike, download: bool = True) -> CifarArrays:
    """Read `root/cifar-10-batches-py/`, downloading it first if absent and allowed.

    The layout is checked file by file; any problem raises DataError naming the file.
    """
    root = Path(root).expanduser()
    folder = root / FOLDER
    if not folder.is_dir():
        if not download:
            raise DataError(f"CIFAR-10 is not in {folder} (downloading is off); {HOW_TO_FIX}")
        _download(root)
        if not folder.is_dir():
            raise DataError(f"the CIFAR-10 download did not create {folder}; {HOW_TO_FIX}")
    classes = _read_classes(folder / META_FILE)
    train_images, train_labels = _to_tensors([_read_batch(folder / name) for name in TRAIN_FILES])
    test_images, test_labels = _to_tensors([_read_batch(folder / TEST_FILE)])
    return CifarArrays(train_images, train_labels, test_images, test_labels, classes)


# ---------------------------------------------------------------------------
# Synthetic data

def _derived_seed(*keys: int) -> int:
    """A 63-bit seed mixing the keys, so that (seed, stream) pairs give unrelated streams."""
    words = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _upsample_matrix(low: int, high: int) -> Tensor:
    """[high, low] matrix U with U @ x @ U.T == bilinear upsampling of x (align_corners=False).

    Bilinear interpolation is separable and linear; two small matmuls are ~10x
    faster on CPU than F.interpolate on a batch of 4x4 maps.
    """
    return F.interpolate(torch.eye(low)[None], size=high, mode="linear", align_corners=False)[0].T


def _synthetic_images(labels: Tensor, patterns: Tensor, up: Tensor, gen: torch.Generator,
                      chunk: int = 4096) -> Tensor:
    pattern_gain, nuisance_gain, noise_gain = 16.0, 32.0, 48.0  # grey levels; nearest-mean acc ~0.9
    out = torch.empty(len(labels), *IMAGE_SHAPE, dtype=torch.uint8)
    for start in range(0, len(labels), chunk):  # chunks bound the float32 working memory
        lab = labels[start:start + chunk]
        # Class pattern plus a per-image nuisance pattern, both low frequency (4x4 upsampled).
        low = torch.randn(len(lab), 3, *patterns.shape[-2:], generator=gen).mul_(nuisance_gain)
        low.add_(patterns[lab], alpha=pattern_gain).add_(128.0)
        x = up @ low @ up.T
        x.add_(torch.randn(x.shape, generator=gen), alpha=noise_gain)  # white pixel noise
        out[start:start + len(lab)] = x.clamp_(0, 255)
    return out


def synthetic_cifar10(n_train: int = 50000, n_test: int = 10000, seed: int = 0) -> CifarArrays:
    """CIFAR-10-shaped uint8 images whose labels are learnable, deterministic given seed.

    Each class owns a fixed random low-frequency colour pattern; an image is
    that pattern plus a random low-frequency nuisance pattern plus white noise.
    Labels are exactly balanced when n is a multiple of 10. The test images do
    not depend on n_train.
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    n_classes = len(CLASSES)
    pattern_gen = torch.Generator().manual_seed(_derived_seed(seed, 0))
    patterns = torch.randn(n_classes, 3, 4, 4, generator=pattern_gen)
    up = _upsample_matrix(4, IMAGE_SHAPE[-1])
    arrays = []
    for stream, n in ((1, n_train), (2, n_test)):
        gen = torch.Generator().manual_seed(_derived_seed(seed, stream))
        labels = torch.randperm(n, generator=gen) % n_classes
        arrays += [_synthetic_images(labels, patterns, up, gen), labels]
    return CifarArrays(*arrays, classes=CLASSES)


# ---------------------------------------------------------------------------
# Splits

def make_splits(dataset: str = "cifar10", data_root: str | os.PathLike | None = None, seed: int = 0,
                subset: int | None = None, val_fraction: float = 0.1,
                device: str | torch.device = "cpu", download: bool = True) -> Splits:
    """The notebook's split: a seeded permutation of the 50,000 training images, 90/10 train/val.

    Same indices as `torch.utils.data.random_split(train, [45000, 5000],
    generator=torch.Generator().manual_seed(seed))`. `subset=N` keeps the
    first N training images; validation and test stay whole. Each split is
    moved to the device once, as uint8.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    if dataset == "cifar10":
        arrays = load_cifar10(resolve_data_root(data_root), download=download)
    else:
        arrays = synthetic_cifar10()  # fixed data seed: `seed` varies the split, not the images
    n = len(arrays.train_labels)
    n_val = round(n * val_fraction)
    n_train = n - n_val
    if n_val < 1 or n_train < 1:
        raise ValueError(f"val_fraction {val_fraction} leaves an empty split of {n} images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    train_idx, val_idx = perm[:n_train], perm[n_train:]
    if subset is not None:
        if not 1 <= subset <= n_train:
            raise ValueError(f"subset must be between 1 and {n_train} (the training split), "
                             f"got {subset}")
        train_idx = train_idx[:subset]

    def on_device(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return images.to(device), labels.to(device)

    return Splits(
        train=on_device(arrays.train_images[train_idx], arrays.train_labels[train_idx]),
        val=on_device(arrays.train_images[val_idx], arrays.train_labels[val_idx]),
        test=on_device(arrays.test_images, arrays.test_labels),
        classes=arrays.classes,
        synthetic=dataset == "synthetic",
        dataset=dataset,
    )


# ---------------------------------------------------------------------------
# Batches

def _normalize_affine(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scale, shift) of shape [1, 3, 1, 1] with x * scale + shift == (x / 255 - MEAN) / STD."""
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std)).to(device, dtype), (-mean / std).to(device, dtype)


def normalize(images: Tensor, affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """uint8 [N, 3, H, W] -> float32 (x / 255 - MEAN) / STD, as one fused multiply-add.

    `affine` is a cached (scale, shift) pair for the images' device; None builds it.
    The output keeps the input's memory format (channels_last stays channels_last).
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {images.dtype}")
    scale, shift = affine if affine is not None else _normalize_affine(images.device, torch.float32)
    return torch.addcmul(shift, images, scale)


class DeviceLoader:
    """Normalised batches sliced from uint8 images already on the device (airbench's CifarLoader).

    With shuffle=True the order of epoch e comes from a generator seeded from
    (seed, e): call `set_epoch(e)` before iterating and a resumed run sees the
    same batches without saved RNG state. The epoch does not advance by
    itself, and iterating never touches the global RNG.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, channels_last: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(MEAN):
            raise ValueError(f"images must be uint8 [N, 3, H, W], "
                             f"got {images.dtype} {list(images.shape)}")
        if labels.shape != images.shape[:1] or labels.device != images.device:
            raise ValueError(f"labels must be [N={len(images)}] on {images.device}, "
                             f"got {list(labels.shape)} on {labels.device}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.epoch = 0
        self._affine: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _order(self) -> Tensor:
        # Drawn on the CPU so every device sees the same order for the same (seed, epoch).
        gen = torch.Generator().manual_seed(_derived_seed(self.seed, self.epoch))
        return torch.randperm(len(self.labels), generator=gen).to(self.images.device)

    def _scale_shift(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        key = (self.images.device, dtype)
        if key not in self._affine:
            self._affine[key] = _normalize_affine(*key)
        return self._affine[key]

    def __iter__(self):
        order = self._order() if self.shuffle else None
        affine = self._scale_shift()
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if order is None:
                x, y = self.images[batch], self.labels[batch]
            else:
                idx = order[batch]
                x, y = self.images[idx], self.labels[idx]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)  # on uint8: 4x less to copy
            yield normalize(x, affine), y


# ---------------------------------------------------------------------------
# Sample images

def sample_grid_images(splits: Splits, n: int = 8) -> tuple[Tensor, list[str]]:
    """The first n test images (uint8 [n, 3, 32, 32], CPU) and their class names."""
    images, labels = splits.test
    if not 1 <= n <= len(labels):
        raise ValueError(f"n must be between 1 and {len(labels)}, got {n}")
    return images[:n].cpu(), [splits.classes[i] for i in labels[:n].tolist()]
