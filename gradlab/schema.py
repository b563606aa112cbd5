"""The record format, in one place: columns and their dtypes, metrics, roles, phases, run keys.

Torch-free (numpy and pandas only), so the recorder, the run directory, the analysis and the
reports all import their facts from here and none of them repeats one. Adding a metric
downstream of the recorder is one entry in ``METRICS``; ``tests/test_schema.py`` checks that
every metric the recorder emits has its entry and every entry is emitted.

A record row is one observation: ``step, epoch, layer, position, role, stack_index,
module_type, metric, value``.

``layer``
    The probe point's module path in the model (``conv1``, ``layers.3``, ``layer2.1``), or
    ``model`` for the per-step rows (loss, the whole model's gradient norm).
``position``
    Forward order of the probe points, 0 first; -1 for the model rows.
``role``
    ``stem``, ``stack`` (the block stack whose gradient flow is compared), ``head``, or
    ``model`` for the model rows.
``stack_index``
    0 ... n-1 along the stack; -1 outside it. Analyses compare first and last blocks by this
    index, never by parsing a layer name.
``module_type``
    The probe point's class name (``ResBlock``, ``BasicBlock``, ``Linear``); the model's class
    name on the model rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# pandas is imported inside the functions that need it: the torch side (the recorder) reads this
# module's facts without loading pandas.

# --- records ------------------------------------------------------------------------------------

RECORD_DTYPES = {
    "step": "int64",
    "epoch": "int64",
    "layer": "object",
    "position": "int64",
    "role": "object",
    "stack_index": "int64",
    "module_type": "object",
    "metric": "object",
    "value": "float64",
}
RECORD_COLUMNS = tuple(RECORD_DTYPES)
LAYER_KEYS = ("layer", "position", "role", "stack_index", "module_type")  # what identifies a probe point
LEGACY_RECORD_COLUMNS = ("step", "epoch", "layer", "position", "block", "metric", "value")  # gradlab 0.1

MODEL_LAYER = "model"  # layer and role of the per-step rows
MODEL_POSITION = -1
NOT_IN_STACK = -1  # stack_index of stem, head and model rows
ROLES = ("stem", "stack", "head", MODEL_LAYER)


def empty_records() -> pd.DataFrame:
    """A record table with no rows and the columns' dtypes."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in RECORD_DTYPES.items()})


def empty_columns() -> dict[str, np.ndarray]:
    """The columns of a flush with no rows (numpy arrays with the record dtypes)."""
    return {c: np.zeros(0, dtype=np.dtype(t) if t != "object" else object) for c, t in RECORD_DTYPES.items()}


# --- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """What one metric is: its words for people and which way is bad."""

    label: str  # axis and table label
    unit: str  # "" for plain numbers
    bad: str  # which values signal trouble: "high", "low", "both" (far from a middle), "none"
    side: str  # forward | backward | parameters | model: where it is measured
    doc: str  # one line for --help and the report's glossary


METRICS: dict[str, Metric] = {
    # forward, on the probe point's output; channels are dim 1, statistics over batch and space
    "act_mean": Metric("activation mean", "", "both", "forward", "mean of the output"),
    "act_std": Metric("activation std", "", "both", "forward", "standard deviation of the output"),
    "act_nonpos_frac": Metric("fraction ≤ 0", "", "high", "forward", "fraction of outputs ≤ 0: what a following ReLU kills"),
    "act_chan_mean_sq": Metric("channel mean²", "", "high", "forward",
                               "mean over channels of the squared channel mean (Brock et al. 2021)"),
    "act_chan_var": Metric("channel variance", "", "both", "forward",
                           "mean over channels of the channel variance (Brock et al. 2021)"),
    "branch_chan_var": Metric("branch variance", "", "both", "forward",
                              "residual blocks: channel variance of the branch just before the addition"),
    "skip_chan_var": Metric("skip variance", "", "both", "forward",
                            "residual blocks: channel variance of the skip path (the input, or its projection)"),
    # backward: L2 norms of the loss gradient with respect to the probe point's output and input
    "grad_out_norm": Metric("gradient norm ‖∂L/∂output‖", "", "both", "backward", "L2 norm of the output gradient"),
    "grad_in_norm": Metric("gradient norm ‖∂L/∂input‖", "", "both", "backward", "L2 norm of the input gradient"),
    "grad_gain": Metric("gradient gain", "×", "both", "backward", "grad_in_norm / grad_out_norm"),
    "grad_in_branch_norm": Metric("branch part of ‖∂L/∂input‖", "", "none", "backward",
                                  "residual blocks: norm of the input gradient's part through the branch"),
    "grad_in_skip_norm": Metric("skip part of ‖∂L/∂input‖", "", "none", "backward",
                                "residual blocks: norm of the input gradient's part through the skip path"),
    "nonfinite_grads": Metric("non-finite gradient entries", "", "high", "backward",
                              "count of inf and NaN entries in the output gradient"),
    # parameters of the probe point, sub-modules included; the model row: all parameters
    "param_grad_norm": Metric("parameter gradient norm", "", "both", "parameters",
                              "L2 norm of the parameters' gradients"),
    "param_norm": Metric("parameter norm", "", "none", "parameters", "L2 norm of the parameters before the step"),
    "update_ratio": Metric("update ratio ‖Δθ‖/‖θ‖", "", "both", "parameters",
                           "norm of the optimizer's update over the parameter norm"),
    "loss": Metric("loss", "", "high", "model", "the training loss (model row only)"),
}
METRIC_NAMES = tuple(METRICS)
RESIDUAL_METRICS = ("branch_chan_var", "skip_chan_var", "grad_in_branch_norm", "grad_in_skip_norm")


def metric_label(name: str) -> str:
    """The metric's label, or its name when it is not one of METRICS."""
    metric = METRICS.get(name)
    return name if metric is None else metric.label


# --- runs, phases and words ---------------------------------------------------------------------

RUN_KEYS = ("run", "model", "block", "depth", "width", "norm", "seed")  # what identifies a run in a sweep
DEFAULT_MODEL = "deepcnn"
HEADLINE_RATIO = "gradlab/first_to_last"  # the per-step first-to-last gradient ratio in other tools (TensorBoard, loggers)
UNKNOWN = "n/a"  # a run key the run does not define (the norm of a model gradlab did not build)
NOTEBOOK_WIDTH = 32  # the notebook's channels: a run name shows its width only when it differs (conv-d2-w64-s0)
POOL_IMAGES = 50_000  # the training pool of CIFAR-10 and of the synthetic set, split into train and validation
PHASES = ("init", "epoch1", "end")
PHASE_WORDS = {"init": "at initialisation", "epoch1": "over the first epoch", "end": "at the end of training"}
NORM_WORDS = {"batch": "batch norm", "none": "no normalisation", UNKNOWN: "normalisation not recorded"}


def norm_words(norm) -> str:
    """The norm for a sentence: "batch norm", "no normalisation", "layer norm" for "layer"."""
    return NORM_WORDS.get(norm, f"{norm} norm")


def stack_block(module_types) -> str:
    """The ``block`` run key of a model gradlab did not build: its stack's module types in stack
    order, each once, joined with "/" ("BasicBlock", "BasicBlock/Bottleneck"); UNKNOWN for none."""
    distinct = [str(t) for t in dict.fromkeys(module_types) if isinstance(t, str) and t]
    return "/".join(distinct) or UNKNOWN


DIVERGED = "diverged"  # the status, and the first word of a diverged verdict
DIVERGED_FIELDS = ("step", "epoch", "layer", "position", "cause")  # summary.json's "diverged" object

# --- where the first non-finite value is ----------------------------------------------------------

CAUSES = ("activation", "loss", "gradient")  # the order one step computes them: forward, loss, backward
EVIDENCE = {  # metric -> cause: a non-finite value (a count above 0 for nonfinite_grads) means divergence
    "act_mean": "activation",  # non-finite exactly when an entry is; squared statistics overflow earlier
    "loss": "loss",
    "grad_out_norm": "gradient",
    "grad_in_norm": "gradient",
    "grad_in_branch_norm": "gradient",
    "grad_in_skip_norm": "gradient",
    "param_grad_norm": "gradient",
    "nonfinite_grads": "gradient",
}


def first_nonfinite(records: pd.DataFrame, by: tuple[str, ...] = ("run",)) -> pd.DataFrame:
    """Per group of ``by``: the first step whose records show a non-finite value, and where in it.

    Columns ``*by, step, epoch, layer, position, cause``; no row for a group without evidence.
    Evidence is a non-finite value of a metric in ``EVIDENCE`` or a ``nonfinite_grads`` count
    above 0. Within a step the forward pass comes first (the lowest position), then the loss,
    then the backward pass, which starts at the output (the highest position). ``by=()``
    treats the whole frame as one group.
    """
    import pandas as pd

    by = tuple(c for c in by if c in records.columns)
    columns = [*by, "step", "epoch", "layer", "position", "cause"]
    if records.empty or not {"metric", "value", "step"} <= set(records.columns):
        return pd.DataFrame(columns=columns)
    rows = records.loc[records["metric"].isin(list(EVIDENCE))]
    values = pd.to_numeric(rows["value"], errors="coerce").to_numpy(float)
    counted = (rows["metric"] == "nonfinite_grads").to_numpy()
    with np.errstate(invalid="ignore"):
        bad = rows.loc[np.where(counted, values > 0, ~np.isfinite(values))]
    if bad.empty:
        return pd.DataFrame(columns=columns)
    for column in ("epoch", "layer", "position"):
        if column not in bad.columns:
            bad = bad.assign(**{column: np.nan})
    cause = bad["metric"].map(EVIDENCE)
    position = pd.to_numeric(bad["position"], errors="coerce")
    order = position.where(cause != "gradient", -position)  # backward starts at the output
    ranked = bad.assign(cause=cause, _rank=cause.map({c: i for i, c in enumerate(CAUSES)}), _order=order)
    ranked = ranked.sort_values([*by, "step", "_rank", "_order"], kind="stable")
    first = ranked.drop_duplicates(list(by)) if by else ranked.head(1)
    return first[columns].reset_index(drop=True)
