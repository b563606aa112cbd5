"""Gradient flow at initialisation, without training: forward and backward on real batches.

Each network of the grid is built from the same seed, put in training mode (BatchNorm
normalises with batch statistics, as in the first training step), and run forward and
backward on the same few CIFAR-10 batches; the recorder measures every probe point and the
values are averaged over the batches. No optimizer step is taken, so the weights stay at
their initialisation. The result has the record format of a sweep (one "run" per network,
all at step 0), so every analysis, text and HTML report function reads it. A network whose
records are not finite (``analysis.divergence``) has status ``diverged`` and, like a diverged
training run, a ``diverged`` object (step, epoch, layer, position, cause) in its summary.

The grid is models x blocks x norms x depths x widths x seeds: blocks, norms, depths and widths
shape the DeepCNN only, and every other model (``torchvision:NAME``, a factory; see
``gradlab.specs``) is one network per seed, named by its tag (``tv-resnet18``), side by side with
the DeepCNNs in the same tables. Every network is measured on the same batches, loaded once and
drawn with ``seed``, whatever its own seed: across ``seeds`` only the initialisation changes, so
their spread is the spread over initialisations (Hanin 2018), not over data. Names show the width
(``-w<width>``) in a probe over several widths when it is not the notebook's 32, and the seed
(``-s<seed>``) in a probe over several seeds: ``conv-d8``, ``conv-d8-w128-s2-none``.

Each network's Hanin β (``models.hanin_beta``: Σ 1/width over its hidden layers, channels as
widths) is measured on the built model and stored with its parameter count (runs table columns
``beta`` and ``n_params``; config.json and summary.json), so the report side never builds one.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F

from . import __version__, analysis, resources, runs, schema, specs
from .data import DeviceLoader, Splits, make_splits
from .models import check_architecture, check_axes, count_parameters, hanin_beta
from .schema import NOTEBOOK_WIDTH
from .recorder import Recorder
from .train import SAMPLES, TrainConfig, _write_samples, model_shape, resolve_device


@dataclass(frozen=True)
class ProbeConfig:
    """What `gradlab probe` measures; the CLI's options map one-to-one onto these fields."""

    blocks: tuple[str, ...] = ("conv", "res", "skip")  # block types, one network per depth each
    depths: tuple[int, ...] = (2, 8, 32, 64)  # blocks per network
    norms: tuple[str, ...] = ("batch",)  # batch | none (no normalisation: the classic vanishing case)
    width: int = NOTEBOOK_WIDTH  # channels, as in the notebook; the one width when widths is empty
    widths: tuple[int, ...] = ()  # channels, each even and >= 2: one network per width; empty: width alone
    batch_size: int = 256  # images per batch, the notebook's
    batches: int = 3  # batches averaged per network
    seed: int = 0  # the choice of batches, and initialisation when seeds is empty
    seeds: tuple[int, ...] = ()  # initialisations: one network per seed, all on seed's batches; empty: seed alone
    dataset: str = "cifar10"  # cifar10 | synthetic
    data_root: str | None = None  # as in TrainConfig
    device: str = "auto"  # auto | cpu | cuda
    models: tuple[str, ...] = (specs.DEEPCNN,)  # model specs; blocks, depths and norms shape deepcnn only
    model_args: tuple[tuple[str, str], ...] = ()  # (key, value) options of the torchvision and factory models
    probes: tuple[str, ...] | None = None  # module names or globs to record; None: the default probe points

    def __post_init__(self) -> None:
        for name in ("blocks", "depths", "norms", "models", "widths", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "model_args", tuple(tuple(pair) for pair in self.model_args))
        if self.probes is not None:
            object.__setattr__(self, "probes", (self.probes,) if isinstance(self.probes, str) else tuple(self.probes))

    def width_list(self) -> tuple[int, ...]:
        """The widths probed: ``widths``, else ``width`` alone."""
        return self.widths or (self.width,)

    def seed_list(self) -> tuple[int, ...]:
        """The initialisations probed: ``seeds``, else ``seed`` alone."""
        return self.seeds or (self.seed,)

    def validate(self) -> None:
        check_axes(**{name: getattr(self, name) for name in ("blocks", "depths", "norms", "models")})
        check_axes(**{name: getattr(self, name) for name in ("widths", "seeds") if getattr(self, name)})
        for width in self.widths:
            if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
                raise ValueError(f"widths: each must be an even integer >= 2, got {width!r}")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"seeds: each must be an integer >= 0, got {seed!r}")
        parsed = [specs.parse(model) for model in self.models]
        for block, depth, norm, width in itertools.product(self.blocks, self.depths, self.norms, self.width_list()):
            check_architecture(depth, width, block, norm)
        specs.parse_model_args(self.model_args)
        if self.model_args and all(spec.kind == "deepcnn" for spec in parsed):
            raise ValueError(f"--model-arg {self.model_args[0][0]}: model options are for torchvision and factory "
                             "models, and --model lists none")
        for name in ("batch_size", "batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def network_name(block: str, depth: int, norm: str, width: int | None = None, seed: int | None = None) -> str:
    """``conv-d8``; ``-w<width>`` when ``width`` is given and not the notebook's, ``-s<seed>`` when
    ``seed`` is given (the caller gives them in a probe over several widths or seeds)."""
    shown = "" if width is None or width == NOTEBOOK_WIDTH else f"-w{width}"
    return f"{block}-d{depth}{shown}" + ("" if seed is None else f"-s{seed}") + ("" if norm == "batch" else f"-{norm}")


@dataclass(frozen=True)
class Network:
    """One network of the probe's grid."""

    name: str  # the run name: conv-d8, res-d32-none, tv-resnet18
    config: TrainConfig  # the model, its options and (deepcnn) its shape; what the stored run directory says

    @property
    def spec(self) -> specs.ModelSpec:
        return self.config.spec()

    def build(self) -> torch.nn.Module:
        return self.spec.build(**self.config.model_kwargs())


def networks(config: ProbeConfig) -> list[Network]:
    """The grid in order: per model, deepcnn as blocks x norms x depths x widths x seeds, any
    other model once per seed."""
    found = []
    base = TrainConfig(width=config.width, epochs=1, batch_size=config.batch_size, seed=config.seed,
                       dataset=config.dataset, data_root=config.data_root, device=config.device)
    widths, seeds = config.width_list(), config.seed_list()
    several_widths, several_seeds = len(widths) > 1, len(seeds) > 1
    for model in config.models:
        spec = specs.parse(model)
        if spec.kind != "deepcnn":
            for seed in seeds:
                name = f"{spec.tag}-s{seed}" if several_seeds else spec.tag
                found.append(Network(name, replace(base, model=model, model_args=config.model_args, seed=seed)))
            continue
        for block, norm, depth, width, seed in itertools.product(config.blocks, config.norms, config.depths, widths,
                                                                 seeds):
            name = network_name(block, depth, norm, width if several_widths else None,
                                seed if several_seeds else None)
            found.append(Network(name, replace(base, block=block, depth=depth, norm=norm, width=width, seed=seed)))
    names = [n.name for n in found]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"two networks of the probe would share the name {name}; rename a file or a factory")
    return found


def probe_network(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  probes: Any = None) -> tuple[pd.DataFrame, int]:
    """Records of one freshly initialised ``model`` (on the batches' device), averaged over
    ``batches`` (step 0), and its size. ``probes``: the Recorder's choice of probe points."""
    model = model.to(batches[0][0].device).train()
    with Recorder(model, flush_every=len(batches), probes=probes) as rec:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            rec.record_loss(loss)
            loss.backward()
            model.zero_grad(set_to_none=True)
    frame = rec.frame()
    keys = [c for c in frame.columns if c not in ("step", "epoch", "value")]  # what a probe point and metric are
    # The mean over batches; a batch whose value is non-finite makes the mean non-finite, as it should.
    averaged = frame.groupby(keys, sort=False, as_index=False)["value"].mean()
    return averaged.assign(step=0, epoch=0)[["step", "epoch", *keys, "value"]], count_parameters(model)


def largest_memory(config: ProbeConfig, device: torch.device) -> tuple[str, resources.MemoryEstimate]:
    """(a description, the memory estimate) of the network of the probe that needs the most memory
    (no optimizer: weights and gradients); other models are built and traced on the meta device."""
    n_images = resources.POOL_IMAGES + resources.TEST_IMAGES
    on_cpu = device.type == "cpu"
    found = []
    if specs.DEEPCNN in config.models:  # closed form; resdown keeps the most per block
        block = max(config.blocks, key=lambda b: b == "resdown")
        depth, norm = max(config.depths), "batch" if "batch" in config.norms else config.norms[0]
        width = max(config.width_list())
        shape = model_shape(TrainConfig(block=block, depth=depth, width=width, norm=norm), config.probes)
        found.append((f"probing a {block} network of depth {depth} and width {width}", shape))
    for model in config.models:
        if model != specs.DEEPCNN:
            spec = specs.parse(model)
            shape = model_shape(TrainConfig(model=model, model_args=config.model_args), config.probes)
            found.append((f"probing {spec.name}", shape))
    estimates = [(what, resources.estimate_model_memory(shape, config.batch_size, n_images, optimizer_states=None,
                                                        on_cpu=on_cpu)) for what, shape in found]
    what, estimate = max(estimates, key=lambda pair: pair[1].total)
    return f"{what} with batches of {config.batch_size}", estimate


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
    # channels-last, as the trainer: oneDNN's fast CPU convolutions; the same arithmetic up to rounding
    loader = DeviceLoader(*splits.train, batch_size=config.batch_size, shuffle=True, seed=config.seed, drop_last=True,
                          channels_last=True)
    batches = list(itertools.islice(loader, config.batches))  # loaded once: every network sees these
    if len(batches) < config.batches:
        raise ValueError(f"the training split holds {len(splits.train[1])} images: fewer than "
                         f"{config.batches} batches of {config.batch_size}")
    records, rows = [], []
    for network in networks(config):
        name, train = network.name, network.config
        torch.manual_seed(train.seed)  # the network's initialisation; the batches are the same for every seed
        model = network.build().to(memory_format=torch.channels_last)
        beta = hanin_beta(model)
        frame, n_params = probe_network(model, batches, config.probes)
        identity = _identity(network, model, frame)
        records.append(frame.assign(**identity, seed=train.seed))
        found = analysis.divergence(records[-1])  # non-finite at initialisation: an overflow in the forward pass
        diverged = {f: _plain(found[f].iloc[0]) for f in schema.DIVERGED_FIELDS} if len(found) else None
        rows.append({**identity, "seed": train.seed, "status": "diverged" if diverged else "probe", "epochs": 0,
                     "dataset": splits.dataset, "synthetic": splits.synthetic, "n_params": n_params, "beta": beta,
                     **{f"diverged_{f}": (diverged or {}).get(f) for f in schema.DIVERGED_FIELDS}})
        if out is not None:
            _write_network(Path(out) / runs.RUNS_FOLDER / name, config, train, rows[-1], frame, splits, device,
                           diverged)
        if on_network_done is not None:
            on_network_done(name)
    if out is not None:
        names = [row["run"] for row in rows]
        runs.write_json(Path(out) / runs.SWEEP, {"probe": asdict(config), "cells": names})
    run_columns = list(schema.RUN_KEYS)
    combined = pd.concat(records, ignore_index=True)
    return combined[[*run_columns, *(c for c in combined.columns if c not in run_columns)]], pd.DataFrame(rows), \
        splits.synthetic


def _identity(network: Network, model: torch.nn.Module, frame: pd.DataFrame) -> dict:
    """The run keys of one probed network but its seed (``schema.RUN_KEYS``). For a model other
    than deepcnn: ``block`` is its stack's module types in stack order ("BasicBlock"), ``depth``
    the number of stack points, ``width`` None, and ``norm`` the kind of normalisation it holds
    (``specs.norm_of``)."""
    train = network.config
    if network.spec.kind == "deepcnn":
        return {"run": network.name, "model": train.model, "block": train.block, "depth": train.depth,
                "width": train.width, "norm": train.norm}
    stack = frame.loc[frame["role"] == "stack"].sort_values("stack_index", kind="stable")
    types = [t for t in dict.fromkeys(stack["module_type"]) if isinstance(t, str) and t]
    return {"run": network.name, "model": train.model, "block": schema.stack_block(types),
            "depth": int(stack["stack_index"].nunique()), "width": None, "norm": specs.norm_of(model)}




def _plain(value):
    """A numpy scalar as the Python value JSON can hold."""
    return value.item() if hasattr(value, "item") else value


def _write_network(run_dir: Path, config: ProbeConfig, train: TrainConfig, row: dict, frame: pd.DataFrame,
                   splits: Splits, device: torch.device, diverged: dict | None = None) -> None:
    """One probed network as a run directory: config, summary (status probe or diverged) and its records."""
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_json(run_dir / runs.CONFIG, {
        "train": asdict(train), "model": {**train.spec().describe(), "norm": row["norm"]}, "probe": asdict(config), "dataset": splits.dataset,
        "synthetic": splits.synthetic, "device": str(device), "n_params": row["n_params"], "beta": row["beta"],
        "versions": {"gradlab": __version__, "torch": torch.__version__}, "classes": list(splits.classes)})
    summary = {"status": row["status"], "n_params": row["n_params"], "beta": row["beta"], "epochs_done": 0}
    runs.write_json(run_dir / runs.SUMMARY, summary | ({"diverged": diverged} if diverged else {}))
    writer = runs.RecordsWriter(run_dir)
    writer.truncate(0)
    writer({name: frame[name].to_numpy() for name in runs.RECORD_COLUMNS})
    if not (run_dir / SAMPLES).exists():
        _write_samples(run_dir, splits)
