"""The speed options: channels-last activations and bf16 autocast change speed, not what is measured."""
import math

import pytest
import torch

from gradlab import runs, train
from gradlab.train import Trainer, TrainConfig, train_run


def first_gradients(config, splits):
    """Logits, loss and parameter gradients of the first training batch."""
    trainer = Trainer(config, splits=splits)
    trainer.model.train()
    trainer.train_loader.set_epoch(0)
    x, y = next(iter(trainer.train_loader))
    torch.manual_seed(1)  # the same dropout mask
    with trainer.autocast():
        logits = trainer.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    return logits.detach().float(), x, {n: p.grad for n, p in trainer.model.named_parameters()}


def test_channels_last_changes_the_layout_not_the_arithmetic(small_config, small_splits):
    logits, x, grads = first_gradients(small_config, small_splits)
    plain = TrainConfig(**{**small_config.__dict__, "channels_last": False})
    logits_plain, x_plain, grads_plain = first_gradients(plain, small_splits)
    assert x.is_contiguous(memory_format=torch.channels_last) and x_plain.is_contiguous()
    assert not x_plain.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(logits, logits_plain, rtol=1e-4, atol=1e-5)
    for name, g in grads_plain.items():  # equal up to the rounding of another convolution algorithm
        assert (grads[name] - g).norm() <= 1e-4 * g.norm() + 1e-6, name  # 1e-6: biases before BN get ~0


@pytest.mark.skipif(not train.cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_run_records_float32_statistics_close_to_fp32(small_config, small_splits, tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(**{**small_config.__dict__, "epochs": 1, "precision": precision})
        train_run(config, tmp_path / precision, splits=small_splits)
        results[precision] = runs.load_run(tmp_path / precision)
    fp32, bf16 = (results[p].records() for p in ("fp32", "bf16"))
    assert results["bf16"].config["train"]["precision"] == "bf16"
    assert fp32["value"].dtype == bf16["value"].dtype == "float64"
    merged = fp32.merge(bf16, on=["step", "layer", "metric"], suffixes=("_fp32", "_bf16"))
    first = merged[(merged.step == 0) & (merged.metric == "grad_out_norm")]
    assert len(first) == len(fp32[(fp32.step == 0) & (fp32.metric == "grad_out_norm")]) > 0
    relative = (first.value_bf16 - first.value_fp32).abs() / first.value_fp32
    assert relative.max() < 0.05  # bf16 keeps ~3 significant digits; at step 0 the weights are equal
    assert all(math.isfinite(v) for v in merged.value_bf16)


def test_bf16_is_refused_on_a_cpu_without_it(monkeypatch, small_config, small_splits):
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    with pytest.raises(ValueError, match="use --precision fp32"):
        Trainer(TrainConfig(**{**small_config.__dict__, "precision": "bf16"}), splits=small_splits)


def test_resuming_with_another_precision_is_refused_and_old_configs_mean_the_defaults(small_config):
    stored = {k: v for k, v in small_config.__dict__.items() if k not in ("precision", "channels_last")}
    assert small_config.differences(stored) == []  # a config written before the options existed
    bf16 = TrainConfig(**{**small_config.__dict__, "precision": "bf16", "channels_last": False})
    assert bf16.differences(stored) == ["precision: stored 'fp32', given 'bf16'"]


def test_keep_freed_memory_applies_on_glibc_and_can_be_switched_off(monkeypatch):
    import platform

    from gradlab import runtime

    apply = runtime.keep_freed_memory.__wrapped__  # the cached function, uncached
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert apply() is glibc
    monkeypatch.setenv("GRADLAB_KEEP_FREED_MEMORY", "0")
    assert apply() is False
