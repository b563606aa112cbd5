"""Probe points on any model: selection, declarations, and the recorder on torchvision's ResNets
and a user's own blocks, every gradient norm against autograd through hooks of the test's own."""
import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from gradlab import probes
from gradlab.models import build_model
from gradlab.probes import ProbePoint, Residual, declare, describe, select
from gradlab.recorder import Recorder

FIXTURE = Path(__file__).with_name("data") / "deepcnn-records-v0.1.parquet"
RTOL = 1e-5


def sq(t: torch.Tensor) -> float:
    return t.double().square().sum().item()


def values(df: pd.DataFrame, step: int = 0) -> dict[tuple[str, str], float]:
    rows = df[df.step == step]
    return {(layer, metric): value for layer, metric, value in zip(rows.layer, rows.metric, rows.value)}


def close(actual: float, expected: float, what: str, rtol: float = RTOL) -> None:
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-12), f"{what}: recorded {actual!r}, expected {expected!r}"


# ---------------------------------------------------------------------------------------
# DeepCNN records are those of gradlab 0.1, value for value


def deepcnn_records() -> pd.DataFrame:
    """The procedure that wrote the fixture with gradlab 0.1 (its Recorder, the same seeds, two
    threads: the compiled kernels add per-thread float32 partial sums, so the thread count
    decides the last bits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _deepcnn_records()
    finally:
        torch.set_num_threads(threads)


def _deepcnn_records() -> pd.DataFrame:
    frames = []
    for dtype in (torch.float32, torch.float64):
        for block in ("conv", "res", "resdown", "skip"):
            for norm in ("batch", "none"):
                torch.manual_seed(0)
                model = build_model(block, 3, 8, norm).to(dtype)
                if dtype == torch.float32:
                    model = model.to(memory_format=torch.channels_last)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                g = torch.Generator().manual_seed(1)
                with Recorder(model, optimizer=opt) as rec:
                    for _ in range(3):
                        x = torch.randn(16, 3, 32, 32, generator=g, dtype=dtype)
                        y = torch.randint(0, 10, (16,), generator=g)
                        loss = F.cross_entropy(model(x), y)
                        rec.record_loss(loss)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                frames.append(rec.frame().assign(config=f"{block}-{norm}-{dtype}"))
    return pd.concat(frames, ignore_index=True)


def test_deepcnn_records_equal_those_of_gradlab_0_1():
    old = pd.read_parquet(FIXTURE)
    new = deepcnn_records()
    keys = ["config", "step", "layer", "metric"]
    merged = old.merge(new, on=keys, suffixes=("_old", "_new"), how="outer", indicator=True)
    assert (merged["_merge"] == "both").all(), "the same rows, none missing and none extra"
    assert len(merged) == len(old) == 4320
    assert (merged.epoch_old == merged.epoch_new).all() and (merged.position_old == merged.position_new).all()
    a, b = merged.value_old.to_numpy(), merged.value_new.to_numpy()
    f64 = merged.config.str.endswith("float64").to_numpy()
    np.testing.assert_allclose(b[f64], a[f64], rtol=1e-12, equal_nan=True)  # eager float64 arithmetic
    np.testing.assert_allclose(b[~f64], a[~f64], rtol=1e-6, equal_nan=True)  # float32 kernels; exact on one machine
    # the old kind column maps onto the new description
    kinds = merged.drop_duplicates(["config", "layer"])
    role = {"stem": "stem", "head": "head", "model": "model"}
    assert (kinds.role == kinds.block.map(lambda b: role.get(b, "stack"))).all()
    blocks = kinds[kinds.role == "stack"]
    assert (blocks.stack_index == blocks.layer.str.removeprefix("layers.").astype(int)).all()
    names = {"conv": "ConvBlock", "res": "ResBlock", "resdown": "ResDownBlock", "skip": "SkipBlock"}
    assert (blocks.module_type == blocks.block.map(names)).all()


# ---------------------------------------------------------------------------------------
# Independent references: the test's own hooks, and functional copies of torchvision's blocks


def functional_resnet_block(block: nn.Module, keep: dict, name: str):
    """A forward for torchvision's BasicBlock or Bottleneck written here, without in-place
    operations, that keeps the block's input, branch, skip and sum for autograd."""
    convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]

    def forward(x):
        out = x
        for i, conv in enumerate(convs, start=1):
            out = getattr(block, f"bn{i}")(getattr(block, conv)(out))
            if i < len(convs):
                out = F.relu(out)
        skip = x if block.downsample is None else block.downsample(x)
        total = out + skip
        result = F.relu(total)
        keep[name] = {"in": x, "branch": out, "skip": skip, "sum": total, "out": result}
        return result

    return forward


def resnet_reference(model: nn.Module, x, y) -> tuple[dict, dict]:
    """Per block: input, output, branch and skip tensors and the gradients of the loss with
    respect to them, by torch.autograd.grad on a copy whose blocks run the functional forward."""
    twin = copy.deepcopy(model)
    keep: dict = {}
    blocks = {n: m for n, m in twin.named_modules() if isinstance(m, (torchvision.models.resnet.BasicBlock,
                                                                      torchvision.models.resnet.Bottleneck))}
    for name, block in blocks.items():
        block.forward = functional_resnet_block(block, keep, name)
    ends = {}

    def end(name):
        def hook(module, args, output):
            ends[name] = (args[0], output)
        return hook

    handles = [twin.conv1.register_forward_hook(end("conv1")), twin.fc.register_forward_hook(end("fc"))]
    loss = F.cross_entropy(twin(x), y)
    for h in handles:
        h.remove()
    ref = {}
    for name, k in keep.items():
        g_out, g_in, g_sum = torch.autograd.grad(loss, [k["out"], k["in"], k["sum"]], retain_graph=True)
        branch_part = torch.autograd.grad(k["branch"], k["in"], g_sum, retain_graph=True)[0]
        if k["skip"] is k["in"]:
            skip_part = g_sum  # the identity passes the sum's gradient on unchanged
        else:
            skip_part = torch.autograd.grad(k["skip"], k["in"], g_sum, retain_graph=True)[0]
        torch.testing.assert_close(branch_part + skip_part, g_in)  # the two parts make the input gradient
        ref[name] = {"grad_out_norm": math.sqrt(sq(g_out)), "grad_in_norm": math.sqrt(sq(g_in)),
                     "grad_in_branch_norm": math.sqrt(sq(branch_part)), "grad_in_skip_norm": math.sqrt(sq(skip_part)),
                     "branch_chan_var": chan_var(k["branch"]), "skip_chan_var": chan_var(k["skip"]),
                     "act_std": k["out"].double().std(correction=0).item()}
    for name, (inp, out) in ends.items():
        ref[name] = {"grad_out_norm": math.sqrt(sq(torch.autograd.grad(loss, out, retain_graph=True)[0]))}
    return ref, {"loss": loss.item()}


def chan_var(t: torch.Tensor) -> float:
    t = t.double()
    return t.var(dim=[0, 2, 3], correction=0).mean().item()


@pytest.mark.parametrize("arch,batch", [("resnet18", 8), pytest.param("resnet50", 2, marks=pytest.mark.slow)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_torchvision_resnet_norms_and_branch_skip_split_match_autograd(arch, batch, channels_last, backend):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    ref, extra = resnet_reference(model, x, y)
    with Recorder(model) as rec:
        loss = F.cross_entropy(model(x), y)
        rec.record_loss(loss)
        loss.backward()
    df = rec.frame()
    got = values(df)
    stack = df[df.role == "stack"].drop_duplicates("layer")
    expected_blocks = [n for n in ref if n.startswith("layer")]
    assert list(stack.layer) == expected_blocks and list(stack.stack_index) == list(range(len(expected_blocks)))
    assert set(stack.module_type) == {"BasicBlock" if arch == "resnet18" else "Bottleneck"}
    assert df.loc[df.role == "stem", "layer"].unique().tolist() == ["conv1"]
    assert df.loc[df.role == "head", "layer"].unique().tolist() == ["fc"]
    for name, metrics in ref.items():
        for metric, value in metrics.items():
            close(got[name, metric], value, f"{arch} {name} {metric}", rtol=1e-4 if metric.endswith("var") else RTOL)
    close(got["model", "loss"], extra["loss"], "loss")
    assert all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------------------------------
# A user's own blocks


class ScaledResidual(nn.Module):
    """A user's block: out = relu(0.5 * body(x) + proj(x)), declared below."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.scale = nn.Identity()
        self.proj = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return F.relu(self.scale(0.5 * self.body(x)) + self.proj(x))


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ScaledResidual(8, 8), ScaledResidual(8, 16), ScaledResidual(16, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        out = self.blocks(F.relu(self.stem(x)))
        return self.head(out.mean((2, 3)))


@pytest.fixture
def declared_user_block():
    declare(ScaledResidual, Residual(branch="scale", skip="proj", entry="body", post="relu"))
    yield
    declare(ScaledResidual, None)


def test_a_users_declared_block_is_split_by_its_declaration(declared_user_block, backend):
    torch.manual_seed(0)
    model = UserNet().double()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (4,))
    keep = {}
    twin = copy.deepcopy(model)
    for name, block in twin.blocks.named_children():
        def forward(x, block=block, name=name):
            branch = block.scale(0.5 * block.body(x))
            skip = block.proj(x)
            total = branch + skip
            keep[name] = (x, branch, skip, total)
            return F.relu(total)
        block.forward = forward
    loss = F.cross_entropy(twin(x), y)
    with Recorder(model) as rec:
        F.cross_entropy(model(x), y).backward()
    got = values(rec.frame())
    points = {p.name: p for p in select(model)}
    assert [points[n].role for n in points] == ["stem", "stack", "stack", "stack", "head"]
    for name, (inp, branch, skip, total) in keep.items():
        g_sum = torch.autograd.grad(loss, total, retain_graph=True)[0]
        branch_part = torch.autograd.grad(branch, inp, g_sum, retain_graph=True)[0]
        skip_part = torch.autograd.grad(skip, inp, g_sum, retain_graph=True)[0]
        close(got[f"blocks.{name}", "grad_in_branch_norm"], math.sqrt(sq(branch_part)), f"{name} branch")
        close(got[f"blocks.{name}", "grad_in_skip_norm"], math.sqrt(sq(skip_part)), f"{name} skip")
        close(got[f"blocks.{name}", "skip_chan_var"], chan_var(skip), f"{name} skip variance")
        close(got[f"blocks.{name}", "branch_chan_var"], chan_var(branch), f"{name} branch variance")


def test_an_undeclared_block_gets_every_generic_metric_and_no_split():
    torch.manual_seed(0)
    model = UserNet()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    with Recorder(model) as rec:
        F.cross_entropy(model(x), y).backward()
    df = rec.frame()
    blocks = df[df.role == "stack"]
    assert set(blocks.metric) & {"grad_in_branch_norm", "grad_in_skip_norm", "branch_chan_var", "skip_chan_var"} == set()
    assert {"grad_out_norm", "grad_in_norm", "act_std", "param_grad_norm"} <= set(blocks.metric)


def test_a_declaration_naming_a_missing_submodule_is_refused():
    declare(ScaledResidual, Residual(branch="nope"))
    try:
        with pytest.raises(ValueError, match="has no sub-module 'nope'"):
            select(UserNet())
    finally:
        declare(ScaledResidual, None)


def test_residual_declarations_are_checked_when_made():
    with pytest.raises(ValueError, match="needs entry"):
        Residual(branch="b", skip="s")
    with pytest.raises(ValueError, match="pre_relu needs a projection"):
        Residual(branch="b", pre_relu=True)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        declare(int, Residual(branch="b"))


# ---------------------------------------------------------------------------------------
# Choosing probe points


def test_the_automatic_rule_on_resnet18_an_mlp_and_a_plain_cnn():
    resnet = torchvision.models.resnet18(num_classes=10)
    rows = describe(select(resnet))
    assert [(r["name"], r["role"], r["stack_index"]) for r in rows] == (
        [("conv1", "stem", -1)]
        + [(f"layer{s}.{b}", "stack", 2 * (s - 1) + b) for s in range(1, 5) for b in range(2)]
        + [("fc", "head", -1)])
    assert rows[1]["residual"] == "relu(branch bn2 + skip identity)"
    assert rows[3]["residual"] == "relu(branch bn2 + skip downsample)"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3072, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    assert [(p.name, p.role, p.stack_index) for p in select(mlp)] == [("1", "stack", 0), ("3", "stack", 1), ("5", "stack", 2)]

    class Plain(nn.Module):  # no containers: every layer with parameters is the stack
        def __init__(self):
            super().__init__()
            self.a, self.bn, self.b, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Linear(4, 10)

    assert [(p.name, p.role) for p in select(Plain())] == [("a", "stack"), ("b", "stack"), ("fc", "stack")]


def test_deepcnn_keeps_its_declared_points():
    points = select(build_model("res", depth=3, width=8))
    assert [p.name for p in points] == ["conv1", "conv2", "conv3", "layers.0", "layers.1", "layers.2", "linear1"]
    assert [p.role for p in points] == ["stem"] * 3 + ["stack"] * 3 + ["head"]
    assert [p.stack_index for p in points] == [-1, -1, -1, 0, 1, 2, -1]
    assert [p.position for p in points] == list(range(7))
    named = dict(build_model("res", depth=3, width=8).named_modules())
    assert [type(named[p.name]).__name__ for p in points] == [p.module_type for p in points]
    assert points[3].residual == Residual(branch="conv2")
    assert select(build_model("resdown", depth=1, width=8))[3].residual.pre_relu
    assert select(build_model("conv", depth=1, width=8))[3].residual is None
    assert [p.name for p in select(build_model("conv", depth=0, width=8))] == ["conv1", "conv2", "conv3", "linear1"]


def test_names_globs_callables_and_points_select_probe_points():
    resnet = torchvision.models.resnet18(num_classes=10)
    assert [p.name for p in select(resnet, "layer*.*")] == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert [p.name for p in select(resnet, ["conv1", "layer4.1"])] == ["conv1", "layer4.1"]
    assert [p.name for p in select(resnet, "layer1.**.conv1")] == ["layer1.0.conv1", "layer1.1.conv1"]
    linears = select(resnet, lambda name, module: isinstance(module, nn.Linear))
    assert [(p.name, p.role, p.stack_index, p.module_type) for p in linears] == [("fc", "stack", 0, "Linear")]
    chosen = [ProbePoint("fc", 0, "head", -1, "Linear", resnet.fc)]
    assert select(resnet, chosen) == chosen
    with pytest.raises(ValueError, match="no module of ResNet matches 'layer9.*'"):
        select(resnet, ["layer1.0", "layer9.*"])
    with pytest.raises(ValueError, match="module names or globs"):
        select(resnet, [1, 2])


def test_a_glob_selection_records_only_the_chosen_modules():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with Recorder(model, probes="layer4.*") as rec:
        F.cross_entropy(model(x), y).backward()
    assert set(rec.frame().layer) == {"model", "layer4.0", "layer4.1"}


def test_an_output_changed_in_place_is_not_taken_for_the_next_input():
    """Probe points whose output a ReLU(inplace=True) changes before the next probe point reads
    it: the next input's gradient is the ReLU's, not the first output's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    kept = {}

    def keep(i):
        def hook(module, args, output):
            kept[i] = (args[0], output)
        return hook

    hooks = [model[i].register_forward_hook(keep(i)) for i in (0, 2, 4)]
    twin_loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(twin_loss, [kept[2][0], kept[4][0]])
    with Recorder(model) as rec:
        F.cross_entropy(model(x), y).backward()
    got = values(rec.frame())
    close(got["2", "grad_in_norm"], math.sqrt(sq(grads[0])), "second Linear's input gradient")
    close(got["4", "grad_in_norm"], math.sqrt(sq(grads[1])), "third Linear's input gradient")
    assert not math.isclose(got["2", "grad_in_norm"], got["0", "grad_out_norm"])


def test_probes_import_nothing_from_the_report_side():
    assert "pandas" not in probes.__dict__ and "seaborn" not in probes.__dict__
