"""Shattered gradients (Balduzzi et al. 2017): how the input gradient changes along a line of inputs.

What is measured
----------------
For one network ``f`` and two real test images ``a`` and ``b`` (normalised as in training), the
``n`` points ``x_i = (1 - t_i)·a + t_i·b`` with ``t_i = i / (n - 1)``, ``i = 0 … n-1``, and the
gradient ``g_i = ∂y/∂x`` at each point, flattened to a vector of 3·32·32 values. ``y`` is the
target (``TARGETS``): ``logit``, the logit of a's true class (the default), or ``loss``, the
cross-entropy against a's true class.

``autocorrelation`` at lag ``k``
    The mean over ``i = 0 … n-1-k`` of the cosine similarity ``cos(g_i, g_{i+k})``. Lag 0 is 1;
    lag 1 is the **neighbouring-gradient similarity**, the headline number. It is uncentred: a
    direction that the whole line shares counts as similarity, so that gradients identical
    along the line give exactly 1 at every lag (a linear model), independent random gradients
    give 0 within the sampling error, and a sequence built with lag-k correlation ``ρ^k`` (an
    AR(1) sequence of vectors) gives ``ρ^k`` (the calibrations of ``tests/test_shatter.py``).
    A pair of points where either gradient is exactly 0 has no cosine and is left out of the
    mean; a lag without any defined pair is NaN. ``distance`` is the lag as a fraction of the
    line, ``k / (n - 1)``, comparable across values of ``n``.

Per network the same ``pairs`` image pairs are drawn (seeded, from the test set, ``a ≠ b``) and
each pair gives one value per lag; ``gradlab.lessons.summarise_shatter`` averages them (mean,
standard deviation across pairs, min, max).

Each point is evaluated on its own
----------------------------------
The network is in eval mode, so no point of a line sees another: dropout is off and BatchNorm
normalises with running statistics, never the batch statistics of the line's own points. At
initialisation the running statistics are first estimated from real training batches
(``estimate_bn_statistics``: reset, then a cumulative average over ``stat_batches`` batches in
train mode under ``no_grad``); a trained network keeps its checkpoint's running statistics,
the exponential average that training kept. The ``statistics`` column says which, in words.

Because the samples of an eval-mode batch do not interact, the gradient of the sum of the
points' outputs with respect to the batch of points holds each point's own gradient exactly,
so each line is one forward and one backward pass (in chunks of ``POINTS_PER_PASS`` points).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lessons, runs
from .data import DeviceLoader, Splits, make_splits, normalize
from .lesion import load_trained, trained_runs  # the checks and loading of trained runs
from .models import build_model, check_architecture, check_axes
from .probe import network_name
from .train import resolve_device

TARGETS = ("logit", "loss")
MIN_POINTS = 8  # points on a line: fewer cannot show how the gradient changes along it
MIN_PAIRS = 2  # image pairs per network: the spread needs two
POINTS_PER_PASS = 256  # points per forward and backward pass; bounds the memory, not the result
IMAGE_ROW = 16  # the gradient image shows this pixel row of every channel (the middle of 32)
_BATCH_NORMS = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class ShatterConfig:
    """What `gradlab shatter` measures at initialisation; the CLI's options map one-to-one onto these."""

    blocks: tuple[str, ...] = ("conv", "res", "skip")  # block types, one network per depth each
    depths: tuple[int, ...] = (2, 8, 16, 32)  # blocks per network
    norms: tuple[str, ...] = ("batch",)  # batch | none
    width: int = 32  # channels, as in the notebook
    points: int = 256  # n: points on the line between two test images
    pairs: int = 8  # image pairs per network; the mean and spread are over these
    target: str = "logit"  # logit: a's true-class logit; loss: cross-entropy against a's true class
    max_lag: int = 16  # autocorrelation lags 0 ... max_lag
    stat_batches: int = 4  # training batches that estimate BatchNorm's running statistics
    stat_batch_size: int = 256  # images per such batch
    seed: int = 0  # initialisation, the image pairs and the statistics batches
    dataset: str = "cifar10"  # cifar10 | synthetic
    data_root: str | None = None  # as in TrainConfig
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        for name in ("blocks", "depths", "norms"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        check_axes(**{name: getattr(self, name) for name in ("blocks", "depths", "norms")})
        for block, depth, norm in itertools.product(self.blocks, self.depths, self.norms):
            check_architecture(depth, self.width, block, norm)
        check_line(self.points, self.pairs, self.max_lag, self.target)
        for name in ("stat_batches", "stat_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _integer(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_line(points: int, pairs: int, max_lag: int, target: str) -> None:
    """ValueError for a line measurement that cannot be made: too few points or pairs, a lag the
    line cannot hold (at least two points per lag on every line: ``points >= 2 * max_lag``)."""
    _integer("points", points, MIN_POINTS)
    _integer("pairs", pairs, MIN_PAIRS)
    _integer("max_lag", max_lag, 1)
    if points < 2 * max_lag:
        raise ValueError(f"points ({points}) must be at least twice max_lag ({max_lag}), so that every lag "
                         "averages over half the line or more")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {list(TARGETS)}")


# --- the measurement, on one network ---------------------------------------------------------


def line(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` points ``(1 - t)·a + t·b``, ``t = 0, 1/(n-1), …, 1``, stacked: [n, *a.shape]."""
    t = torch.linspace(0.0, 1.0, n, device=a.device, dtype=a.dtype).view(-1, *([1] * a.dim()))
    return torch.lerp(a.unsqueeze(0), b.unsqueeze(0), t)


def input_gradients(model: nn.Module, points: torch.Tensor, label: int, target: str = "logit",
                    chunk: int = POINTS_PER_PASS) -> torch.Tensor:
    """[n, D] gradients of the target with respect to each point (flattened), one backward pass
    per ``chunk`` points. ``model`` must be in eval mode: in training mode BatchNorm would mix
    the points of a line, and the gradients would not be the points' own."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {list(TARGETS)}")
    if any(m.training for m in model.modules()):
        raise ValueError("input_gradients needs the model in eval mode (model.eval()): in training mode "
                         "BatchNorm and dropout make each point's output depend on the others")
    grads = []
    for part in points.split(chunk):
        x = part.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = model(x)
            if target == "logit":
                y = out[:, label].sum()
            else:
                y = F.cross_entropy(out, torch.full((len(x),), label, device=out.device), reduction="sum")
            (grad,) = torch.autograd.grad(y, x)  # weight gradients are never computed
        grads.append(grad.reshape(len(x), -1))
    return torch.cat(grads)


def lag_similarity(grads: torch.Tensor, max_lag: int) -> torch.Tensor:
    """float64 [max_lag + 1]: the mean cosine similarity of rows ``k`` apart, for k = 0 … max_lag
    (the module docstring's ``autocorrelation``); pairs with a zero row are left out."""
    if grads.dim() != 2 or len(grads) <= max_lag:
        raise ValueError(f"lag_similarity needs [n, D] rows with n > max_lag ({max_lag}), got {list(grads.shape)}")
    g = grads.detach().double()
    norms = g.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, g / norms, torch.full_like(g, float("nan")))
    values = [torch.nanmean((unit[:len(g) - k] * unit[k:]).sum(1)) for k in range(max_lag + 1)]
    return torch.stack(values)


def image_pairs(labels: torch.Tensor, pairs: int, seed: int = 0) -> list[tuple[int, int]]:
    """``pairs`` disjoint (a, b) index pairs of distinct images, drawn from a seeded permutation."""
    if 2 * pairs > len(labels):
        raise ValueError(f"pairs ({pairs}) needs {2 * pairs} test images, and the test split holds {len(labels)}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:2 * pairs].tolist()
    return list(zip(order[0::2], order[1::2]))


@torch.no_grad()
def estimate_bn_statistics(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm layer's running statistics from ``batches`` (reset, then a
    cumulative average: momentum None), in train mode under no_grad; the model ends in eval mode
    and each layer keeps its momentum. Returns how many BatchNorm layers were estimated."""
    layers = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches, not an exponential one
        model.train()
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return len(layers)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, _BATCH_NORMS) for m in model.modules())


def shatter_network(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, pairs: list[tuple[int, int]],
                    points: int = 256, target: str = "logit", max_lag: int = 16, image_pair: int | None = 0,
                    channels_last: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One eval-mode network on the lines between the test images ``pairs`` index (``channels_last``:
    the points in NHWC memory, for a model converted to it; faster, the same gradients).

    Returns (``pair, a, b, label, lag, distance, value`` per pair and lag, and the gradient image of
    pair ``image_pair``: ``point, t, channel, column, value``, the gradient at each point divided by
    its norm, on pixel row ``IMAGE_ROW`` of every channel; empty when ``image_pair`` is None).
    """
    check_line(points, len(pairs), max_lag, target)
    rows, image = [], pd.DataFrame(columns=["point", "t", "channel", "column", "value"])
    normalised = normalize(images[[i for pair in pairs for i in pair]])
    for index, (a, b) in enumerate(pairs):
        label = int(labels[a])  # host sync: one label per line
        x = line(normalised[2 * index], normalised[2 * index + 1], points)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grads = input_gradients(model, x, label, target)
        values = lag_similarity(grads, max_lag).cpu().numpy()  # host sync: once per line
        lags = np.arange(max_lag + 1)
        rows.append(pd.DataFrame({"pair": index, "a": a, "b": b, "label": label, "lag": lags,
                                  "distance": lags / (points - 1), "value": values}))
        if index == image_pair:
            image = _gradient_image(grads, x.shape[1:])
    return pd.concat(rows, ignore_index=True), image


def _gradient_image(grads: torch.Tensor, shape: torch.Size) -> pd.DataFrame:
    channels, height, width = shape
    norms = grads.double().norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, grads.double() / norms, torch.zeros_like(norms))
    row = unit.view(len(grads), channels, height, width)[:, :, min(IMAGE_ROW, height - 1), :]  # [n, C, W]
    n = len(grads)
    point, channel, column = np.meshgrid(np.arange(n), np.arange(channels), np.arange(width), indexing="ij")
    return pd.DataFrame({"point": point.ravel(), "t": point.ravel() / (n - 1), "channel": channel.ravel(),
                         "column": column.ravel(), "value": row.cpu().numpy().ravel()})


# --- many networks: at initialisation, or trained runs ---------------------------------------


@dataclass
class ShatterResult:
    """Frames of a shatter measurement (see ``gradlab.lessons`` for their columns)."""

    pairs: pd.DataFrame  # run keys, weights, target, points, statistics, pair, a, b, label, lag, distance, value
    summary: pd.DataFrame  # lessons.summarise_shatter(pairs)
    images: pd.DataFrame  # run keys, point, t, channel, column, value: the first pair's gradients
    synthetic: bool  # True: the images are synthetic, not CIFAR-10
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why it was not measured


def _statistics_words(batches: int, batch_size: int) -> str:
    return (f"running statistics estimated from {batches} training batches of {batch_size} images "
            "(reset, then a cumulative average), eval mode")


def _result(frames: list[pd.DataFrame], images: list[pd.DataFrame], synthetic: bool,
            skipped: dict[str, str] | None = None) -> ShatterResult:
    pairs = pd.concat(frames, ignore_index=True)
    image = pd.concat(images, ignore_index=True) if images else pd.DataFrame()
    return ShatterResult(pairs, lessons.summarise_shatter(pairs), image, synthetic, skipped or {})


def write(result: ShatterResult, folder: str | os.PathLike) -> None:
    """Store ``result``'s per-pair rows and gradient images in ``folder`` (created), each written
    atomically, as ``gradlab.lessons.read_shatter`` reads them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_parquet(folder / lessons.SHATTER, result.pairs)
    runs.write_parquet(folder / lessons.SHATTER_IMAGES, result.images)


def shatter(config: ShatterConfig, splits: Splits | None = None,
            on_network_done: Callable[[str], None] | None = None) -> ShatterResult:
    """Every network of the grid at initialisation (blocks × norms × depths, each built from
    ``config.seed`` as ``gradlab probe`` builds them), BatchNorm statistics estimated first."""
    config.validate()
    device = resolve_device(config.device)
    if splits is None:
        splits = make_splits(config.dataset, config.data_root, seed=config.seed, device=device)
    loader = DeviceLoader(*splits.train, batch_size=config.stat_batch_size, shuffle=True, seed=config.seed,
                          drop_last=True, channels_last=True)
    batches = [x for x, _ in itertools.islice(loader, config.stat_batches)]
    if len(batches) < config.stat_batches:
        raise ValueError(f"the training split holds {len(splits.train[1])} images: fewer than "
                         f"{config.stat_batches} batches of {config.stat_batch_size}")
    pairs = image_pairs(splits.test[1], config.pairs, config.seed)
    frames, images = [], []
    for block, norm, depth in itertools.product(config.blocks, config.norms, config.depths):
        name = network_name(block, depth, norm)
        torch.manual_seed(config.seed)  # every network starts from the same seed, as in gradlab probe
        model = build_model(block, depth, config.width, norm).to(device, memory_format=torch.channels_last)
        if has_batch_norm(model):
            estimate_bn_statistics(model, batches)
            statistics = _statistics_words(config.stat_batches, config.stat_batch_size)
        else:
            statistics = "no BatchNorm, eval mode"
        model.eval()
        frame, image = shatter_network(model, *splits.test, pairs, config.points, config.target, config.max_lag,
                                       channels_last=True)
        keys = {"run": name, "model": "deepcnn", "block": block, "depth": depth, "width": config.width,
                "norm": norm, "seed": config.seed}
        frames.append(frame.assign(**keys, weights="init", target=config.target, points=config.points,
                                   statistics=statistics))
        images.append(image.assign(**keys, weights="init"))
        if on_network_done is not None:
            on_network_done(name)
    return _result(frames, images, splits.synthetic)


def shatter_runs(path: str | os.PathLike, points: int = 256, pairs: int = 8, target: str = "logit",
                 max_lag: int = 16, seed: int = 0, data_root: str | None = None, device: str = "auto",
                 splits: Splits | None = None, on_network_done: Callable[[str], None] | None = None) -> ShatterResult:
    """The trained networks of a run or a sweep (each run's ``best.pt``, its own BatchNorm running
    statistics, eval mode). A single run that cannot be measured (no checkpoint, diverged) raises
    ValueError; in a sweep such cells are skipped and named in ``skipped``, and ValueError is raised
    only when no cell is left."""
    check_line(points, pairs, max_lag, target)
    device = resolve_device(device)
    usable, skipped = trained_runs(path)
    if splits is None:
        train = usable[0].train
        splits = make_splits(train.get("dataset", "cifar10"), data_root or train.get("data_root"),
                             seed=train.get("seed", 0), device=device)
    chosen = image_pairs(splits.test[1], pairs, seed)
    frames, images = [], []
    for run in usable:
        model, _ = load_trained(run, device)
        model = model.to(memory_format=torch.channels_last)
        statistics = ("the checkpoint's running statistics (the exponential average kept in training), eval mode"
                      if has_batch_norm(model) else "no BatchNorm, eval mode")
        frame, image = shatter_network(model, *splits.test, chosen, points, target, max_lag, channels_last=True)
        keys = lessons.run_keys(run)
        frames.append(frame.assign(**keys, weights="trained", target=target, points=points, statistics=statistics))
        images.append(image.assign(**keys, weights="trained"))
        if on_network_done is not None:
            on_network_done(run.name)
    return _result(frames, images, splits.synthetic, skipped)
