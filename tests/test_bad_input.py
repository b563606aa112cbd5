"""Bad input to every command: one line on stderr, exit status 2, no traceback, nothing written.

Each row is a command, the options that differ from a valid invocation of it, and a piece of
the message the user must see. Every row fails before any training, probing or data loading,
so the whole matrix runs in seconds.
"""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from gradlab import runs
from gradlab.cli import main
from gradlab.recorder import RecordConfig
from gradlab.train import TrainConfig

CUDA = torch.cuda.is_available()
NO_CUDA = "device 'cuda' was asked for but torch sees no CUDA GPU"

# Valid invocations (with --out added per row); each row changes some options.
VALID = {
    "train": {"--dataset": "synthetic", "--block": "res", "--depth": "2", "--width": "2", "--epochs": "2",
              "--batch-size": "64", "--subset": "192", "--val-fraction": "0.02", "--lr": "3e-3", "--device": "cpu"},
    "sweep": {"--blocks": "conv", "--depths": "1", "--seeds": "0", "--dataset": "synthetic", "--width": "2",
              "--epochs": "2", "--batch-size": "64", "--subset": "192", "--val-fraction": "0.02", "--device": "cpu"},
    "probe": {"--blocks": "conv", "--depths": "2", "--norm": "batch", "--width": "4", "--batch-size": "8",
              "--batches": "1", "--dataset": "synthetic", "--device": "cpu"},
    "demo": {"--device": "cpu"},
    "report": {},
}
# The train config VALID["train"] describes, for the run directory created with other options.
TRAIN_CONFIG = TrainConfig(block="res", depth=2, width=2, epochs=2, batch_size=64, subset=192, val_fraction=0.02,
                           lr=3e-3, dataset="synthetic", device="cpu")


class Paths:
    """The paths the rows point at, made fresh in each test's tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.afile = tmp / "afile"
        self.afile.write_text("not a folder")
        self.empty = tmp / "empty"
        self.empty.mkdir()
        self.run = tmp / "run"  # the default --out: must not exist after a refusal
        self.sweep = tmp / "sweep"
        if os.geteuid() == 0:  # root writes anywhere but in sysfs
            self.unwritable = Path("/sys/gradlab-unwritable")
        else:
            locked = tmp / "locked"
            locked.mkdir(mode=0o555)
            self.unwritable = locked / "out"
        self.other_run = tmp / "other-run"  # a run directory created with other options
        self.other_run.mkdir()
        other = replace(TRAIN_CONFIG, depth=3, lr=0.1)
        runs.write_json(self.other_run / runs.CONFIG, {"train": asdict(other)})
        self.other_sweep = tmp / "other-sweep"  # a sweep folder created with another grid
        self.other_sweep.mkdir()
        base = replace(TRAIN_CONFIG, block="conv", depth=6, seed=0, epochs=2, lr=1e-4)
        runs.write_json(self.other_sweep / runs.SWEEP, {
            "grid": {"blocks": ["conv"], "depths": [2], "seeds": [0], "norms": ["batch"]},
            "base": asdict(base), "record": asdict(RecordConfig()), "cells": ["conv-d2-s0"]})
        self.corrupt_sweep = tmp / "corrupt-sweep"
        self.corrupt_sweep.mkdir()
        (self.corrupt_sweep / runs.SWEEP).write_text('{"grid": {"blocks": [')
        self.corrupt_run = tmp / "corrupt-run"
        self.corrupt_run.mkdir()
        (self.corrupt_run / runs.CONFIG).write_text("\x00\x01garbage")
        self.user_models = tmp / "user_models.py"  # a user's factories, each wrong in its own way
        self.user_models.write_text(USER_MODELS)
        self.broken_models = tmp / "broken_models.py"  # a file that fails on import
        self.broken_models.write_text("import torch\nSCALE = 1 / 0\n")


USER_MODELS = """
import torch.nn as nn


def mlp(hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def raises():
    raise RuntimeError("out of ideas")


def not_a_module():
    return [nn.Linear(2, 2)]


def seven_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))


def fails_forward():
    return nn.Sequential(nn.Linear(5, 10))


NOT_CALLABLE = 3
"""
HUGE = ["--model", "torchvision:resnet50", "--model-arg", "width_per_group=16384"]  # terabytes, traced on meta

# (command, {option: value or None to drop it} or a list of extra arguments, expected piece of the message)
ROWS = {
    # --- gradlab train -----------------------------------------------------------------------
    "train: unknown block": ("train", {"--block": "dense"}, "'dense' is not one of"),
    "train: unknown norm": ("train", {"--norm": "layer"}, "'layer' is not one of"),
    "train: negative depth": ("train", {"--depth": "-1"}, "-1 is not in the range x>=0"),
    "train: non-numeric depth": ("train", {"--depth": "deep"}, "'deep' is not a valid integer"),
    "train: depth too deep for memory": ("train", {"--depth": str(10 ** 9)}, "of memory on cpu"),
    # --- widths: lists like --depths ----------------------------------------------------------
    "sweep: odd width in --widths": ("sweep", {"--width": None, "--widths": "4,7"},
                                     "widths: each must be an even integer >= 2, got 7"),
    "sweep: width 0 in --widths": ("sweep", {"--width": None, "--widths": "0,4"},
                                   "widths: each must be an even integer >= 2, got 0"),
    "sweep: duplicate widths": ("sweep", {"--width": None, "--widths": "4,8,4"}, "widths lists 4 more than once"),
    "sweep: empty --widths": ("sweep", {"--width": None, "--widths": ""}, "--widths must not be empty"),
    "sweep: --width and --widths": ("sweep", {"--widths": "4,8"}, "give --width (one width) or --widths"),
    "sweep: wider-deeper without the base width": ("sweep", {"--width": None, "--widths": "4,8",
                                                             "--shape": "wider-deeper"},
                                                   "must include the width the deeper line grows at, --width 32"),
    "sweep: unknown shape": ("sweep", {"--shape": "star"}, "'star' is not one of"),
    "probe: odd width in --widths": ("probe", {"--width": None, "--widths": "8,3"},
                                     "widths: each must be an even integer >= 2, got 3"),
    "probe: width 1 in --widths": ("probe", {"--width": None, "--widths": "1"},
                                   "widths: each must be an even integer >= 2, got 1"),
    "probe: duplicate widths": ("probe", {"--width": None, "--widths": "8,16,8"}, "widths lists 8 more than once"),
    "probe: non-numeric widths": ("probe", {"--width": None, "--widths": "8,wide"}, "is not a comma-separated list"),
    "probe: --width and --widths": ("probe", {"--widths": "8,16"}, "give --width (one width) or --widths"),
    "probe: duplicate seeds": ("probe", {"--seeds": "0,1,0"}, "seeds lists 0 more than once"),
    "probe: negative seed": ("probe", {"--seeds": "0,-1"}, "seeds: each must be an integer >= 0, got -1"),
    "train: odd width": ("train", {"--width": "7"}, "width must be an even integer >= 2, got 7"),
    "train: width 1": ("train", {"--width": "1"}, "1 is not in the range x>=2"),
    "train: width 0": ("train", {"--width": "0"}, "0 is not in the range x>=2"),
    "train: negative width": ("train", {"--width": "-4"}, "-4 is not in the range x>=2"),
    "train: width too wide for memory": ("train", {"--width": "1000000"}, "of memory on cpu"),
    "train: zero epochs": ("train", {"--epochs": "0"}, "0 is not in the range x>=1"),
    "train: negative epochs": ("train", {"--epochs": "-3"}, "-3 is not in the range x>=1"),
    "train: fractional epochs": ("train", {"--epochs": "1.5"}, "'1.5' is not a valid integer"),
    "train: epochs too many for the disk": ("train", {"--epochs": str(10 ** 12)}, "will write about"),
    "train: zero batch": ("train", {"--batch-size": "0"}, "0 is not in the range x>=1"),
    "train: negative batch": ("train", {"--batch-size": "-64"}, "-64 is not in the range x>=1"),
    "train: batch larger than the subset": ("train", {"--batch-size": "193"},
                                            "batch_size 193 is larger than the 192 training images"),
    "train: batch of a billion": ("train", {"--batch-size": str(10 ** 9)},
                                  "batch_size 1000000000 is larger than the 192 training images"),
    "train: zero lr": ("train", {"--lr": "0"}, "lr must be a finite number > 0, got 0.0"),
    "train: negative lr": ("train", {"--lr": "-1e-3"}, "lr must be a finite number > 0, got -0.001"),
    "train: nan lr": ("train", {"--lr": "nan"}, "lr must be a finite number > 0, got nan"),
    "train: infinite lr": ("train", {"--lr": "inf"}, "lr must be a finite number > 0, got inf"),
    "train: lr overflowing to infinity": ("train", {"--lr": "1e999"}, "lr must be a finite number > 0, got inf"),
    "train: non-numeric lr": ("train", {"--lr": "fast"}, "'fast' is not a valid float"),
    "train: negative seed": ("train", {"--seed": "-1"}, "-1 is not in the range x>=0"),
    "train: seed beyond 64 bits": ("train", {"--seed": str(2 ** 64)}, "seed must be an integer from 0 to 2**63 - 1"),
    "train: zero subset": ("train", {"--subset": "0"}, "0 is not in the range x>=1"),
    "train: negative subset": ("train", {"--subset": "-5"}, "-5 is not in the range x>=1"),
    "train: subset larger than the split": ("train", {"--subset": "1000000"},
                                            "subset must be at most 49000 (the training split), got 1000000"),
    "train: val fraction 0": ("train", {"--val-fraction": "0"}, "0.0 is not in the range 0<x<1"),
    "train: val fraction 1": ("train", {"--val-fraction": "1"}, "1.0 is not in the range 0<x<1"),
    "train: negative val fraction": ("train", {"--val-fraction": "-0.1"}, "-0.1 is not in the range 0<x<1"),
    "train: nan val fraction": ("train", {"--val-fraction": "nan"}, "val_fraction must lie strictly between 0 and 1, got nan"),
    "train: val fraction leaving no image": ("train", {"--val-fraction": "1e-6"}, "leaves an empty split"),
    "train: zero eval batch": ("train", {"--eval-batch-size": "0"}, "0 is not in the range x>=1"),
    "train: negative record-every": ("train", {"--record-every": "-1"}, "-1 is not in the range x>=0"),
    "train: fractional record-every": ("train", {"--record-every": "1.5"}, "'1.5' is not a valid integer"),
    "train: unknown record schedule": ("train", {"--record-schedule": "cosine"}, "'cosine' is not one of"),
    "train: unknown on-nonfinite": ("train", {"--on-nonfinite": "ignore"}, "'ignore' is not one of"),
    "train: unknown dataset": ("train", {"--dataset": "imagenet"}, "'imagenet' is not one of"),
    "train: unknown device": ("train", {"--device": "tpu"}, "'tpu' is not one of"),
    "train: cuda without a GPU": ("train", {"--device": "cuda"}, NO_CUDA),
    "train: data root is a file": ("train", {"--dataset": "cifar10", "--data-root": "{afile}"}, "is a file"),
    "train: data root missing, offline": ("train", {"--dataset": "cifar10", "--data-root": "{tmp}/missing"},
                                          "GRADLAB_DATA"),
    "train: data root empty, offline": ("train", {"--dataset": "cifar10", "--data-root": "{empty}"}, "GRADLAB_DATA"),
    "train: out is a file": ("train", {"--out": "{afile}"}, "exists and is a file"),
    "train: out inside a file": ("train", {"--out": "{afile}/run"}, "cannot create the run directory"),
    "train: out unwritable": ("train", {"--out": "{unwritable}/run"}, "cannot create the run directory"),
    "train: run directory created with other options": (
        "train", {"--out": "{other_run}"}, "holds a run with other options (depth: stored 3, given 2; lr: stored 0.1, given 0.003)"),
    "train: corrupt config.json": ("train", {"--out": "{corrupt_run}"}, "config.json: not valid JSON"),
    "train: unknown option": ("train", ["--bogus", "1"], "No such option '--bogus'"),
    "train: model name without a kind": ("train", {"--model": "resnet18"}, "did you mean torchvision:resnet18?"),
    "train: unknown torchvision model": ("train", {"--model": "torchvision:resnet19"},
                                         "unknown torchvision model 'resnet19'; close names: resnet18"),
    "train: model file missing": ("train", {"--model": "{tmp}/missing.py:make"}, "the file {tmp}/missing.py does not exist"),
    "train: model file is a folder": ("train", {"--model": "{empty}/:make"}, "the file {empty}/ is a folder"),
    "train: model module not importable": ("train", {"--model": "no_such_package.models:make"},
                                           "cannot import module 'no_such_package.models'"),
    "train: model file fails on import": ("train", {"--model": "{broken_models}:make"},
                                          "importing {broken_models} raised ZeroDivisionError: division by zero"),
    "train: factory missing": ("train", {"--model": "{user_models}:absent"}, "{user_models} has no 'absent'"),
    "train: factory not callable": ("train", {"--model": "{user_models}:NOT_CALLABLE"}, "'NOT_CALLABLE' is not callable"),
    "train: factory raises": ("train", {"--model": "{user_models}:raises"}, "raises() raised RuntimeError: out of ideas"),
    "train: factory returns no module": ("train", {"--model": "{user_models}:not_a_module"},
                                         "not_a_module() returned an object of type list, not a torch.nn.Module"),
    "train: model with the wrong output shape": ("train", {"--model": "{user_models}:seven_classes"},
                                                 "gives an output of shape [2, 7], not [2, 10]"),
    "train: model failing on a CIFAR-10 batch": ("train", {"--model": "{user_models}:fails_forward"},
                                                 "fails on a CIFAR-10 batch of shape [2, 3, 32, 32]: RuntimeError"),
    "train: torchvision model for large images": ("train", {"--model": "torchvision:vit_b_16"},
                                                  "fails on a CIFAR-10 batch of shape [2, 3, 32, 32]"),
    "train: torchvision model with auxiliary outputs": ("train", {"--model": "torchvision:googlenet"},
                                                        "in training mode it returns an object of type GoogLeNetOutputs"),
    "train: model too large for memory": ("train", ["--out", "{tmp}/run", *HUGE, "--device", "cpu"], "of memory on cpu"),
    "train: model-arg without =": ("train", {"--model": "{user_models}:mlp", "--model-arg": "hidden"},
                                   "expected key=value"),
    "train: model-arg the factory does not take": ("train", {"--model": "{user_models}:mlp", "--model-arg": "colour=red"},
                                                   "mlp() raised TypeError"),
    "train: model-arg with deepcnn": ("train", {"--model-arg": "hidden=3"}, "model options are for torchvision"),
    "train: model-arg fixed by gradlab": ("train", {"--model": "torchvision:resnet18", "--model-arg": "weights=x"},
                                          "--model-arg weights is fixed by gradlab"),
    "train: unknown optimizer": ("train", {"--optimizer": "lion"}, "'lion' is not one of"),
    "train: momentum with adam": ("train", {"--momentum": "0.9"}, "momentum 0.9 applies to sgd only"),
    "train: momentum 1": ("train", {"--optimizer": "sgd", "--momentum": "1"}, "momentum must be below 1, got 1.0"),
    "train: nan momentum": ("train", {"--optimizer": "sgd", "--momentum": "nan"},
                            "momentum must be a finite number >= 0, got nan"),
    "train: negative weight decay": ("train", {"--weight-decay": "-1"},
                                     "weight_decay must be a finite number >= 0, got -1.0"),
    "train: probes matching nothing": ("train", {"--probes": "layer9.*"}, "no module of DeepCNN matches 'layer9.*'"),
    "train: empty probes": ("train", {"--probes": " , "}, "--probes ' , ': give module names or globs"),
    "train: missing --out": ("train", {"--out": None}, "Missing option '--out'"),
    # --- gradlab sweep -----------------------------------------------------------------------
    "sweep: empty blocks": ("sweep", {"--blocks": ""}, "blocks must not be empty"),
    "sweep: unknown block": ("sweep", {"--blocks": "conv,dense"}, "unknown block 'dense'"),
    "sweep: duplicate blocks": ("sweep", {"--blocks": "conv,conv"}, "blocks lists 'conv' more than once"),
    "sweep: empty depths": ("sweep", {"--depths": ""}, "depths must not be empty"),
    "sweep: duplicate depths": ("sweep", {"--depths": "1,1"}, "depths lists 1 more than once"),
    "sweep: negative depth": ("sweep", {"--depths": "-1"}, "depths: each must be an integer >= 0, got -1"),
    "sweep: non-numeric depth": ("sweep", {"--depths": "1,x"}, "'1,x' is not a comma-separated list of integers"),
    "sweep: fractional depth": ("sweep", {"--depths": "2.5"}, "'2.5' is not a comma-separated list of integers"),
    "sweep: depth too deep for memory": ("sweep", {"--depths": f"1,{10 ** 9}"}, "of memory on cpu"),
    "sweep: negative seed": ("sweep", {"--seeds": "-1"}, "seeds: each must be an integer >= 0, got -1"),
    "sweep: duplicate seeds": ("sweep", {"--seeds": "0,0"}, "seeds lists 0 more than once"),
    "sweep: seed beyond 64 bits": ("sweep", {"--seeds": str(2 ** 64)}, "seed must be an integer from 0 to 2**63 - 1"),
    "sweep: empty norms": ("sweep", {"--norms": ""}, "norms must not be empty"),
    "sweep: unknown norm": ("sweep", {"--norms": "layer"}, "unknown norm 'layer'"),
    "sweep: duplicate norms": ("sweep", {"--norms": "none,none"}, "norms lists 'none' more than once"),
    "sweep: odd width": ("sweep", {"--width": "5"}, "width must be an even integer >= 2, got 5"),
    "sweep: nan lr": ("sweep", {"--lr": "nan"}, "lr must be a finite number > 0, got nan"),
    "sweep: zero epochs": ("sweep", {"--epochs": "0"}, "0 is not in the range x>=1"),
    "sweep: epochs too many for the disk": ("sweep", {"--epochs": str(10 ** 12)}, "will write about"),
    "sweep: batch larger than the subset": ("sweep", {"--batch-size": "500"}, "batch_size 500 is larger than"),
    "sweep: zero jobs": ("sweep", {"--jobs": "0"}, "0 is not in the range x>=1"),
    "sweep: negative jobs": ("sweep", {"--jobs": "-2"}, "-2 is not in the range x>=1"),
    "sweep: unknown executor": ("sweep", {"--executor": "dask"}, "'dask' is not one of"),
    "sweep: ray address without ray": ("sweep", {"--ray-address": "auto"}, "needs the ray executor"),
    "sweep: cuda without a GPU": ("sweep", {"--device": "cuda"}, NO_CUDA),
    "sweep: out is a file": ("sweep", {"--out": "{afile}"}, "exists and is a file"),
    "sweep: out is a run directory": ("sweep", {"--out": "{other_run}"}, "is a run directory"),
    "sweep: out inside a file": ("sweep", {"--out": "{afile}/sweep"}, "cannot create the sweep folder"),
    "sweep: out unwritable": ("sweep", {"--out": "{unwritable}/sweep"}, "cannot create the sweep folder"),
    "sweep: folder created with other options": ("sweep", {"--out": "{other_sweep}"},
                                                 "holds a sweep with other options (grid.depths: stored [2], given [1]"),
    "sweep: corrupt sweep.json": ("sweep", {"--out": "{corrupt_sweep}"}, "sweep.json: not valid JSON"),
    "sweep: empty models": ("sweep", {"--models": ""}, "models must not be empty"),
    "sweep: unknown model": ("sweep", {"--models": "deepcnn,torchvision:resnet19"}, "unknown torchvision model 'resnet19'"),
    "sweep: duplicate models": ("sweep", {"--models": "deepcnn,deepcnn"}, "models lists 'deepcnn' more than once"),
    "sweep: factory raises": ("sweep", {"--models": "{user_models}:raises"}, "raises() raised RuntimeError: out of ideas"),
    "sweep: model-arg without such a model": ("sweep", {"--model-arg": "hidden=3"}, "and --models lists none"),
    "sweep: model too large for memory": ("sweep", {"--models": "torchvision:resnet50",
                                                    "--model-arg": "width_per_group=16384"}, "of memory on cpu"),
    # --- gradlab report ----------------------------------------------------------------------
    "report: missing path": ("report", ["{tmp}/missing"], "does not exist"),
    "report: path is a file": ("report", ["{afile}"], "is a file"),
    "report: folder that is no run": ("report", ["{empty}"], "neither a run directory"),
    "report: unknown format": ("report", ["{empty}", "--format", "xml"], "'xml' is not one of"),
    "report: html is a folder": ("report", ["{other_run}", "--html", "{empty}"], "is a folder, not a file"),
    "report: html inside a file": ("report", ["{other_run}", "--html", "{afile}/r.html"], "is a file, not a folder"),
    "report: corrupt sweep.json": ("report", ["{corrupt_sweep}"], "sweep.json: not valid JSON"),
    "report: corrupt config.json": ("report", ["{corrupt_run}"], "config.json: not valid JSON"),
    # --- gradlab probe -----------------------------------------------------------------------
    "probe: empty blocks": ("probe", {"--blocks": ""}, "blocks must not be empty"),
    "probe: unknown block": ("probe", {"--blocks": "mlp"}, "unknown block 'mlp'"),
    "probe: duplicate blocks": ("probe", {"--blocks": "res,res"}, "blocks lists 'res' more than once"),
    "probe: empty depths": ("probe", {"--depths": ""}, "depths must not be empty"),
    "probe: duplicate depths": ("probe", {"--depths": "2,2"}, "depths lists 2 more than once"),
    "probe: negative depth": ("probe", {"--depths": "-2"}, "depth must be an integer >= 0"),
    "probe: depth too deep for memory": ("probe", {"--depths": str(10 ** 9)}, "of memory on cpu"),
    "probe: batch too large for memory": ("probe", {"--width": "32", "--depths": "64", "--batch-size": str(10 ** 7)},
                                          "of memory on cpu"),
    "probe: unknown norm": ("probe", {"--norm": "group"}, "unknown norm 'group'"),
    "probe: empty norms": ("probe", {"--norm": ""}, "norms must not be empty"),
    "probe: odd width": ("probe", {"--width": "5"}, "width must be an even integer >= 2, got 5"),
    "probe: width 0": ("probe", {"--width": "0"}, "0 is not in the range x>=2"),
    "probe: zero batch": ("probe", {"--batch-size": "0"}, "0 is not in the range x>=1"),
    "probe: zero batches": ("probe", {"--batches": "0"}, "0 is not in the range x>=1"),
    "probe: negative seed": ("probe", {"--seed": "-1"}, "-1 is not in the range 0<=x<="),
    "probe: unknown dataset": ("probe", {"--dataset": "mnist"}, "'mnist' is not one of"),
    "probe: data root is a file": ("probe", {"--data-root": "{afile}"}, "is a file"),
    "probe: cuda without a GPU": ("probe", {"--device": "cuda"}, NO_CUDA),
    "probe: out is a file": ("probe", {"--out": "{afile}"}, "is a file"),
    "probe: html is a folder": ("probe", {"--html": "{empty}"}, "is a folder, not a file"),
    "probe: unknown format": ("probe", {"--format": "yaml"}, "'yaml' is not one of"),
    "probe: unknown model": ("probe", {"--model": "deepcnn,torchvision:resnet19"}, "unknown torchvision model 'resnet19'"),
    "probe: duplicate models": ("probe", {"--model": "deepcnn,deepcnn"}, "models lists 'deepcnn' more than once"),
    "probe: model with the wrong output shape": ("probe", {"--model": "{user_models}:seven_classes"},
                                                 "gives an output of shape [2, 7], not [2, 10]"),
    "probe: model too large for memory": ("probe", ["--dataset", "synthetic", *HUGE], "of memory on cpu"),
    "probe: list-probes matching nothing": ("probe", ["--model", "{user_models}:mlp", "--probes", "layer*",
                                                      "--list-probes"], "no module of Sequential matches 'layer*'"),
    # --- gradlab demo ------------------------------------------------------------------------
    "demo: work dir is a file": ("demo", {"--work-dir": "{afile}"}, "Directory '{afile}' is a file"),
    "demo: out is a folder": ("demo", {"--out": "{empty}"}, "File '{empty}' is a directory"),
    "demo: out inside a file": ("demo", {"--out": "{afile}/demo.html"}, "is a file, not a folder"),
    "demo: data root is a file": ("demo", {"--data-root": "{afile}"}, "is a file"),
    "demo: unknown device": ("demo", {"--device": "tpu"}, "'tpu' is not one of"),
    "demo: cuda without a GPU": ("demo", {"--device": "cuda"}, NO_CUDA),
    # --- no command --------------------------------------------------------------------------
    "unknown command": ("trian", [], "No such command 'trian'"),
}
BAD_INPUTS = len(ROWS)  # for the closing note


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import torchvision

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", refuse)


def _arguments(command: str, change, paths: Paths) -> list[str]:
    fill = {name: str(value) for name, value in vars(paths).items()}
    if isinstance(change, list):
        return [command, *[a.format(**fill) for a in change]]
    options = dict(VALID.get(command, {}))
    if command in ("train", "sweep"):
        options["--out"] = str(paths.run if command == "train" else paths.sweep)
    elif command == "demo":
        options.update({"--work-dir": str(paths.tmp / "demo"), "--out": str(paths.tmp / "demo.html")})
    for option, value in change.items():
        if value is None:
            options.pop(option, None)
        else:
            options[option] = value.format(**fill)
    return [command, *[x for kv in options.items() for x in kv]]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, row):
    command, change, expected = ROWS[row]
    if expected == NO_CUDA and CUDA:
        pytest.skip("this machine has a CUDA GPU")
    paths = Paths(tmp_path)
    before = _files(tmp_path)
    result = CliRunner().invoke(main, _arguments(command, change, paths), catch_exceptions=False)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlab: error: "), result.stderr
    assert expected.format(**{k: str(v) for k, v in vars(paths).items()}) in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    # Nothing written: no run or sweep folder, no new, removed or changed file or folder.
    assert not paths.run.exists() and not paths.sweep.exists() and not (tmp_path / "demo").exists()
    assert _files(tmp_path) == before


def _files(folder: Path) -> dict[Path, int | None]:
    """Every path under ``folder``, with its modification time for files (a folder's changes when a
    lock file comes and goes)."""
    return {p: p.stat().st_mtime_ns if p.is_file() else None for p in folder.rglob("*")}
