"""gradlab's recorder in a Lightning training run: ``GradlabCallback`` writes an ordinary run directory.

    import lightning as L
    from gradlab.integrations.lightning import GradlabCallback

    trainer = L.Trainer(max_epochs=2, callbacks=[GradlabCallback(out="runs/lit", every=1)])
    trainer.fit(module, train_loader, val_loader)      # then: gradlab report runs/lit --html

What it records. The LightningModule's network: the module named by ``network`` (a sub-module
path such as ``"net"``), else the LightningModule's only child with parameters when that child
holds all of them (``self.net = ...``: the records' layer names are then the network's own,
``layers.3`` rather than ``net.layers.3``), else the LightningModule itself. Probe points as
everywhere in gradlab (``probes``: names or globs; default ``probes.select``'s choice).

Steps as Lightning defines them. Lightning's automatic optimisation runs forward and backward
inside ``optimizer.step(closure)``, so an optimizer's step pre-hook would fire before the
gradients exist; the recorder's steps are therefore driven by Lightning's hooks
(``Recorder(manual_steps=True)``): ``on_before_optimizer_step`` (the closure's gradients are
complete) measures parameters and gradients, and ``on_train_batch_end`` of the batch whose
optimizer step advanced ``trainer.global_step`` measures the update and ends the step. One
gradlab step is one optimizer step: with ``accumulate_grad_batches=k`` the parameter-gradient
norms are those of the accumulated gradient, the activation and activation-gradient statistics
those of the step's last micro-batch (the recorder keeps a step's last forward pass), and the
step's loss the sum of the micro-batches' losses as Lightning reports them (each divided by k).
Validation, sanity checks and tests run in eval mode without gradients: the recorder skips them.

The run directory (``gradlab.runs``, every file written atomically)::

    config.json        train.model "lightning:<LightningModule class>", the optimizer, epochs, batch
                       size, accumulation, precision; "model" names the module and its network
    summary.json       status running | complete | failed (with the error), steps and epochs done,
                       best validation accuracy, parameter count, wall time; test_acc once
                       ``trainer.test`` ran after the fit (below)
    history.parquet    one row per epoch: epoch, step, HISTORY_METRICS as logged, seconds, images/s
    steps.parquet      the loss of every optimizer step
    records.parquet/   the recorder's rows, one Parquet part per flush

History columns come from the metrics the module logs (``self.log``), read once per epoch from
``trainer.callback_metrics``: each of gradlab's columns takes the first name of
``HISTORY_METRICS`` that was logged (``train_acc`` from ``train_acc``, ``train_acc_epoch`` or
``train/acc``, ...); a column nothing was logged for stays NaN. At every flush of the records
(every ``flush_every`` recorded steps, and at each epoch's end: no extra host sync) the headline
ratio of each recorded step, gradlab's first-to-last gradient ratio (``analysis.first_to_last_by_step``),
goes to every logger of the Trainer as ``HEADLINE_METRIC`` at that step.

Test accuracy. Lightning tests outside ``fit``: after ``trainer.test(...)`` with this callback (the
same object, or a new one with the same ``out`` in another Trainer) the logged test accuracy (the
first of ``TEST_METRICS`` logged) goes into summary.json as ``test_acc``, and as ``test_acc_best``
when the weights tested were the checkpoint callback's best (``ckpt_path="best"``) or
``test_acc_last`` when they were the fitted module's own; ``test_checkpoint`` names a checkpoint
file tested. A run still training, or a directory without a run, is left as it is.

One process and one optimizer; an existing run directory is refused, not resumed.
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

try:
    import lightning.pytorch as pl
except ImportError as exc:  # the extra is optional; say how to get it
    raise ImportError("gradlab.integrations.lightning needs Lightning: pip install 'gradlab[lightning]'") from exc

from gradlab import __version__, analysis, runs, schema, specs
from gradlab.models import count_parameters, hanin_beta
from gradlab.recorder import Recorder, RecordConfig
from gradlab.train import hardware

HISTORY_METRICS = {  # gradlab's history column -> the logged names it is read from, first found wins
    "train_loss": ("train_loss", "train_loss_epoch", "train/loss"),
    "train_acc": ("train_acc", "train_acc_epoch", "train/acc"),
    "val_loss": ("val_loss", "val_loss_epoch", "val/loss"),
    "val_acc": ("val_acc", "val_acc_epoch", "val/acc"),
}
TEST_METRICS = ("test_acc", "test_acc_epoch", "test/acc")  # the logged names test accuracy is read from
HEADLINE_METRIC = schema.HEADLINE_RATIO  # what the Trainer's loggers receive
MODEL_KIND = "lightning"  # config.json train.model is "lightning:<class name>"


class GradlabCallback(pl.Callback):
    """Records a Lightning training run into the gradlab run directory ``out`` (see the module docstring).

    ``every``, ``schedule``, ``flush_every``, ``probes``: ``RecordConfig``'s fields (record every
    N-th optimizer step, 0: none; ``"log"`` for log-spaced steps; recorded steps between host
    syncs; module names or globs). ``network``: the sub-module path of the network to record.
    ``dataset``: a name for config.json (``"synthetic"`` marks the run as trained on synthetic data).
    """

    def __init__(self, out: str | os.PathLike, every: int = 1, probes: str | tuple[str, ...] | None = None,
                 schedule: str = "every", flush_every: int = 64, network: str | None = None,
                 dataset: str | None = None) -> None:
        self.record = RecordConfig(every=every, schedule=schedule, flush_every=flush_every, probes=probes)
        self.run_dir = Path(out)
        self.network_path, self.dataset = network, dataset
        self.recorder: Recorder | None = None
        self._trainer: pl.Trainer | None = None
        self._reset()

    def _reset(self) -> None:
        self.config: dict = {}
        self.summary: dict = {}
        self.history: list[dict] = []
        self.step_losses: list[tuple[int, int, float]] = []  # (step, epoch, loss) of every optimizer step
        self._epoch_losses: list[tuple[int, torch.Tensor]] = []  # this epoch's, on the device until its end
        self._loss: torch.Tensor | None = None  # the current step's loss so far (micro-batches)
        self._images = self._batch_size = 0
        self._next_step = 0  # the optimizer step under way: trainer.global_step passes it when it is done
        self._start = self._epoch_start = 0.0

    # -- fit start and end -------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()
        self._reset()
        if trainer.world_size > 1:
            raise ValueError(f"GradlabCallback records one process; this Trainer runs {trainer.world_size}")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"GradlabCallback records a module with one optimizer; this one has "
                             f"{len(trainer.optimizers)}")
        if runs.is_run_dir(self.run_dir):
            raise runs.RunError(f"{self.run_dir}: holds a gradlab run already; use another out, or delete it first")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise runs.RunError(f"{self.run_dir}: exists and is a file; out must name a run directory")
        network = self._network(pl_module)
        recorder = None
        if self.record.enabled:  # made before anything is written: a bad probe selection raises here
            recorder = Recorder(network, every=self.record.make_schedule(), flush_every=self.record.flush_every,
                                start_step=trainer.global_step, probes=self.record.probes, manual_steps=True,
                                sink=self._sink)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = runs.RecordsWriter(self.run_dir) if recorder is not None else None
        self._trainer, self._next_step = trainer, trainer.global_step
        self.config = self._run_config(trainer, pl_module, network)
        self.summary = {"status": "running", "n_params": self.config["n_params"], "beta": self.config["beta"],
                        "epochs": trainer.max_epochs,
                        "epochs_done": 0, "steps_done": trainer.global_step, "best_val_acc": None,
                        "best_epoch": -1, "wall_seconds": 0.0, "synthetic": self.config["synthetic"],
                        "test_acc": None, "test_acc_best": None, "test_acc_last": None}
        runs.write_json(self.run_dir / runs.CONFIG, self.config)
        runs.write_json(self.run_dir / runs.SUMMARY, self.summary)
        self._start = time.perf_counter()
        self.recorder = recorder.__enter__() if recorder is not None else None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish("complete")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish("failed", f"{type(exception).__name__}: {exception}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.close()  # also reached when another callback's hook raised first

    def _finish(self, status: str, error: str | None = None) -> None:
        if not self.summary or self.summary["status"] != "running":
            return  # never started here, or already finished
        self.close()
        self.summary.update(status=status, wall_seconds=time.perf_counter() - self._start)
        if error is not None:
            self.summary["error"] = error
        runs.write_json(self.run_dir / runs.SUMMARY, self.summary)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = self.summary
        if not summary and runs.is_run_dir(self.run_dir) and (self.run_dir / runs.SUMMARY).is_file():
            summary = runs.read_json(self.run_dir / runs.SUMMARY)  # fitted by another callback or process
        logged = trainer.callback_metrics
        found = next((logged[n] for n in TEST_METRICS if n in logged), None)
        if not summary or summary.get("status") == "running" or found is None:
            return
        accuracy = float(found)  # host sync: once per test
        tested = trainer.ckpt_path
        best = getattr(trainer.checkpoint_callback, "best_model_path", None)
        summary.update(test_acc=accuracy, test_checkpoint=None if tested is None else str(tested))
        if tested is None:
            summary["test_acc_last"] = accuracy
        elif best and Path(tested) == Path(best):
            summary["test_acc_best"] = accuracy
        self.summary = summary
        runs.write_json(self.run_dir / runs.SUMMARY, summary)

    def close(self) -> None:
        """Remove every hook and flush the records; safe to call again, and after a failed run."""
        if self.recorder is not None:
            self.recorder.close()

    # -- steps -----------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.epoch = trainer.current_epoch
        self._epoch_losses, self._images, self._epoch_start = [], 0, time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.recorder is not None and self.recorder.step != trainer.global_step:
            self.recorder.step = trainer.global_step  # e.g. a step Lightning skipped

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.recorder is not None:
            self.recorder.before_update()  # after the closure's backward, before the update

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            self._loss = loss if self._loss is None else self._loss + loss
        images = _batch_len(batch)
        self._images += images
        self._batch_size = max(self._batch_size, images)
        if trainer.global_step <= self._next_step:
            return  # accumulating: the optimizer has not stepped yet
        step, self._next_step = self._next_step, trainer.global_step
        if self._loss is not None:
            self._epoch_losses.append((step, self._loss))
        if self.recorder is not None:
            if self._loss is not None:
                self.recorder.record_loss(self._loss)
            self.recorder.after_update()
        self._loss = None

    # -- epochs ----------------------------------------------------------------------------------

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning has run this epoch's validation by now, and reduced its epoch-level metrics.
        seconds = time.perf_counter() - self._epoch_start
        epoch = trainer.current_epoch
        if self.recorder is not None:
            self.recorder.flush()
        if self._epoch_losses:
            values = torch.stack([loss.float() for _, loss in self._epoch_losses]).tolist()  # host sync: once per epoch
            self.step_losses += [(step, epoch, value) for (step, _), value in zip(self._epoch_losses, values)]
            self._epoch_losses = []
        logged = trainer.callback_metrics
        row = {"epoch": epoch, "step": trainer.global_step}
        for column, names in HISTORY_METRICS.items():
            found = next((logged[n] for n in names if n in logged), None)
            row[column] = float(found) if found is not None else np.nan  # host sync: once per epoch
        row.update(train_seconds=seconds, images_per_s=self._images / seconds if seconds > 0 else np.nan)
        self.history.append(row)
        if epoch == 0 or self.config["train"]["batch_size"] is None:  # known once a batch was seen
            self.config["train"]["batch_size"] = self._batch_size or None
            self.config["train_images"] = self._images
            runs.write_json(self.run_dir / runs.CONFIG, self.config)
        self._write_tables()

    def _write_tables(self) -> None:
        history = pd.DataFrame(self.history)
        runs.write_parquet(self.run_dir / runs.HISTORY, history)
        steps = pd.DataFrame(self.step_losses, columns=["step", "epoch", "loss"]).astype(
            {"step": "int64", "epoch": "int64", "loss": "float64"})
        runs.write_parquet(self.run_dir / runs.STEPS, steps)
        val = history["val_acc"]
        best = int(val.idxmax()) if val.notna().any() else None
        self.summary.update(epochs_done=len(history), steps_done=int(history["step"].iloc[-1]),
                            final_train_acc=_finite_or_none(history["train_acc"].iloc[-1]),
                            best_val_acc=None if best is None else float(val.iloc[best]),
                            best_epoch=-1 if best is None else int(history["epoch"].iloc[best]))
        runs.write_json(self.run_dir / runs.SUMMARY, self.summary)

    # -- records and the headline ratio -------------------------------------------------------------

    def _sink(self, columns: dict[str, np.ndarray]) -> None:
        """One flush of the recorder: a Parquet part, then each step's ratio to the Trainer's loggers."""
        self._writer(columns)
        trainer = self._trainer
        if trainer is None or not trainer.loggers:
            return
        for step, ratio in first_to_last_by_step(columns).items():
            for logger in trainer.loggers:
                logger.log_metrics({HEADLINE_METRIC: ratio}, step=step)

    # -- what is recorded, and config.json ------------------------------------------------------

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.network_path is not None:
            try:
                return pl_module.get_submodule(self.network_path)
            except AttributeError:
                children = [name for name, _ in pl_module.named_children()]
                raise ValueError(f"network {self.network_path!r}: {type(pl_module).__name__} has no such sub-module; "
                                 f"its children: {children}") from None
        owners = [m for _, m in pl_module.named_children() if next(m.parameters(), None) is not None]
        if len(owners) == 1 and count_parameters(owners[0]) == count_parameters(pl_module):
            return owners[0]
        return pl_module

    def _run_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module) -> dict:
        optimizer = trainer.optimizers[0]
        group = optimizer.param_groups[0] if optimizer.param_groups else {}
        device = next(network.parameters(), torch.empty(0)).device
        module_class = type(pl_module)
        path = "" if network is pl_module else next(n for n, m in pl_module.named_modules() if m is network)
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by lightning.seed_everything
        return {
            "train": {"model": f"{MODEL_KIND}:{module_class.__name__}", "epochs": trainer.max_epochs,
                      "batch_size": None, "lr": group.get("lr"), "optimizer": type(optimizer).__name__.lower(),
                      "momentum": group.get("momentum"), "weight_decay": group.get("weight_decay"),
                      "seed": int(seed) if seed is not None else None,
                      "accumulate_grad_batches": trainer.accumulate_grad_batches,
                      "precision": str(trainer.precision), "dataset": self.dataset},
            "model": {"spec": f"{MODEL_KIND}:{module_class.__name__}", "kind": MODEL_KIND,
                      "name": module_class.__name__, "class": f"{module_class.__module__}.{module_class.__qualname__}",
                      "network": path, "network_class": type(network).__name__, "norm": specs.norm_of(network)},
            "record": asdict(self.record),
            "dataset": self.dataset,
            "synthetic": self.dataset == "synthetic",
            "device": str(device),
            "hardware": hardware(device),
            "versions": {"gradlab": __version__, "torch": torch.__version__, "lightning": pl.__version__,
                         "python": platform.python_version()},
            "n_params": count_parameters(network),
            "beta": hanin_beta(network),  # Hanin's β, as gradlab's trainer stores it
            "train_images": None,  # counted in the first epoch
        }


def first_to_last_by_step(columns: Mapping[str, np.ndarray]) -> dict[int, float]:
    """Each recorded step's first-to-last gradient ratio (``analysis.first_to_last_by_step``), the
    finite ones only, by step."""
    ratios = analysis.first_to_last_by_step(pd.DataFrame({c: columns[c] for c in schema.RECORD_COLUMNS}))
    finite = ratios.loc[np.isfinite(ratios["first_to_last"].to_numpy(float))]
    return dict(zip(finite["step"].astype(int), finite["first_to_last"].astype(float)))


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss in ``training_step``'s output as Lightning passes it on (a tensor, or a dict's "loss")."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _batch_len(batch: Any) -> int:
    """Examples in a batch: the leading size of its first tensor (a tensor, or a tuple, list or dict of them)."""
    while isinstance(batch, (list, tuple, Mapping)) and len(batch):
        batch = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 0


def _finite_or_none(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None
