"""gradlab.data: the CIFAR-10 reader, safe unpickling, splits, device batches, synthetic data."""
from __future__ import annotations

import builtins
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms

from gradlab import data
from gradlab.data import (CLASSES, CifarArrays, DataError, DeviceLoader, Splits,
                          load_cifar10, make_splits, normalize, sample_grid_images,
                          synthetic_cifar10)

FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
NOTEBOOK_MEAN, NOTEBOOK_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # its Normalize


# ---------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def cifar(cifar_root) -> CifarArrays:
    return load_cifar10(cifar_root, download=False)


@pytest.fixture(scope="module")
def small_synthetic() -> CifarArrays:
    return synthetic_cifar10(n_train=2000, n_test=500, seed=0)


@pytest.fixture(scope="module")
def fake_layout(tmp_path_factory) -> Path:
    """A valid layout in the pickle flavours we accept: pixel j of image k in file f is
    (k + j + f) % 256, label = k % 10.

    data_batch_1 uses protocol 2 (bytes via _codecs.encode), the others protocol 5
    (numpy's _frombuffer), str keys in one file and bytes keys in the rest.
    """
    folder = tmp_path_factory.mktemp("fake") / "cifar-10-batches-py"
    folder.mkdir()
    labels = [i % 10 for i in range(10_000)]
    for f, name in enumerate(FILES):
        protocol = 2 if name == "data_batch_1" else 5
        batch = {b"data": fake_pixels(np.arange(10_000), f), b"labels": labels,
                 b"batch_label": name.encode()}
        if name == "data_batch_2":
            batch = {k.decode(): v for k, v in batch.items()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def fake_pixels(k: np.ndarray, f: int) -> np.ndarray:
    """Rows k of fake_layout's file number f (uint8 arithmetic wraps modulo 256)."""
    k = (k % 256).astype(np.uint8)[:, None]
    return k + (np.arange(3072) % 256).astype(np.uint8)[None, :] + np.uint8(f)


def layout_with(fake_layout: Path, tmp_path: Path, name: str, payload: bytes) -> Path:
    """A symlinked copy of the fake layout with file `name` replaced by payload; returns root."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for src in fake_layout.iterdir():
        (folder / src.name).symlink_to(src)
    (folder / name).unlink()
    (folder / name).write_bytes(payload)
    return tmp_path


def indexed_arrays(n_train: int = 50_000, n_test: int = 10_000) -> CifarArrays:
    """Tiny 2x2 images whose first pixel spells their index in base 256 (R, G, B)."""
    def encode(n: int) -> torch.Tensor:
        idx = torch.arange(n)
        images = torch.zeros(n, 3, 2, 2, dtype=torch.uint8)
        for c, shift in enumerate((16, 8, 0)):
            images[:, c, 0, 0] = (idx >> shift) & 255
        return images

    return CifarArrays(encode(n_train), torch.arange(n_train) % 10,
                       encode(n_test), torch.arange(n_test) % 10, CLASSES)


def decode(images: torch.Tensor) -> torch.Tensor:
    px = images[:, :, 0, 0].long()
    return (px[:, 0] << 16) | (px[:, 1] << 8) | px[:, 2]


@pytest.fixture
def indexed(monkeypatch) -> CifarArrays:
    """make_splits reads these instead of CIFAR-10, so every split image names its source."""
    arrays = indexed_arrays()
    monkeypatch.setattr(data, "load_cifar10", lambda root, download=True: arrays)
    return arrays


# ---------------------------------------------------------------------------
# Data root

def test_default_data_root_prefers_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADLAB_DATA", str(tmp_path / "d"))
    assert data.default_data_root() == tmp_path / "d"
    monkeypatch.delenv("GRADLAB_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_root() == tmp_path / "xdg" / "gradlab" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_root() == tmp_path / "home" / ".cache" / "gradlab" / "data"
    assert data.resolve_data_root(None) == data.default_data_root()
    assert data.resolve_data_root("~/x") == tmp_path / "home" / "x"


# ---------------------------------------------------------------------------
# The real copy

def test_real_copy_shapes_counts_and_classes(cifar):
    assert cifar.train_images.shape == (50_000, 3, 32, 32)
    assert cifar.test_images.shape == (10_000, 3, 32, 32)
    assert cifar.train_images.dtype == cifar.test_images.dtype == torch.uint8
    assert cifar.train_labels.dtype == cifar.test_labels.dtype == torch.int64
    assert cifar.train_images.is_contiguous() and cifar.test_images.is_contiguous()
    assert cifar.train_labels.bincount().tolist() == [5000] * 10
    assert cifar.test_labels.bincount().tolist() == [1000] * 10
    assert cifar.classes == CLASSES


@pytest.mark.parametrize("name, offset", [("data_batch_1", 0), ("data_batch_4", 30_000),
                                          ("test_batch", None)])
def test_real_copy_matches_plain_pickle(cifar, cifar_root, name, offset):
    with open(cifar_root / "cifar-10-batches-py" / name, "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # trusted file: the plain, unrestricted reader
    images, labels = ((cifar.test_images, cifar.test_labels) if offset is None
                      else (cifar.train_images, cifar.train_labels))
    offset = offset or 0
    assert labels[offset:offset + 10_000].tolist() == raw[b"labels"]
    for k in (0, 1, 4321, 9999):
        row = raw[b"data"][k]  # 1024 red, then green, then blue, row-major
        image = images[offset + k]
        assert image[0, 0, 0] == row[0] and image[1, 0, 0] == row[1024]
        assert image[2, 31, 31] == row[3071] and image[0, 5, 7] == row[5 * 32 + 7]
        assert np.array_equal(image.numpy().reshape(-1), row)


# ---------------------------------------------------------------------------
# The reader on crafted layouts

def test_reader_accepts_protocols_2_and_5_and_str_keys(fake_layout):
    arrays = load_cifar10(fake_layout.parent, download=False)
    assert arrays.train_images.shape == (50_000, 3, 32, 32)
    assert arrays.train_labels.tolist() == [i % 10 for i in range(10_000)] * 5
    k = np.array([0, 1, 777, 9999])
    for f in range(5):
        pixels = arrays.train_images[f * 10_000 + k].reshape(len(k), -1).numpy()
        assert np.array_equal(pixels, fake_pixels(k, f))
    assert np.array_equal(arrays.test_images[k].reshape(len(k), -1).numpy(), fake_pixels(k, 5))
    assert arrays.classes == CLASSES


class RunsCommand:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsExec:
    """Unpickling this would exec Python that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [RunsCommand, RunsExec,
                                     lambda m: np.array([RunsCommand(m)], dtype=object)])
def test_malicious_pickle_is_refused_without_running(fake_layout, tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {b"data": payload(marker), b"labels": [0] * 10_000}
    stream = pickle.dumps(evil, protocol=2)
    root = layout_with(fake_layout, tmp_path / "root", "data_batch_3", stream)
    with pytest.raises(DataError, match="refused to unpickle") as err:
        load_cifar10(root, download=False)
    assert str(root / "cifar-10-batches-py" / "data_batch_3") in str(err.value)
    assert not marker.exists()
    pickle.loads(stream)  # control: the plain unpickler does run the payload
    assert marker.exists()


class CallsNdarray:
    """Asks the unpickler to call numpy.ndarray(shape) directly, which numpy's pickles never do."""

    def __reduce__(self):
        return np.ndarray, ((4,),)


def wrong_labels(labels) -> bytes:
    batch = {b"data": np.zeros((10_000, 3072), np.uint8), b"labels": labels}
    return pickle.dumps(batch, protocol=5)


@pytest.mark.parametrize("name, payload, match", [
    ("data_batch_2", b"this is not a pickle", "cannot be unpickled"),
    ("test_batch", None, "cannot be unpickled"),  # truncated, filled in below
    ("data_batch_5", pickle.dumps({b"data": np.zeros((10_000, 3071), np.uint8),
                                   b"labels": [0] * 10_000}, protocol=5), r"\(10000, 3071\)"),
    ("data_batch_1", pickle.dumps({b"data": np.zeros((10_000, 3072), np.int16),
                                   b"labels": [0] * 10_000}, protocol=2), "dtype"),
    ("data_batch_4", wrong_labels([0] * 9_999), "9999 entries"),
    ("data_batch_4", wrong_labels([10] * 10_000), "0..9"),
    ("data_batch_4", wrong_labels(["cat"] * 10_000), "list of ints"),
    ("data_batch_4", pickle.dumps([1, 2, 3], protocol=2), "not a dict"),
    ("data_batch_3", pickle.dumps({b"data": CallsNdarray()}, protocol=2), "cannot be unpickled"),
    ("batches.meta", pickle.dumps({b"label_names": [b"cat"] * 9}, protocol=2), "9 entries"),
])
def test_malformed_file_names_the_file(fake_layout, tmp_path, name, payload, match):
    if payload is None:
        payload = (fake_layout / name).read_bytes()[:50_000]
    root = layout_with(fake_layout, tmp_path, name, payload)
    with pytest.raises(DataError, match=match) as err:
        load_cifar10(root, download=False)
    message = str(err.value)
    assert str(root / "cifar-10-batches-py" / name) in message
    assert "delete" in message and "\n" not in message


def test_missing_file_names_the_file(fake_layout, tmp_path):
    root = layout_with(fake_layout, tmp_path, "data_batch_5", b"")
    (root / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5: file is missing"):
        load_cifar10(root, download=False)


def test_failed_download_says_what_to_do(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nowhere", download=True)
    message = str(err.value)
    for hint in ("--data-root", "GRADLAB_DATA", "synthetic", str(tmp_path / "nowhere")):
        assert hint in message
    assert "\n" not in message


def test_no_download_when_off(monkeypatch, tmp_path):
    def must_not_run(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", must_not_run)
    with pytest.raises(DataError, match="downloading is off.*--data-root.*GRADLAB_DATA.*synthetic"):
        load_cifar10(tmp_path, download=False)


def test_download_then_reads_with_own_reader(monkeypatch, tmp_path, fake_layout):
    calls = []

    def fake_cifar10(root, train, download):  # stands in for the official archive's extraction
        calls.append(train)
        folder = Path(root) / "cifar-10-batches-py"
        if not folder.exists():
            folder.symlink_to(fake_layout)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    arrays = load_cifar10(tmp_path / "new", download=True)
    assert sorted(calls) == [False, True]
    assert arrays.test_labels.shape == (10_000,)


# ---------------------------------------------------------------------------
# Splits

def test_split_sizes_disjoint_covering_like_random_split(indexed):
    splits = make_splits("cifar10", seed=7)
    train, val = decode(splits.train[0]), decode(splits.val[0])
    assert len(train) == 45_000 and len(val) == 5_000
    assert torch.cat([train, val]).sort().values.equal(torch.arange(50_000))
    assert splits.train[1].equal(train % 10) and splits.val[1].equal(val % 10)  # labels follow
    assert decode(splits.test[0]).equal(torch.arange(10_000))
    # The notebook's torch.utils.data.random_split with a seeded generator picks the same images.
    ref_train, ref_val = torch.utils.data.random_split(
        range(50_000), [45_000, 5_000], generator=torch.Generator().manual_seed(7))
    assert train.tolist() == list(ref_train) and val.tolist() == list(ref_val)
    assert splits.train[0].dtype == torch.uint8 and splits.train[1].dtype == torch.int64
    assert splits.dataset == "cifar10" and not splits.synthetic


def test_split_depends_only_on_seed(indexed):
    a, b, c = make_splits(seed=1), make_splits(seed=1), make_splits(seed=2)
    assert decode(a.val[0]).equal(decode(b.val[0]))
    assert not decode(a.val[0]).equal(decode(c.val[0]))


def test_subset_keeps_first_training_images_and_whole_eval_sets(indexed):
    full, sub = make_splits(seed=3), make_splits(seed=3, subset=100)
    assert sub.train[0].equal(full.train[0][:100]) and sub.train[1].equal(full.train[1][:100])
    assert sub.val[0].equal(full.val[0]) and sub.test[0].equal(full.test[0])


@pytest.mark.parametrize("subset", [0, -1, 45_001])
def test_subset_out_of_range(indexed, subset):
    with pytest.raises(ValueError, match="between 1 and 45000"):
        make_splits(subset=subset)


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError, match=r"'mnist'.*\['cifar10', 'synthetic'\]"):
        make_splits("mnist")


def test_make_splits_on_real_copy(cifar_root, cifar):
    splits = make_splits("cifar10", data_root=cifar_root, seed=5, download=False)
    val_idx = torch.randperm(50_000, generator=torch.Generator().manual_seed(5))[45_000:]
    assert splits.val[0].equal(cifar.train_images[val_idx])
    assert splits.val[1].equal(cifar.train_labels[val_idx])
    assert splits.test[0].equal(cifar.test_images)


def test_make_splits_synthetic_and_sample_grid():
    splits = make_splits("synthetic", subset=64)
    assert splits.synthetic and splits.dataset == "synthetic"
    assert [len(s[1]) for s in (splits.train, splits.val, splits.test)] == [64, 5_000, 10_000]
    images, names = sample_grid_images(splits)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert images.equal(splits.test[0][:8])
    assert names == [CLASSES[i] for i in splits.test[1][:8].tolist()]


def test_sample_grid_rejects_bad_n():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    splits = Splits(train=(images, torch.zeros(4, dtype=torch.long)), val=(images, torch.zeros(4)),
                    test=(images, torch.arange(4)), classes=CLASSES, synthetic=True, dataset="x")
    assert sample_grid_images(splits, n=4)[1] == list(CLASSES[:4])
    with pytest.raises(ValueError, match="between 1 and 4"):
        sample_grid_images(splits, n=5)


# ---------------------------------------------------------------------------
# DeviceLoader

N_IMAGES = 1000


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (N_IMAGES, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def ids() -> torch.Tensor:
    """Labels that are the image index, so a batch says which images it holds."""
    return torch.arange(N_IMAGES)


def epoch_ids(loader: DeviceLoader, epoch: int) -> torch.Tensor:
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


@pytest.mark.parametrize("drop_last, sizes", [(False, [256, 256, 256, 232]),
                                              (True, [256, 256, 256])])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_count(images, drop_last, sizes, shuffle):
    loader = DeviceLoader(images, ids(), batch_size=256, shuffle=shuffle, drop_last=drop_last)
    assert len(loader) == len(sizes)
    assert [len(y) for _, y in loader] == sizes
    assert [x.shape[0] for x, _ in loader] == sizes


def test_normalisation_matches_torchvision(images):
    x, y = next(iter(DeviceLoader(images, ids(), batch_size=64)))
    to_tensor, norm = transforms.ToTensor(), transforms.Normalize(NOTEBOOK_MEAN, NOTEBOOK_STD)
    expected = torch.stack([norm(to_tensor(img.permute(1, 2, 0).numpy())) for img in images[:64]])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize(images[:64]), expected, atol=1e-5, rtol=1e-5)


def test_shuffled_epoch_is_a_permutation_with_matching_pairs(images):
    loader = DeviceLoader(images, ids(), batch_size=300, shuffle=True, seed=1)
    order = []
    for x, y in loader:
        torch.testing.assert_close(x, normalize(images[y]))  # each image travels with its label
        order.append(y)
    order = torch.cat(order)
    assert order.sort().values.equal(ids())
    assert not order.equal(ids())


def test_order_depends_only_on_seed_and_epoch(images):
    a = DeviceLoader(images, ids(), batch_size=128, shuffle=True, seed=4)
    b = DeviceLoader(images, ids(), batch_size=128, shuffle=True, seed=4)
    other_seed = DeviceLoader(images, ids(), batch_size=128, shuffle=True, seed=5)
    history = [epoch_ids(a, e) for e in range(3)]
    assert epoch_ids(b, 2).equal(history[2])  # a resumed run at epoch 2 sees the same batches
    assert epoch_ids(a, 0).equal(history[0])  # and iterating again does not advance the order
    assert not history[0].equal(history[1]) and not history[1].equal(history[2])
    assert not epoch_ids(other_seed, 0).equal(history[0])


def test_iterating_leaves_global_rng_alone(images):
    state = torch.random.get_rng_state()
    for shuffle in (False, True):
        for _ in DeviceLoader(images, ids(), batch_size=100, shuffle=shuffle, channels_last=True):
            pass
    assert torch.random.get_rng_state().equal(state)


def test_channels_last(images):
    plain = DeviceLoader(images, ids(), batch_size=100, shuffle=True)
    cl = DeviceLoader(images, ids(), batch_size=100, shuffle=True, channels_last=True)
    for (x, y), (x_cl, y_cl) in zip(plain, cl):
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        assert not x_cl.is_contiguous()
        assert y_cl.equal(y) and x_cl.equal(x)


def test_loader_rejects_bad_inputs(images):
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), ids(), batch_size=10)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(images, ids()[:-1], batch_size=10)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(images, ids(), batch_size=0)


# ---------------------------------------------------------------------------
# Synthetic data

def test_synthetic_shapes_and_balance(small_synthetic):
    s = small_synthetic
    assert s.train_images.shape == (2000, 3, 32, 32) and s.test_images.shape == (500, 3, 32, 32)
    assert s.train_images.dtype == torch.uint8 and s.train_labels.dtype == torch.int64
    assert s.train_labels.bincount().tolist() == [200] * 10
    assert s.test_labels.bincount().tolist() == [50] * 10
    assert s.classes == CLASSES
    assert 40 < s.train_images.float().std() < 90  # not blank, not saturated


def test_synthetic_is_deterministic(small_synthetic):
    again = synthetic_cifar10(n_train=2000, n_test=500, seed=0)
    other = synthetic_cifar10(n_train=2000, n_test=500, seed=1)
    assert again.train_images.equal(small_synthetic.train_images)
    assert again.train_labels.equal(small_synthetic.train_labels)
    assert not other.train_images.equal(small_synthetic.train_images)
    # The test set does not depend on how many training images were drawn.
    assert synthetic_cifar10(n_train=10, n_test=500).test_images.equal(small_synthetic.test_images)


def test_synthetic_is_learnable_by_nearest_class_mean(small_synthetic):
    s = small_synthetic
    train = s.train_images.flatten(1).float()
    means = torch.stack([train[s.train_labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(s.test_images.flatten(1).float(), means).argmin(1)
    accuracy = (predicted == s.test_labels).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance is 0.1
