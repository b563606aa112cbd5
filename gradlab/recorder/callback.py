"""The trainer's adapter: a Recorder attached through the training loop's named events."""
from __future__ import annotations

import logging
from typing import Any

import torch

from gradlab import native, schema

from .buffer import Sink
from .core import Recorder
from .schedule import RecordConfig


class RecorderCallback:
    """Records a training run through the trainer's named events.

    Creates the Recorder at fit start (continuing the trainer's step numbering on resume),
    keeps its epoch, records each step's loss, flushes at every epoch end (before the
    trainer writes its checkpoint) and removes every hook at fit end, or in ``close()``.
    """

    def __init__(self, config: RecordConfig | None = None, sink: Sink | None = None) -> None:
        self.config = RecordConfig() if config is None else config
        self.sink = sink
        self.recorder: Recorder | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self.close()
        if not self.config.enabled:
            return  # no hooks at all: zero cost
        recorder = Recorder(
            trainer.model,
            every=self.config.make_schedule(),
            optimizer=trainer.optimizer,
            sink=self.sink,
            flush_every=self.config.flush_every,
            start_step=trainer.step,
            probes=self.config.probes,
        )
        recorder.epoch = getattr(trainer, "epoch", 0)
        if recorder._buffer_kind()[1].type == "cpu" and not native.available():  # built here, once
            logging.getLogger("gradlab").warning(
                "gradient statistics by eager PyTorch ops, not the compiled kernels (%s): "
                "recording costs about twice as much; see README, Performance", native.status_reason()
            )
        self.recorder = recorder.__enter__()

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if self.recorder is not None:
            self.recorder.epoch = epoch
            self.recorder.step = trainer.step

    def on_after_forward(self, trainer: Any, loss: torch.Tensor) -> None:
        if self.recorder is not None:
            if self.recorder.step != trainer.step:  # e.g. a step the trainer skipped
                self.recorder.step = trainer.step
            self.recorder.record_loss(loss)

    def on_after_backward(self, trainer: Any) -> None:
        pass  # the recorder's own hooks measured the backward pass

    def on_after_step(self, trainer: Any) -> None:
        pass  # the optimizer's step hooks closed the step

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: Any) -> None:
        if self.recorder is not None:
            self.recorder.flush()

    def on_fit_end(self, trainer: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and flush; safe to call again, and after a failed run."""
        if self.recorder is not None:
            self.recorder.close()

    def frame(self):
        """The records kept by the recorder (empty with a sink or before fit start)."""
        if self.recorder is None:
            return schema.empty_records()
        return self.recorder.frame()
