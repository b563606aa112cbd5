"""The notebook's ModelTrainer, done properly: events, device-resident data, safe checkpoints, resume.

The loop knows events, not metrics: recording, progress bars and checkpoints attach to the
named events of ``Callback``. Losses and accuracies accumulate on the device; the host syncs
once per epoch (plus once per evaluation).
"""
from __future__ import annotations

import copy
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, runs
from .data import DeviceLoader, Splits, make_splits, sample_grid_images
from .models import DeepCNN, build_model, check_architecture, count_parameters

DATASETS = ("cifar10", "synthetic")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; the CLI's options map one-to-one onto these fields."""

    block: str = "conv"  # conv | res | resdown | skip; the notebook's experiment uses ConvBlock
    depth: int = 6  # number of blocks (the notebook's num_blocks)
    width: int = 32  # channels through the stem and the blocks (ch_width)
    norm: str = "batch"  # batch: the notebook; none: every BatchNorm becomes an identity
    epochs: int = 30  # passes over the training split (the notebook's num_epochs)
    batch_size: int = 256  # images per optimizer step (the notebook's batch_size)
    lr: float = 1e-4  # Adam learning rate (the notebook's learning_rate)
    seed: int = 0  # seeds initialisation, the train/validation split and shuffling
    dataset: str = "cifar10"  # cifar10 | synthetic (seeded noise with learnable labels)
    data_root: str | None = None  # folder holding cifar-10-batches-py; None: $GRADLAB_DATA or the cache
    subset: int | None = None  # train on the first N images of the training split; None: all 45,000
    val_fraction: float = 0.1  # the notebook keeps 10 % of the 50,000 training images for validation
    device: str = "auto"  # auto picks CUDA when present
    eval_batch_size: int = 1024  # evaluation only, under inference_mode: larger is faster, same result

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        check_architecture(self.depth, self.width, self.block, self.norm)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {list(DATASETS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; known: {list(DEVICES)}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be a positive number of images, got {self.subset!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}")

    # Options that may differ when a run directory is resumed: where data lives and what runs it.
    RESUMABLE_CHANGES = ("data_root", "device", "epochs", "eval_batch_size")

    def differences(self, other: dict) -> list[str]:
        """Options (except RESUMABLE_CHANGES) whose values differ from a stored config dict."""
        return [f"{f.name}: stored {other.get(f.name)!r}, given {getattr(self, f.name)!r}"
                for f in fields(self)
                if f.name not in self.RESUMABLE_CHANGES and other.get(f.name) != getattr(self, f.name)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


class Callback:
    """Named events of the training loop; override the ones you need."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None: ...
    def on_after_forward(self, trainer: "Trainer", loss: torch.Tensor) -> None: ...  # loss stays on the device
    def on_after_backward(self, trainer: "Trainer") -> None: ...  # after loss.backward(), before optimizer.step()
    def on_after_step(self, trainer: "Trainer") -> None: ...  # after optimizer.step(); trainer.step not yet advanced
    def on_epoch_end(self, trainer: "Trainer", epoch: int, metrics: dict) -> None: ...  # before the checkpoint
    def on_fit_end(self, trainer: "Trainer") -> None: ...  # always called, also when training raises


def _rng_state() -> dict:
    """The generators training draws from: torch's (dropout) and CUDA's. Shuffling is seeded per epoch."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, trainer: "Trainer") -> None:
    """Everything needed to continue exactly: weights, optimizer, counters, RNG, history."""
    state = {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "epoch": trainer.epoch,  # epochs completed
        "step": trainer.step,  # optimizer steps completed
        "best_val_acc": trainer.best_val_acc,
        "best_epoch": trainer.best_epoch,
        "history": trainer.history,
        "step_losses": trainer.step_losses,
        "rng": _rng_state(),
        "config": asdict(trainer.config),
    }
    runs.atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise runs.RunError(f"{path}: missing checkpoint") from None
    except Exception as exc:  # torch raises many types for truncated or crafted files
        raise runs.RunError(f"{path}: cannot be loaded as a gradlab checkpoint ({type(exc).__name__}); "
                            "it is corrupt or not from gradlab — rerun with --restart") from None


class Trainer:
    """Adam + cross-entropy on device-resident CIFAR-10, the notebook's defaults."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = (), splits: Splits | None = None) -> None:
        config.validate()
        self.config = config
        self.callbacks = list(callbacks)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)  # initialisation and dropout
        self.splits = splits or make_splits(config.dataset, config.data_root, seed=config.seed,
                                            subset=config.subset, val_fraction=config.val_fraction,
                                            device=self.device)
        self.model: DeepCNN = build_model(config.block, config.depth, config.width, config.norm).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.train_loader = DeviceLoader(*self.splits.train, batch_size=config.batch_size, shuffle=True, seed=config.seed)
        self.epoch = 0  # epochs completed; during an epoch, its 0-based index
        self.step = 0  # optimizer steps completed; during a step, its 0-based index
        self.best_val_acc = 0.0
        self.best_epoch = -1
        self.history: list[dict] = []  # one dict per completed epoch
        self.step_losses: list[float] = []  # one loss per optimizer step

    @property
    def n_params(self) -> int:
        return count_parameters(self.model)

    def _emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self, *args)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_val_acc, self.best_epoch = float(state["best_val_acc"]), int(state["best_epoch"])
        self.history = list(state["history"])
        self.step_losses = list(state["step_losses"])
        _set_rng_state(state["rng"])

    @torch.inference_mode()
    def evaluate(self, split: str, model: torch.nn.Module | None = None) -> float:
        """Accuracy on ``train``, ``val`` or ``test`` in eval mode (dropout off, BN running stats)."""
        model = model or self.model
        was_training = model.training
        model.eval()
        images, labels = getattr(self.splits, split)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for x, y in DeviceLoader(images, labels, batch_size=self.config.eval_batch_size):
            correct += (model(x).argmax(1) == y).sum()
        model.train(was_training)
        return correct.item() / len(labels)  # host sync: once per evaluation

    def train_epoch(self) -> dict:
        """One pass over the training split; returns the epoch's metrics."""
        self.model.train()
        self.train_loader.set_epoch(self.epoch)
        n_steps = len(self.train_loader)
        losses = torch.zeros(n_steps, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        start = time.perf_counter()
        for i, (x, y) in enumerate(self.train_loader):
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self._emit("on_after_forward", loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._emit("on_after_backward")
            self.optimizer.step()
            self._emit("on_after_step")
            losses[i] = loss.detach()
            correct += (out.argmax(1) == y).sum()
            self.step += 1
        step_losses = losses.tolist()  # host sync: once per epoch
        seconds = time.perf_counter() - start
        n_images = len(self.splits.train[1])
        self.step_losses.extend(step_losses)
        return {"epoch": self.epoch, "step": self.step, "train_loss": float(np.mean(step_losses)),
                "train_acc": correct.item() / n_images, "train_seconds": seconds,
                "images_per_s": n_images / seconds}


class RunFinished(Exception):
    """The run directory holds a complete run of the requested length."""


def _run_config(config: TrainConfig, record, trainer: Trainer) -> dict:
    return {
        "train": asdict(config),
        "record": asdict(record) if record is not None else None,
        "dataset": config.dataset,
        "synthetic": trainer.splits.synthetic,
        "device": str(trainer.device),
        "hardware": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else None},
        "versions": {"gradlab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "n_params": trainer.n_params,
        "classes": list(trainer.splits.classes),
    }


def _write_tables(run_dir: Path, trainer: Trainer) -> None:
    import pandas as pd  # the run directory's tables; the loop itself never needs pandas

    runs.write_parquet(run_dir / runs.HISTORY, pd.DataFrame(trainer.history))
    steps_per_epoch = len(trainer.train_loader)
    steps = np.arange(len(trainer.step_losses))
    runs.write_parquet(run_dir / runs.STEPS, pd.DataFrame(
        {"step": steps, "epoch": steps // steps_per_epoch, "loss": np.asarray(trainer.step_losses, dtype=np.float64)}))


class _Checkpointer(Callback):
    """Writes last.pt every epoch and best.pt on a new best validation accuracy, then the tables."""

    def __init__(self, run_dir: Path, summary: dict) -> None:
        self.run_dir, self.summary = run_dir, summary

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if metrics["is_best"]:
            save_checkpoint(self.run_dir / runs.BEST, trainer)
        save_checkpoint(self.run_dir / runs.LAST, trainer)
        _write_tables(self.run_dir, trainer)
        self.summary.update(epochs_done=trainer.epoch, steps_done=trainer.step,
                            best_val_acc=trainer.best_val_acc, best_epoch=trainer.best_epoch,
                            final_train_acc=metrics["train_acc"])
        runs.write_json(self.run_dir / runs.SUMMARY, self.summary)


def train_run(config: TrainConfig, out: str | os.PathLike, record=None, callbacks: Sequence[Callback] = (),
          restart: bool = False, splits: Splits | None = None) -> dict:
    """Train into run directory ``out``, resuming from its ``last.pt`` unless ``restart``.

    ``record`` is a ``RecordConfig`` (None or every=0: no recording). Returns the summary dict.
    Raises RunFinished when ``out`` already holds a complete run of ``config.epochs`` epochs.
    """
    from .recorder import RecorderCallback, RecordConfig  # torch side; imported here to keep start-up light

    config.validate()
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: exists and is a file; --out must name a run directory")
    resume_state = None
    if run_dir.is_dir() and runs.is_run_dir(run_dir) and not restart:
        stored = runs.read_json(run_dir / runs.CONFIG)
        differences = config.differences(stored.get("train", {}))
        if differences:
            raise runs.RunError(f"{run_dir}: holds a run with other options ({'; '.join(differences)}); "
                                "use another --out, or --restart to overwrite it")
        summary = runs.read_json(run_dir / runs.SUMMARY) if (run_dir / runs.SUMMARY).exists() else {}
        if summary.get("status") == "complete" and summary.get("epochs_done", 0) >= config.epochs:
            raise RunFinished(f"{run_dir}: already complete ({summary['epochs_done']} epochs, "
                              f"test accuracy {summary.get('test_acc', float('nan')):.2%}); use --restart to train again")
        if (run_dir / runs.LAST).exists():
            resume_state = load_checkpoint(run_dir / runs.LAST)
    if restart and run_dir.is_dir():
        _clear_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    record = record if record is not None else RecordConfig()
    trainer = Trainer(config, splits=splits)
    if resume_state is not None:
        trainer.restore(resume_state)
    previous = runs.read_json(run_dir / runs.SUMMARY) if resume_state is not None and (run_dir / runs.SUMMARY).exists() else {}
    summary = {"status": "running", "n_params": trainer.n_params, "epochs": config.epochs,
               "epochs_done": trainer.epoch, "steps_done": trainer.step,
               "best_val_acc": trainer.best_val_acc, "best_epoch": trainer.best_epoch,
               "wall_seconds": previous.get("wall_seconds", 0.0), "resumed_from_epoch": trainer.epoch or None,
               "synthetic": trainer.splits.synthetic}
    runs.write_json(run_dir / runs.CONFIG, _run_config(config, record, trainer))
    runs.write_json(run_dir / runs.SUMMARY, summary)
    start = time.perf_counter()
    try:
        _write_samples(run_dir, trainer.splits)
        own = [_Checkpointer(run_dir, summary)]
        if record.every > 0:
            sink = runs.RecordsWriter(run_dir)
            sink.truncate(trainer.step)  # records flushed after the checkpoint we resume from are redone
            own.insert(0, RecorderCallback(record, sink=sink))
        trainer.callbacks = own[:-1] + list(callbacks) + own[-1:]
        _fit(trainer)
        summary["test_acc_last"] = trainer.evaluate("test")
        if trainer.best_epoch == trainer.epoch - 1:  # the last epoch was the best: same weights
            summary["test_acc_best"] = summary["test_acc_last"]
        else:
            best = copy.deepcopy(trainer.model)
            best.load_state_dict(load_checkpoint(run_dir / runs.BEST, map_location=trainer.device)["model"])
            summary["test_acc_best"] = trainer.evaluate("test", best)
        summary["test_acc"] = summary["test_acc_best"]  # the model chosen by validation accuracy
        summary["status"] = "complete"
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary["wall_seconds"] = summary["wall_seconds"] + time.perf_counter() - start
        runs.write_json(run_dir / runs.SUMMARY, summary)
    return summary


def _fit(trainer: Trainer) -> None:
    trainer._emit("on_fit_start")
    try:
        while trainer.epoch < trainer.config.epochs:
            trainer._emit("on_epoch_start", trainer.epoch)
            metrics = trainer.train_epoch()
            metrics["val_acc"] = trainer.evaluate("val")
            metrics["is_best"] = metrics["val_acc"] > trainer.best_val_acc
            if metrics["is_best"]:
                trainer.best_val_acc, trainer.best_epoch = metrics["val_acc"], trainer.epoch
            trainer.history.append({k: v for k, v in metrics.items() if k != "is_best"})
            trainer.epoch += 1
            trainer._emit("on_epoch_end", trainer.epoch - 1, metrics)
    finally:
        trainer._emit("on_fit_end")


def _clear_run_dir(run_dir: Path) -> None:
    import shutil

    for name in (runs.CONFIG, runs.SUMMARY, runs.HISTORY, runs.STEPS, runs.LAST, runs.BEST, SAMPLES):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / runs.RECORDS, ignore_errors=True)


SAMPLES = "samples.npz"


def _write_samples(run_dir: Path, splits: Splits) -> None:
    """The notebook's grid of 8 test images, stored as plain uint8 arrays for the report side."""
    images, names = sample_grid_images(splits, n=8)
    runs.atomic_write(run_dir / SAMPLES, lambda f: np.savez(f, images=images.numpy(), labels=np.array(names)))
