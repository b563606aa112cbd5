"""Any model: specs from the command line, training a user's factory and torchvision models, SGD,
the --models grid, memory traced on the meta device, and the probe points a user can list."""
from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from gradlab import resources, runs, specs
from gradlab.cli import main
from gradlab.models import build_model
from gradlab.specs import ModelSpec
from gradlab.sweep import SweepGrid, cell_name, expand
from gradlab.train import TrainConfig, Trainer, memory_estimate, model_shape, train_run

# A user's file: an MLP, a CNN with residual blocks, a CNN without, and factories that go wrong.
USER_MODELS = textwrap.dedent('''
    import torch
    import torch.nn as nn


    def mlp(hidden: int = 32, depth: int = 2):
        layers = [nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(hidden, 10))


    class Residual(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                      nn.Conv2d(channels, channels, 3, padding=1))

        def forward(self, x):
            return x + self.body(x)


    class ResCNN(nn.Module):
        def __init__(self, width: int = 8, blocks: int = 2) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.blocks = nn.Sequential(*(Residual(width) for _ in range(blocks)))
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            out = self.stem(x)
            out = self.blocks(out)
            return self.head(out.mean((2, 3)))


    def res_cnn(width: int = 8, blocks: int = 2):
        return ResCNN(width, blocks)


    # The user declares the block's decomposition: out = body(x) + x (gradlab.probes, README).
    from gradlab.probes import Residual as Decomposition, declare

    declare(Residual, Decomposition(branch="body"))


    def plain_cnn(width: int = 8):
        return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


    def raises():
        raise RuntimeError("out of ideas")


    def not_a_module():
        return 42


    def seven_classes():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 7))


    NOT_CALLABLE = 3
''')
SMALL = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--subset", "256", "--val-fraction", "0.02",
         "--device", "cpu", "--eval-batch-size", "2048", "--lr", "3e-3", "--quiet"]


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_models.py"
    path.write_text(USER_MODELS)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# --- parsing -------------------------------------------------------------------------------------


def test_each_kind_of_spec_parses(user_file):
    deep = ModelSpec.parse("deepcnn")
    assert (deep.kind, deep.name, deep.sha256) == ("deepcnn", "deepcnn", None)
    tv = ModelSpec.parse("torchvision:resnet18")
    assert (tv.kind, tv.target, tv.name, tv.tag) == ("torchvision", "resnet18", "torchvision:resnet18", "tv-resnet18")
    user = ModelSpec.parse(f"{user_file}:res_cnn")
    assert (user.kind, user.target, user.factory) == ("file", str(user_file), "res_cnn")
    assert user.sha256 == hashlib.sha256(user_file.read_bytes()).hexdigest()
    assert (user.name, user.tag) == ("user_models.py:res_cnn", "user_models-res_cnn")
    assert user.describe()["path"] == str(user_file.resolve()) and user.describe()["sha256"] == user.sha256
    module = ModelSpec.parse("gradlab.models:build_model")
    assert (module.kind, module.target, module.factory, module.tag) == ("module", "gradlab.models", "build_model",
                                                                       "models-build_model")
    assert specs.parse(" deepcnn ") == deep  # surrounding spaces are no part of it


def test_specs_build_the_models_they_name(user_file):
    torch.manual_seed(0)
    deep = ModelSpec.parse("deepcnn").build(block="res", depth=3, width=8, norm="batch")
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(deep.state_dict().values(), build_model("res", 3, 8).state_dict().values()))
    resnet = ModelSpec.parse("torchvision:resnet18").build()
    assert type(resnet).__name__ == "ResNet" and resnet.fc.out_features == 10
    mlp = ModelSpec.parse(f"{user_file}:mlp").build(hidden=16, depth=3)
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [16, 16, 16, 10]
    assert isinstance(ModelSpec.parse("gradlab.models:build_model").build(depth=1, width=4), nn.Module)
    assert not (user_file.parent / "__pycache__").exists()  # importing the user's file leaves their folder alone


def test_model_args_are_typed_from_text():
    assert specs.split_model_arg("hidden=64") == ("hidden", "64")
    assert specs.split_model_arg(" name = a=b ") == ("name", "a=b")
    parsed = specs.parse_model_args((("n", "64"), ("rate", "0.5"), ("big", "1e3"), ("on", "True"), ("off", "false"),
                                     ("kind", "relu"), ("empty", "")))
    assert parsed == {"n": 64, "rate": 0.5, "big": 1000.0, "on": True, "off": False, "kind": "relu", "empty": ""}
    assert type(parsed["n"]) is int and type(parsed["on"]) is bool
    for bad in ("hidden", "=3", "2x=1", "a b=1"):
        with pytest.raises(ValueError, match="expected key=value"):
            specs.split_model_arg(bad)
    with pytest.raises(ValueError, match="--model-arg n is given more than once"):
        specs.parse_model_args((("n", "1"), ("n", "2")))


def test_model_args_survive_config_json():
    config = TrainConfig(model="torchvision:resnet18", model_args=(("zero_init_residual", "true"),))
    assert TrainConfig(model_args={"a": "1"}).model_args == (("a", "1"),)
    stored = json.loads(json.dumps({"train": __import__("dataclasses").asdict(config)}))["train"]
    assert stored["model_args"] == [["zero_init_residual", "true"]]
    assert config.differences(stored) == []  # a list from JSON equals the tuple it was written from
    assert TrainConfig(**stored) == config
    assert config.model_kwargs() == {"zero_init_residual": True}


# --- training any model --------------------------------------------------------------------------


@pytest.mark.parametrize("factory, args, residual", [("mlp", ["--model-arg", "hidden=16"], False),
                                                     ("res_cnn", ["--model-arg", "width=4"], True),
                                                     ("plain_cnn", [], False)])
def test_a_factory_in_a_file_trains_through_the_cli(tmp_path, user_file, factory, args, residual):
    out = tmp_path / "run"
    result = invoke("train", "--model", f"{user_file}:{factory}", *args, *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"user_models.py:{factory}" in result.stdout and "test accuracy" in result.stdout
    run = runs.load_run(out)
    assert run.summary["status"] == "complete" and run.summary["epochs_done"] == 1
    kwargs = specs.parse_model_args([specs.split_model_arg(a) for a in args[1::2]])
    model = ModelSpec.parse(f"{user_file}:{factory}").build(**kwargs)
    assert run.summary["n_params"] == sum(p.numel() for p in model.parameters())
    assert run.config["model"] == {"spec": f"{user_file}:{factory}", "kind": "file", "name": f"user_models.py:{factory}",
                                   "path": str(user_file.resolve()),
                                   "sha256": hashlib.sha256(user_file.read_bytes()).hexdigest(),
                                   "norm": "batch" if factory == "res_cnn" else "none"}
    assert run.config["train"]["model"] == f"{user_file}:{factory}"
    records = run.records()
    steps = 256 // 64
    assert sorted(records["step"].unique()) == list(range(steps))
    stack = records.loc[records["role"] == "stack"]
    assert stack["stack_index"].nunique() >= 2
    # The branch/skip split exactly where the user declared a residual block, never elsewhere.
    split = records.loc[records["metric"].isin(["grad_in_branch_norm", "grad_in_skip_norm", "branch_chan_var"])]
    assert set(split["layer"]) == ({"blocks.0", "blocks.1"} if residual else set())


def test_a_factory_trains_on_real_cifar10(tmp_path, user_file, cifar_root):
    out = tmp_path / "run"
    result = invoke("train", "--model", f"{user_file}:res_cnn", "--model-arg", "width=8", "--dataset", "cifar10",
                    "--data-root", cifar_root, "--subset", "512", "--epochs", "1", "--batch-size", "128",
                    "--val-fraction", "0.02", "--device", "cpu", "--lr", "3e-3", "--quiet", "--out", out)
    assert result.exit_code == 0, result.output
    run = runs.load_run(out)
    assert run.config["dataset"] == "cifar10" and run.config["synthetic"] is False
    assert run.summary["status"] == "complete" and 0 <= run.summary["test_acc"] <= 1
    loss = run.steps["loss"]
    assert len(loss) == 4 and loss.iloc[0] == pytest.approx(2.30, abs=0.2)  # about ln 10 at initialisation


def test_probes_choose_what_is_recorded(tmp_path, user_file):
    out = tmp_path / "run"
    result = invoke("train", "--model", f"{user_file}:res_cnn", "--probes", "blocks.*", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    layers = set(runs.load_run(out).records()["layer"])
    assert layers == {"model", "blocks.0", "blocks.1"}


def test_resuming_with_a_changed_model_file_is_refused(tmp_path, user_file):
    out = tmp_path / "run"
    assert invoke("train", "--model", f"{user_file}:mlp", *SMALL, "--out", out).exit_code == 0
    longer = [("2" if previous == "--epochs" else a) for previous, a in zip([None, *SMALL], SMALL)]
    user_file.write_text(USER_MODELS.replace("hidden: int = 32", "hidden: int = 48"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = invoke("train", "--model", f"{user_file}:mlp", *longer, "--out", out)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.count("\n") == 0 and f"the model file {user_file} changed since the run began" in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    user_file.write_text(USER_MODELS)  # the same content again: the run resumes
    again = invoke("train", "--model", f"{user_file}:mlp", *longer, "--out", out)
    assert again.exit_code == 0 and "resuming after epoch 1" in again.stdout


def test_sgd_momentum_and_weight_decay_reach_the_optimizer(small_splits):
    config = TrainConfig(model="deepcnn", depth=1, width=4, epochs=1, batch_size=64, lr=0.05, optimizer="sgd",
                         momentum=0.9, weight_decay=5e-4, dataset="synthetic", device="cpu")
    trainer = Trainer(config, splits=small_splits)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 5e-4)
    adam = Trainer(replace(config, optimizer="adam", momentum=0.0, weight_decay=0.0, lr=1e-4), splits=small_splits)
    assert isinstance(adam.optimizer, torch.optim.Adam)
    assert adam.optimizer.param_groups[0]["lr"] == 1e-4 and adam.optimizer.param_groups[0]["weight_decay"] == 0
    decayed = Trainer(replace(config, optimizer="adam", momentum=0.0), splits=small_splits)
    assert decayed.optimizer.param_groups[0]["weight_decay"] == 5e-4


def test_the_cli_passes_sgd_options_and_stores_them(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--depth", "1", "--width", "4", "--optimizer", "sgd", "--momentum", "0.9",
                    "--weight-decay", "1e-4", *SMALL, "--out", out)
    assert result.exit_code == 0, result.output
    train = runs.load_run(out).train
    assert (train["optimizer"], train["momentum"], train["weight_decay"]) == ("sgd", 0.9, 1e-4)
    state = torch.load(out / "last.pt", weights_only=True)["optimizer"]
    assert state["param_groups"][0]["momentum"] == 0.9 and state["state"]  # momentum buffers were kept


def test_the_trainer_takes_a_model_optimizer_and_loss_of_its_own(small_splits):
    calls = []

    def loss(out, y):
        calls.append(out.shape)
        return nn.functional.cross_entropy(out, y, label_smoothing=0.1)

    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    config = TrainConfig(epochs=1, batch_size=100, dataset="synthetic", device="cpu")
    trainer = Trainer(config, splits=small_splits, model=model,
                      optimizer=lambda params: torch.optim.SGD(params, lr=0.01), loss=loss)
    assert trainer.model is model and isinstance(trainer.optimizer, torch.optim.SGD)
    trainer.train_epoch()
    assert calls == [torch.Size([100, 10])] * 4


def test_the_default_train_keeps_its_config_and_stores_the_model(tmp_path, small_config, small_splits):
    train_run(replace(small_config, epochs=1), tmp_path / "run", splits=small_splits)
    run = runs.load_run(tmp_path / "run")
    assert run.config["model"] == {"spec": "deepcnn", "kind": "deepcnn", "name": "deepcnn", "norm": "batch"}
    assert {k: run.train[k] for k in ("model", "model_args", "optimizer", "momentum", "weight_decay")} == \
        {"model": "deepcnn", "model_args": [], "optimizer": "adam", "momentum": 0.0, "weight_decay": 0.0}
    # An older run directory, without these keys, resumes as the default it stands for.
    stored = {k: v for k, v in run.train.items() if k not in ("model", "model_args", "optimizer", "momentum",
                                                               "weight_decay")}
    assert replace(small_config, epochs=1).differences(stored) == []


# --- sweeps and probes over models ---------------------------------------------------------------


def test_models_are_an_axis_of_the_sweep_grid(user_file):
    base = TrainConfig(width=4, epochs=1, batch_size=64, subset=256, val_fraction=0.02, dataset="synthetic",
                       device="cpu", model_args=(("width", "4"),))
    grid = SweepGrid(blocks=("conv", "res"), depths=(2, 4), seeds=(0, 1), norms=("batch",),
                     models=("deepcnn", "torchvision:resnet18", f"{user_file}:res_cnn"))
    cells = expand(grid, base)
    names = [c.name for c in cells]
    assert names == ["conv-d2-s0", "conv-d2-s1", "conv-d4-s0", "conv-d4-s1", "res-d2-s0", "res-d2-s1", "res-d4-s0",
                     "res-d4-s1", "tv-resnet18-s0", "tv-resnet18-s1", "user_models-res_cnn-s0",
                     "user_models-res_cnn-s1"]
    assert cells[0].config.model == "deepcnn" and cells[0].config.model_args == ()  # deepcnn takes no model options
    assert cells[9].config.model == "torchvision:resnet18" and cells[9].config.seed == 1
    assert cells[10].config.model_args == (("width", "4"),) and cells[10].config.block == base.block
    assert [cell_name(c.config) for c in cells] == names
    # The DeepCNN-only grid is named exactly as before any model existed.
    plain = expand(SweepGrid(blocks=("conv",), depths=(2,), norms=("batch", "none")), replace(base, model_args=()))
    assert [c.name for c in plain] == ["conv-d2-s0", "conv-d2-s0-none"]
    with pytest.raises(ValueError, match="--model-arg width: model options are for torchvision and factory models"):
        expand(SweepGrid(blocks=("conv",), depths=(2,)), base)


def test_a_sweep_over_models_trains_each(tmp_path, user_file):
    out = tmp_path / "sweep"
    result = invoke("sweep", "--models", f"deepcnn,{user_file}:mlp", "--blocks", "res", "--depths", "1",
                    "--model-arg", "hidden=8", "--width", "4", *[a for a in SMALL if a != "--quiet"], "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["res-d1-s0", "user_models-mlp-s0"]
    assert runs.load_run(out / "runs" / "user_models-mlp-s0").train["model_args"] == [["hidden", "8"]]
    assert runs.load_run(out / "runs" / "res-d1-s0").train["model_args"] == []
    stored = runs.read_json(out / "sweep.json")
    assert stored["grid"]["models"] == ["deepcnn", f"{user_file}:mlp"]


def test_probe_measures_models_side_by_side(tmp_path, user_file):
    result = invoke("probe", "--model", f"{user_file}:res_cnn,deepcnn", "--blocks", "res", "--depths", "2",
                    "--width", "4", "--batch-size", "16", "--batches", "1", "--dataset", "synthetic", "--device", "cpu",
                    "--format", "csv")
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.strip().splitlines()
    assert header.startswith("run,") and sorted(r.split(",")[0] for r in rows) == ["res-d2", "user_models-res_cnn"]


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_list_probes_prints_the_choice_and_exits(fmt):
    result = invoke("probe", "--model", "torchvision:resnet18", "--list-probes", "--format", fmt)
    assert result.exit_code == 0, result.output
    text = result.stdout
    blocks = [f"layer{stage}.{i}" for stage in range(1, 5) for i in range(2)]
    if fmt == "csv":
        lines = text.strip().splitlines()
        assert lines[0] == "network,name,role,stack_index,module_type,residual"
        stack = [line.split(",") for line in lines[1:] if ",stack," in line]
        assert [(s[1], int(s[3]), s[4]) for s in stack] == [(b, i, "BasicBlock") for i, b in enumerate(blocks)]
        assert lines[1].startswith("tv-resnet18,conv1,stem,-1,Conv2d") and lines[-1].startswith("tv-resnet18,fc,head,-1")
        return
    assert text.startswith("tv-resnet18 (torchvision:resnet18, ResNet): 10 probe points")
    rows = [line.split() for line in text.splitlines() if line.startswith("layer")]
    assert [(r[0], r[1], int(r[2]), r[3]) for r in rows] == [(b, "stack", i, "BasicBlock") for i, b in enumerate(blocks)]
    assert "skip downsample" in text and "Traceback" not in result.output


def test_list_probes_follows_the_probes_option(user_file):
    result = invoke("probe", "--model", f"{user_file}:res_cnn", "--probes", "stem,blocks.1", "--list-probes")
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip() and not line.startswith("-")]
    assert names == ["stem", "blocks.1"]


# --- memory --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", ["conv", "res", "resdown", "skip"])
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_the_traced_memory_estimate_equals_the_closed_form_for_deepcnn(block, norm):
    config = TrainConfig(block=block, depth=5, width=16, norm=norm)
    closed = resources.deepcnn_shape(block, 5, 16, norm)
    traced = specs.inspect(config.spec(), config.model_kwargs())
    assert (traced.n_params, traced.saved_per_image, traced.largest_per_image, traced.n_probes) == \
        (closed.n_params, closed.saved_per_image, closed.largest_per_image, closed.n_probes)
    cpu = torch.device("cpu")
    exact = resources.estimate_model_memory(closed, 256, 60_000, 1024)
    estimate = resources.estimate_model_memory(traced, 256, 60_000, 1024)
    assert estimate.total == pytest.approx(exact.total, rel=0.02)
    assert memory_estimate(config, cpu) == resources.estimate_memory(block, 5, 16, norm, 256, 60_000, 1024)


def test_the_memory_estimate_of_a_torchvision_model_is_traced_without_memory():
    config = TrainConfig(model="torchvision:resnet18")
    shape = model_shape(config)
    n_params = sum(p.numel() for p in ModelSpec.parse("torchvision:resnet18").build().parameters())
    assert shape.n_params == n_params and shape.n_probes == 10
    assert shape.saved_per_image > 0 and shape.largest_per_image == 4 * 64 * 16 * 16  # conv1's output, stride 2
    estimate = memory_estimate(config, torch.device("cpu"))
    assert estimate.activations == 256 * (shape.saved_per_image + 2 * shape.largest_per_image)
    assert estimate.parameters >= n_params * 4 * 5
    sgd = memory_estimate(replace(config, optimizer="sgd", lr=0.05, momentum=0.9), torch.device("cpu"))
    assert estimate.parameters - sgd.parameters == n_params * 4  # one optimizer state per parameter less


@pytest.mark.parametrize("command, options", [
    ("train", [("--model", "deepcnn"), ("--optimizer", "adam"), ("--momentum", "0.0"), ("--weight-decay", "0.0")]),
    ("sweep", [("--models", "deepcnn"), ("--optimizer", "adam"), ("--momentum", "0.0"), ("--weight-decay", "0.0")]),
    ("probe", [("--model", "deepcnn")]),
])
def test_help_explains_the_model_options_with_their_defaults(command, options):
    text = " ".join(invoke(command, "--help").stdout.split())  # one line: wrapping varies with the terminal
    for option, default in options:
        assert f"[default: {default}" in text.split(option, 1)[1], option
    assert "--model-arg KEY=VALUE" in text and "Default: none" in text.split("--model-arg", 1)[1]
    assert "--probes PATTERNS" in text
    if command != "probe":
        assert "deepcnn only; other models ignore it" in text.split("--block", 1)[1]
    else:
        assert "--list-probes" in text
