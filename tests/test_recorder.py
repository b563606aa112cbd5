"""The recorder against independent computations on the same batch, its hooks, schedules and flushes."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from gradlab import stats
from gradlab.models import build_model
from gradlab.probes import select
from gradlab.recorder import (
    COLUMNS,
    METRICS,
    RecordConfig,
    Recorder,
    RecorderCallback,
    every,
    logspaced,
)

RTOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and immune to waiting on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(block: str, norm: str = "batch", depth: int = 2, width: int = 4, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(block, depth, width, norm).to(dtype)


def make_batch(n: int = 4, dtype=torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def values(df, step: int = 0) -> dict[tuple[str, str], float]:
    """{(layer, metric): value} of one step."""
    part = df[df.step == step]
    return {(layer, metric): value for layer, metric, value in zip(part.layer, part.metric, part.value)}


def dims(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(d for d in range(t.dim()) if d != 1)


def chan_var(t: torch.Tensor) -> float:
    return t.var(dims(t), correction=0).mean().item()


def assert_close(actual: float, expected: float, what: str, rtol: float = RTOL) -> None:
    same = math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-12) or (math.isnan(actual) and math.isnan(expected))
    assert same, f"{what}: recorded {actual!r}, expected {expected!r}"


def ratio(a: float, b: float) -> float:
    """a / b as IEEE arithmetic says: 0/0 is NaN, x/0 is inf."""
    with np.errstate(all="ignore"):
        return float(np.float64(a) / np.float64(b))


def reference(model, x, y, seed: int) -> dict:
    """Every tensor the metrics describe, from a fresh forward pass with temporary hooks of
    the test's own, and the gradients by torch.autograd.grad with respect to them."""
    probes = select(model)
    seen: dict = {}
    handles = []

    def keep(key):
        def hook(module, args, output):
            seen[key] = (args[0], output)

        return hook

    for p in probes:
        handles.append(p.module.register_forward_hook(keep(p.name)))
        if p.residual is not None:
            handles.append(p.module.conv2.register_forward_hook(keep((p.name, "conv2"))))
        if p.module_type == "ResDownBlock":
            handles.append(p.module.conv3.register_forward_hook(keep((p.name, "conv3"))))
    torch.manual_seed(seed)  # the same dropout mask as the recorded pass
    loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    wrt = []
    for p in probes:
        x_in, out = seen[p.name]
        wrt += [out] + ([x_in] if x_in.requires_grad else [])
    grads = dict(zip(map(id, wrt), torch.autograd.grad(loss, wrt, retain_graph=True)))
    result = {"loss": loss.item(), "probes": {}}
    for p in probes:
        x_in, out = seen[p.name]
        r = {"in": x_in, "out": out, "grad_out": grads[id(out)], "grad_in": grads.get(id(x_in))}
        if p.residual is not None:
            branch = seen[p.name, "conv2"][1]
            skip = x_in if p.module_type == "ResBlock" else seen[p.name, "conv3"][1]
            r["branch"], r["skip"] = branch, skip
            # each path's share of the input gradient, through that path alone
            r["grad_in_branch"] = torch.autograd.grad(branch, x_in, r["grad_out"], retain_graph=True)[0]
            if p.module_type == "ResBlock":
                r["grad_in_skip"] = r["grad_out"]  # identity
            else:
                relu_out = seen[p.name, "conv3"][0]
                r["relu_out"] = relu_out
                r["grad_skip_at_relu"] = torch.autograd.grad(skip, relu_out, r["grad_out"], retain_graph=True)[0]
                r["grad_in_skip"] = torch.autograd.grad(skip, x_in, r["grad_out"], retain_graph=True)[0]
        result["probes"][p.name] = r
    return result


def recorded_step(model, x, y, seed: int, optimizer=None, **kwargs):
    with Recorder(model, optimizer=optimizer, **kwargs) as rec:
        torch.manual_seed(seed)  # the dropout mask the reference pass draws too
        run_steps(rec, model, x, y, 1, optimizer)
    return rec.frame()


def all_hooks_removed(model, optimizer=None) -> bool:
    for m in model.modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
    if optimizer is not None and (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks):
        return False
    return True


# ---------------------------------------------------------------------------------------
# Every metric against an independent computation


def sq(t: torch.Tensor) -> float:
    """Sum of squares in float64."""
    return t.double().square().sum().item()


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("block", ["conv", "res", "resdown", "skip"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_every_metric_matches_an_independent_computation(block, norm, dtype, backend):
    """float64 models go through eager ops whatever the backend; float32 ones through the
    compiled kernels or eager ops, against float64 computations on the same tensors."""
    model = make_model(block, norm, width=8, dtype=dtype)
    if dtype == torch.float32:
        model = model.to(memory_format=torch.channels_last)  # as the trainer runs it
    twin = copy.deepcopy(model)
    x, y = make_batch(dtype=dtype)
    df = recorded_step(model, x, y, seed=5)
    got = values(df)
    ref = reference(twin, x, y, seed=5)

    expected_metrics = {("model", "loss"), ("model", "param_grad_norm")}
    for p in select(model):  # its parameters hold the recorded step's gradients
        r = ref["probes"][p.name]
        out = r["out"].double()
        expect = {
            "act_mean": out.mean().item(),
            "act_std": out.std(correction=0).item(),
            "act_nonpos_frac": (out <= 0).double().mean().item(),
            "act_chan_mean_sq": out.mean(dims(out)).square().mean().item(),
            "act_chan_var": chan_var(out),
            "grad_out_norm": math.sqrt(sq(r["grad_out"])),
            "nonfinite_grads": 0.0,
            "param_grad_norm": math.sqrt(sum(sq(q.grad) for q in p.module.parameters())),
            "param_norm": math.sqrt(sum(sq(q) for q in p.module.parameters())),
        }
        if r["grad_in"] is not None:
            expect["grad_in_norm"] = math.sqrt(sq(r["grad_in"]))
            expect["grad_gain"] = ratio(expect["grad_in_norm"], expect["grad_out_norm"])
        if p.residual is not None:
            expect["branch_chan_var"] = chan_var(r["branch"].double())
            expect["skip_chan_var"] = chan_var(r["skip"].double())
            expect["grad_in_branch_norm"] = math.sqrt(sq(r["grad_in_branch"]))
            expect["grad_in_skip_norm"] = math.sqrt(sq(r["grad_in_skip"]))
        for metric, value in expect.items():
            assert_close(got[p.name, metric], value, f"{block}/{norm} {p.name} {metric}")
        expected_metrics |= {(p.name, m) for m in expect}
    assert set(got) == expected_metrics  # no metric missing, none extra
    assert_close(got["model", "loss"], ref["loss"], "loss")
    global_norm = math.sqrt(sum(sq(q.grad) for q in model.parameters()))
    assert_close(got["model", "param_grad_norm"], global_norm, "global param_grad_norm")


@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("block", ["res", "resdown"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_branch_and_skip_parts_sum_to_the_input_gradient(block, norm, dtype, backend):
    model = make_model(block, norm, dtype=dtype)
    twin = copy.deepcopy(model)
    x, y = make_batch(dtype=dtype)
    got = values(recorded_step(model, x, y, seed=2))
    ref = reference(twin, x, y, seed=2)
    for p in select(twin):
        if p.module_type != {"res": "ResBlock", "resdown": "ResDownBlock"}[block]:
            continue
        r = ref["probes"][p.name]
        if dtype == torch.float64:
            # the independent parts, as vectors, add up to the input gradient
            torch.testing.assert_close(r["grad_in_branch"] + r["grad_in_skip"], r["grad_in"], rtol=1e-12, atol=1e-15)
            # and the recorder's definitions of the parts give those same vectors
            if block == "res":
                torch.testing.assert_close(r["grad_in"] - r["grad_out"], r["grad_in_branch"], rtol=1e-10, atol=1e-15)
            else:
                skip = stats.relu_part(r["grad_skip_at_relu"], r["relu_out"])
                torch.testing.assert_close(skip, r["grad_in_skip"], rtol=0, atol=0)
        assert_close(got[p.name, "grad_in_branch_norm"], math.sqrt(sq(r["grad_in_branch"])), f"{p.name} branch")
        assert_close(got[p.name, "grad_in_skip_norm"], math.sqrt(sq(r["grad_in_skip"])), f"{p.name} skip")


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_param_norms_update_ratio_and_loss_with_a_real_adam_step(frozen, dtype, backend):
    model = make_model("res", depth=3, dtype=dtype).to(memory_format=torch.channels_last)
    if frozen:  # parameters without gradients: in the parameter norms, not in the gradient norms
        model.layers[1].conv1.requires_grad_(False)
        model.conv1.bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = make_batch(dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    got = values(recorded_step(model, x, y, seed=0, optimizer=opt))
    names = {id(p): name for name, p in model.named_parameters()}

    def grad_norm(params) -> float:
        return math.sqrt(sum(sq(p.grad) for p in params if p.grad is not None))

    for probe in select(model):
        params = list(probe.module.parameters())
        theta = math.sqrt(sum(sq(before[names[id(p)]]) for p in params))
        delta = math.sqrt(sum(sq(p.detach().double() - before[names[id(p)]].double()) for p in params))
        assert_close(got[probe.name, "param_norm"], theta, f"{probe.name} param_norm")
        assert_close(got[probe.name, "update_ratio"], delta / theta, f"{probe.name} update_ratio")
        assert_close(got[probe.name, "param_grad_norm"], grad_norm(params), f"{probe.name} param_grad_norm")
    assert_close(got["model", "param_grad_norm"], grad_norm(model.parameters()), "global param_grad_norm")
    torch.manual_seed(0)
    twin = make_model("res", depth=3, dtype=dtype).to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    assert_close(got["model", "loss"], F.cross_entropy(twin(x), y).item(), "loss")


def test_float32_and_bf16_autocast_are_measured_in_float32(backend):
    model = make_model("res", dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = make_batch(dtype=torch.float32)
    got = values(recorded_step(model, x, y, seed=3))
    ref = reference(twin, x, y, seed=3)
    out = ref["probes"]["layers.1"]["out"].double()
    assert_close(got["layers.1", "act_chan_var"], chan_var(out), "float32 act_chan_var", rtol=1e-4)
    grad_out = ref["probes"]["layers.1"]["grad_out"].double()
    assert_close(got["layers.1", "grad_out_norm"], grad_out.norm().item(), "float32 grad_out_norm", rtol=1e-4)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        df = recorded_step(model, x, y, seed=3)
    assert np.isfinite(df.value).all()
    bf = values(df)
    assert set(bf) == set(got)
    for key in [("layers.1", "act_mean"), ("layers.1", "grad_out_norm"), ("layers.0", "grad_in_branch_norm")]:
        assert math.isclose(bf[key], got[key], rel_tol=0.1, abs_tol=1e-3), key


# ---------------------------------------------------------------------------------------
# Hooks, schedules, flushes


def hook_alive(handle) -> bool:
    """True while the hook behind a RemovableHandle (tensor or graph-node hook) is registered."""
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def test_every_hook_is_removed_on_exit_and_after_an_exception(monkeypatch):
    fired = []
    on_grad = Recorder._on_grad
    monkeypatch.setattr(Recorder, "_on_grad", lambda self, *args: fired.append(args) or on_grad(self, *args))
    model = make_model("resdown")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batch()
    with Recorder(model, optimizer=opt) as rec:
        kept = model(x)  # a forward without its backward leaves gradient hooks until exit
        assert not all_hooks_removed(model, opt)
        taps = list(rec._grad_handles)
        assert taps and all(map(hook_alive, taps))
    assert all_hooks_removed(model, opt)
    assert not any(map(hook_alive, taps))
    F.cross_entropy(kept, y).backward()  # the graph outlived the recorder: none of its hooks runs
    assert fired == []

    with pytest.raises(ZeroDivisionError):
        with Recorder(model) as rec:
            out = model(x)
            taps = list(rec._grad_handles)
            1 / 0
    assert all_hooks_removed(model)
    assert taps and not any(map(hook_alive, taps))

    with Recorder(model) as rec:  # after a complete backward no tensor or node keeps a hook either
        out = model(x)
        taps = list(rec._grad_handles)
        F.cross_entropy(out, y).backward()
        assert fired and not any(map(hook_alive, taps)) and not rec._grad_handles
    rec.close()  # idempotent
    assert all_hooks_removed(model)


def run_steps(rec, model, x, y, steps: int, opt=None, on_forward=None) -> list[torch.Tensor]:
    outs = []
    for _ in range(steps):
        out = model(x)
        if on_forward is not None:
            on_forward(out)
        outs.append(out)
        loss = F.cross_entropy(out, y)
        rec.record_loss(loss)
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()
    return outs


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_only_scheduled_steps_are_recorded(with_optimizer):
    model = make_model("conv", dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if with_optimizer else None
    x, y = make_batch(dtype=torch.float32)
    hooked, taps = [], []
    with Recorder(model, every=3, optimizer=opt) as rec:

        def on_forward(out):
            hooked.append(len(rec._grad_handles))
            taps.extend(rec._grad_handles)

        run_steps(rec, model, x, y, 7, opt, on_forward=on_forward)
        assert rec.step == 7
    if with_optimizer:  # an unscheduled step registers no hook at all
        assert [n > 0 for n in hooked] == [True, False, False, True, False, False, True]
    assert sorted(rec.frame().step.unique()) == [0, 3, 6]
    assert taps and not any(map(hook_alive, taps))  # no tensor or graph node keeps a hook


def test_setting_the_step_during_a_step_renumbers_or_drops_it():
    model = make_model("res", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    with Recorder(model, every=2) as rec:
        out = model(x)
        rec.step = 6  # e.g. resynchronised with a trainer
        F.cross_entropy(out, y).backward()
        assert rec.step == 7
        rec.step = 8
        out = model(x)
        rec.step = 9  # unscheduled: what step 8 had gathered is dropped
        F.cross_entropy(out, y).backward()
        assert rec.step == 10
    assert list(rec.frame().step.unique()) == [6]



# ---------------------------------------------------------------------------------------
# manual steps: the caller marks the step (optimizer.step(closure), gradient accumulation)


def closure_steps(rec, model, opt, batches, manual: bool) -> None:
    """Lightning's automatic optimisation in miniature: forward and backward run inside
    ``opt.step(closure)``; with ``manual`` the closure ends with ``rec.before_update()`` (where
    Lightning calls on_before_optimizer_step) and ``rec.after_update()`` follows the step."""
    for batch in batches:
        def closure():
            opt.zero_grad()
            loss = 0.0
            for x, y in batch:  # several (x, y): gradient accumulation over micro-batches
                part = F.cross_entropy(model(x), y) / len(batch)
                part.backward()
                loss = loss + part.detach()
            rec.record_loss(loss)
            if manual:
                rec.before_update()
            return loss

        opt.step(closure)
        if manual:
            rec.after_update()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_manual_steps_around_a_closure_record_what_the_optimizer_hooks_record_in_a_plain_loop(opt_name, backend):
    x, y = make_batch(n=8, dtype=torch.float32)
    make_opt = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if opt_name == "sgd" else \
        (lambda ps: torch.optim.Adam(ps, lr=1e-2))

    def run(manual: bool):
        model = make_model("res", depth=3, dtype=torch.float32)
        opt = make_opt(model.parameters())
        torch.manual_seed(7)  # dropout masks
        with Recorder(model, optimizer=None if manual else opt, manual_steps=manual) as rec:
            if manual:
                closure_steps(rec, model, opt, [[(x, y)]] * 3, manual=True)
            else:
                run_steps(rec, model, x, y, 3, opt)
        assert all_hooks_removed(model, opt)
        return rec.frame(), model

    (plain, plain_model), (manual, manual_model) = run(False), run(True)
    pd.testing.assert_frame_equal(manual, plain)  # the same records, bit for bit
    assert sorted(plain.step.unique()) == [0, 1, 2] and plain.metric.isin(["param_grad_norm", "update_ratio"]).any()
    for a, b in zip(plain_model.parameters(), manual_model.parameters()):
        assert torch.equal(a, b)


def test_the_optimizer_hooks_cannot_see_the_gradients_of_a_closure_step():
    """The trap manual_steps exists for: a step pre-hook fires before the closure's backward."""
    x, y = make_batch(n=8, dtype=torch.float32)
    model = make_model("conv", dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, optimizer=opt) as rec:
        closure_steps(rec, model, opt, [[(x, y)]], manual=False)
    got = values(rec.frame())
    grads = math.sqrt(sum(sq(p.grad) for p in model.parameters()))
    assert grads > 0 and ("model", "param_grad_norm") not in got  # no gradient existed when it measured


def test_manual_steps_with_accumulation_measure_the_summed_gradient_once_per_step(backend):
    x, y = make_batch(n=8, dtype=torch.float64)
    model = make_model("res", depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    before = [p.detach().clone() for p in model.parameters()]
    with Recorder(model, manual_steps=True) as rec:
        for m in model.modules():  # no dropout or batch statistics: the halves sum to the full batch
            if isinstance(m, (torch.nn.Dropout, torch.nn.BatchNorm2d)):
                m.eval()
        closure_steps(rec, model, opt, [halves, halves], manual=True)
        assert rec.step == 2
    df = rec.frame()
    assert sorted(df.step.unique()) == [0, 1]
    twin = make_model("res", depth=2).eval()
    for p, b in zip(twin.parameters(), before):
        assert torch.equal(p, b)
    F.cross_entropy(twin(x), y).backward()  # the full batch: the gradient the two halves summed to
    expected = math.sqrt(sum(sq(p.grad) for p in twin.parameters()))
    assert_close(values(df)["model", "param_grad_norm"], expected, "accumulated param_grad_norm", rtol=1e-9)
    with torch.no_grad():
        out = twin(x[4:])  # activation statistics: those of the step's last micro-batch
    assert_close(values(df)["linear1", "act_mean"], out.mean().item(), "last micro-batch act_mean", rtol=1e-9)


def test_manual_steps_are_checked():
    model = make_model("conv", dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pass no optimizer"):
        Recorder(model, optimizer=opt, manual_steps=True)
    with Recorder(model, optimizer=opt) as rec:
        with pytest.raises(RuntimeError, match="manual_steps=True"):
            rec.before_update()
        with pytest.raises(RuntimeError, match="manual_steps=True"):
            rec.after_update()
    rec = Recorder(model, manual_steps=True)
    rec.before_update()  # not entered: nothing happens
    rec.after_update()
    assert rec.step == 0 and rec.frame().empty

def test_schedules():
    assert [s for s in range(10) if every(3)(s)] == [0, 3, 6, 9]
    assert not any(every(0)(s) for s in range(10))
    log = [s for s in range(130) if logspaced()(s)]
    assert log == [0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126]
    assert [s for s in range(20) if logspaced(per_decade=3)(s)] == [0, 1, 2, 5, 10]
    assert RecordConfig(every=4).make_schedule()(8) and not RecordConfig(every=4).make_schedule()(9)
    assert RecordConfig(schedule="log").make_schedule()(13)
    assert not RecordConfig(every=0).make_schedule()(0)


@pytest.mark.parametrize(
    "kwargs, bad",
    [({"every": -1}, "-1"), ({"schedule": "cosine"}, "'cosine'"), ({"flush_every": 0}, "0"), ({"every": 1.5}, "1.5")],
)
def test_record_config_rejects_bad_values(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        RecordConfig(**kwargs)


def test_recorder_rejects_bad_values():
    model = make_model("conv")
    with pytest.raises(ValueError, match="-2"):
        Recorder(model, every=-2)
    with pytest.raises(ValueError, match="0"):
        Recorder(model, flush_every=0)
    with pytest.raises(ValueError, match="-1"):
        logspaced(-1)


def test_a_flush_in_the_middle_of_a_step_keeps_that_step_whole(backend):
    model = make_model("res", dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = make_batch(dtype=torch.float32)
    frames = []
    for m, flush_mid_step in ((model, True), (twin, False)):
        torch.manual_seed(0)  # the same dropout masks in both
        with Recorder(m, flush_every=100) as rec:
            for step in range(3):
                out = m(x)
                if flush_mid_step and step == 1:
                    rec.flush()  # step 0 leaves; step 1 is measured halfway
                F.cross_entropy(out, y).backward()
        frames.append(rec.frame())
    assert sorted(frames[0].step.unique()) == [0, 1, 2]
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_flushes_in_chunks_with_typed_columns():
    model = make_model("res", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    chunks = []
    with Recorder(model, flush_every=2, sink=chunks.append) as rec:
        run_steps(rec, model, x, y, 5)
        assert len(chunks) == 2  # after recorded steps 2 and 4, not per step
        assert rec._buffer.shape[0] == 2  # the buffer holds flush_every steps, whatever the run length
    assert len(chunks) == 3  # and the rest on exit
    assert [sorted(set(c["step"])) for c in chunks] == [[0, 1], [2, 3], [4]]
    for c in chunks:
        assert set(c) == set(COLUMNS)
        assert c["step"].dtype == np.int64 and c["epoch"].dtype == np.int64 and c["position"].dtype == np.int64
        assert c["value"].dtype == np.float64
        assert c["stack_index"].dtype == np.int64
        for name in ("layer", "role", "module_type", "metric"):
            assert c[name].dtype == object and all(isinstance(v, str) for v in c[name])
        assert len({len(v) for v in c.values()}) == 1
    assert rec.frame().empty  # the records went to the sink


def test_frame_is_long_format_and_sorted():
    model = make_model("skip", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    with Recorder(model, start_step=10) as rec:
        rec.epoch = 2
        run_steps(rec, model, x, y, 2)
    df = rec.frame()
    assert tuple(df.columns) == COLUMNS
    assert sorted(df.step.unique()) == [10, 11] and set(df.epoch) == {2}
    order = {m: i for i, m in enumerate(METRICS)}
    keys = list(zip(df.step, df.position, df.metric.map(order)))
    assert keys == sorted(keys)
    model_rows = df[df.layer == "model"]
    assert set(model_rows.position) == {-1} and set(model_rows.role) == {"model"}
    assert set(model_rows.stack_index) == {-1} and set(model_rows.module_type) == {"DeepCNN"}
    blocks = df[df.role == "stack"].drop_duplicates("layer")
    assert list(blocks.layer) == ["layers.0", "layers.1"] and list(blocks.stack_index) == [0, 1]
    assert set(blocks.module_type) == {"SkipBlock"}
    assert set(df.metric) <= set(METRICS)
    assert list(df[df.step == 10].drop_duplicates("layer").layer) == ["model"] + [p.name for p in select(model)]


def test_evaluation_forwards_are_not_recorded():
    model = make_model("res", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    with Recorder(model) as rec:
        with torch.inference_mode():
            model(x)
        with torch.no_grad():
            model(x)
        model.eval()
        F.cross_entropy(model(x), y).backward()  # eval mode: not a training step
        model.train()
        assert rec.step == 0
        out = model(x)
        with torch.inference_mode():  # an evaluation inside the training step changes nothing
            model(2 * x)
        F.cross_entropy(out, y).backward()
        assert rec.step == 1
    got = values(rec.frame())
    assert list(rec.frame().step.unique()) == [0]
    assert_close(got["linear1", "act_mean"], out.double().mean().item(), "the training forward's act_mean", rtol=1e-5)


def test_recording_does_not_change_training():
    x, y = make_batch(n=8, dtype=torch.float32)

    def train(record: bool):
        model = make_model("res", depth=2, width=8, dtype=torch.float32)  # dropout and batch norm active
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(123)
        if record:
            with Recorder(model, optimizer=opt, flush_every=2) as rec:
                run_steps(rec, model, x, y, 4, opt)
            assert len(rec.frame()) > 0
        else:
            for _ in range(4):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.state_dict(), torch.rand(3)  # the RNG stream after training

    (plain, rng_plain), (recorded, rng_recorded) = train(False), train(True)
    for name in plain:
        assert torch.equal(plain[name], recorded[name]), name
    assert torch.equal(rng_plain, rng_recorded)


@pytest.mark.parametrize("scale", [float("inf"), 0.0])
def test_nonfinite_and_zero_gradients_are_recorded_not_raised(scale):
    model = make_model("res")
    x, y = make_batch()
    with Recorder(model) as rec:
        loss = F.cross_entropy(model(x), y) * scale
        rec.record_loss(loss)
        loss.backward()
    got = values(rec.frame())
    if math.isinf(scale):
        assert got["linear1", "nonfinite_grads"] == 4 * 10  # every logit gradient is inf
        assert math.isnan(got["linear1", "grad_gain"])  # inf / inf
        assert got["layers.1", "nonfinite_grads"] > 0
    else:
        assert got["linear1", "grad_out_norm"] == 0 and got["linear1", "nonfinite_grads"] == 0
        assert math.isnan(got["linear1", "grad_gain"])  # 0 / 0, as arithmetic says
    assert got["model", "loss"] == (0.0 if scale == 0 else float("inf"))


def test_nonfinite_gradient_entries_are_counted_exactly():
    model = make_model("conv")
    x, y = make_batch()

    def poison(module, args, output):
        # three bad entries in the gradient arriving at layers.0's output; registered before
        # the recorder's own hooks, so the recorder sees the poisoned gradient
        bad = torch.tensor([0, 5, 9])

        def poisoned(grad):  # entries 5 and 9 NaN, entry 0 inf
            flat = grad.flatten().index_fill(0, bad, math.nan).index_fill(0, bad[:1], math.inf)
            return flat.view_as(grad)

        output.register_hook(poisoned)

    handle = model.layers[0].register_forward_hook(poison)
    with Recorder(model) as rec:
        F.cross_entropy(model(x), y).backward()
    handle.remove()
    got = values(rec.frame())
    assert got["layers.0", "nonfinite_grads"] == 3
    assert got["layers.1", "nonfinite_grads"] == 0
    assert got["conv3", "nonfinite_grads"] > 0  # NaN spreads backwards through conv weights


@pytest.mark.parametrize("host", [False, True], ids=["accelerator", "cpu"])
def test_hooks_never_sync_with_the_host(monkeypatch, host, backend):
    """The pragmatic check: no .item()/.tolist()/.cpu()/.numpy()/bool()/float() during training
    steps, exactly one .cpu() per flush. On a CPU (``reads_are_free``) the eager ops may read
    each gradient norm's ``.item()``, which decides whether its non-finite entries need
    counting; the compiled kernels count them in the same pass and read nothing."""
    monkeypatch.setattr(stats, "reads_are_free", lambda device: host)  # "accelerator": the device path
    model = make_model("resdown", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    rec = Recorder(model, flush_every=100).__enter__()
    run_steps(rec, model, x, y, 1)  # layouts are built on a step's first sight
    calls = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    run_steps(rec, model, x, y, 3)
    if host and backend == "eager":
        output_gradients = 3 * len(rec.probes)  # one norm read per probe output and step
        assert calls == ["item"] * output_gradients
        calls.clear()
    assert calls == []
    rec.flush()
    assert calls.count("cpu") == 1 and set(calls) <= {"cpu", "numpy"}  # .numpy() of a host tensor: no sync
    monkeypatch.undo()
    rec.close()
    assert sorted(rec.frame().step.unique()) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------
# The trainer's adapter


class FakeTrainer(SimpleNamespace):
    """Calls the events in the order and with the attributes the lead's trainer promises."""

    def fit(self, callback, epochs: int, steps: int, x, y, fail_at: int | None = None):
        callback.on_fit_start(self)
        try:
            for epoch in range(self.epoch, self.epoch + epochs):
                self.epoch = epoch
                callback.on_epoch_start(self, epoch)
                for _ in range(steps):
                    if self.step == fail_at:
                        raise RuntimeError("boom")
                    loss = F.cross_entropy(self.model(x), y)
                    callback.on_after_forward(self, loss)
                    self.optimizer.zero_grad()
                    loss.backward()
                    callback.on_after_backward(self)
                    self.optimizer.step()
                    callback.on_after_step(self)
                    self.step += 1
                callback.on_epoch_end(self, epoch, {})
                self.checkpoints.append(len(self.flushed))  # written after the epoch-end callbacks
        finally:
            callback.on_fit_end(self)


def test_callback_records_through_trainer_events_and_resumes():
    model = make_model("res", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    flushed = []
    trainer = FakeTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), step=0, epoch=0,
                          checkpoints=[], flushed=flushed)
    callback = RecorderCallback(RecordConfig(every=2, flush_every=64), sink=flushed.append)
    trainer.fit(callback, epochs=2, steps=3, x=x, y=y)
    assert trainer.checkpoints == [1, 2]  # one flush per epoch end, before the checkpoint
    assert all_hooks_removed(model, trainer.optimizer)
    steps = np.concatenate([c["step"] for c in flushed])
    epochs = np.concatenate([c["epoch"] for c in flushed])
    assert sorted(set(steps)) == [0, 2, 4]
    assert dict(zip(steps, epochs)) == {0: 0, 2: 0, 4: 1}
    loss_rows = [c["metric"] == "loss" for c in flushed]
    assert sum(int(m.sum()) for m in loss_rows) == 3

    # resume: a new callback continues the step numbering from the trainer
    resumed = []
    trainer.flushed, trainer.epoch = resumed, 2
    callback = RecorderCallback(RecordConfig(every=1), sink=resumed.append)
    trainer.fit(callback, epochs=1, steps=2, x=x, y=y)
    assert sorted(set(np.concatenate([c["step"] for c in resumed]))) == [6, 7]
    assert set(np.concatenate([c["epoch"] for c in resumed])) == {2}


def test_callback_removes_hooks_when_training_fails_and_when_disabled():
    model = make_model("conv", dtype=torch.float32)
    x, y = make_batch(dtype=torch.float32)
    trainer = FakeTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), step=0, epoch=0,
                          checkpoints=[], flushed=[])
    callback = RecorderCallback(RecordConfig())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(callback, epochs=1, steps=3, x=x, y=y, fail_at=2)
    assert all_hooks_removed(model, trainer.optimizer)
    assert sorted(callback.frame().step.unique()) == [0, 1]
    callback.close()  # idempotent

    off = RecorderCallback(RecordConfig(every=0))
    trainer.step, trainer.epoch = 0, 0
    trainer.fit(off, epochs=1, steps=1, x=x, y=y)
    assert off.recorder is None and off.frame().empty


# ---------------------------------------------------------------------------------------
# stats.py


def activation_stats(x: torch.Tensor) -> torch.Tensor:
    """The five activation metrics as the recorder derives them: moments, then metrics."""
    return torch.stack(stats.activation_metrics(stats.activation_moments(x), x.numel(), stats.channels(x)))


def test_stats_functions_against_plain_tensor_ops(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64) + 0.3
    x[0, 0, 0, 0] = 0.0
    expect = torch.stack((x.mean(), x.std(correction=0), (x <= 0).double().mean(),
                          x.mean((0, 2, 3)).square().mean(), x.var((0, 2, 3), correction=0).mean()))
    torch.testing.assert_close(activation_stats(x), expect)
    torch.testing.assert_close(stats.chan_var(x), x.var((0, 2, 3), correction=0).mean())
    torch.testing.assert_close(stats.sumsq(x), x.square().sum())
    y = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(stats.diff_sumsq(x, y), (x - y).square().sum())
    torch.testing.assert_close(stats.param_sumsq([x, y]), torch.stack((x.square().sum(), y.square().sum())))
    bad = x.clone()
    bad[1, 2, 3, 4], bad[2, 0, 0, 0], bad[3, 3, 3, 3] = float("nan"), float("inf"), -float("inf")
    assert stats.nonfinite_count(bad).item() == 3
    # channels-last memory, a [B, C] head output, and chunked reductions agree
    torch.testing.assert_close(activation_stats(x.to(memory_format=torch.channels_last)), expect)
    head = torch.randn(7, 10, generator=g, dtype=torch.float64)
    torch.testing.assert_close(stats.chan_var(head), head.var(0, correction=0).mean())
    monkeypatch.setattr(stats, "CHUNK", 150)  # 2 samples per chunk
    torch.testing.assert_close(activation_stats(x), expect)
    torch.testing.assert_close(stats.grad_moments(bad)[1], torch.tensor(3.0, dtype=torch.float64))
    for host in (True, False):  # CPU: counted only when the norm is not finite; accelerator: always
        monkeypatch.setattr(stats, "reads_are_free", lambda device, host=host: host)
        assert stats.grad_moments(bad)[1].item() == 3 and stats.grad_moments(x)[1].item() == 0
        torch.testing.assert_close(stats.grad_moments(x)[0], x.square().sum())
        huge = torch.full((4,), 1e200, dtype=torch.float64).float()  # inf after the cast: counted
        assert stats.grad_moments(huge)[1].item() == 4
        finite_overflow = torch.full((4,), 3e38)  # finite entries whose square sum overflows
        assert stats.grad_moments(finite_overflow).tolist() == [math.inf, 0.0]
    torch.testing.assert_close(stats.diff_sumsq(x, y), (x - y).square().sum())
    r = torch.relu(y)
    torch.testing.assert_close(stats.relu_part_sumsq(x, r), torch.where(y > 0, x, 0).square().sum())
    # bf16 inputs are summed in float32
    xb = x.to(torch.bfloat16)
    assert activation_stats(xb).dtype == torch.float32
    torch.testing.assert_close(activation_stats(xb), activation_stats(xb.float()))
    xb_nhwc = xb.to(memory_format=torch.channels_last)  # converted chunk by chunk in NHWC order
    torch.testing.assert_close(activation_stats(xb_nhwc), activation_stats(xb.float()))
    torch.testing.assert_close(stats.sumsq(xb_nhwc), xb.float().square().sum())
