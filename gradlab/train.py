"""The notebook's ModelTrainer, done properly: events, device-resident data, safe checkpoints, resume.

The loop knows events, not metrics: recording, progress bars and checkpoints attach to the
named events of ``Callback``. Losses and accuracies accumulate on the device; the host syncs
once per epoch (plus once per evaluation). A non-finite loss or gradient is caught on the
device too and read back once per DIVERGENCE_CHECK_EVERY steps (every step on the CPU, where
reading it is free).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, native, resources, runs, runtime, specs
from .data import DeviceLoader, Splits, make_splits, sample_grid_images
from .lock import RunLock
from .models import check_architecture, count_parameters, hanin_beta

DATASETS = ("cifar10", "synthetic")
DEVICES = ("auto", "cpu", "cuda")
ON_NONFINITE = ("stop", "continue")
POOL_IMAGES = resources.POOL_IMAGES  # both datasets hold 50,000 training images, split into train and validation
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "sgd")
DIVERGENCE_CHECK_EVERY = 64  # steps between host reads of the divergence flag on an accelerator
log = logging.getLogger("gradlab")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run; the CLI's options map one-to-one onto these fields."""

    model: str = specs.DEEPCNN  # deepcnn | torchvision:NAME | path/to/file.py:factory | package.module:factory
    model_args: tuple[tuple[str, str], ...] = ()  # (key, value) keyword options of torchvision or a factory
    block: str = "conv"  # deepcnn only: conv | res | resdown | skip; the notebook's experiment uses ConvBlock
    depth: int = 6  # deepcnn only: number of blocks (the notebook's num_blocks)
    width: int = 32  # deepcnn only: channels through the stem and the blocks (ch_width)
    norm: str = "batch"  # deepcnn only: batch (the notebook); none: every BatchNorm becomes an identity
    epochs: int = 30  # passes over the training split (the notebook's num_epochs)
    batch_size: int = 256  # images per optimizer step (the notebook's batch_size)
    lr: float = 1e-4  # learning rate; Adam at 1e-4 is the notebook's learning_rate
    optimizer: str = "adam"  # adam (the notebook) | sgd (ResNet recipes: with momentum 0.9)
    momentum: float = 0.0  # sgd only: heavy-ball momentum
    weight_decay: float = 0.0  # L2 penalty on every parameter (adam adds it to the gradient, as torch's Adam)
    seed: int = 0  # seeds initialisation, the train/validation split and shuffling
    dataset: str = "cifar10"  # cifar10 | synthetic (seeded noise with learnable labels)
    data_root: str | None = None  # folder holding cifar-10-batches-py; None: $GRADLAB_DATA or the cache
    subset: int | None = None  # train on the first N images of the training split; None: all 45,000
    val_fraction: float = 0.1  # the notebook keeps 10 % of the 50,000 training images for validation
    device: str = "auto"  # auto picks CUDA when present
    eval_batch_size: int = 1024  # evaluation only, under inference_mode: larger is faster, same result
    precision: str = "fp32"  # fp32 | bf16: bfloat16 autocast (CUDA; CPUs with AVX512-BF16 or AMX); statistics stay float32
    channels_last: bool = True  # NHWC activations: oneDNN's fast CPU convolutions, tensor cores on CUDA; same weights
    on_nonfinite: str = "stop"  # stop | continue: what a run does after its first non-finite loss or gradient

    def __post_init__(self) -> None:
        pairs = self.model_args
        if isinstance(pairs, dict):  # a mapping is accepted and stored as pairs
            pairs = tuple(pairs.items())
        if isinstance(pairs, (list, tuple)):  # JSON gives lists; store a tuple of pairs (hashable, frozen)
            pairs = tuple(tuple(p) if isinstance(p, list) else p for p in pairs)
        object.__setattr__(self, "model_args", pairs)

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        spec = self.spec()
        check_architecture(self.depth, self.width, self.block, self.norm)
        if not isinstance(self.model_args, tuple):
            raise ValueError(f"model_args must be (key, value) pairs, got {self.model_args!r}")
        specs.parse_model_args(self.model_args)
        if self.model_args and spec.kind == "deepcnn":
            raise ValueError(f"--model-arg {self.model_args[0][0]}: model options are for torchvision and factory "
                             "models; deepcnn takes --block, --depth, --width and --norm")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {list(OPTIMIZERS)}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be below 1, got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(f"momentum {self.momentum!r} applies to sgd only; use --optimizer sgd "
                             "(adam keeps its own moment estimates)")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.lr, bool) or not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; known: {list(DATASETS)}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; known: {list(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {list(PRECISIONS)}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be true or false, got {self.channels_last!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"unknown on_nonfinite {self.on_nonfinite!r}; known: {list(ON_NONFINITE)}")
        if self.subset is not None and (isinstance(self.subset, bool) or not isinstance(self.subset, int) or self.subset < 1):
            raise ValueError(f"subset must be a positive number of images, got {self.subset!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {self.val_fraction!r}")
        n_val = round(POOL_IMAGES * self.val_fraction)
        if not 1 <= n_val < POOL_IMAGES:
            raise ValueError(f"val_fraction {self.val_fraction!r} leaves an empty split of the {POOL_IMAGES:,} "
                             "training images")
        if self.subset is not None and self.subset > POOL_IMAGES - n_val:
            raise ValueError(f"subset must be at most {POOL_IMAGES - n_val} (the training split), got {self.subset}")
        n_train = self.split_sizes()[0]
        if self.batch_size > n_train:
            raise ValueError(f"batch_size {self.batch_size} is larger than the {n_train} training images; "
                             f"use at most {n_train}")

    def spec(self) -> specs.ModelSpec:
        """The parsed ``model``; ValueError when it names no model gradlab can build."""
        return specs.parse(self.model)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``spec().build``: the DeepCNN's shape, or the parsed model_args."""
        if self.spec().kind == "deepcnn":
            return {"block": self.block, "depth": self.depth, "width": self.width, "norm": self.norm}
        return specs.parse_model_args(self.model_args)

    def split_sizes(self) -> tuple[int, int]:
        """(training images used, validation images): make_splits' split of the 50,000-image pool."""
        n_val = round(POOL_IMAGES * self.val_fraction)
        n_train = POOL_IMAGES - n_val
        return (n_train if self.subset is None else min(self.subset, n_train)), n_val

    # Options that may differ when a run directory is resumed: where data lives and what runs it.
    # channels_last changes the memory layout, not the arithmetic. precision is not resumable.
    RESUMABLE_CHANGES = ("data_root", "device", "epochs", "eval_batch_size", "on_nonfinite", "channels_last")

    def differences(self, other: dict) -> list[str]:
        """Options (except RESUMABLE_CHANGES) whose values differ from a stored config dict; an
        option missing there predates it and stands for its default (what such runs did). Values
        compare as JSON stores them (a tuple equals the list it was written as)."""
        return [f"{f.name}: stored {other.get(f.name, f.default)!r}, given {getattr(self, f.name)!r}"
                for f in fields(self)
                if f.name not in self.RESUMABLE_CHANGES
                and _as_json(other.get(f.name, f.default)) != _as_json(getattr(self, f.name))]


def _as_json(value):
    """Tuples as lists, recursively: the form a value has after a trip through config.json."""
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    return value


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``parameters``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}  # else Adam's own default
    return torch.optim.Adam(parameters, lr=config.lr, **decay)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ValueError when ``device`` cannot run ``precision`` at speed (bf16 on a CPU without
    AVX512-BF16 or AMX would be emulated, several times slower than fp32)."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        raise ValueError("precision bf16 needs CUDA or a CPU with AVX512-BF16 or AMX, and this CPU has neither; "
                         "use --precision fp32")


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
        "diverged": trainer.diverged,  # the first non-finite step so far, None while finite
    }
    state["digest"] = _digest(state)
    runs.atomic_write(path, lambda f: torch.save(state, f))


def _digest(state) -> str:
    """SHA-256 of a checkpoint's content (tensor bytes and every other value, in key order).

    torch.load does not check the zip's CRCs, so garbled bytes inside a tensor would load as
    silently wrong weights; load_checkpoint compares this digest instead."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {flat.dtype} {tuple(value.shape)}|".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            digest.update(b"{")
            for key in sorted(value, key=repr):
                if key != "digest":
                    digest.update(f"{key!r}:".encode())
                    add(value[key])
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                add(item)
            digest.update(b"]")
        else:
            digest.update(f"{value!r}|".encode())

    add(state)
    return digest.hexdigest()


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "best_val_acc", "best_epoch", "history", "step_losses", "rng")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without executing code (``weights_only=True``): a crafted file is refused."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise runs.RunError(f"{path}: missing checkpoint") from None
    except Exception as exc:  # torch raises many types for truncated or crafted files
        raise runs.RunError(f"{path}: cannot be loaded as a gradlab checkpoint ({type(exc).__name__}); it is "
                            f"corrupt or not from gradlab: {runs.RESTART_HINT}") from None
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        raise runs.RunError(f"{path}: loads, but is not a gradlab checkpoint (it lacks the training state); "
                            f"{runs.RESTART_HINT}")
    if "digest" in state and state["digest"] != _digest(state):
        raise runs.RunError(f"{path}: its content does not match its checksum; the file is corrupt: {runs.RESTART_HINT}")
    return state


class Trainer:
    """Any model, optimizer and loss on device-resident CIFAR-10; Adam + cross-entropy on the
    notebook's DeepCNN by default.

    The model is ``config.model`` built by ``gradlab.specs`` (seeded by ``config.seed``) unless
    ``model`` is given; the optimizer is ``config.optimizer`` unless ``optimizer`` is given (a
    callable from the model's parameters to a torch optimizer); the loss is cross-entropy unless
    ``loss`` is given (a callable from logits and labels to a scalar tensor).
    """

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback] = (), splits: Splits | None = None,
                 model: torch.nn.Module | None = None,
                 optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        config.validate()
        self.config = config
        self.spec = config.spec()
        self.callbacks = list(callbacks)
        self.device = resolve_device(config.device)
        check_precision(config.precision, self.device)
        if self.device.type == "cpu":
            runtime.keep_freed_memory()  # no page faults for the stem's 32 MiB activations every step
        torch.manual_seed(config.seed)  # initialisation and dropout
        if splits is not None and config.subset is not None and config.subset < len(splits.train[1]):
            splits = replace(splits, train=tuple(t[:config.subset] for t in splits.train))  # as make_splits does
        self.splits = splits or make_splits(config.dataset, config.data_root, seed=config.seed,
                                            subset=config.subset, val_fraction=config.val_fraction,
                                            device=self.device)
        if model is None:
            model = self.spec.build(**config.model_kwargs())
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model: torch.nn.Module = model.to(self.device, memory_format=memory_format)
        params = self.model.parameters()
        self.optimizer = make_optimizer(config, params) if optimizer is None else optimizer(params)
        self.loss_fn = F.cross_entropy if loss is None else loss
        self.train_loader = DeviceLoader(*self.splits.train, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                                         channels_last=config.channels_last)
        self.epoch = 0  # epochs completed; during an epoch, its 0-based index
        self.step = 0  # optimizer steps completed; during a step, its 0-based index
        self.best_val_acc = 0.0
        self.best_epoch = -1
        self.history: list[dict] = []  # one dict per completed epoch
        self.step_losses: list[float] = []  # one loss per optimizer step
        self.diverged: dict | None = None  # {step, epoch, cause} of the first non-finite loss or gradient
        self.stop_training = False  # set by a callback (divergence): the loop ends after the current step

    def autocast(self) -> torch.autocast:
        """The forward pass's precision: bf16 autocast for ``precision="bf16"``, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

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
        self.diverged = state.get("diverged")
        _set_rng_state(state["rng"])

    @torch.inference_mode()
    def evaluate(self, split: str, model: torch.nn.Module | None = None) -> float:
        """Accuracy on ``train``, ``val`` or ``test`` in eval mode (dropout off, BN running stats)."""
        model = model or self.model
        was_training = model.training
        model.eval()
        runs.fault_point("evaluate")
        images, labels = getattr(self.splits, split)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        loader = DeviceLoader(images, labels, batch_size=self.config.eval_batch_size, channels_last=self.config.channels_last)
        for x, y in loader:
            with self.autocast():
                logits = model(x)
            correct += (logits.argmax(1) == y).sum()
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
            with self.autocast():
                out = self.model(x)
                loss = self.loss_fn(out, y)  # cross-entropy: float32 under autocast
            self._emit("on_after_forward", loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._emit("on_after_backward")
            runs.fault_point("step")
            self.optimizer.step()
            self._emit("on_after_step")
            losses[i] = loss.detach()
            correct += (out.argmax(1) == y).sum()
            self.step += 1
            if self.stop_training:  # a callback ended the run (divergence): the epoch ends here
                n_steps = i + 1
                break
        step_losses = losses[:n_steps].tolist()  # host sync: once per epoch
        seconds = time.perf_counter() - start
        n_images = min(n_steps * self.config.batch_size, len(self.splits.train[1]))
        self.step_losses.extend(step_losses)
        return {"epoch": self.epoch, "step": self.step, "train_loss": float(np.mean(step_losses)),
                "train_acc": correct.item() / n_images, "train_seconds": seconds,
                "images_per_s": n_images / seconds}


class RunFinished(Exception):
    """The run directory holds a finished run: complete with the requested epochs, or diverged."""


def hardware(device: torch.device, node: dict | None = None) -> dict:
    """config.json's ``hardware``: where a run trains (platform, CPUs, torch threads, the GPU, the node)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "node": node or {"host": platform.node()}}  # a sweep's Ray node, else this host


def _run_config(config: TrainConfig, record, trainer: Trainer, node: dict | None = None) -> dict:
    return {
        "train": asdict(config),
        # a file's path and content hash (a resume checks it), and the normalisation the model uses
        "model": {**trainer.spec.describe(), "norm": specs.norm_of(trainer.model)},
        "record": asdict(record) if record is not None else None,
        "dataset": config.dataset,
        "synthetic": trainer.splits.synthetic,
        "device": str(trainer.device),
        "hardware": hardware(trainer.device, node),  # where this (resumed) run trains
        "versions": {"gradlab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "n_params": trainer.n_params,
        "beta": hanin_beta(trainer.model),  # Hanin's β = Σ 1/width over hidden layers (gradlab.models)
        "classes": list(trainer.splits.classes),
        "train_images": len(trainer.splits.train[1]),  # the training budget's images (reports name it)
    }


def _write_tables(run_dir: Path, trainer: Trainer) -> None:
    import pandas as pd  # the run directory's tables; the loop itself never needs pandas

    runs.write_parquet(run_dir / runs.HISTORY, pd.DataFrame(trainer.history))
    steps_per_epoch = len(trainer.train_loader)
    steps = np.arange(len(trainer.step_losses))
    runs.write_parquet(run_dir / runs.STEPS, pd.DataFrame(
        {"step": steps, "epoch": steps // steps_per_epoch, "loss": np.asarray(trainer.step_losses, dtype=np.float64)}))


class _Checkpointer(Callback):
    """Writes last.pt every epoch and best.pt on a new best validation accuracy, then the tables
    and the summary, whose ``wall_seconds`` then counts this process's time so far (``clock``), so
    that a run killed later and resumed still adds up the time it spent up to this checkpoint."""

    def __init__(self, run_dir: Path, summary: dict, clock: Callable[[], float]) -> None:
        self.run_dir, self.summary, self.clock = run_dir, summary, clock

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        if metrics["is_best"]:
            save_checkpoint(self.run_dir / runs.BEST, trainer)
        save_checkpoint(self.run_dir / runs.LAST, trainer)
        _write_tables(self.run_dir, trainer)
        self.summary.update(epochs_done=trainer.epoch, steps_done=trainer.step,
                            best_val_acc=trainer.best_val_acc, best_epoch=trainer.best_epoch,
                            final_train_acc=metrics["train_acc"], wall_seconds=self.clock())
        runs.write_json(self.run_dir / runs.SUMMARY, self.summary)


class _TensorBoard(Callback):
    """Writes each epoch's losses and accuracies to a ``TensorBoardSink`` (its records arrive
    through the recorder's flush); the epoch's step losses are already on the host."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.first_step = 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.first_step = trainer.step

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict) -> None:
        self.sink.epoch(metrics, trainer.step_losses[self.first_step:], self.first_step)


def _tee(*sinks):
    """One recorder sink that hands each flush to every sink in order."""
    def sink(columns) -> None:
        for each in sinks:
            each(columns)
    return sink


_GRAD = torch.Tensor.grad.__get__  # p.grad without attribute lookup: 4x faster between large kernels


class _Divergence(Callback):
    """Finds the first step whose loss or gradient is non-finite, without a host sync per step.

    On an accelerator each step adds a few device ops (isfinite of the loss, the max-abs norm
    of all gradients, which is non-finite exactly when one entry is); the first bad step is kept
    in a device tensor and read once per DIVERGENCE_CHECK_EVERY steps and at every epoch's last
    step. On the CPU, where reading a value is free, each step is judged on the host: the loss
    by its value, the gradients by the compiled kernels' count of inf and NaN entries in one
    pass (``native``; 30-60x cheaper than the foreach norms, which remain the fallback). It sets
    ``trainer.diverged`` and, with on_nonfinite=stop, ``trainer.stop_training``.
    """

    NONE = 2 ** 62  # "no bad step yet"

    def on_fit_start(self, trainer: Trainer) -> None:
        device = trainer.device
        self.host = device.type == "cpu"
        self.params = list(trainer.model.parameters())
        if self.host:  # first bad loss and gradient step, and this step's loss verdict, as Python values
            self.host_first, self.loss_bad_now = [self.NONE, self.NONE], False
            self.watched = native.Watched(self.params)  # the compiled kernels' view of the parameters
        else:  # the same on the device, with the step there too (one copy per fit)
            self.first = torch.full((2,), self.NONE, dtype=torch.long, device=device)
            self.step = torch.tensor(trainer.step, device=device)
            self.loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.check_every = 1 if self.host else DIVERGENCE_CHECK_EVERY
        self.steps_per_epoch = len(trainer.train_loader)

    def on_after_forward(self, trainer: Trainer, loss: torch.Tensor) -> None:
        if trainer.diverged is None:
            if self.host:
                self.loss_bad_now = not math.isfinite(loss.item())  # not a host sync: the CPU computed it
            else:
                self.loss_bad = ~torch.isfinite(loss.detach())

    def on_after_backward(self, trainer: Trainer) -> None:
        if trainer.diverged is not None:
            return
        if self.host:
            for i, bad in enumerate((self.loss_bad_now, self._grads_bad_on_host())):
                if bad:
                    self.host_first[i] = min(self.host_first[i], trainer.step)
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            grad_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf)).max())
        else:
            grad_bad = torch.zeros_like(self.loss_bad)
        bad = torch.stack((self.loss_bad, grad_bad))
        torch.minimum(self.first, torch.where(bad, self.step, self.NONE), out=self.first)

    def _grads_bad_on_host(self) -> bool:
        """True when a gradient entry is inf or NaN (CPU)."""
        grads = list(map(_GRAD, self.params))
        present = [g for g in grads if g is not None]
        if not present:
            return False
        view = self.watched.current() if len(present) == len(grads) else None
        count = None if view is None else view.nonfinite_like(grads)
        if count is None:
            # not a host sync: the CPU computed it
            return not math.isfinite(torch.stack(torch._foreach_norm(present, math.inf)).max().item())
        return count > 0

    def on_after_step(self, trainer: Trainer) -> None:
        if not self.host:
            self.step += 1
        step = trainer.step  # not yet advanced: this step's index
        if trainer.diverged is not None or not ((step + 1) % self.check_every == 0
                                                or (step + 1) % self.steps_per_epoch == 0):
            return
        # host sync: once per check on an accelerator (the CPU's own values are free to read)
        loss_step, grad_step = self.host_first if self.host else self.first.tolist()
        if min(loss_step, grad_step) == self.NONE:
            return
        first = min(loss_step, grad_step)
        trainer.diverged = {"step": first, "epoch": first // self.steps_per_epoch,
                            "cause": "loss" if loss_step <= grad_step else "gradient"}
        if trainer.config.on_nonfinite == "stop":
            trainer.stop_training = True


def _locate_divergence(run_dir: Path, diverged: dict) -> dict:
    """The summary's ``diverged`` object: step, epoch, and the probe point where the records first
    show a non-finite value at that step (layer "model", position -1 when only the loss tells)."""
    where = None
    folder = run_dir / runs.RECORDS
    if folder.is_dir() and any(folder.glob("part-*.parquet")):
        records = runs.read_parquet(folder, filters=[("step", "==", int(diverged["step"]))])
        where = runs.locate_nonfinite(records)
    where = where or {"layer": "model", "position": -1, "cause": diverged["cause"]}
    return {"step": int(diverged["step"]), "epoch": int(diverged["epoch"]), **where}


def finished(summary: dict, config: TrainConfig) -> str | None:
    """Why a run directory with this summary needs no more training for ``config``, or None.

    Complete with enough epochs; or diverged, unless it went on after the divergence
    (on_nonfinite=continue) and has fewer epochs than asked for.
    """
    status, done = summary.get("status"), summary.get("epochs_done", 0)
    if not isinstance(done, int):
        return None
    if status == "complete" and done >= config.epochs:
        acc = summary.get("test_acc")
        acc_text = f"test accuracy {acc:.2%}" if isinstance(acc, float) else "no test accuracy"
        return f"already complete ({done} epochs, {acc_text})"
    if status == "diverged" and (config.on_nonfinite == "stop" or done >= config.epochs):
        where = summary.get("diverged") or {}
        return (f"diverged at step {where.get('step')} (epoch {where.get('epoch')}, first non-finite "
                f"{where.get('cause')} at {where.get('layer')})")
    return None


def _resume_state(run_dir: Path, config: TrainConfig) -> tuple[dict | None, dict]:
    """(the last.pt state to resume from or None, the stored summary), after checking every file that
    a resume reads; RunError naming the first corrupt or foreign file, RunFinished for a finished run.
    Reads only: nothing in ``run_dir`` changes."""
    if not runs.is_run_dir(run_dir):
        return None, {}
    stored_config = runs.read_json(run_dir / runs.CONFIG)
    stored = stored_config.get("train") if isinstance(stored_config, dict) else None
    if not isinstance(stored, dict):
        raise runs.RunError(f"{run_dir / runs.CONFIG}: has no training options; the file is corrupt: "
                            f"{runs.RESTART_HINT}")
    differences = config.differences(stored)
    if differences:
        raise runs.RunError(f"{run_dir}: holds a run with other options ({'; '.join(differences)}); "
                            "use another --out, or --restart to overwrite it")
    changed = _model_file_changed(stored_config.get("model"), config.spec())
    if changed:
        raise runs.RunError(f"{run_dir}: {changed}; restore the file, use another --out, or --restart to train "
                            "the new model from scratch")
    summary = runs.read_json(run_dir / runs.SUMMARY) if (run_dir / runs.SUMMARY).exists() else {}
    states = {}
    for name in (runs.BEST, runs.LAST):
        if (run_dir / name).exists():
            states[name] = load_checkpoint(run_dir / name)
            differences = config.differences(states[name].get("config") or {})
            if differences:
                raise runs.RunError(f"{run_dir / name}: is a checkpoint of other options ({'; '.join(differences)}); "
                                    f"{runs.RESTART_HINT}")
    reason = finished(summary, config)
    if reason:
        raise RunFinished(f"{run_dir}: {reason}; use --restart to train again")
    last = states.get(runs.LAST)
    if last is not None:
        runs.check_records(run_dir, int(last["step"]))
    return last, summary


def _model_file_changed(stored: dict | None, spec: specs.ModelSpec) -> str | None:
    """What changed in the model's file since the run stored its content hash, or None."""
    if not isinstance(stored, dict) or spec.kind != "file" or stored.get("sha256") in (None, spec.sha256):
        return None
    return (f"the model file {spec.target} changed since the run began (sha256 stored {str(stored['sha256'])[:12]}, "
            f"now {spec.sha256[:12]})")


def optimizer_states(config: TrainConfig) -> int:
    """Tensors the optimizer keeps per parameter: Adam two moments, SGD a momentum buffer or none."""
    if config.optimizer == "sgd":
        return 1 if config.momentum else 0
    return 2


def model_shape(config: TrainConfig, probes=None) -> resources.ModelShape:
    """What the memory and disk checks need to know about ``config``'s network: the closed form for
    a DeepCNN with its own probe points, else built and traced (``specs.inspect``), which checks the
    model and the ``probes`` selection too (ValueError)."""
    spec = config.spec()
    if spec.kind == "deepcnn" and probes is None:
        return resources.deepcnn_shape(config.block, config.depth, config.width, config.norm)
    if probes is not None:
        probes = (probes,) if isinstance(probes, str) else tuple(probes)
    return _inspect(spec, tuple(sorted(config.model_kwargs().items())), probes)


@functools.lru_cache(maxsize=64)
def _inspect(spec: specs.ModelSpec, kwargs: tuple, probes: tuple | None) -> resources.ModelShape:
    return specs.inspect(spec, dict(kwargs), probes)  # a sweep asks once per model, not once per cell


def memory_estimate(config: TrainConfig, device: torch.device, probes=None) -> resources.MemoryEstimate:
    """Peak memory of training ``config`` on ``device`` (see gradlab.resources)."""
    n_train, n_val = config.split_sizes()
    half = getattr(config, "precision", "fp32") == "bf16"  # autocast keeps about half the bytes
    return resources.estimate_model_memory(model_shape(config, probes), config.batch_size,
                                           n_train + n_val + resources.TEST_IMAGES, config.eval_batch_size,
                                           optimizer_states=optimizer_states(config), on_cpu=device.type == "cpu",
                                           bytes_per_value=2 if half else 4)


def disk_estimate(config: TrainConfig, record, done_steps: int = 0, checkpoints_missing: int = 2) -> int:
    """Bytes a run of ``config`` still writes to its run directory after ``done_steps`` steps."""
    steps_per_epoch = math.ceil(config.split_sizes()[0] / config.batch_size)
    total = config.epochs * steps_per_epoch
    epochs_left = config.epochs - done_steps // steps_per_epoch
    recorded = resources.recorded_steps(record, done_steps, total)
    flushes = epochs_left + recorded // max(1, getattr(record, "flush_every", 64))
    return resources.estimate_model_disk(model_shape(config, getattr(record, "probes", None)), total, done_steps,
                                         record, flushes, checkpoints_missing, optimizer_states(config))


def _describe(config: TrainConfig) -> str:
    if config.spec().kind != "deepcnn":
        return f"training {config.spec().name} with batches of {config.batch_size}"
    return (f"training a {config.block} network of depth {config.depth} and width {config.width} "
            f"with batches of {config.batch_size}")


def train_run(config: TrainConfig, out: str | os.PathLike, record=None, callbacks: Sequence[Callback] = (),
              restart: bool = False, splits: Splits | None = None, lock_wait: float = 0.0,
              tensorboard: str | os.PathLike | None = None, node: dict | None = None) -> dict:
    """Train into run directory ``out``, resuming from its ``last.pt`` unless ``restart``.

    ``record`` is a ``RecordConfig`` (None or every=0: no recording). ``tensorboard``: a folder
    that also receives the records, losses and accuracies as TensorBoard scalars while the run
    trains (``gradlab.integrations.tensorboard``; needs the tensorboard extra). Returns the summary dict,
    whose status is ``complete`` or ``diverged``. Raises RunFinished when ``out`` already holds a
    finished run (see ``finished``), and RunError (a ValueError) before anything in ``out``
    changes when another process writes there (``lock_wait``: seconds to wait for it), when
    ``out`` holds a run with other options or a corrupt file, or when the run cannot fit in
    memory or on the disk. ``node``: where it trains (a sweep's Ray node: host, address, node id),
    stored in config.json's ``hardware.node``; default: this host's name.
    """
    from .recorder import RecordConfig  # torch side; imported here to keep start-up light

    config.validate()
    record = record if record is not None else RecordConfig()
    if tensorboard is not None:
        from .integrations.tensorboard import require

        require()  # before anything changes: the extra is missing
    run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: exists and is a file; --out must name a run directory")
    device = resolve_device(config.device)
    probes = getattr(record, "probes", None)  # RecordConfig.probes: checked against the model here
    fix = "use a smaller --batch-size, --depth or --width" if config.spec().kind == "deepcnn" else \
        "use a smaller --batch-size or a smaller model"
    resources.check_memory(memory_estimate(config, device, probes), device, _describe(config), fix)
    with RunLock(run_dir, wait=lock_wait) as lock:
        if lock.stale is not None:
            log.warning(f"{run_dir}: took over the lock left by {lock.stale.describe()}, which is no longer running")
        resume_state, previous = (None, {}) if restart else _resume_state(run_dir, config)
        missing = sum(not (run_dir / name).exists() for name in (runs.LAST, runs.BEST)) if resume_state else 2
        resources.check_disk(disk_estimate(config, record, resume_state["step"] if resume_state else 0, missing),
                             run_dir, _describe(config))
        trainer = Trainer(config, splits=splits)
        if resume_state is not None:
            try:
                trainer.restore(resume_state)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                reason = (str(exc).splitlines() or [""])[0]
                raise runs.RunError(f"{run_dir / runs.LAST}: does not fit this run ({type(exc).__name__}: "
                                    f"{reason}); {runs.RESTART_HINT}") from None
        # From here on the run directory changes.
        runs.remove_temporary(run_dir)  # left by atomic writes that a kill interrupted
        if resume_state is None and (restart or runs.is_run_dir(run_dir)):
            _clear_run_dir(run_dir)  # a restart, or a run killed before its first checkpoint
        return _train(run_dir, trainer, record, list(callbacks), resume_state is not None, previous, node,
                      tensorboard)


def _train(run_dir: Path, trainer: Trainer, record, callbacks: list[Callback], resumed: bool, previous: dict,
           node: dict | None = None, tensorboard: str | os.PathLike | None = None) -> dict:
    from .recorder import RecorderCallback

    config = trainer.config
    summary = {"status": "running", "n_params": trainer.n_params, "beta": hanin_beta(trainer.model),
               "epochs": config.epochs,
               "epochs_done": trainer.epoch, "steps_done": trainer.step,
               "best_val_acc": trainer.best_val_acc, "best_epoch": trainer.best_epoch,
               "wall_seconds": previous.get("wall_seconds", 0.0) if resumed else 0.0,
               "resumed_from_epoch": trainer.epoch or None, "synthetic": trainer.splits.synthetic}
    runs.write_json(run_dir / runs.CONFIG, _run_config(config, record, trainer, node))
    runs.write_json(run_dir / runs.SUMMARY, summary)
    start, before = time.perf_counter(), summary["wall_seconds"]  # before: the time of earlier processes

    def wall_seconds() -> float:
        return before + time.perf_counter() - start

    board = None
    try:
        _write_samples(run_dir, trainer.splits)
        if resumed:
            _write_tables(run_dir, trainer)  # the checkpoint's history: a kill may have come before the tables
        own = [_Divergence(), _Checkpointer(run_dir, summary, wall_seconds)]
        if tensorboard is not None:
            from .integrations.tensorboard import TensorBoardSink

            board = TensorBoardSink(tensorboard, start_step=trainer.step)
            own.insert(0, _TensorBoard(board))
        if record.every > 0:
            sink = runs.RecordsWriter(run_dir)
            sink.truncate(trainer.step)  # records flushed after the checkpoint we resume from are redone
            own.insert(0, RecorderCallback(record, sink=sink if board is None else _tee(sink, board)))
        trainer.callbacks = own[:-1] + callbacks + own[-1:]
        _fit(trainer)
        summary.update(epochs_done=trainer.epoch, steps_done=trainer.step)
        if trainer.diverged is not None:
            summary["diverged"] = _locate_divergence(run_dir, trainer.diverged)
        if trainer.stop_training:  # diverged: the weights are not finite; the best checkpoint still is
            _write_tables(run_dir, trainer)  # the loss of every step up to the divergence
            summary["test_acc_last"] = None
            summary["test_acc_best"] = _test_best(run_dir, trainer) if trainer.best_epoch >= 0 else None
        else:
            summary["test_acc_last"] = trainer.evaluate("test")
            if trainer.best_epoch == trainer.epoch - 1:  # the last epoch was the best: same weights
                summary["test_acc_best"] = summary["test_acc_last"]
            else:
                summary["test_acc_best"] = _test_best(run_dir, trainer)
        summary["test_acc"] = summary["test_acc_best"]  # the model chosen by validation accuracy
        if board is not None and summary["test_acc"] is not None and trainer.step > 0:
            board.finished(trainer.step - 1, summary["test_acc"])
        summary["status"] = "diverged" if trainer.diverged is not None else "complete"
    except Exception as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if board is not None:
            board.close()
        summary["wall_seconds"] = wall_seconds()
        runs.write_json(run_dir / runs.SUMMARY, summary)
    return summary


def _test_best(run_dir: Path, trainer: Trainer) -> float:
    best = copy.deepcopy(trainer.model)
    best.load_state_dict(load_checkpoint(run_dir / runs.BEST, map_location=trainer.device)["model"])
    return trainer.evaluate("test", best)


def _fit(trainer: Trainer) -> None:
    trainer._emit("on_fit_start")
    try:
        while trainer.epoch < trainer.config.epochs and not trainer.stop_training:
            trainer._emit("on_epoch_start", trainer.epoch)
            metrics = trainer.train_epoch()
            if trainer.stop_training:  # diverged (on_nonfinite=stop): no evaluation, no checkpoint
                break
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
    """Delete gradlab's own files (and nothing else); config.json last, so that a kill in between
    leaves a run directory that the same command clears again."""
    import shutil

    for name in (runs.SUMMARY, runs.HISTORY, runs.STEPS, runs.LAST, runs.BEST, SAMPLES):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / runs.RECORDS, ignore_errors=True)
    (run_dir / runs.CONFIG).unlink(missing_ok=True)


SAMPLES = "samples.npz"


def _write_samples(run_dir: Path, splits: Splits) -> None:
    """The notebook's grid of 8 test images, stored as plain uint8 arrays for the report side."""
    images, names = sample_grid_images(splits, n=8)
    runs.atomic_write(run_dir / SAMPLES, lambda f: np.savez(f, images=images.numpy(), labels=np.array(names)))
