"""The gradient-flow lesson in one call: probe at initialisation, train shallow and deep, report.

``run_demo`` probes plain, residual and skip networks at a few depths, measures their shattered
gradients at initialisation (a shallow and a deep one of each kind: ``gradlab.shatter``), trains a
shallow and a deep network of each kind for a short fixed budget on a real CIFAR-10 subset
(synthetic data, stated as such, when no CIFAR-10 can be had), deletes their blocks on part of
the test split (``gradlab.lesion``), and writes the HTML report of that small sweep, which shows
both experiments. It returns frames; ``gradlab demo`` prints them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from . import analysis, lessons, runs, schema
from .data import DataError, make_splits
from .lesion import lesion_runs
from .probe import ProbeConfig, probe
from .shatter import ShatterConfig, shatter, write
from .sweep import SweepGrid, run_sweep
from .train import TrainConfig, resolve_device


@dataclass(frozen=True)
class DemoConfig:
    """The lesson's fixed budget: about a minute on a 2-core laptop CPU."""

    blocks: tuple[str, ...] = ("conv", "res", "skip")  # plain, identity residual, concatenating skip
    probe_depths: tuple[int, ...] = (2, 8, 32)  # networks probed at initialisation
    probe_norms: tuple[str, ...] = ("batch", "none")  # with BatchNorm (the notebook) and without
    train_depths: tuple[int, ...] = (2, 16)  # a shallow and a deep network of each kind are trained
    width: int = 16  # channels; the notebook's 32 doubles the time and tells the same story
    probe_batch_size: int = 128  # images per probe batch
    probe_batches: int = 2  # batches averaged per probed network
    subset: int = 2048  # training images per trained network
    epochs: int = 2  # passes over the subset
    batch_size: int = 128  # images per optimizer step
    lr: float = 1e-3  # Adam; 10x the notebook's so that two short epochs show learning
    val_fraction: float = 0.04  # 2,000 validation images: evaluation would otherwise cost more than training
    shatter_depths: tuple[int, ...] = (2, 32)  # networks whose shattered gradients are measured at initialisation
    shatter_points: int = 128  # points per line; half the default: the neighbours are still close
    shatter_pairs: int = 4  # image pairs per network: enough for a spread
    shatter_max_lag: int = 16  # autocorrelation lags 0 ... 16 (the report's figure)
    lesion_images: int = 2000  # the first test images the trained networks are lesioned on
    lesion_draws: int = 2  # random sets per number of deleted blocks
    seed: int = 0
    data_root: str | None = None  # as in TrainConfig; None: $GRADLAB_DATA, else the cache (downloads)
    device: str = "auto"
    work_dir: str = "runs/demo"  # the trained networks' sweep directory (and the probe's)
    html: str = "runs/demo/demo.html"  # the report: beside the runs (ignored by git), outside the gallery


@dataclass
class DemoResult:
    synthetic: bool  # True: no CIFAR-10 was available and noise stood in for it
    data_note: str  # why synthetic data was used, else ""
    probe_records: pd.DataFrame
    probe_flow: pd.DataFrame  # analysis.flow_summary at initialisation, one row per probed network
    probe_profile: pd.DataFrame  # analysis.gradient_profile at initialisation
    trained: pd.DataFrame  # one row per trained network: its keys, budget, first and last loss, accuracies, verdicts
    shatter_summary: pd.DataFrame  # lessons.summarise_shatter at initialisation
    lesion: pd.DataFrame  # gradlab.lesion's rows of the trained networks, run keys in front
    html: Path
    seconds: dict  # phase -> wall seconds


def _splits(config: DemoConfig, device):
    try:
        return make_splits("cifar10", config.data_root, seed=config.seed, device=device), ""
    except DataError as exc:
        return make_splits("synthetic", seed=config.seed, device=device), str(exc)


def run_demo(config: DemoConfig = DemoConfig(), on_progress: Callable[[str], None] | None = None) -> DemoResult:
    """Probe, train and report; ``on_progress(message)`` is called as each stage starts."""
    from .report.html import write_report  # the report side; imported late to keep start-up light

    def say(message: str) -> None:
        if on_progress is not None:
            on_progress(message)

    seconds, clock = {}, time.perf_counter()
    device = resolve_device(config.device)
    say("loading CIFAR-10")
    splits, data_note = _splits(config, device)
    dataset = splits.dataset
    seconds["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"probing {', '.join(config.blocks)} networks at depths {', '.join(map(str, config.probe_depths))}")
    probe_config = ProbeConfig(blocks=config.blocks, depths=config.probe_depths, norms=config.probe_norms, width=config.width,
                               batch_size=config.probe_batch_size, batches=config.probe_batches, seed=config.seed,
                               dataset=dataset, data_root=config.data_root, device=config.device)
    records, probe_runs, _ = probe(probe_config, splits=splits, out=Path(config.work_dir) / "probe")
    flow = analysis.flow_summary(records, probe_runs, phases=("init",))
    profile = analysis.gradient_profile(records, "init")
    seconds["probe"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"shattered gradients of depths {' and '.join(map(str, config.shatter_depths))} at initialisation")
    shattered = shatter(ShatterConfig(blocks=config.blocks, depths=config.shatter_depths, width=config.width,
                                      points=config.shatter_points, pairs=config.shatter_pairs,
                                      max_lag=config.shatter_max_lag,
                                      stat_batches=config.probe_batches, stat_batch_size=config.probe_batch_size,
                                      seed=config.seed, dataset=dataset, data_root=config.data_root,
                                      device=config.device), splits=splits)
    seconds["shatter"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"training depths {' and '.join(map(str, config.train_depths))} of each kind "
        f"({config.epochs} epochs on {config.subset} images)")
    base = TrainConfig(width=config.width, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                       seed=config.seed, dataset=dataset, data_root=config.data_root, subset=config.subset,
                       val_fraction=config.val_fraction,
                       device=config.device, eval_batch_size=2048)
    sweep_dir = Path(config.work_dir) / "train"
    run_sweep(SweepGrid(blocks=config.blocks, depths=config.train_depths, seeds=(config.seed,)), base, sweep_dir)
    trained = _trained_table(sweep_dir)
    write(shattered, sweep_dir / lessons.SHATTER_FOLDER)  # the report's section reads it there
    seconds["train"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(f"deleting blocks of the trained networks (first {config.lesion_images:,} test images)")
    images, labels = splits.test
    part = replace(splits, test=(images[:config.lesion_images], labels[:config.lesion_images]))
    lesion, _, _ = lesion_runs(sweep_dir, draws=config.lesion_draws, seed=config.seed, device=config.device,
                               splits=part)
    seconds["lesion"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say("writing the HTML report")
    html = write_report(sweep_dir, config.html)
    seconds["report"] = time.perf_counter() - clock
    return DemoResult(splits.synthetic, data_note, records, flow, profile, trained, shattered.summary, lesion,
                      Path(html), seconds)


def _trained_table(sweep_dir: Path) -> pd.DataFrame:
    """Per trained network: its run keys, status and training budget (epochs, steps, training
    images: ``report.text.accuracy_sentences`` names it), the loss at the first and last step,
    accuracies, and the flow verdicts."""
    from .report.text import runs_table  # with each summary's divergence, so a diverged net says where

    sweep = runs.load_sweep(sweep_dir)
    table = runs_table(sweep)
    losses = pd.DataFrame([{"run": r.name, "first_loss": r.steps["loss"].iloc[0], "last_loss": r.steps["loss"].iloc[-1]}
                           for r in sweep.runs if len(r.steps)])
    metrics = sorted({"grad_out_norm", "grad_gain", *schema.EVIDENCE})
    flow = analysis.flow_summary(sweep.records(metrics=metrics), table, phases=("init", "end"))
    verdicts = flow.pivot(index="run", columns="phase", values="verdict").add_prefix("verdict_").reset_index()
    columns = [*schema.RUN_KEYS, "status", "epochs_done", "steps", "train_images", "first_loss", "last_loss",
               "final_train_acc", "best_val_acc", "test_acc", "verdict_init", "verdict_end"]
    return table.merge(losses, on="run", how="left").merge(verdicts, on="run", how="left").reindex(columns=columns)
