"""Gradient flow at initialisation, without training: forward and backward on real batches.

Each network of the grid is built from the same seed, put in training mode (BatchNorm
normalises with batch statistics, as in the first training step), and run forward and
backward on the same few CIFAR-10 batches; the recorder measures every probe point and the
values are averaged over the batches. No optimizer step is taken, so the weights stay at
their initialisation. The result has the record format of a sweep (one "run" per network,
all at step 0), so every analysis, text and HTML report function reads it. A network whose
records are not finite (``analysis.divergence``) has status ``diverged`` and, like a diverged
training run, a ``diverged`` object (step, epoch, layer, position, cause) in its summary.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from . import __version__, analysis, runs
from .data import DeviceLoader, Splits, make_splits
from .models import build_model, check_architecture, count_parameters
from .recorder import Recorder
from .train import SAMPLES, TrainConfig, _write_samples, resolve_device


@dataclass(frozen=True)
class ProbeConfig:
    """What `gradlab probe` measures; the CLI's options map one-to-one onto these fields."""

    blocks: tuple[str, ...] = ("conv", "res", "skip")  # block types, one network per depth each
    depths: tuple[int, ...] = (2, 8, 32, 64)  # blocks per network
    norms: tuple[str, ...] = ("batch",)  # batch | none (no normalisation: the classic vanishing case)
    width: int = 32  # channels, as in the notebook
    batch_size: int = 256  # images per batch, the notebook's
    batches: int = 3  # batches averaged per network
    seed: int = 0  # initialisation and the choice of batches
    dataset: str = "cifar10"  # cifar10 | synthetic
    data_root: str | None = None  # as in TrainConfig
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        for name in ("blocks", "depths", "norms"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        for name in ("blocks", "depths", "norms"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            duplicates = sorted({v for v in values if values.count(v) > 1}, key=str)
            if duplicates:
                raise ValueError(f"{name} lists {duplicates[0]!r} more than once")
        for block, depth, norm in itertools.product(self.blocks, self.depths, self.norms):
            check_architecture(depth, self.width, block, norm)
        for name in ("batch_size", "batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def network_name(block: str, depth: int, norm: str) -> str:
    return f"{block}-d{depth}" + ("" if norm == "batch" else f"-{norm}")


def probe_network(block: str, depth: int, norm: str, width: int, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Records of one freshly initialised network, averaged over ``batches`` (step 0), and its size."""
    torch.manual_seed(seed)
    model = build_model(block, depth, width, norm).to(batches[0][0].device).train()
    with Recorder(model, flush_every=len(batches)) as rec:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            rec.record_loss(loss)
            loss.backward()
            model.zero_grad(set_to_none=True)
    frame = rec.frame()
    keys = ["layer", "position", "block", "metric"]
    # The mean over batches; a batch whose value is non-finite makes the mean non-finite, as it should.
    averaged = frame.groupby(keys, sort=False, as_index=False)["value"].mean()
    return averaged.assign(step=0, epoch=0)[["step", "epoch", *keys, "value"]], count_parameters(model)


def probe(config: ProbeConfig, splits: Splits | None = None, out: str | os.PathLike | None = None,
          on_network_done: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """Probe every network of the grid; returns (records, runs, synthetic) in the sweep format.

    With ``out``, also writes a sweep directory (``sweep.json`` and one run directory per network,
    status ``probe``) that ``gradlab report`` and the HTML report read like any sweep.
    """
    config.validate()
    device = resolve_device(config.device)
    if splits is None:
        splits = make_splits(config.dataset, config.data_root, seed=config.seed, device=device)
    loader = DeviceLoader(*splits.train, batch_size=config.batch_size, shuffle=True, seed=config.seed, drop_last=True)
    batches = list(itertools.islice(loader, config.batches))
    if len(batches) < config.batches:
        raise ValueError(f"the training split holds {len(splits.train[1])} images: fewer than "
                         f"{config.batches} batches of {config.batch_size}")
    records, rows = [], []
    for block, norm, depth in itertools.product(config.blocks, config.norms, config.depths):
        name = network_name(block, depth, norm)
        frame, n_params = probe_network(block, depth, norm, config.width, batches, seed=config.seed)
        records.append(frame.assign(run=name, arch=block, depth=depth, norm=norm, seed=config.seed))
        found = analysis.divergence(records[-1])  # non-finite at initialisation: an overflow in the forward pass
        diverged = {f: _plain(found[f].iloc[0]) for f in analysis.DIVERGED_FIELDS} if len(found) else None
        rows.append({"run": name, "arch": block, "depth": depth, "width": config.width, "norm": norm,
                     "seed": config.seed, "status": "diverged" if diverged else "probe", "epochs": 0,
                     "dataset": splits.dataset, "synthetic": splits.synthetic, "n_params": n_params,
                     **{f"diverged_{f}": (diverged or {}).get(f) for f in analysis.DIVERGED_FIELDS}})
        if out is not None:
            _write_network(Path(out) / runs.RUNS_FOLDER / name, config, rows[-1], frame, splits, device, diverged)
        if on_network_done is not None:
            on_network_done(name)
    if out is not None:
        names = [row["run"] for row in rows]
        runs.write_json(Path(out) / runs.SWEEP, {"probe": asdict(config), "cells": names})
    columns = ["run", "arch", "depth", "norm", "seed", "step", "epoch", "layer", "position", "block", "metric", "value"]
    return pd.concat(records, ignore_index=True)[columns], pd.DataFrame(rows), splits.synthetic




def _plain(value):
    """A numpy scalar as the Python value JSON can hold."""
    return value.item() if hasattr(value, "item") else value


def _write_network(run_dir: Path, config: ProbeConfig, row: dict, frame: pd.DataFrame, splits: Splits,
                   device: torch.device, diverged: dict | None = None) -> None:
    """One probed network as a run directory: config, summary (status probe or diverged) and its records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train = TrainConfig(block=row["arch"], depth=row["depth"], width=config.width, norm=row["norm"], epochs=1,
                        batch_size=config.batch_size, seed=config.seed, dataset=config.dataset,
                        data_root=config.data_root, device=config.device)
    runs.write_json(run_dir / runs.CONFIG, {
        "train": asdict(train), "probe": asdict(config), "dataset": splits.dataset,
        "synthetic": splits.synthetic, "device": str(device), "n_params": row["n_params"],
        "versions": {"gradlab": __version__, "torch": torch.__version__}, "classes": list(splits.classes)})
    summary = {"status": row["status"], "n_params": row["n_params"], "epochs_done": 0}
    runs.write_json(run_dir / runs.SUMMARY, summary | ({"diverged": diverged} if diverged else {}))
    writer = runs.RecordsWriter(run_dir)
    writer.truncate(0)
    writer({name: frame[name].to_numpy() for name in runs.RECORD_COLUMNS})
    if not (run_dir / SAMPLES).exists():
        _write_samples(run_dir, splits)
