"""Scale-free gradient-flow metrics and verdicts from long-format record frames.

Pure pandas and numpy: this module never imports torch, so reports can be
built on a machine without it. Every function takes the recorder's tidy table
with the run keys in front (``run, model, block, depth, width, norm, seed``,
``schema.RUN_KEYS``, then the record columns ``step, epoch, layer, position,
role, stack_index, module_type, metric, value``, ``schema.RECORD_COLUMNS``) and
returns a tidy table. Work is vectorised (filter ``metric`` first, then
groupby/pivot); there is no Python loop over rows or steps.

Probe points are described, never parsed
----------------------------------------
Every record row says what its probe point is: ``role`` (``stem``, ``stack``,
``head``, or ``model`` for the per-step rows) and ``stack_index`` (0 ... n-1
along the stack, -1 elsewhere). The block stack of a run is its rows with role
``stack``; its first block is stack_index 0 and its last block the highest
stack_index the run recorded. This module never reads meaning into a layer
name, so any model works: a DeepCNN (stack ``layers.0 .. layers.{N-1}``), a
torchvision resnet18 (stack ``layer1.0 .. layer4.1``), or a mix of the two in
one sweep. ``layer`` is only shown; ``position`` (forward order) orders every
profile, stem and head included. Records in the legacy format (a ``block``
kind instead of role and stack_index) are upgraded by ``gradlab.runs`` when a
run directory is read; this module refuses them with that hint.

Run keys
--------
``model`` is the model spec (``deepcnn``, ``torchvision:resnet18``,
``file.py:factory``); ``block`` the network's block type (``conv``, ``res``,
... for a DeepCNN, the stack's module type such as ``BasicBlock`` otherwise);
``depth`` the number of blocks in the stack. When ``depth`` is not recorded it
is the number of distinct stack_index values of the run (0 without a stack);
when ``block`` is not recorded it is the stack's module types joined with "/"
(``schema.stack_block``). Runs are grouped by ``model, block, norm, depth``
(NaN keys kept, never dropped).

Phases
------
``init``
    The first recorded step of each run, taken per metric: the first step at
    which that metric was recorded in that run. Step 0 need not be recorded,
    and a metric that starts later (``update_ratio`` needs an optimizer step)
    still gets an init value.
``epoch1``
    Every recorded step of epoch 0, reduced by the median over steps, which a
    single spike cannot move.
``end``
    The last ``END_STEPS`` (3) recorded steps of each run (per metric),
    reduced by the median, so one spiky final step cannot decide a verdict.
    With log-spaced schedules these steps may lie far apart.

When a phase spans several steps the median skips NaN values; a phase whose
values are all NaN stays NaN.

Gradient-flow measures (over the block stack, role ``stack``)
-------------------------------------------------------------
``first_to_last``
    ``grad_out_norm`` at stack_index 0 divided by ``grad_out_norm`` at the
    last stack_index: the gradient at the first block relative to the last.
    Above 1 it grows on its way back toward the input.
``gain_geomean``
    Geometric mean of the stack blocks' ``grad_gain`` (= grad_in / grad_out):
    the per-block rate of growth (>1) or decay (<1).
``log_slope``
    Least-squares slope of log10 ``grad_out_norm`` against stack_index, in
    decades per block (negative: larger toward the input).
``relative`` (profiles and per-layer tables)
    A value divided by the run's value at its last stack block; stem and head
    rows are divided by the same value.

Verdict (on ``first_to_last``; the thresholds are module constants)
------------------------------------------------------------------
``diverged at step S (layer L)``
    The run diverged (see Divergence below) at or before this phase's steps:
    its numbers say nothing about gradient flow, so ``first_to_last``,
    ``gain_geomean`` and ``log_slope`` are NaN and the verdict names where the
    first non-finite value appeared ("(loss)" when it was the loss).
``n/a``
    Fewer than 2 stack blocks, or ``grad_out_norm`` not recorded at the first
    or the last block: there is nothing to compare.
``non-finite``
    Either norm is NaN or inf in a run not known to have diverged (the
    caller passed an empty ``diverged`` frame). ``first_to_last`` is then NaN.
``exploding``
    ``first_to_last >= EXPLODING_RATIO`` (10); includes a last-block gradient
    that underflows to exactly 0 while the first is positive (ratio inf).
``vanishing``
    ``first_to_last <= VANISHING_RATIO`` (0.1); includes a first-block
    gradient of exactly 0 (ratio 0), and both blocks exactly 0: the gradient
    vanished to 0 before it reached the blocks (0/0, so ``first_to_last`` is
    NaN). An underflow to 0 is a result, not an error.
``stable``
    Anything in between.

A block whose gradient is exactly 0 on both sides has ``grad_gain`` 0/0 =
NaN; once the gradient has vanished to 0 somewhere (a gain of exactly 0), the
product of the gains is 0 whatever those blocks say, so ``gain_geomean`` is 0.

Divergence (``divergence``)
---------------------------
A run diverged when its summary says so (``status == "diverged"``, with the
trainer's ``diverged_step, diverged_epoch, diverged_layer, diverged_position,
diverged_cause`` columns in the runs table) or, without that, when its
records hold a non-finite value of a metric in ``schema.EVIDENCE`` or a
``nonfinite_grads`` count above 0 (a probe, an older trainer), as found by
``schema.first_nonfinite``: the first such step is the divergence step; within
it the forward pass comes first (the lowest activation position), then the
loss, then the backward pass, which starts at the output (the highest gradient
position). Second moments (``act_std``, ``act_chan_*``) are not evidence:
float32 sums of squares overflow long before the values do. Ratios
(``grad_gain``, ``update_ratio``) are not either: 0/0 is NaN for gradients
that vanished to exactly 0.

Training budget (``training_budget``)
-------------------------------------
A run's accuracy means something only at the budget it was trained for: its
``steps`` (optimizer steps done), ``train_images`` (the training images it drew
its batches from) and ``epochs_done``. An accuracy is ``at_chance`` when it
lies within ``CHANCE_MARGIN`` (3 points) of chance, 1 / classes (``CHANCE``:
10 % for CIFAR-10's ten classes and the synthetic set's). A budget is
``short_budget`` below ``SHORT_BUDGET_STEPS`` (500) optimizer steps: enough to
compare gradient flow at initialisation and early in training, too few to
tell how well a network can learn (the notebook's experiment takes 30 epochs
of 176 steps). A net at chance after a short budget has barely trained; its
accuracy says "not yet", never "cannot".

Width against depth (``width_depth``, ``width_effect``)
------------------------------------------------------
A network grows wider (more channels per layer) or deeper (more blocks). For
each (model, block, norm) with at least two widths, ``width_depth`` picks two
lines through one base network: the base width is the width with the most
depths (ties: the notebook's ``NOTEBOOK_WIDTH``, 32, when it is among them,
else the narrowest), the base depth the depth with the most widths (ties: the
shallowest). "wider" is every width at the base depth, "deeper" every depth at
the base width; the base network is on both lines. Each point is a (depth,
width) with its parameter count (``n_params``), Hanin's ``beta`` and its test
accuracy (mean and sample std over seeds), so accuracy can be compared against
the parameters each direction spends. A sweep with ``--shape wider-deeper``
holds exactly these two lines; a product grid holds them and more.
``width_effect`` takes ``depth_scaling`` rows and, per (phase, model, block,
norm, depth) with at least two widths, gives the ratio at the narrowest and
the widest width (NaN where no seed has a ratio) and ``n_zero_widths``, the
widths whose ratio is exactly 0 (the gradient underflowed at the first block),
and ``n_seeds``, the most seeds behind one width's (geometric mean) ratio.

Spread across seeds and Hanin's β (``seed_spread``, ``spread_trend``)
-------------------------------------------------------------------
Hanin (2018) shows for fully connected ReLU nets that the fluctuation of the
gradient across initialisations grows with β = Σ 1/n over the hidden layers
(n: a layer's width): wider nets fluctuate less, while the mean trend is set
by depth and architecture. gradlab applies it to CNNs as an approximation:
a layer's width is its channel count (every Conv2d's out_channels and every
Linear's out_features but the output layer's; ``gradlab.models.hanin_beta``,
measured on the built model by the torch side and stored as the run's
``beta``). The theorem does not cover convolutions, BatchNorm or skips; the
report shows the data against β and claims nothing the data does not show.
``seed_spread`` takes ``flow_summary`` rows at init and, per (model, block,
norm, depth, width), gives the standard deviation over seeds (ddof 1) of
ln ``first_to_last`` (``log_ratio_std``, NaN with fewer than
``MIN_SPREAD_SEEDS`` (2) usable seeds) and its mean; seeds whose ratio is
exactly 0 (``n_zero``) or not finite (``n_nonfinite``: 0/0, inf, diverged,
n/a) are left out of both and counted, never passed to a log. ``spread_trend``
gives, per (model, block, norm), the Spearman rank correlation between
``beta`` and ``log_ratio_std`` over its networks with a spread (``rho``, NaN
with fewer than ``MIN_TREND_POINTS`` (3) networks or no variation): positive
means the networks with larger β (narrower, or deeper) fluctuate more; the
report calls |rho| >= ``CLEAR_RHO`` (0.5) a clear rise or fall and anything
less no clear relation.

No direction is assumed: BatchNorm nets without skips typically explode
toward the input at init (Yang et al. 2019); nets without normalisation
vanish (Glorot & Bengio 2010). The verdict says what the numbers say.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from gradlab import schema
from gradlab.schema import (
    DEFAULT_MODEL,
    DIVERGED,
    DIVERGED_FIELDS,
    MODEL_LAYER,
    PHASES,
    PHASE_WORDS,
    first_nonfinite,
    NOTEBOOK_WIDTH,
    norm_words,
    stack_block,
)

END_STEPS = 3  # the end phase is the median of this many last recorded steps
EXPLODING_RATIO = 10.0  # first_to_last at or above: exploding
VANISHING_RATIO = 0.1  # first_to_last at or below: vanishing
VERDICTS = (DIVERGED, "non-finite", "exploding", "vanishing", "stable", "n/a")  # also the tie-break order
DIVERGENCE_COLUMNS = ["run", *DIVERGED_FIELDS, "source"]  # source: "summary" or "records"
BLOCK_ORDER = ("conv", "res", "resdown", "skip")  # display order; other block types follow by name
STACK = "stack"  # the role of the blocks whose gradient flow is compared

RUN_KEYS = list(schema.RUN_KEYS)
LAYER_KEYS = list(schema.LAYER_KEYS)
VALUE_COLUMNS = [*RUN_KEYS, *LAYER_KEYS, "metric", "value"]
GROUP_KEYS = ["model", "block", "norm", "depth", "width"]  # a depth-scaling cell: its runs differ by seed only
NETWORK_KEYS = ["model", "block", "norm"]  # what a line of a depth or width figure is drawn for
MIN_SPREAD_SEEDS = 2  # usable seeds a standard deviation needs
MIN_TREND_POINTS = 3  # networks with a spread a rank correlation needs
DIRECTIONS = ("wider", "deeper")
CLEAR_RHO = 0.5  # |Spearman rho| from here on: the spread clearly rises or falls with beta

PROFILE_COLUMNS = [*RUN_KEYS, *LAYER_KEYS, "value", "relative"]
FLOW_COLUMNS = [
    "run", "phase", *RUN_KEYS[1:],
    "first_grad", "last_grad", "first_to_last", "gain_geomean", "log_slope", "verdict",
]
SCALING_COLUMNS = [
    "phase", *GROUP_KEYS, "n_params", "beta", "n_seeds", "n_failed", "n_diverged", "n_ratios",
    "test_acc_mean", "test_acc_std", "best_val_acc_mean", "best_val_acc_std",
    "final_train_acc_mean", "final_train_acc_std",
    "first_to_last", "first_to_last_gstd", "gain_geomean", "gain_geomean_gstd",
    "log_slope_mean", "log_slope_std", "verdict",
]
ACTIVATION_METRICS = ["act_chan_mean_sq", "act_chan_var", "branch_chan_var", "skip_chan_var"]
SHARE_COLUMNS = [
    *RUN_KEYS, *LAYER_KEYS,
    "grad_in_branch_norm", "grad_in_skip_norm", "branch_share", "skip_to_branch",
]
LAYER_TABLE_METRICS = [
    "grad_out_norm", "grad_in_norm", "grad_gain", "act_std", "param_grad_norm", "update_ratio",
]
LAYER_TABLE_COLUMNS = [
    *LAYER_KEYS, "grad_out_norm", "grad_in_norm", "grad_gain",
    "relative", "act_std", "param_grad_norm", "update_ratio",
]
ACCURACIES = ["test_acc", "best_val_acc", "final_train_acc"]
CHANCE = 0.1  # accuracy of a guess among ten classes (CIFAR-10, and the synthetic set)
CHANCE_MARGIN = 0.03  # an accuracy within 3 points of chance is "at chance"
SHORT_BUDGET_STEPS = 500  # fewer optimizer steps: too short a budget to tell whether a network can learn
WIDTH_DEPTH_COLUMNS = [*NETWORK_KEYS, "direction", "depth", "width", "n_params", "beta", "n_seeds",
                       "test_acc_mean", "test_acc_std"]
WIDTH_EFFECT_COLUMNS = ["phase", *NETWORK_KEYS, "depth", "n_widths", "narrow", "wide", "ratio_narrow", "ratio_wide",
                        "n_zero_widths", "n_seeds"]
SPREAD_COLUMNS = [*GROUP_KEYS, "n_params", "beta", "n_seeds", "n_zero", "n_nonfinite", "n_used",
                  "log_ratio_mean", "log_ratio_std"]
TREND_COLUMNS = [*NETWORK_KEYS, "n_networks", "rho"]
BUDGET_ACCURACIES = ("test_acc", "final_train_acc")  # what training_budget can test for chance
BUDGET_COLUMNS = [*RUN_KEYS, "status", "epochs_done", "steps", "train_images", "test_acc", "final_train_acc",
                  "at_chance", "short_budget"]



# ---------------------------------------------------------------- helpers


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {list(PHASES)}")


def _check_records(records: pd.DataFrame) -> None:
    """Refuse legacy records (a ``block`` kind, no role): their stack is not described."""
    if "role" not in records.columns and {"layer", "position"} <= set(records.columns):
        raise ValueError(
            "records without a role column (the legacy format of gradlab <= 0.3: a block kind instead of "
            "role, stack_index and module_type); read them with gradlab.load_run or gradlab.load_sweep, "
            "which upgrade them")


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=list(columns))


def _with_columns(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Add any missing column as NaN (a missing metric or run field is not an error)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        df = df.assign(**{c: np.nan for c in missing})
    return df


def _stack_index(values: pd.DataFrame) -> pd.Series:
    """The stack_index of the stack rows (role ``stack``, index >= 0); NaN for every other row."""
    index = pd.to_numeric(values["stack_index"], errors="coerce")
    return index.where((values["role"] == STACK) & (index >= 0))


def _last_in_stack(values: pd.DataFrame) -> pd.Series:
    """True on the rows at their run's last stack block (its highest stack_index)."""
    index = _stack_index(values)
    return index.notna() & (index == index.groupby(values["run"]).transform("max"))


def _rank(values: pd.Series, first: Sequence[str]) -> pd.Series:
    """A sort key: the values in ``first`` in that order, every other value after them by name."""
    text = values.astype(str)
    order = [*first, *sorted(set(text) - set(first))]
    return text.map({v: i for i, v in enumerate(order)})


def sort_by_block(df: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """``df`` sorted by the columns ``by``; block in BLOCK_ORDER and model deepcnn first, the
    other block types and models after them by name."""
    if df.empty:
        return df
    ranks = {"block": BLOCK_ORDER, "model": (DEFAULT_MODEL,)}
    keyed = df.assign(**{f"_{c}_rank": _rank(df[c], ranks[c]) for c in by if c in ranks})
    keys = [f"_{c}_rank" if c in ranks else c for c in by]
    return keyed.sort_values(keys, kind="stable").drop(columns=[k for k in keys if k.startswith("_")])


def network_label(row: Mapping | pd.Series) -> str:
    """The network of a run in words: its block type ("res"), and the model unless it is a DeepCNN
    ("torchvision:resnet18, BasicBlock")."""
    model, block = row.get("model"), row.get("block")
    block = str(block) if block is not None and pd.notna(block) else "?"
    if model is None or pd.isna(model) or model == DEFAULT_MODEL:
        return block
    return f"{model}, {block}"


def _stack_keys(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run with stack rows: ``depth`` (its distinct stack_index values) and ``block`` (its
    module types in stack order, ``schema.stack_block``)."""
    index = _stack_index(rows)
    stack = rows.assign(_index=index).dropna(subset=["_index"]).sort_values(["run", "_index"], kind="stable")
    grouped = stack.groupby("run", sort=False)
    return pd.DataFrame({"depth": grouped["_index"].nunique(), "block": grouped["module_type"].agg(stack_block)})


def _fill_run_keys(frame: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``depth`` and ``block`` where not recorded taken from the stack rows in
    ``rows`` (module docstring): depth 0 and block ``schema.UNKNOWN`` for a run without a stack."""
    missing_depth, missing_block = frame["depth"].isna(), frame["block"].isna()
    if not (missing_depth.any() or missing_block.any()):
        return frame
    keys = _stack_keys(rows)
    depth = pd.to_numeric(frame["run"].map(keys["depth"]), errors="coerce").fillna(0).astype(int)
    block = frame["run"].map(keys["block"]).astype(object).fillna(schema.UNKNOWN)
    return frame.assign(depth=frame["depth"].where(~missing_depth, depth),
                        block=frame["block"].astype(object).where(~missing_block, block))


def network_labels(frame: pd.DataFrame) -> pd.Series:
    """``network_label`` of every row of ``frame`` (columns ``block`` and, optionally, ``model``)."""
    pairs = frame.reindex(columns=["model", "block"]).astype(object)
    labels = [network_label({"model": m, "block": b}) for m, b in zip(pairs["model"], pairs["block"])]
    return pd.Series(labels, index=frame.index, dtype=object)


def run_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per run with ``RUN_KEYS`` as recorded (depth and block from the stack when not
    recorded; other missing keys NaN)."""
    if records.empty or "run" not in records.columns:
        return _empty(RUN_KEYS)
    present = [c for c in RUN_KEYS[1:] if c in records.columns]
    meta = records.groupby("run", observed=True, sort=True)[present].first().reset_index()
    meta = _with_columns(meta, RUN_KEYS)
    if meta["depth"].isna().any() or meta["block"].isna().any():
        stack = _with_columns(records, LAYER_KEYS)
        stack = stack.loc[stack["role"] == STACK, ["run", *LAYER_KEYS]].drop_duplicates(["run", "stack_index"])
        meta = _fill_run_keys(meta, stack)
    return meta[RUN_KEYS]


def phase_values(records: pd.DataFrame, phase: str, metrics: Sequence[str]) -> pd.DataFrame:
    """One value per (run, layer, metric) for ``phase`` (see the module docstring).

    Returns a long frame with columns ``VALUE_COLUMNS``. Metrics that were not
    recorded simply have no rows. ``depth`` and ``block``, when not recorded,
    come from the run's stack rows.
    """
    _check_phase(phase)
    if records.empty or "metric" not in records.columns:
        return _empty(VALUE_COLUMNS)
    _check_records(records)
    df = records.loc[records["metric"].isin(list(metrics))]
    if df.empty:
        return _empty(VALUE_COLUMNS)
    df = _with_columns(df, ["step", "epoch", *LAYER_KEYS[1:], *RUN_KEYS[1:]])
    by_run_metric = df.groupby(["run", "metric"], observed=True, sort=False)["step"]
    if phase == "init":
        df = df.loc[df["step"] == by_run_metric.transform("min")]
    elif phase == "epoch1":
        df = df.loc[df["epoch"] == 0]
    else:
        newest = by_run_metric.rank(method="dense", ascending=False)
        df = df.loc[newest <= END_STEPS]
    if df.empty:
        return _empty(VALUE_COLUMNS)

    values = (
        df.groupby(["run", "layer", "metric"], observed=True, sort=False)["value"]
        .median()
        .reset_index()
    )
    layer_meta = (
        df.groupby(["run", "layer"], observed=True, sort=False)[LAYER_KEYS[1:]]
        .first()
        .reset_index()
    )
    run_meta = (
        df.groupby("run", observed=True, sort=False)[RUN_KEYS[1:]].first().reset_index()
    )
    out = values.merge(layer_meta, on=["run", "layer"], how="left").merge(
        run_meta, on="run", how="left"
    )
    for column in ("run", "layer", "metric"):
        out[column] = out[column].astype(str)
    return _fill_run_keys(out, out)[VALUE_COLUMNS].reset_index(drop=True)


def _relative_to_last(values: pd.DataFrame) -> pd.Series:
    """``value`` divided by the value at the run's last stack block."""
    last = values.loc[_last_in_stack(values)].drop_duplicates("run").set_index("run")["value"]
    with np.errstate(divide="ignore", invalid="ignore"):
        return values["value"] / values["run"].map(last)


def _probe_rows(values: pd.DataFrame) -> pd.DataFrame:
    """``values`` without the per-step model rows."""
    return values.loc[values["role"] != MODEL_LAYER]


# ---------------------------------------------------------------- divergence


def divergence(records: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per diverged run: ``DIVERGENCE_COLUMNS`` (see the module docstring).

    A run whose ``runs`` status is "diverged" takes step, epoch, layer, position and cause
    from the ``diverged_*`` columns (source "summary"); when they are missing, from its
    records (source "records", by ``schema.first_nonfinite``); when those show nothing either,
    the fields are NaN. A run with non-finite records but another status is found from its
    records.
    """
    found = _empty(DIVERGENCE_COLUMNS)
    if not records.empty and "run" in records.columns:
        first = first_nonfinite(records, by=("run",))
        if not first.empty:
            found = first.assign(run=first["run"].astype(str), source="records")[DIVERGENCE_COLUMNS]
    if runs is None or runs.empty or "status" not in runs.columns:
        return found
    flagged = runs.loc[runs["status"].astype(str) == DIVERGED]
    if flagged.empty:
        return found
    fields = {f"diverged_{f}": f for f in DIVERGED_FIELDS}
    reported = _with_columns(flagged, fields).rename(columns=fields)
    reported = reported.assign(run=reported["run"].astype(str), source="summary")[DIVERGENCE_COLUMNS]
    known = reported["step"].notna()
    from_records = found["run"].isin(reported.loc[~known, "run"])
    unknown = reported.loc[~known & ~reported["run"].isin(found["run"])]
    others = found.loc[~found["run"].isin(reported["run"])]
    parts = [f for f in (reported.loc[known], found.loc[from_records], unknown, others) if not f.empty]
    if not parts:
        return _empty(DIVERGENCE_COLUMNS)
    out = pd.concat(parts, ignore_index=True).sort_values("run", kind="stable")
    return out[DIVERGENCE_COLUMNS].reset_index(drop=True)


def diverged_verdict(row: Mapping | pd.Series) -> str:
    """"diverged at step 12 (layer layers.3)", "(loss)" for the loss, "diverged" without a step."""
    step, layer, cause = row.get("step"), row.get("layer"), row.get("cause")
    if step is None or pd.isna(step):
        return DIVERGED
    where = "loss" if cause == "loss" else f"layer {layer}" if layer is not None and pd.notna(layer) else cause
    return f"{DIVERGED} at step {int(step)}" + (f" ({where})" if where is not None and pd.notna(where) else "")


def _is_diverged(verdict: pd.Series) -> pd.Series:
    return verdict.astype(str).str.startswith(DIVERGED)


# ---------------------------------------------------------------- profiles


def gradient_profile(
    records: pd.DataFrame, phase: str = "init", metric: str = "grad_out_norm"
) -> pd.DataFrame:
    """The whole gradient path of each run: stem, blocks and head, in forward order.

    Columns ``PROFILE_COLUMNS``: run keys, ``layer, position, role, stack_index,
    module_type``, the phase-aggregated ``value`` of ``metric`` and ``relative`` =
    value / value at the run's last stack block (NaN for a run without a stack).
    Stem and head rows keep their position and are normalised by the same last
    block. The ``model`` rows are left out.
    """
    values = _probe_rows(phase_values(records, phase, [metric]))
    if values.empty:
        return _empty(PROFILE_COLUMNS)
    values = values.assign(relative=_relative_to_last(values))
    return values.sort_values(["run", "position"], kind="stable")[PROFILE_COLUMNS].reset_index(
        drop=True
    )


def activation_profile(records: pd.DataFrame, phase: str = "init") -> pd.DataFrame:
    """Per run and position: ``act_chan_mean_sq, act_chan_var`` and, for residual
    blocks, ``branch_chan_var, skip_chan_var`` (long format: ``metric, value``)."""
    values = _probe_rows(phase_values(records, phase, ACTIVATION_METRICS))
    if values.empty:
        return _empty(VALUE_COLUMNS)
    return values.sort_values(["run", "position", "metric"], kind="stable").reset_index(drop=True)


def branch_skip_share(records: pd.DataFrame, phase: str = "init") -> pd.DataFrame:
    """How the input gradient of each residual block splits between branch and skip.

    ``branch_share = b² / (b² + s²)`` with ``b = grad_in_branch_norm`` and
    ``s = grad_in_skip_norm``: 1 means the gradient reaching the block input
    comes all through the branch, 0 all through the skip. The two parts are
    not orthogonal in general (‖b + s‖² ≠ b² + s²), so this is a share of the
    squared part norms, not of the total; the raw norms and ``skip_to_branch
    = s / b`` are given too. 0/0 gives NaN, s/0 gives inf. Only blocks that
    recorded these metrics (residual blocks: res and resdown in a DeepCNN) appear.
    """
    parts = ["grad_in_branch_norm", "grad_in_skip_norm"]
    values = phase_values(records, phase, parts)
    if values.empty:
        return _empty(SHARE_COLUMNS)
    wide = values.pivot(index=["run", "layer"], columns="metric", values="value")
    wide = _with_columns(wide.reset_index(), parts)
    meta = values.drop_duplicates(["run", "layer"])[[*RUN_KEYS, *LAYER_KEYS]]
    out = meta.merge(wide, on=["run", "layer"], how="left")
    branch, skip = out["grad_in_branch_norm"], out["grad_in_skip_norm"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["branch_share"] = branch**2 / (branch**2 + skip**2)
        out["skip_to_branch"] = skip / branch
    return out.sort_values(["run", "position"], kind="stable")[SHARE_COLUMNS].reset_index(drop=True)


def layer_table(records: pd.DataFrame, run: str, phase: str = "init") -> pd.DataFrame:
    """The per-layer gradient-flow table of one run, in forward order.

    Columns ``LAYER_TABLE_COLUMNS`` (the probe point's layer, role, stack_index,
    module_type and position, then the metrics); ``relative`` is grad_out_norm
    relative to the last stack block. A metric the run did not record (``update_ratio`` without
    an optimizer) is a NaN column. Raises ValueError for a run not in
    ``records`` (unless ``records`` is empty: then the table is empty).
    """
    _check_phase(phase)
    if records.empty or "run" not in records.columns:
        return _empty(LAYER_TABLE_COLUMNS)
    mine = records.loc[records["run"] == run]
    if mine.empty:
        known = sorted(map(str, pd.unique(records["run"])))
        raise ValueError(f"unknown run {run!r}; known: {known}")
    values = _probe_rows(phase_values(mine, phase, LAYER_TABLE_METRICS))
    if values.empty:
        return _empty(LAYER_TABLE_COLUMNS)
    wide = values.pivot(index="layer", columns="metric", values="value").reset_index()
    meta = values.drop_duplicates("layer")[[*LAYER_KEYS, "run"]]
    table = _with_columns(meta.merge(wide, on="layer", how="left"), LAYER_TABLE_METRICS)
    table["relative"] = _relative_to_last(table.assign(value=table["grad_out_norm"]))
    table = table.sort_values("position", kind="stable")
    return table[LAYER_TABLE_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------- flow summary


def _verdicts(first: np.ndarray, last: np.ndarray, has_pair: np.ndarray):
    """(first_to_last, verdict) arrays by the rule in the module docstring."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = first / last
        non_finite = ~np.isfinite(first) | ~np.isfinite(last)
        both_zero = (first == 0) & (last == 0)  # vanished to 0 before reaching the blocks: a result
        verdict = np.select(
            [~has_pair, non_finite, both_zero, ratio >= EXPLODING_RATIO, ratio <= VANISHING_RATIO],
            ["n/a", "non-finite", "vanishing", "exploding", "vanishing"],
            default="stable",
        )
    return np.where(has_pair & ~non_finite & ~both_zero, ratio, np.nan), verdict.astype(object)


def _geometric_mean_by_run(values: pd.DataFrame) -> pd.Series:
    """exp(mean ln value) per run; a NaN value makes its run's mean NaN, unless a value is
    exactly 0: the product is then 0 whatever the others (0/0 gains of vanished blocks)."""
    raw = values["value"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = pd.Series(np.log(raw), index=values["run"].to_numpy())
    by_run = logs.groupby(level=0, sort=False)
    mean = by_run.mean().where(~logs.isna().groupby(level=0, sort=False).any())
    zero = pd.Series(raw == 0, index=logs.index).groupby(level=0, sort=False).any()
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp(mean).mask(zero, 0.0)


def _log_slope_by_run(norms: pd.DataFrame) -> pd.Series:
    """Least-squares slope of log10 value against stack_index (the ``index`` column), per run.

    NaN unless the run has at least 2 blocks and every log10 is finite.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log10(norms["value"].to_numpy(float))
    points = pd.DataFrame({"x": norms["index"].to_numpy(float), "y": y, "finite": np.isfinite(y)})
    run = norms["run"].to_numpy()
    means = points[["x", "y"]].groupby(run, sort=False).transform("mean")
    with np.errstate(invalid="ignore"):
        dx, dy = points["x"] - means["x"], points["y"] - means["y"]
        points["sxy"], points["sxx"] = dx * dy, dx * dx
    sums = points.groupby(run, sort=False).agg(
        sxy=("sxy", "sum"), sxx=("sxx", "sum"), n=("x", "size"), finite=("finite", "all")
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sums["sxy"] / sums["sxx"]).where((sums["n"] >= 2) & sums["finite"])


def _diverged_in_phase(run: pd.Series, records: pd.DataFrame, phase: str, diverged: pd.DataFrame) -> pd.Series:
    """Whether each run had diverged by the end of ``phase``: at or before its first recorded
    gradient step (init), within epoch 0 (epoch1), at any time (end)."""
    info = diverged.drop_duplicates("run").set_index("run")
    known = run.isin(info.index)
    step = pd.to_numeric(run.map(info["step"]), errors="coerce")
    if phase == "end":
        return known
    gradients = _with_columns(records.loc[records["metric"] == "grad_out_norm"], ["step", "epoch"])
    if phase == "init":
        first = gradients.groupby("run", observed=True)["step"].min()
        return known & (step <= pd.to_numeric(run.map(first), errors="coerce"))
    last = gradients.loc[gradients["epoch"] == 0].groupby("run", observed=True)["step"].max()
    epoch = pd.to_numeric(run.map(info["epoch"]), errors="coerce")
    return known & ((epoch == 0) | (step <= pd.to_numeric(run.map(last), errors="coerce")))


def _flow_phase(records: pd.DataFrame, phase: str, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """``FLOW_COLUMNS`` for one phase: one row per run that recorded gradients."""
    values = _probe_rows(phase_values(records, phase, ["grad_out_norm", "grad_gain"]))
    if values.empty:
        return _empty(FLOW_COLUMNS)
    index = _stack_index(values)
    blocks = values.assign(index=index).loc[index.notna()]
    size = blocks.groupby("run")["index"].max() + 1  # the stack's length: its last index over both metrics
    norms = blocks.loc[blocks["metric"] == "grad_out_norm"]
    first = norms.loc[norms["index"] == 0].set_index("run")["value"]
    last = norms.loc[norms["index"] == pd.to_numeric(norms["run"].map(size)) - 1].set_index("run")["value"]

    out = values.drop_duplicates("run")[RUN_KEYS].reset_index(drop=True)
    out.insert(1, "phase", phase)
    out["first_grad"] = out["run"].map(first)
    out["last_grad"] = out["run"].map(last)
    has_pair = out["run"].isin(first.index) & out["run"].isin(last.index)
    has_pair &= pd.to_numeric(out["run"].map(size)) >= 2
    out["first_to_last"], out["verdict"] = _verdicts(
        out["first_grad"].to_numpy(float), out["last_grad"].to_numpy(float), has_pair.to_numpy()
    )
    gains = blocks.loc[blocks["metric"] == "grad_gain"]
    out["gain_geomean"] = out["run"].map(_geometric_mean_by_run(gains))
    out["log_slope"] = out["run"].map(_log_slope_by_run(norms))
    if diverged is not None and not diverged.empty:
        hit = _diverged_in_phase(out["run"], records, phase, diverged).to_numpy(bool)
        if hit.any():
            info = diverged.drop_duplicates("run").set_index("run")
            out.loc[hit, ["first_to_last", "gain_geomean", "log_slope"]] = np.nan
            out.loc[hit, "verdict"] = [diverged_verdict(info.loc[r]) for r in out.loc[hit, "run"]]
    return out[FLOW_COLUMNS]


def first_to_last_by_step(records: pd.DataFrame) -> pd.DataFrame:
    """``run, step, first_to_last`` at every recorded step: the flow summary's headline ratio
    taken one step at a time (no phase median), for views that follow a run as it trains, such
    as TensorBoard. NaN where the flow summary's would be (0/0, a non-finite norm); runs without
    two stack blocks have no rows. Records without a ``run`` column are one run named ""."""
    norms = records.loc[records["metric"] == "grad_out_norm"]
    if "run" not in norms:
        norms = norms.assign(run="")
    index = _stack_index(norms)
    blocks = norms.assign(index=index).loc[index.notna()]
    last_index = blocks.groupby("run")["index"].transform("max")
    blocks = blocks.loc[last_index >= 1]
    last_index = last_index.loc[blocks.index]
    first = blocks.loc[blocks["index"] == 0].set_index(["run", "step"])["value"]
    last = blocks.loc[blocks["index"] == last_index].set_index(["run", "step"])["value"]
    pair = pd.concat({"first": first, "last": last}, axis=1, join="inner")
    ratio, _ = _verdicts(pair["first"].to_numpy(float), pair["last"].to_numpy(float), np.ones(len(pair), bool))
    return pair.index.to_frame(index=False).assign(first_to_last=ratio)


def flow_summary(
    records: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    phases: Sequence[str] = PHASES,
    diverged: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (run, phase): ``FLOW_COLUMNS`` (see the module docstring).

    ``first_grad`` and ``last_grad`` are the raw grad_out_norm at stack_index 0
    and at the last stack_index. When ``runs`` is given, its other columns (width,
    status, accuracies, ...) are joined on ``run``. A run without gradient
    records has no row here (``depth_scaling`` still counts it).
    ``diverged`` (the ``divergence`` frame) is computed from ``records`` and
    ``runs`` when not given; pass it when ``records`` holds only some steps.
    """
    for phase in phases:
        _check_phase(phase)
    if diverged is None:
        diverged = divergence(records, runs)
    if not records.empty and "metric" in records.columns:
        records = records.loc[records["metric"].isin(["grad_out_norm", "grad_gain"])]
    frames = [_flow_phase(records, phase, diverged) for phase in phases]
    frames = [f for f in frames if not f.empty]
    flow = pd.concat(frames, ignore_index=True) if frames else _empty(FLOW_COLUMNS)
    if runs is not None and not runs.empty:
        extra = [c for c in runs.columns if c not in FLOW_COLUMNS]
        runs_extra = runs[["run", *extra]].assign(run=runs["run"].astype(str))
        flow = flow.merge(runs_extra, on="run", how="left")
    elif runs is not None:
        flow = _with_columns(flow, [c for c in runs.columns if c not in FLOW_COLUMNS])
    if flow.empty:
        return flow
    phase_rank = flow["phase"].map({p: i for i, p in enumerate(PHASES)})
    flow = flow.assign(_phase=phase_rank).sort_values(["run", "_phase"], kind="stable")
    return flow.drop(columns="_phase").reset_index(drop=True)


def _format_factor(x: float) -> str:
    """A ratio for a sentence: 438, 1.3, 0.53, 4.1e+03, 2.0e-05."""
    if 0.01 <= abs(x) < 1000:
        return f"{x:.3g}"
    return f"{x:.1e}"


def describe_flow(row: Mapping | pd.Series) -> str:
    """One plain sentence from one ``flow_summary`` row, e.g.

    "conv, depth 32 (batch norm) at initialisation: the gradient grows
    4.1e+03× from the last block to the first (×1.3 per block) — exploding."

    A model other than the DeepCNN is named before its block type
    ("torchvision:resnet18, BasicBlock, depth 8 (batch norm) at initialisation: ...").
    """
    depth, norm = row.get("depth"), row.get("norm")
    phase = row.get("phase", "init")
    depth_text = f"depth {int(depth)}" if pd.notna(depth) else "depth ?"
    norm_text = f" ({norm_words(norm)})" if pd.notna(norm) else ""
    subject = f"{network_label(row)}, {depth_text}{norm_text} {PHASE_WORDS.get(phase, phase)}"
    verdict = row.get("verdict", "n/a")
    ratio = row.get("first_to_last", np.nan)
    gain = row.get("gain_geomean", np.nan)
    first, last = row.get("first_grad", np.nan), row.get("last_grad", np.nan)
    per_block = f"×{_format_factor(gain)} per block" if np.isfinite(gain) else ""

    if str(verdict).startswith(DIVERGED):
        return f"{subject}: the run {verdict}, so its gradients give no ratio — {DIVERGED}."
    if verdict == "n/a":
        blocks = "no blocks" if depth == 0 else "too few blocks to compare first and last"
        tail = f" ({per_block})" if per_block else ""
        return f"{subject}: {blocks}{tail} — n/a."
    if verdict == "non-finite":
        return (
            f"{subject}: the gradient norms at the first and last blocks are "
            f"{first:g} and {last:g}, so they give no ratio — non-finite."
        )
    if first == 0 and last == 0:
        return (
            f"{subject}: the gradient is exactly 0 at the first and at the last block: it "
            "vanished to 0 before it reached the blocks — vanishing."
        )
    if ratio == 0:
        return (
            f"{subject}: the gradient underflows to exactly 0 at the first block "
            f"(last block {last:.2g}) — vanishing."
        )
    if np.isinf(ratio):
        return (
            f"{subject}: the gradient is exactly 0 at the last block but "
            f"{first:.2g} at the first — exploding."
        )
    rate = f" ({per_block})" if per_block else ""
    if verdict == "exploding":
        change, band = f"grows {_format_factor(ratio)}×", ""
    elif verdict == "vanishing":
        change, band = f"shrinks to {_format_factor(ratio)}×", ""
    else:
        change = f"changes only ×{_format_factor(ratio)}"
        band = f", within {_format_factor(VANISHING_RATIO)}–{_format_factor(EXPLODING_RATIO)}×"
    path = "from the last block to the first"
    return f"{subject}: the gradient {change} {path}{rate}{band} — {verdict}."


# ---------------------------------------------------------------- sweeps


def depth_scaling(
    records: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    phase: str = "init",
    diverged: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per (model, block, norm, depth): accuracy and gradient flow over seeds.

    Columns ``SCALING_COLUMNS``. Accuracies: mean and sample std (ddof=1, NaN
    for one seed) over the seeds' runs, NaN accuracies skipped.
    ``first_to_last`` and ``gain_geomean`` are ratios, so they are geometric
    means over seeds with ``*_gstd`` the geometric standard deviation factor
    exp(std ln x) (≥ 1); ``log_slope`` is already a log, so arithmetic
    mean/std. NaN ratios (diverged, 0/0 or n/a seeds) are skipped, and
    ``n_ratios`` counts the seeds whose ratio entered the mean (0: the cell has
    no ratio to show); a ratio of 0 makes the geometric mean 0. ``verdict`` is
    the verdict of every seed when they agree, else the most common one with
    its count, e.g. "exploding (2/3)" (ties broken in ``VERDICTS`` order;
    seeds without records do not vote). Diverged seeds vote "diverged": one
    such seed shows its own verdict ("diverged at step 5 (layer layers.2)"),
    several "diverged (2/3), first at step 5 (layer layers.2)". ``n_seeds``
    counts the group's runs, ``n_failed`` their failed status, ``n_diverged``
    the runs in ``diverged`` (the ``divergence`` frame, computed from
    ``records`` and ``runs`` when not given). Without ``runs`` the run fields
    come from ``records`` (accuracies NaN).
    """
    _check_phase(phase)
    if runs is None:
        runs = run_table(records)
    if runs.empty:
        return _empty(SCALING_COLUMNS)
    if diverged is None:
        diverged = divergence(records, runs)
    if not records.empty and "metric" in records.columns:
        records = records.loc[records["metric"].isin(["grad_out_norm", "grad_gain"])]
    flow = _flow_phase(records, phase, diverged)
    flow = flow[["run", "first_to_last", "gain_geomean", "log_slope", "verdict"]]
    table = _with_columns(runs, [*GROUP_KEYS, "status", *ACCURACIES, "n_params", "beta"])
    table = table.assign(run=table["run"].astype(str)).merge(flow, on="run", how="left")
    status = table["status"].astype(object)
    with np.errstate(divide="ignore", invalid="ignore"):
        table = table.assign(
            _log_ratio=np.log(pd.to_numeric(table["first_to_last"]).to_numpy(float)),
            _log_gain=np.log(pd.to_numeric(table["gain_geomean"]).to_numpy(float)),
            _failed=(status == "failed").astype(int),
            _diverged=((status == DIVERGED) | table["run"].isin(diverged["run"])).astype(int),
            _diverged_step=table["run"].map(diverged.drop_duplicates("run").set_index("run")["step"]),
            log_slope=pd.to_numeric(table["log_slope"]),
            n_params=pd.to_numeric(table["n_params"], errors="coerce"),
            beta=pd.to_numeric(table["beta"], errors="coerce"),
            **{a: pd.to_numeric(table[a], errors="coerce") for a in ACCURACIES},
        )
    keys = GROUP_KEYS
    aggregations = {
        "n_seeds": ("run", "count"),
        "n_failed": ("_failed", "sum"),
        "n_diverged": ("_diverged", "sum"),
        "n_ratios": ("_log_ratio", "count"),
        "n_params": ("n_params", "median"),
        "beta": ("beta", "median"),
        "_log_ratio_mean": ("_log_ratio", "mean"),
        "_log_ratio_std": ("_log_ratio", "std"),
        "_log_gain_mean": ("_log_gain", "mean"),
        "_log_gain_std": ("_log_gain", "std"),
        "log_slope_mean": ("log_slope", "mean"),
        "log_slope_std": ("log_slope", "std"),
    }
    for accuracy in ACCURACIES:
        aggregations[f"{accuracy}_mean"] = (accuracy, "mean")
        aggregations[f"{accuracy}_std"] = (accuracy, "std")
    with np.errstate(invalid="ignore", over="ignore"):
        out = table.groupby(keys, observed=True, dropna=False).agg(**aggregations).reset_index()
        out["first_to_last"] = np.exp(out["_log_ratio_mean"])
        out["first_to_last_gstd"] = np.exp(out["_log_ratio_std"])
        out["gain_geomean"] = np.exp(out["_log_gain_mean"])
        out["gain_geomean_gstd"] = np.exp(out["_log_gain_std"])
    out["phase"] = phase
    out = out.merge(_majority_verdict(table, keys), on=keys, how="left")
    return sort_by_block(out, keys)[SCALING_COLUMNS].reset_index(drop=True)


def _majority_verdict(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The seeds' common verdict per group, or "<most common> (k/n)" when they disagree."""
    voters = table.loc[table["verdict"].notna()]
    if voters.empty:
        return _empty([*keys, "verdict"])
    # the earliest divergence of each group speaks for its diverged seeds
    voters = voters.sort_values("_diverged_step", kind="stable", na_position="last")
    is_diverged = _is_diverged(voters["verdict"])
    first = voters.loc[is_diverged].drop_duplicates(keys)[[*keys, "verdict"]].rename(columns={"verdict": "_first"})
    voters = voters.assign(verdict=voters["verdict"].mask(is_diverged, DIVERGED))
    votes = voters.groupby([*keys, "verdict"], observed=True, dropna=False).size()
    votes = votes.rename("votes").reset_index()
    votes["total"] = votes.groupby(keys, observed=True, dropna=False)["votes"].transform("sum")
    rank = {v: i for i, v in enumerate(VERDICTS)}
    votes["order"] = votes["verdict"].map(rank).fillna(len(VERDICTS))
    votes = votes.sort_values(
        [*keys, "votes", "order"], ascending=[*[True] * len(keys), False, True], kind="stable"
    )
    top = votes.drop_duplicates(keys).copy()
    split = top["votes"] < top["total"]
    share = top["votes"].astype(str) + "/" + top["total"].astype(str)
    counted = top["verdict"] + " (" + share + ")"
    top["verdict"] = counted.where(split, top["verdict"])
    top = top.merge(first, on=keys, how="left")
    diverged_top = _is_diverged(top["verdict"]) & top["_first"].notna()
    if diverged_top.any():
        where = top["_first"].astype(str).str.removeprefix(DIVERGED).str.strip()
        several = pd.Series(DIVERGED + " (" + share.to_numpy() + ")", index=top.index)
        several = several.where(where == "", several + ", first " + where)
        alone = top["total"] == 1
        top["verdict"] = top["verdict"].mask(diverged_top & alone, top["_first"])
        top["verdict"] = top["verdict"].mask(diverged_top & ~alone, several)
    return top[[*keys, "verdict"]]


# ---------------------------------------------------------------- training budget


def training_budget(runs: pd.DataFrame, chance: float | None = None, metric: str = "test_acc") -> pd.DataFrame:
    """Per run: what it trained for and whether its accuracy can say anything yet.

    Columns ``BUDGET_COLUMNS``: the run keys, ``status``, ``epochs_done``, ``steps``,
    ``train_images`` (NaN where the runs table does not hold them), the test and final train
    accuracy, ``at_chance`` (the ``metric`` accuracy, test by default, lies within
    ``CHANCE_MARGIN`` of ``chance``, default ``CHANCE``) and ``short_budget`` (fewer than
    ``SHORT_BUDGET_STEPS`` steps). An unknown accuracy is not at chance and an unknown budget is
    not short: nothing is claimed that the runs table does not hold.
    """
    if metric not in BUDGET_ACCURACIES:
        raise ValueError(f"unknown accuracy {metric!r}; known: {list(BUDGET_ACCURACIES)}")
    chance = CHANCE if chance is None else chance
    table = _with_columns(runs, BUDGET_COLUMNS[:-2])
    accuracy = pd.to_numeric(table[metric], errors="coerce")
    steps = pd.to_numeric(table["steps"], errors="coerce")
    return table.assign(at_chance=(accuracy - chance).abs() <= CHANCE_MARGIN,
                        short_budget=steps < SHORT_BUDGET_STEPS)[BUDGET_COLUMNS].reset_index(drop=True)


def settled_accuracies(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with ``final_train_acc`` blanked (NaN) for runs still running: theirs is the
    train accuracy of the latest epoch a checkpoint holds, not of their budget's last epoch, so
    comparing it across depths would compare budgets. Test accuracy is only written at the end."""
    if "final_train_acc" not in runs or "status" not in runs:
        return runs
    running = runs["status"].astype(str) == "running"
    return runs.assign(final_train_acc=pd.to_numeric(runs["final_train_acc"], errors="coerce").mask(running))


# ---------------------------------------------------------------- width against depth


def _base_value(counts: pd.Series, prefer=None):
    """The index value with the highest count; ties: ``prefer`` when tied, else the smallest."""
    top = counts.loc[counts == counts.max()].index
    return prefer if prefer is not None and prefer in set(top) else min(top)


def base_network(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, block, norm) of ``runs`` with a known width: ``base_depth`` and
    ``base_width`` (the module docstring's rule) and ``n_widths``, the distinct widths."""
    table = _with_columns(runs, [*NETWORK_KEYS, "depth", "width"])
    table = table.assign(depth=pd.to_numeric(table["depth"], errors="coerce"),
                         width=pd.to_numeric(table["width"], errors="coerce")).dropna(subset=["depth", "width"])
    rows = []
    for keys, group in table.groupby(NETWORK_KEYS, sort=False, dropna=False):
        pairs = group.drop_duplicates(["depth", "width"])
        width = _base_value(pairs.groupby("width").size(), NOTEBOOK_WIDTH)
        depth = _base_value(pairs.groupby("depth").size())
        rows.append(dict(zip(NETWORK_KEYS, keys), base_depth=int(depth), base_width=int(width),
                         n_widths=int(pairs["width"].nunique())))
    return pd.DataFrame(rows, columns=[*NETWORK_KEYS, "base_depth", "base_width", "n_widths"])


def at_base_width(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``runs`` (any frame with the run keys) at their network's base width, and every
    row without a width (another model): what depth-only views draw when a sweep has several widths."""
    bases = base_network(runs)
    if bases.empty:
        return runs
    keyed = runs.merge(bases[[*NETWORK_KEYS, "base_width"]], on=NETWORK_KEYS, how="left")
    width = pd.to_numeric(keyed["width"], errors="coerce")
    keep = (width == keyed["base_width"]) | width.isna() | keyed["base_width"].isna()
    return runs.loc[keep.to_numpy()]


def width_depth(runs: pd.DataFrame) -> pd.DataFrame:
    """The "wider" and "deeper" lines of each (model, block, norm) with at least two widths:
    ``WIDTH_DEPTH_COLUMNS``, one row per (direction, depth, width), seeds averaged (module docstring)."""
    table = _with_columns(runs, [*GROUP_KEYS, "n_params", "beta", "test_acc"])
    table = table.assign(**{c: pd.to_numeric(table[c], errors="coerce")
                            for c in ("depth", "width", "n_params", "beta", "test_acc")})
    bases = base_network(table)
    bases = bases.loc[bases["n_widths"] >= 2]
    if bases.empty:
        return _empty(WIDTH_DEPTH_COLUMNS)
    table = table.merge(bases, on=NETWORK_KEYS, how="inner")
    lines = [table.loc[table["depth"] == table["base_depth"]].assign(direction="wider"),
             table.loc[table["width"] == table["base_width"]].assign(direction="deeper")]
    both = pd.concat(lines, ignore_index=True)
    out = both.groupby([*NETWORK_KEYS, "direction", "depth", "width"], sort=False, dropna=False).agg(
        n_params=("n_params", "median"), beta=("beta", "median"), n_seeds=("run", "count"),
        test_acc_mean=("test_acc", "mean"), test_acc_std=("test_acc", "std")).reset_index()
    out = out.assign(_direction=out["direction"].map({d: i for i, d in enumerate(DIRECTIONS)}))
    out = sort_by_block(out, [*NETWORK_KEYS, "_direction", "depth", "width"])  # drops the "_" key
    out[["depth", "width"]] = out[["depth", "width"]].astype(int)
    return out[WIDTH_DEPTH_COLUMNS].reset_index(drop=True)


def width_effect(scaling: pd.DataFrame) -> pd.DataFrame:
    """Per (phase, model, block, norm, depth) of ``depth_scaling`` rows with at least two widths:
    ``WIDTH_EFFECT_COLUMNS`` (module docstring)."""
    table = _with_columns(scaling, ["phase", *GROUP_KEYS, "first_to_last", "n_seeds"])
    table = table.assign(width=pd.to_numeric(table["width"], errors="coerce"),
                         first_to_last=pd.to_numeric(table["first_to_last"], errors="coerce")).dropna(subset=["width"])
    rows = []
    for keys, group in table.groupby(["phase", *NETWORK_KEYS, "depth"], sort=False, dropna=False):
        if group["width"].nunique() < 2:
            continue
        group = group.sort_values("width")
        narrow, wide = group.iloc[0], group.iloc[-1]
        rows.append(dict(zip(["phase", *NETWORK_KEYS, "depth"], keys), n_widths=int(group["width"].nunique()),
                         narrow=int(narrow["width"]), wide=int(wide["width"]), ratio_narrow=narrow["first_to_last"],
                         ratio_wide=wide["first_to_last"], n_zero_widths=int((group["first_to_last"] == 0).sum()),
                         n_seeds=int(pd.to_numeric(group["n_seeds"], errors="coerce").fillna(1).max())))
    if not rows:
        return _empty(WIDTH_EFFECT_COLUMNS)
    out = pd.DataFrame(rows)
    return sort_by_block(out, ["phase", *NETWORK_KEYS, "depth"])[WIDTH_EFFECT_COLUMNS].reset_index(drop=True)


def seed_spread(flow: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (model, block, norm, depth, width): the spread over seeds of ln first_to_last at
    init, ``SPREAD_COLUMNS`` (module docstring). ``flow`` is ``flow_summary`` output (its
    ``init`` rows are used; ``n_params`` and ``beta`` from its columns, else from ``runs``)."""
    rows = flow.loc[flow["phase"] == "init"] if "phase" in flow.columns else flow
    if rows.empty:
        return _empty(SPREAD_COLUMNS)
    if runs is not None and not runs.empty:
        extra = [c for c in ("n_params", "beta") if c in runs.columns and c not in rows.columns]
        if extra:
            rows = rows.merge(runs[["run", *extra]].assign(run=runs["run"].astype(str)), on="run", how="left")
    rows = _with_columns(rows, [*GROUP_KEYS, "n_params", "beta", "first_to_last"])
    ratio = pd.to_numeric(rows["first_to_last"], errors="coerce").to_numpy(float)
    usable = np.isfinite(ratio) & (ratio > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(usable, np.log(np.where(usable, ratio, 1.0)), np.nan)  # no log of 0, inf or NaN
    table = rows.assign(_log=logs, _zero=(ratio == 0).astype(int), _bad=(~np.isfinite(ratio)).astype(int),
                        n_params=pd.to_numeric(rows["n_params"], errors="coerce"),
                        beta=pd.to_numeric(rows["beta"], errors="coerce"))
    out = table.groupby(GROUP_KEYS, sort=False, dropna=False).agg(
        n_params=("n_params", "median"), beta=("beta", "median"), n_seeds=("run", "count"), n_zero=("_zero", "sum"),
        n_nonfinite=("_bad", "sum"), n_used=("_log", "count"), log_ratio_mean=("_log", "mean"),
        log_ratio_std=("_log", "std")).reset_index()
    out["log_ratio_std"] = out["log_ratio_std"].where(out["n_used"] >= MIN_SPREAD_SEEDS)
    return sort_by_block(out, GROUP_KEYS)[SPREAD_COLUMNS].reset_index(drop=True)


def _ranks(values: pd.Series) -> pd.Series:
    return values.rank(method="average")


def spread_trend(spread: pd.DataFrame) -> pd.DataFrame:
    """Per (model, block, norm): the Spearman rank correlation of ``beta`` and ``log_ratio_std``
    over its networks with both finite (``TREND_COLUMNS``; module docstring)."""
    table = _with_columns(spread, [*NETWORK_KEYS, "beta", "log_ratio_std"])
    table = table.assign(beta=pd.to_numeric(table["beta"], errors="coerce"),
                         log_ratio_std=pd.to_numeric(table["log_ratio_std"], errors="coerce"))
    table = table.loc[np.isfinite(table["beta"]) & np.isfinite(table["log_ratio_std"])]
    rows = []
    for keys, group in table.groupby(NETWORK_KEYS, sort=False, dropna=False):
        rho = np.nan
        x, y = _ranks(group["beta"]), _ranks(group["log_ratio_std"])
        if len(group) >= MIN_TREND_POINTS and x.std() > 0 and y.std() > 0:
            rho = float(np.corrcoef(x, y)[0, 1])  # Pearson's r of the ranks: Spearman's rho
        rows.append(dict(zip(NETWORK_KEYS, keys), n_networks=len(group), rho=rho))
    return pd.DataFrame(rows, columns=TREND_COLUMNS)
