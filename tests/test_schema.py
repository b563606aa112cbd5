"""The one source of the record format: every metric the recorder emits is described there,
every description is emitted, and the columns' dtypes are those a flush writes."""
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gradlab import schema
from gradlab.models import build_model
from gradlab.recorder import Recorder
from gradlab.recorder.buffer import metrics


def test_every_metric_is_described_and_every_description_is_emitted():
    torch.manual_seed(0)
    seen = set()
    for block in ("conv", "res", "resdown"):
        model = build_model(block, depth=2, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        with Recorder(model, optimizer=opt) as rec:
            loss = F.cross_entropy(model(x), y)
            rec.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seen |= set(rec.frame().metric)
    assert seen == set(schema.METRICS)
    for name, metric in schema.METRICS.items():
        assert metric.label and metric.doc, name
        assert metric.bad in ("high", "low", "both", "none"), name
        assert metric.side in ("forward", "backward", "parameters", "model"), name
    assert set(schema.RESIDUAL_METRICS) <= set(schema.METRICS)
    assert set(schema.EVIDENCE) <= set(schema.METRICS) and set(schema.EVIDENCE.values()) == set(schema.CAUSES)


def test_the_moments_give_every_metric_in_schema_order():
    raw = np.zeros((1, 2, 17))
    values, valid = metrics(raw, np.zeros_like(raw, dtype=bool), np.ones((1, 2, 3, 2)))
    assert values.shape == (1, 2, len(schema.METRIC_NAMES)) and not valid.any()


def test_a_flush_has_the_schema_columns_and_dtypes():
    model = build_model("res", depth=1, width=4)
    chunks = []
    with Recorder(model, sink=chunks.append) as rec:
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    assert rec is not None and len(chunks) == 1
    frame = pd.DataFrame(chunks[0])
    assert tuple(frame.columns) == schema.RECORD_COLUMNS
    for table in (frame, schema.empty_records()):
        for column, dtype in schema.RECORD_DTYPES.items():  # text: object, or pandas 3's str
            if dtype == "object":
                assert pd.api.types.is_object_dtype(table[column]) or pd.api.types.is_string_dtype(table[column])
            else:
                assert str(table[column].dtype) == dtype, column
    assert {c: v.dtype for c, v in schema.empty_columns().items()} == {c: np.dtype(t) for c, t in schema.RECORD_DTYPES.items()}
    assert set(frame.role) == {"stem", "stack", "head", "model"}


def test_the_first_nonfinite_value_forward_first_then_loss_then_backward_from_the_output():
    rows = [  # run a: a clean step 0; at step 1 the head's activation, the loss and gradients break
        ("a", 0, "layers.0", 3, "act_mean", 1.0),
        ("a", 1, "layers.1", 4, "grad_out_norm", math.inf),
        ("a", 1, "model", -1, "loss", math.nan),
        ("a", 1, "linear1", 5, "act_mean", math.nan),
        ("a", 1, "layers.0", 3, "act_mean", math.inf),
        # run b: only gradients, counted; the backward pass reaches the highest position first
        ("b", 2, "layers.0", 3, "nonfinite_grads", 4.0),
        ("b", 2, "layers.1", 4, "nonfinite_grads", 1.0),
        ("b", 2, "layers.2", 5, "nonfinite_grads", 0.0),
        # run c: the loss alone; run d: nothing
        ("c", 7, "model", -1, "loss", math.inf),
        ("d", 0, "layers.0", 3, "grad_out_norm", 2.0),
    ]
    records = pd.DataFrame(rows, columns=["run", "step", "layer", "position", "metric", "value"]).assign(epoch=0)
    found = schema.first_nonfinite(records).set_index("run")
    assert sorted(found.index) == ["a", "b", "c"]
    assert found.loc["a", ["step", "layer", "cause"]].tolist() == [1, "layers.0", "activation"]
    assert found.loc["b", ["step", "layer", "cause"]].tolist() == [2, "layers.1", "gradient"]
    assert found.loc["c", ["step", "layer", "cause"]].tolist() == [7, "model", "loss"]
    one = schema.first_nonfinite(records[records.run == "b"], by=())
    assert one[["step", "layer", "position", "cause"]].iloc[0].tolist() == [2, "layers.1", 4, "gradient"]
    assert schema.first_nonfinite(records[records.run == "d"]).empty


def test_schema_imports_neither_torch_nor_pandas():
    code = ("import sys; sys.modules['torch'] = None; import gradlab.schema; "
            "assert 'pandas' not in sys.modules, 'pandas loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
