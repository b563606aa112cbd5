"""Training images/s: gradlab's train loop against the notebook's pipeline, side by side.

    python benchmarks/train_throughput.py [--configs conv:6,res:6,conv:32,res:32] [--steps 8]
        [--reps 5] [--precisions fp32,bf16] [--threads T] [--data-root DIR]

Every side trains a DeepCNN (width 32, batch 256, Adam lr 1e-4, cross-entropy, the same
initial weights) on the real CIFAR-10 training images:

- notebook: the notebook's pipeline. `DataLoader(shuffle=True, num_workers=0)` over the PIL
  transforms (Resize, ToTensor, Normalize), an NCHW float32 model, and its loop: forward,
  loss, zero_grad, backward, step, `loss.item()` into the loss logger every step.
- gradlab fp32 / bf16: gradlab's own loop, `Trainer.train_epoch()` over `--steps` batches:
  uint8 images resident on the device, channels-last activations, losses and accuracy kept
  on the device; bf16 adds autocast (only where the CPU has native bf16, or on CUDA).
- +recorder: the same with the recorder on every step (all metrics) and its flush.

Repetitions are interleaved (every side once per repetition, in rotating order) and the
median images/s is reported, so load from other processes hits every side alike.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from notebook import BATCH_SIZE as BATCH  # noqa: E402  (the notebook's pipeline, a sibling script)
from notebook import NotebookTrainer  # noqa: E402

from gradlab import runtime  # noqa: E402
from gradlab.data import make_splits  # noqa: E402
from gradlab.models import build_model  # noqa: E402
from gradlab.recorder import RecordConfig, RecorderCallback  # noqa: E402
from gradlab.train import Trainer, TrainConfig, cpu_has_bf16  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NotebookSide(NotebookTrainer):
    """The notebook's train_model() over the ``steps``-batch subset per call."""

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        self.train_model()
        _sync(self.device)
        return time.perf_counter() - start


class GradlabSide:
    """gradlab's Trainer; one train_epoch() over a ``steps``-batch subset per call."""

    def __init__(self, config: TrainConfig, splits, model: torch.nn.Module, record: bool) -> None:
        self.callback = RecorderCallback(RecordConfig(every=1), sink=self._keep) if record else None
        self.trainer = Trainer(config, callbacks=[self.callback] if record else [], splits=splits)
        self.trainer.model.load_state_dict(model.state_dict())  # the same initial weights
        self.rows = 0
        if self.callback is not None:
            self.callback.on_fit_start(self.trainer)

    def _keep(self, columns: dict) -> None:
        self.rows += len(columns["value"])  # a real run writes these to records.parquet

    def run(self, steps: int) -> float:
        trainer = self.trainer
        start = time.perf_counter()
        if self.callback is not None:
            self.callback.on_epoch_start(trainer, trainer.epoch)
        metrics = trainer.train_epoch()
        if self.callback is not None:
            self.callback.on_epoch_end(trainer, trainer.epoch, metrics)  # the flush
        _sync(trainer.device)
        trainer.epoch += 1
        return time.perf_counter() - start

    def close(self) -> None:
        if self.callback is not None:
            self.callback.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="conv:6,res:6,conv:32,res:32", help="block:depth pairs, comma separated")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per repetition and side")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions; medians over them")
    parser.add_argument("--precisions", default="fp32,bf16", help="gradlab precisions (bf16 where supported)")
    parser.add_argument("--no-record", action="store_true", help="skip the +recorder sides")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps the default")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runtime.keep_freed_memory()  # gradlab's allocator setting, for every side: benchmarks/allocator.py measures it
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precisions = [p for p in args.precisions.split(",")
                  if p == "fp32" or device.type == "cuda" or cpu_has_bf16()]

    subset = args.steps * BATCH
    splits = make_splits("cifar10", args.data_root, seed=0, subset=subset, device=device)

    names = ["notebook"] + [f"{p}{suffix}" for p in precisions for suffix in ("", "+rec")[: 1 if args.no_record else 2]]
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, batch {BATCH}, "
          f"{args.steps} steps x {args.reps} interleaved reps, median images/s")
    print(f"{'model':<9}" + "".join(f"{n:>13}" for n in names))
    for spec in args.configs.split(","):
        block, depth = spec.split(":")
        config = TrainConfig(block=block, depth=int(depth), dataset="cifar10", data_root=args.data_root, subset=subset,
                             device=device.type)
        torch.manual_seed(0)
        base = build_model(block, int(depth), config.width).to(device)  # every side starts from these weights
        sides = {"notebook": NotebookSide(block, int(depth), config.width, splits, device, model=copy.deepcopy(base))}
        for name in names[1:]:
            precision = name.removesuffix("+rec")
            sides[name] = GradlabSide(TrainConfig(**{**config.__dict__, "precision": precision}), splits, base,
                                      record=name.endswith("+rec"))
        for side in sides.values():  # warm-up: allocator, oneDNN primitives, the recorder's layouts
            side.run(args.steps)
        seconds = {name: [] for name in sides}
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                seconds[name].append(sides[name].run(args.steps))
        for side in sides.values():
            if isinstance(side, GradlabSide):
                side.close()
        rate = {name: subset / statistics.median(s) for name, s in seconds.items()}
        print(f"{spec:<9}" + "".join(f"{rate[n]:>13,.0f}" for n in names))
        print(f"{'':<9}" + "".join(f"{rate[n] / rate['notebook']:>12.2f}x" for n in names), flush=True)


if __name__ == "__main__":
    main()
