"""Summaries, tables and sentences of the shattered-gradient and lesion frames; pandas only.

The torch side (``gradlab.shatter``, ``gradlab.lesion``) measures and returns tidy frames; this
module reduces them, so that the reports (which never import torch) read the same numbers.
Every network is identified by ``RUN_KEYS`` (``run, model, block, depth, width, norm, seed``).

Shattered gradients (``gradlab.shatter`` defines the measurement)
-----------------------------------------------------------------
``summarise_shatter``
    Per network and lag: ``mean``, ``std`` (across image pairs, ddof 1), ``min``, ``max`` and
    ``pairs`` (pairs with a defined value) of the per-pair autocorrelation. Lag 1 is the
    neighbouring-gradient similarity.
``describe_shatter``
    One sentence per block type (and model, norm, weights, target): the similarity at each
    depth with its spread, how many pairs and points, the target and how BatchNorm's
    statistics were obtained. It states the numbers; it assumes no direction.

Lesion study (``gradlab.lesion`` defines the measurement)
---------------------------------------------------------
``lesion_k``
    Per network and number ``k`` of deleted blocks: ``mean``, ``std`` (ddof 1; NaN for one
    set), ``min``, ``max`` of the accuracy over the sets measured (``sets``), and ``all_sets``:
    whether those were every possible set of k deletable blocks. k = 0 is the intact network.
``lesion_single``
    The k = 1 rows along the stack: ``stack_index, blocks, deletable, accuracy``, the intact
    accuracy and the ``change`` (accuracy minus intact).
``describe_lesion``
    One sentence per network: intact accuracy, the range and mean over single deletions, the
    mean for each larger k, blocks that cannot be deleted, swaps when measured, and chance.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .analysis import sort_by_block
from .report.text import format_number
from .schema import DEFAULT_MODEL, RUN_KEYS, norm_words

LESION = "lesion.parquet"  # in a run directory: gradlab.lesion's rows for its best.pt
SHATTER = "shatter.parquet"  # in a folder given to `gradlab shatter --out`: the per-pair rows
SHATTER_IMAGES = "shatter-images.parquet"  # beside it: the gradient images
SHATTER_FOLDER = "shatter"  # in a run or sweep directory: where `gradlab shatter PATH` stores them; the report reads it
CHANCE = 0.1  # CIFAR-10: ten balanced classes
WEIGHTS_WORDS = {"init": "at initialisation", "trained": "trained (best.pt)"}
TARGET_WORDS = {"logit": "the logit of image a's true class", "loss": "the cross-entropy against image a's true class"}
SHATTER_KEYS = [*RUN_KEYS, "weights", "target", "points", "statistics"]
SUMMARY_COLUMNS = [*SHATTER_KEYS, "lag", "distance", "mean", "std", "min", "max", "pairs"]
LESION_K_COLUMNS = [*RUN_KEYS, "k", "mean", "std", "min", "max", "sets", "all_sets"]
LESION_SINGLE_COLUMNS = [*RUN_KEYS, "stack_index", "blocks", "deletable", "accuracy", "intact", "change"]


def run_keys(run) -> dict:
    """``RUN_KEYS`` of a ``gradlab.runs.Run`` from its stored training options."""
    train = run.train
    return {"run": run.name, "model": train.get("model") or DEFAULT_MODEL, "block": train.get("block"),
            "depth": train.get("depth"), "width": train.get("width"), "norm": train.get("norm"),
            "seed": train.get("seed")}


def _pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def _network(row: Mapping) -> str:
    model = row.get("model") or DEFAULT_MODEL
    name = str(row.get("block")) if model == DEFAULT_MODEL else f"{model} ({row.get('block')})"
    norm = row.get("norm")
    return f"{name}, {norm_words(norm)}" if isinstance(norm, str) else name


# --- stored results ---------------------------------------------------------------------------


def read_shatter(folder) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(per-pair rows, gradient images) stored by ``gradlab shatter --out FOLDER`` (or
    ``gradlab.shatter.write``), or None when ``folder`` holds none; RunError when unreadable."""
    from pathlib import Path

    from .runs import read_parquet

    folder = Path(folder)
    if not (folder / SHATTER).is_file():
        return None
    images = read_parquet(folder / SHATTER_IMAGES) if (folder / SHATTER_IMAGES).is_file() else pd.DataFrame()
    return read_parquet(folder / SHATTER), images


def read_lesions(sweep) -> pd.DataFrame:
    """The stored lesion rows of every run of a ``gradlab.runs.Sweep`` (a run is a sweep of one), with
    ``RUN_KEYS`` in front; empty when no run has been lesioned. A run whose file cannot be read is
    left out (its rows would be evaluated again by ``gradlab lesion``)."""
    from .runs import RunError, read_parquet

    frames = []
    for run in sweep.runs:
        if (run.path / LESION).is_file():
            try:
                frames.append(read_parquet(run.path / LESION).assign(**run_keys(run)))
            except RunError:
                continue
    if not frames:
        return pd.DataFrame(columns=list(RUN_KEYS))
    frame = pd.concat(frames, ignore_index=True)
    return frame[list(RUN_KEYS) + [c for c in frame.columns if c not in RUN_KEYS]]


# --- shattered gradients ----------------------------------------------------------------------


def summarise_shatter(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per network and lag: the mean, spread and range over image pairs (see the module docstring)."""
    if pairs.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    keys = [*SHATTER_KEYS, "lag", "distance"]
    grouped = pairs.groupby(keys, sort=False, dropna=False)["value"]
    summary = grouped.agg(mean="mean", std="std", min="min", max="max", pairs="count").reset_index()
    return summary[SUMMARY_COLUMNS]


def similarity(summary: pd.DataFrame) -> pd.DataFrame:
    """The lag-1 rows: the neighbouring-gradient similarity of each network."""
    return summary.loc[summary["lag"] == 1].reset_index(drop=True)


def _spread_cell(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "–"
    return format_number(mean) if not np.isfinite(std) else f"{format_number(mean)} ± {format_number(std)}"


def similarity_table(summary: pd.DataFrame) -> pd.DataFrame:
    """For people: rows depth (with the norm and weights when several), a column per block type,
    cells "mean ± std" of the neighbouring-gradient similarity."""
    rows = similarity(summary)
    if rows.empty:
        return pd.DataFrame(columns=["depth"])
    rows = rows.assign(cell=[_spread_cell(m, s) for m, s in zip(rows["mean"], rows["std"])],
                       network=[(str(b) if m == DEFAULT_MODEL else f"{m} ({b})") for m, b in zip(rows["model"], rows["block"])])
    index = [c for c in ("norm", "weights") if rows[c].nunique(dropna=False) > 1] + ["depth"]
    table = rows.pivot_table(index=index, columns="network", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    return table.reset_index()


def autocorrelation_table(summary: pd.DataFrame, lags=(0, 1, 2, 4, 8, 16, 32, 64)) -> pd.DataFrame:
    """For people: a row per network, a column per lag (those of ``lags`` measured), the mean."""
    rows = summary.loc[summary["lag"].isin(lags)]
    if rows.empty:
        return pd.DataFrame(columns=["run"])
    table = rows.pivot_table(index="run", columns="lag", values="mean", aggfunc="first", sort=False)
    table.columns = [f"lag {lag}" for lag in table.columns]
    return table.reset_index()


def describe_shatter(summary: pd.DataFrame) -> list[str]:
    """One sentence per block type (model, norm, weights, target): what was measured."""
    rows = similarity(summary)
    sentences = []
    keys = ["model", "block", "norm", "weights", "target", "points", "statistics"]
    for _, group in rows.groupby(keys, sort=False, dropna=False):
        group = group.sort_values("depth")
        first = group.iloc[0]
        values = [f"{_spread_cell(r['mean'], r['std'])} at depth {r['depth']}" for _, r in group.iterrows()]
        listed = values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" and {values[-1]}"
        pairs = int(group["pairs"].max())
        batch_norm = "" if str(first["statistics"]).startswith("no BatchNorm") else "BatchNorm: "
        sentences.append(
            f"{_network(first)}, {WEIGHTS_WORDS.get(first['weights'], first['weights'])}: the mean cosine similarity "
            f"of input gradients at neighbouring points was {listed} (mean ± standard deviation over {pairs} image "
            f"pairs, {first['points']} points per line, gradient of {TARGET_WORDS.get(first['target'], first['target'])}; "
            f"{batch_norm}{first['statistics']}).")
    return sentences


# --- lesion study -----------------------------------------------------------------------------


def _keys(frame: pd.DataFrame) -> list[str]:
    return [k for k in RUN_KEYS if k in frame.columns]


def _in_network_order(rows: pd.DataFrame, keys: list[str], then: list[str]) -> pd.DataFrame:
    """``rows`` by network (block in the usual order, then depth as a number, width, norm and
    seed; the run's name last, so that depth 16 never comes before depth 2), then ``then``."""
    by = [k for k in keys if k != "run"] + [k for k in keys if k == "run"] + then
    return sort_by_block(rows, by)


def lesion_k(frame: pd.DataFrame) -> pd.DataFrame:
    """Per network and k (0: intact): the accuracy's mean, spread and range over the sets measured."""
    keys = _keys(frame)
    rows = frame.loc[frame["experiment"].isin(["intact", "delete"]) & frame["deletable"].astype(bool)]
    if rows.empty:
        return pd.DataFrame(columns=LESION_K_COLUMNS)
    summary = (rows.groupby([*keys, "k"], sort=False, dropna=False)["accuracy"]
               .agg(mean="mean", std="std", min="min", max="max", sets="count").reset_index())
    singles = frame.loc[(frame["experiment"] == "delete") & (frame["k"] == 1)]
    if keys:
        deletable = singles.groupby(keys, sort=False, dropna=False)["deletable"].sum().rename("m").reset_index()
        summary = summary.merge(deletable, on=keys, how="left")
    else:  # one network, as lesion.lesion_study returns it
        summary = summary.assign(m=int(singles["deletable"].sum()))
    summary["all_sets"] = [k == 0 or (pd.notna(m) and sets == math.comb(int(m), int(k)))
                           for k, m, sets in zip(summary["k"], summary["m"], summary["sets"])]
    return _in_network_order(summary, keys, ["k"])[[*keys, *LESION_K_COLUMNS[len(RUN_KEYS):]]].reset_index(drop=True)


def lesion_single(frame: pd.DataFrame) -> pd.DataFrame:
    """The accuracy after deleting each single block along the stack, with the intact accuracy."""
    keys = _keys(frame)
    singles = frame.loc[(frame["experiment"] == "delete") & (frame["k"] == 1)]
    intact = frame.loc[frame["experiment"] == "intact", [*keys, "accuracy"]].rename(columns={"accuracy": "intact"})
    rows = singles.merge(intact, on=keys, how="left") if keys else singles.assign(intact=intact["intact"].iloc[0])
    rows = rows.assign(change=rows["accuracy"] - rows["intact"])
    columns = [*keys, *LESION_SINGLE_COLUMNS[len(RUN_KEYS):]]
    return _in_network_order(rows, keys, ["stack_index"])[columns].reset_index(drop=True)


def single_table(frame: pd.DataFrame) -> pd.DataFrame:
    """For people: a row per stack block, a column per network: the accuracy without that block."""
    rows = lesion_single(frame)
    if rows.empty:
        return pd.DataFrame(columns=["block"])
    rows = rows.assign(cell=[_pct(a) if d else "not deletable" for a, d in zip(rows["accuracy"], rows["deletable"])],
                       network=rows["run"] if "run" in rows else "network")
    table = rows.pivot_table(index="stack_index", columns="network", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    table = table.reset_index().rename(columns={"stack_index": "stack index"})
    if rows["network"].nunique() == 1:  # one network: its blocks' names beside their index
        table.insert(1, "block", rows.drop_duplicates("stack_index")["blocks"].to_numpy())
    return table


def k_table(frame: pd.DataFrame) -> pd.DataFrame:
    """For people: a row per k (blocks deleted at once), a column per network: "mean ± std (sets)"."""
    summary = lesion_k(frame)
    if summary.empty:
        return pd.DataFrame(columns=["deleted"])
    cells = []
    for row in summary.to_dict("records"):
        text = _pct(row["mean"])
        if row["sets"] > 1:
            text += f" ± {100 * row['std']:.1f} ({row['sets']}{' = all' if row['all_sets'] else ''})"
        cells.append(text)
    summary = summary.assign(cell=cells, network=summary["run"] if "run" in summary else "network")
    table = summary.pivot_table(index="k", columns="network", values="cell", aggfunc="first", sort=False)
    table.columns.name = None
    return table.reset_index().rename(columns={"k": "deleted"})


def swap_table(frame: pd.DataFrame) -> pd.DataFrame:
    """For people: each swap of adjacent blocks with its accuracy, a row per swap and network."""
    rows = frame.loc[frame["experiment"] == "swap"]
    keys = [k for k in ("run",) if k in rows.columns]
    return rows[[*keys, "blocks", "accuracy"]].assign(accuracy=rows["accuracy"].map(_pct)).rename(
        columns={"blocks": "swapped"}).reset_index(drop=True)


def describe_lesion(frame: pd.DataFrame) -> list[str]:
    """One sentence per network: what deleting blocks did to its test accuracy."""
    keys = _keys(frame)
    summary, singles = lesion_k(frame), lesion_single(frame)
    groups = singles.groupby(keys, sort=False, dropna=False) if keys else [((), singles)]
    sentences = []
    for key, single in groups:
        key = key if isinstance(key, tuple) else (key,)
        match = dict(zip(keys, key))
        ks = summary
        for column, value in match.items():
            ks = ks.loc[ks[column].isna()] if pd.isna(value) else ks.loc[ks[column] == value]
        name = match.get("run", "the network")
        intact = single["intact"].iloc[0]
        n = len(single)
        free = single.loc[single["deletable"].astype(bool), "accuracy"]
        parts = [f"{name}: {_pct(intact)} test accuracy with all {n} blocks"]
        if len(free):
            parts.append(f"deleting one block gave {_pct(free.min())} to {_pct(free.max())} "
                         f"(mean {_pct(free.mean())} over {len(free)} blocks)")
        larger = ks.loc[ks["k"] > 1]
        if len(larger):
            means = ", ".join(f"{_pct(r['mean'])} for {'all ' if r['k'] == len(free) else ''}{r['k']}"
                              for r in larger.to_dict("records"))
            sets = ", ".join(str(s) for s in larger["sets"])
            parts.append(f"deleting more at once gave a mean of {means} (over {sets} sets)")
        if len(free) < n:
            parts.append(f"{n - len(free)} of the {n} blocks change the shape and cannot be deleted")
        swaps = frame.loc[frame["experiment"] == "swap"]
        for column, value in match.items():
            swaps = swaps.loc[swaps[column] == value]
        if len(swaps):
            parts.append(f"swapping adjacent blocks gave {_pct(swaps['accuracy'].min())} to "
                         f"{_pct(swaps['accuracy'].max())} ({len(swaps)} swaps)")
        sentences.append("; ".join(parts) + f"; chance is {_pct(CHANCE)}.")
    return sentences
