"""gradlab.integrations.lightning: a real lightning.Trainer on real CIFAR-10 images, against a plain gradlab run.

Both sides train the same network (built after the same seed, from the same constructor) on the
same batches in the same order (gradlab's DeviceLoader, seeded per epoch) with the same Adam and
cross-entropy, for two epochs of 8 optimizer steps on 512 images. Nothing else draws from torch's
global generator in between (Lightning's sanity check and validation run in eval mode: no
dropout), so the two runs perform the same floating-point operations and every recorded step
agrees, not only step 0 (on the development machine bit for bit, every value of both models).
The test allows RTOL, room for a platform whose kernels sum in another order from call to call.
One thread throughout: small nets are fastest so, and immune to a busy second core.
"""
from __future__ import annotations

import importlib
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from gradlab import analysis, runs, specs  # noqa: E402
from gradlab.data import DeviceLoader, Splits, make_splits  # noqa: E402
from gradlab.integrations.lightning import HEADLINE_METRIC, GradlabCallback, first_to_last_by_step  # noqa: E402
from gradlab.recorder import RecordConfig  # noqa: E402
from gradlab.train import TrainConfig, train_run  # noqa: E402

RTOL = 1e-5  # float32 sums of the same operations; see the module docstring
N_TRAIN, N_EVAL, BATCH, EPOCHS = 512, 256, 64, 2
STEPS = EPOCHS * N_TRAIN // BATCH

SMALL_CNN = '''
import torch.nn as nn

def small_cnn(width=8):
    """A network from outside gradlab: three convolutions in an nn.Sequential and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(width, 10))
'''


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits(cifar_root) -> Splits:
    """512 real CIFAR-10 training images, 256 validation and 256 test images."""
    full = make_splits("cifar10", cifar_root, seed=0, subset=N_TRAIN, device="cpu")
    return replace(full, val=tuple(t[:N_EVAL] for t in full.val), test=tuple(t[:N_EVAL] for t in full.test))


class LitClassifier(pl.LightningModule):
    """A LightningModule as users write them: the network in ``self.net``, metrics by ``self.log``."""

    def __init__(self, net: torch.nn.Module, splits: Splits, lr: float = 3e-3, fail_at: int | None = None) -> None:
        super().__init__()
        self.net, self.lr, self.fail_at = net, lr, fail_at
        self.train_loader = DeviceLoader(*splits.train, batch_size=BATCH, shuffle=True, seed=0)
        self.val_loader = DeviceLoader(*splits.val, batch_size=N_EVAL)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        out = self.net(x)
        loss = F.cross_entropy(out, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.log("train_acc", (out.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)  # TrainConfig's adam: no weight decay

    def on_train_epoch_start(self):
        self.train_loader.set_epoch(self.current_epoch)  # gradlab's order for this epoch

    def train_dataloader(self):
        return self.train_loader

    def val_dataloader(self):
        return self.val_loader


class Watch(pl.Callback):
    """What the recorder holds while Lightning validates: a step opened there would be recorded."""

    def __init__(self, callback: GradlabCallback) -> None:
        self.callback, self.open_in_validation, self.validations = callback, [], 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.validations += 1
        self.open_in_validation.append(self.callback.recorder._state is not None)


def make_lightning(model: str, splits: Splits, out: Path, accumulate: int = 1, fail_at: int | None = None,
                   logger=False, **callback_args):
    """A real lightning.Trainer on CPU, not yet fitted: (trainer, gradlab callback, watcher, LightningModule)."""
    spec, kwargs = _spec(model, out.parent)
    torch.manual_seed(0)  # what gradlab's Trainer does before it builds the model
    module = LitClassifier(spec.build(**kwargs), splits, fail_at=fail_at)
    callback = GradlabCallback(out=out, **callback_args)
    watch = Watch(callback)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, accumulate_grad_batches=accumulate,
                         callbacks=[callback, watch], logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
                         log_every_n_steps=1)
    return trainer, callback, watch, module


def fit_lightning(*args, **kwargs):
    """``make_lightning``, fitted."""
    trainer, callback, watch, module = made = make_lightning(*args, **kwargs)
    trainer.fit(module)
    return made


def _spec(model: str, folder: Path) -> tuple[specs.ModelSpec, dict]:
    if model == "deepcnn":
        return specs.parse("deepcnn"), {"block": "conv", "depth": 4, "width": 8, "norm": "batch"}
    path = folder / "small_cnn.py"
    path.write_text(SMALL_CNN)
    return specs.parse(f"{path}:small_cnn"), {}


def train_plain(model: str, splits: Splits, out: Path) -> runs.Run:
    """gradlab's own trainer on the same network, batches and optimizer."""
    spec, _ = _spec(model, out.parent)
    shape = {"block": "conv", "depth": 4, "width": 8} if model == "deepcnn" else {}
    config = TrainConfig(model=spec.text, **shape, epochs=EPOCHS, batch_size=BATCH, lr=3e-3, seed=0, device="cpu",
                         channels_last=False, subset=N_TRAIN)
    train_run(config, out, record=RecordConfig(every=1), splits=splits)
    return runs.load_run(out)


def hooks_left(module: torch.nn.Module) -> list[str]:
    return [name for name, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks]


@pytest.fixture(scope="module", params=["deepcnn", "sequential"])
def pair(request, splits, tmp_path_factory):
    """(Lightning run, plain gradlab run, trainer, callback, watcher, module) of one model."""
    folder = tmp_path_factory.mktemp(request.param)
    plain = train_plain(request.param, splits, folder / "plain")
    logger = pl.loggers.CSVLogger(folder / "logs", name="lit")
    trainer, callback, watch, module = fit_lightning(request.param, splits, folder / "lit", logger=logger)
    return runs.load_run(folder / "lit"), plain, trainer, callback, watch, module


def test_without_lightning_the_import_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "lightning" or n.startswith(("lightning.", "gradlab.integrations.lightning"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # what Python does for a package that is not installed
    with pytest.raises(ImportError, match=r"pip install 'gradlab\[lightning\]'"):
        importlib.import_module("gradlab.integrations.lightning")


def test_the_records_agree_with_a_plain_gradlab_run(pair):
    lit, plain, trainer, *_ = pair
    a, b = lit.records(), plain.records()
    assert trainer.global_step == STEPS
    assert sorted(a.step.unique()) == list(range(STEPS)) and sorted(a.epoch.unique()) == [0, 1]
    keys = ["step", "epoch", "layer", "position", "role", "stack_index", "module_type", "metric"]
    assert len(a) == len(b) and not a.duplicated(keys).any()
    both = a.merge(b, on=keys, suffixes=("_lit", "_plain"), validate="one_to_one")
    assert len(both) == len(a)  # the same probe points, metrics and steps on both sides
    step0 = both.loc[both.step == 0]
    assert {"grad_out_norm", "act_std", "param_grad_norm", "update_ratio", "loss"} <= set(step0.metric)
    np.testing.assert_allclose(step0.value_lit, step0.value_plain, rtol=RTOL, err_msg="step 0")
    np.testing.assert_allclose(both.value_lit, both.value_plain, rtol=RTOL, err_msg="every step")
    steps = lit.steps.merge(plain.steps, on=["step", "epoch"], suffixes=("_lit", "_plain"))
    assert len(steps) == STEPS
    np.testing.assert_allclose(steps.loss_lit, steps.loss_plain, rtol=RTOL)


def test_the_run_directory_reads_like_any_other(pair):
    lit, plain, trainer, _, _, module = pair
    assert lit.summary["status"] == "complete" and lit.summary["steps_done"] == STEPS
    assert lit.summary["epochs_done"] == EPOCHS and lit.summary["n_params"] == plain.summary["n_params"]
    assert lit.summary["beta"] == plain.summary["beta"] == lit.config["beta"] > 0  # Hanin's β of the same network
    assert lit.config["hardware"]["node"] == plain.config["hardware"]["node"]  # the trainer's hardware record
    assert lit.config["train"]["model"] == "lightning:LitClassifier"
    assert lit.config["model"]["name"] == "LitClassifier" and lit.config["model"]["network"] == "net"
    assert lit.config["train"]["batch_size"] == BATCH and lit.config["train_images"] == N_TRAIN
    assert lit.identity()["depth"] == plain.identity()["depth"] >= 3
    history = lit.history
    assert history[["epoch", "step"]].values.tolist() == [[0, STEPS // 2], [1, STEPS]]
    logged = trainer.callback_metrics  # the last epoch's values as Lightning reduced them
    for column in ("train_loss", "train_acc", "val_acc"):
        assert history[column].iloc[-1] == pytest.approx(float(logged[column]))
    assert history["val_loss"].isna().all()  # not logged by this module
    # the epoch's mean loss: the plain trainer's mean of its step losses, Lightning's weighted mean
    np.testing.assert_allclose(history.train_loss, plain.history.train_loss, rtol=RTOL)
    assert lit.summary["best_val_acc"] == pytest.approx(history.val_acc.max())
    assert hooks_left(module) == []


def test_validation_and_sanity_checks_record_nothing(pair):
    lit, _, trainer, callback, watch, _ = pair
    assert watch.validations == 1 + EPOCHS  # the sanity check's batch, then one per epoch
    assert watch.open_in_validation == [False] * watch.validations  # no step was opened by a validation forward
    assert callback.recorder._state is None


def test_the_headline_ratio_goes_to_the_trainer_s_logger(pair):
    lit, _, trainer, *_ = pair
    logged = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    logged = logged.dropna(subset=[HEADLINE_METRIC]).set_index("step")[HEADLINE_METRIC]
    grads = lit.records(metrics=["grad_out_norm"])
    stack = grads.loc[grads.role == "stack"]
    first = stack.loc[stack.stack_index == 0].set_index("step").value
    last = stack.loc[stack.stack_index == stack.stack_index.max()].set_index("step").value
    assert list(logged.index) == list(range(STEPS))
    np.testing.assert_allclose(logged.to_numpy(), (first / last).to_numpy(), rtol=1e-6)
    records = lit.records().assign(**lit.identity())
    flow = analysis.flow_summary(records, phases=("init",))
    assert logged.loc[0] == pytest.approx(flow.first_to_last.iloc[0], rel=1e-6)


def test_first_to_last_by_step_follows_analysis_rules():
    rows = []
    for step, (first, last) in enumerate([(8.0, 2.0), (1.0, 0.0), (np.nan, 1.0)]):
        for index, value in ((0, first), (1, 1.0), (2, last)):
            rows.append({"step": step, "epoch": 0, "layer": f"b{index}", "position": index, "role": "stack",
                         "stack_index": index, "module_type": "Block", "metric": "grad_out_norm", "value": value})
    columns = {c: pd.DataFrame(rows)[c].to_numpy() for c in runs.RECORD_COLUMNS}
    assert first_to_last_by_step(columns) == {0: 4.0}  # inf (last block 0) and a non-finite step: not logged
    assert first_to_last_by_step({c: v[:0] for c, v in columns.items()}) == {}


def test_gradient_accumulation_is_one_step_per_optimizer_step(splits, tmp_path):
    trainer, callback, watch, module = fit_lightning("deepcnn", splits, tmp_path / "acc", accumulate=2)
    run = runs.load_run(tmp_path / "acc")
    steps = STEPS // 2
    assert trainer.global_step == steps
    records = run.records()
    assert sorted(records.step.unique()) == list(range(steps))
    assert (records.groupby("step").size() == records.loc[records.step == 0].shape[0]).all()
    assert run.steps.step.tolist() == list(range(steps)) and run.history.step.tolist() == [steps // 2, steps]
    # a step's loss: the sum of its micro-batches' losses, each divided by 2 (Lightning's outputs)
    loss = records.loc[(records.layer == "model") & (records.metric == "loss")].set_index("step").value
    np.testing.assert_allclose(loss.to_numpy(), run.steps.set_index("step").loss.to_numpy(), rtol=1e-6)
    assert np.isfinite(loss).all() and 1.5 < loss.iloc[0] < 3.5  # about ln 10 at initialisation
    assert hooks_left(module) == []


def test_hooks_never_leak_and_a_failed_fit_is_recorded_as_failed(splits, tmp_path):
    trainer, callback, watch, module = make_lightning("deepcnn", splits, tmp_path / "fail", fail_at=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module)
    assert hooks_left(module) == []
    run = runs.load_run(tmp_path / "fail")
    assert run.summary["status"] == "failed" and "boom" in run.summary["error"]
    assert sorted(run.records().step.unique()) == [0, 1, 2]  # flushed on the way out


def _accuracy(net: torch.nn.Module, loader: DeviceLoader) -> float:
    """Test accuracy by hand: eval mode, gradlab's normalised batches, no Lightning."""
    net.eval()
    with torch.no_grad():
        hits = [(net(x).argmax(1) == y).float() for x, y in loader]
    return torch.cat(hits).mean().item()


def test_a_test_after_the_fit_writes_the_test_accuracy_of_the_weights_tested(splits, tmp_path):
    """``trainer.test`` after ``fit``: the fitted weights' accuracy as test_acc and test_acc_last;
    a new callback in a new Trainer adds the test of the best checkpoint as test_acc_best; gradlab
    report then compares it; a directory without a finished run is left alone."""
    trainer, callback, _, module = fit_lightning("deepcnn", splits, tmp_path / "run")
    tests = DeviceLoader(*splits.test, batch_size=N_EVAL)
    trainer.test(module, tests, verbose=False)
    last = _accuracy(module.net, tests)
    summary = runs.load_run(tmp_path / "run").summary
    assert summary["test_acc"] == pytest.approx(last, abs=1e-6) and summary["test_acc_last"] == summary["test_acc"]
    assert summary["test_checkpoint"] is None and summary["test_acc_best"] is None and summary["status"] == "complete"

    folder = tmp_path / "checkpoints"  # one more epoch elsewhere, saved as the best checkpoint
    saved = pl.callbacks.ModelCheckpoint(dirpath=folder, monitor="val_acc", mode="min")
    other = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, callbacks=[saved])
    other.fit(module, module.train_loader, module.val_loader)
    tester = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[saved, GradlabCallback(out=tmp_path / "run")])
    tester.test(module, tests, ckpt_path=saved.best_model_path, verbose=False)
    best = _accuracy(module.net, tests)  # Lightning loaded the checkpoint's weights into the module
    summary = runs.load_run(tmp_path / "run").summary
    assert summary["test_acc"] == pytest.approx(best, abs=1e-6) and summary["test_acc_best"] == summary["test_acc"]
    assert summary["test_acc_last"] == pytest.approx(last, abs=1e-6)  # the earlier test is kept
    assert summary["test_checkpoint"] == saved.best_model_path

    table = runs.load_sweep(tmp_path / "run").table()
    assert table["test_acc"].item() == pytest.approx(best, abs=1e-6)
    GradlabCallback(out=tmp_path / "none").on_test_end(tester, module)  # no run there: nothing written
    assert not (tmp_path / "none").exists()


def test_an_existing_run_directory_and_a_wrong_network_are_refused(splits, tmp_path):
    _, _, _, module = fit_lightning("deepcnn", splits, tmp_path / "once")
    with pytest.raises(runs.RunError, match="holds a gradlab run already"):
        fit_lightning("deepcnn", splits, tmp_path / "once")
    with pytest.raises(ValueError, match="has no such sub-module"):
        fit_lightning("deepcnn", splits, tmp_path / "other", network="backbone")
    assert not (tmp_path / "other").exists()


@pytest.mark.browser
@pytest.mark.parametrize("pair", ["deepcnn"], indirect=True)  # one model is enough for the page
def test_gradlab_report_turns_a_lightning_run_into_a_page_that_works_in_a_real_browser(pair, tmp_path):
    """``gradlab report`` in the terminal and as HTML, checked as tests/test_report_html.py checks its pages."""
    from click.testing import CliRunner
    from test_report_html import SECTIONS, browser_tab

    from gradlab.cli import main

    lit = pair[0]
    text = CliRunner().invoke(main, ["report", str(lit.path)], catch_exceptions=False)
    assert text.exit_code == 0 and "lightning:LitClassifier" in text.output
    page = tmp_path / "lit.html"
    result = CliRunner().invoke(main, ["report", str(lit.path), "--html", str(page)], catch_exceptions=False)
    assert result.exit_code == 0 and page.is_file()
    url = page.resolve().as_uri()
    errors, dialogs, requests = [], [], []
    with browser_tab(url, errors, dialogs, requests) as tab:
        shown = tab.evaluate("""() => ({
            widths: Array.from(document.images, i => i.complete ? i.naturalWidth : 0),
            sections: Array.from(document.querySelectorAll('section[id]'), s => s.id),
            text: document.body.innerText})""")
    assert errors == [] and dialogs == []
    assert [r for r in requests if not r.startswith("data:")] == [url]  # self-contained
    assert shown["sections"] == list(SECTIONS)
    assert len(shown["widths"]) >= 4 and all(w > 0 for w in shown["widths"]), shown["widths"]
    assert "lightning:LitClassifier" in shown["text"] and not re.search(r"\bnan\b", shown["text"], re.IGNORECASE)
