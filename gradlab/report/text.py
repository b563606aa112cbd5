"""Terminal tables: one number format for people, four output formats.

Numbers for people (``format_number``): 3 significant digits; magnitudes
from 100 up to 1e5 are rounded to whole numbers ("4123"); scientific notation,
written compactly as "4.12e3" / "2.5e-5", for |x| < 1e-3 or |x| >= 1e5;
integers (Python or numpy ints) print in full; 0 -> "0", inf -> "inf",
-inf -> "-inf", and a missing value (NaN, None) -> "–" (``MISSING``, an en
dash: a gap in a table, not a number).

Formats (``render``):
``table``     aligned plain-text columns under a dashed header rule; numeric
              columns right-aligned and formatted with ``format_number``.
``markdown``  a GitHub pipe table with the same formatted cells.
``csv``       full precision (floats round-trip), NaN as an empty field, inf
              as "inf" (``pandas.read_csv`` reads both back).
``json``      a list of row objects (records orientation), full precision; JSON
              has no NaN or infinity, so NaN -> null and ±inf -> "inf" / "-inf".

Human tables (table, markdown) may be pivoted for reading; machine formats
(csv, json) always carry the tidy frames. ``report_text`` follows that rule:
its csv is one section per table, each a ``# name`` line then a CSV block
(read one with ``pandas.read_csv(..., comment="#")``), sections separated by a
blank line; its json is one object with a key per section.

Runs that went wrong are reported, not fatal: ``sweep_frames`` reads a sweep
one run at a time and names every cell it cannot read with the reason; the
report lists those cells and every diverged run (``analysis.divergence``),
and a depth-scaling cell without a finite ratio says why ("diverged at step
5 (layer layers.1)", "ratio 0/0", "no finite ratio") instead of showing NaN.

Accuracies name their budget: a test accuracy means something only at the training budget it
was measured at, so every sentence that compares accuracies across depths
(``accuracy_sentences``) says after how many optimizer steps, on how many training images and
in how many epochs (``budget_words``), and a net still at chance after a short budget
(``analysis.training_budget``) is said to be too short-trained to tell, never unable to learn.
The report states the runs' budgets under its header (``budget_line``), with what a short
budget can and cannot show (``short_budget_note``).

Names: tables show a probe point's real module path (``layers.7``,
``layer3.1``) with its role and stack index. Human tables shorten long paths
with ``short_names``, which never makes two names look alike; csv and json
keep the full paths. A network is named by its block type (``res``), with
the model in front when it is not a DeepCNN (``torchvision:resnet18,
BasicBlock``; ``analysis.network_label``).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from numbers import Integral, Real

import numpy as np
import pandas as pd

from gradlab import analysis, schema
from gradlab.runs import RunError, Sweep
from gradlab.schema import DIVERGED, DIVERGED_FIELDS, RECORD_COLUMNS, RUN_KEYS, norm_words

FORMATS = ("table", "markdown", "csv", "json")
MISSING = "–"
SEP = " · "  # between the parts of a display cell and of the header line
SHORT_NAME_WIDTH = 24  # characters: a longer module path is shortened in human tables (short_names)
ELLIPSIS = "…"


def format_number(x) -> str:
    """A number for people: 3 significant digits (see the module docstring)."""
    if x is None or x is pd.NA:
        return MISSING
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, Integral):
        return str(int(x))
    if not isinstance(x, Real):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    magnitude = abs(x)
    if magnitude < 1e-3 or magnitude >= 1e5:
        mantissa, exponent = f"{x:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if magnitude >= 100:
        return f"{x:.0f}"
    decimals = 2 - math.floor(math.log10(magnitude))
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def short_names(names, width: int = SHORT_NAME_WIDTH) -> dict[str, str]:
    """Display names for module paths, unambiguous among ``names``: {name: short name}.

    1. A leading path that every name shares (``backbone.`` in ``backbone.layer1.0`` ...) is
       dropped, as long as every name keeps at least one part of its own.
    2. A name still longer than ``width`` characters keeps only its last parts behind "…": as
       many as fit in ``width``, and at least as many as end it differently from every other
       name ("…blocks.7.attn" only when no other name ends in "blocks.7.attn"); when no such
       ending is shorter than the name, it stays whole.

    Distinct names get distinct short names, and a short name is always the end of its own
    name and of no other one, so a reader can never confuse two probe points.
    """
    distinct = list(dict.fromkeys(str(n) for n in names))
    parts = [n.split(".") for n in distinct]
    shared = 0
    while (parts and all(len(p) > shared + 1 for p in parts)
           and len({p[shared] for p in parts}) == 1 and len(parts) > 1):
        shared += 1
    rests = [p[shared:] for p in parts]
    shorts = {}
    for name, rest in zip(distinct, rests):
        short = ".".join(rest)
        if len(short) > width:
            others = [r for r in rests if r is not rest]
            unique = [ELLIPSIS + ".".join(rest[-keep:]) for keep in range(1, len(rest))
                      if all(o[-keep:] != rest[-keep:] for o in others)]  # shortest first
            fitting = [u for u in unique if len(u) <= width]
            candidate = fitting[-1] if fitting else unique[0] if unique else short
            short = candidate if len(candidate) < len(short) else short
        shorts[name] = short
    return shorts


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known: {list(FORMATS)}")


def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Named index levels become columns; multi-level column labels join with ' / '."""
    if any(name is not None for name in df.index.names):
        df = df.reset_index()
    if isinstance(df.columns, pd.MultiIndex):
        df = df.copy()
        df.columns = [" / ".join(str(p) for p in label if str(p)) for label in df.columns]
    return df


def _is_number_column(series: pd.Series) -> bool:
    dtype = series.dtype
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return MISSING
    return format_number(value)


def _grid(df: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool], list[int]]:
    header = [str(c) for c in df.columns]
    right = [_is_number_column(df[c]) for c in df.columns]
    columns = [[_cell(v) for v in df[c].tolist()] for c in df.columns]
    rows = [list(r) for r in zip(*columns)] if columns else []
    widths = [max([len(h), *(len(v) for v in col)]) for h, col in zip(header, columns)]
    return header, rows, right, widths


def _pad(text: str, width: int, right: bool) -> str:
    return text.rjust(width) if right else text.ljust(width)


def _render_table(df: pd.DataFrame) -> str:
    header, rows, right, widths = _grid(df)
    lines = [
        "  ".join(_pad(h, w, r) for h, w, r in zip(header, widths, right)),
        "  ".join("-" * w for w in widths),
        *("  ".join(_pad(v, w, r) for v, w, r in zip(row, widths, right)) for row in rows),
    ]
    return "\n".join(line.rstrip() for line in lines)


def _render_markdown(df: pd.DataFrame) -> str:
    header, rows, right, widths = _grid(df)

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = [escape(h) for h in header]
    rows = [[escape(v) for v in row] for row in rows]
    widths = [max(3, w, *(len(r[i]) for r in rows), len(header[i])) for i, w in enumerate(widths)]
    rule = [("-" * (w - 1) + ":") if r else ("-" * w) for w, r in zip(widths, right)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(_pad(c, w, r) for c, w, r in zip(cells, widths, right)) + " |"

    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *(line(row) for row in rows)])


def _json_value(value):
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        value = float(value)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return value if isinstance(value, str) else str(value)


def json_records(df: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts (NaN -> None, ±inf -> "inf" / "-inf")."""
    df = _flat(df)
    columns = [str(c) for c in df.columns]
    return [
        {c: _json_value(v) for c, v in zip(columns, row)}
        for row in df.itertuples(index=False, name=None)
    ]


def render(df: pd.DataFrame, fmt: str = "table") -> str:
    """``df`` as text in ``fmt`` (one of ``FORMATS``; see the module docstring)."""
    _check_format(fmt)
    df = _flat(df)
    if fmt == "table":
        return _render_table(df)
    if fmt == "markdown":
        return _render_markdown(df)
    if fmt == "csv":
        return df.to_csv(index=False, lineterminator="\n").rstrip("\n")
    return json.dumps(json_records(df), indent=2, allow_nan=False, ensure_ascii=False)


# ---------------------------------------------------------------- depth scaling


def _ratio_part(row: dict) -> str | None:
    """"ratio 3100"; None when the verdict says why there is none (diverged, too shallow);
    "ratio 0/0" when the gradient vanished to 0 at both ends; else "no finite ratio"."""
    ratio, verdict = row.get("first_to_last"), str(row.get("verdict"))
    if ratio is not None and not (isinstance(ratio, float) and math.isnan(ratio)):
        return f"ratio {format_number(ratio)}"
    if verdict.startswith((DIVERGED, "n/a")) or verdict in ("nan", "None"):
        return None
    if verdict.startswith("vanishing"):
        return "ratio 0/0"
    return "no finite ratio"


def _scaling_cell(row: dict) -> str:
    """"test 41.2±0.8% · ratio 3100 · exploding" (± only with a std over seeds)."""
    test, spread = row.get("test_acc_mean"), row.get("test_acc_std")
    accuracy = f"test {format_number(100 * test)}" if pd.notna(test) else f"test {MISSING}"
    if pd.notna(test) and pd.notna(spread):
        accuracy += f"±{format_number(100 * spread)}"
    verdict = row.get("verdict")
    parts = [
        accuracy + ("%" if pd.notna(test) else ""),
        _ratio_part(row),
        str(verdict) if pd.notna(verdict) else "no records",
    ]
    parts = [p for p in parts if p is not None]
    for status in ("failed", "diverged"):
        count = row.get(f"n_{status}", 0)
        if pd.notna(count) and count > 0:
            parts.append(f"{int(count)} {status}")
    return SEP.join(parts)


def depth_scaling_table(scaling: pd.DataFrame) -> pd.DataFrame:
    """The ``analysis.depth_scaling`` frame pivoted for reading.

    Rows: depth (the index, named "depth"). Columns: the network
    (``network_label``: block, or "model, block"), or "network / norm" when the
    frame holds more than one norm (and " / phase" when more than one phase).
    Cells: "test 41.2±0.8% · ratio 3100 · exploding", plus failed or diverged
    counts. A (network, depth) that was not run shows ``MISSING``. For table and
    markdown output; csv and json should carry ``scaling`` itself.
    """
    if scaling.empty:
        return pd.DataFrame(index=pd.Index([], name="depth"))
    frame = scaling.copy()
    label = analysis.network_labels(frame)
    if frame["norm"].nunique(dropna=False) > 1:
        label = label + " / " + frame["norm"].astype(str)
    if "phase" in frame and frame["phase"].nunique() > 1:
        label = label + " / " + frame["phase"].astype(str)
    frame["column"] = label
    frame["cell"] = [_scaling_cell(row) for row in frame.to_dict("records")]
    ordered = analysis.sort_by_block(frame, ["model", "block", "norm", "depth"])
    columns = list(dict.fromkeys(ordered["column"]))
    index = _row_keys(frame)
    table = frame.pivot(index=index, columns="column", values="cell")
    table = table.reindex(columns=columns).sort_index().fillna(MISSING)
    table.columns.name = None
    return table


def _row_keys(frame: pd.DataFrame) -> list[str] | str:
    """The rows of a pivoted depth table: depth, and width when the frame holds several widths."""
    several = "width" in frame and pd.to_numeric(frame["width"], errors="coerce").nunique() > 1
    return ["depth", "width"] if several else "depth"


# ---------------------------------------------------------------- the training budget


def _count(n, noun: str) -> str:
    """"1 epoch", "2,048 training images": a whole number with thousands separators and its noun."""
    n = int(n)
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


def budget_words(steps=None, train_images=None, epochs=None) -> str:
    """The training budget an accuracy was measured at, in words: "40 optimizer steps on 10,000
    training images (1 epoch)"; parts the run does not record are left out, and with none of
    them it is "an unrecorded training budget"."""
    parts = []
    if _known(steps):
        parts.append(_count(steps, "optimizer step"))
    if _known(train_images):
        parts.append(("on " if parts else "") + _count(train_images, "training image"))
    words = " ".join(parts)
    if _known(epochs):
        words = f"{words} ({_count(epochs, 'epoch')})" if words else _count(epochs, "epoch")
    return words or "an unrecorded training budget"


def _percent(x: float) -> str:
    """"41.3 %": an accuracy in a sentence."""
    return f"{100 * x:.1f} %"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _steps_range(steps: pd.Series) -> str:
    """"40 optimizer steps", "12 to 40 optimizer steps"."""
    low, high = int(steps.min()), int(steps.max())
    return _count(high, "optimizer step") if low == high else f"{low:,} to {_count(high, 'optimizer step')}"


def _chance_clause(rows: pd.DataFrame, chance: float) -> str:
    """What a depth at chance means at its budget: "Depth 16 is still at chance (10 %) after only
    32 optimizer steps: too short a budget to tell whether this depth can learn." (short
    budgets); "Depth 32 is at chance (10 %) after 11,730 optimizer steps." (long ones)."""
    sentences = []
    level = f"{format_number(100 * chance)} %"
    for short, group in rows.groupby("short_budget", sort=False):
        depths = [format_number(int(d)) for d in group["depth"]]
        one = len(depths) == 1
        subject = f"Depth {depths[0]} is" if one else f"Depths {_and(depths)} are"
        steps = pd.to_numeric(group["steps"], errors="coerce").dropna()
        if short:
            sentences.append(f"{subject} still at chance ({level}) after only {_steps_range(steps)}: too short a "
                             f"budget to tell whether {'this depth' if one else 'these depths'} can learn.")
        else:
            after = f" after {_steps_range(steps)}" if len(steps) else ""
            sentences.append(f"{subject} at chance ({level}){after}.")
    return " ".join(sentences)


ACCURACY_WORDS = {"test_acc": "test accuracy", "final_train_acc": "train accuracy in the last epoch"}


def accuracy_sentences(runs: pd.DataFrame, chance: float | None = None,
                       metric: str = "test_acc") -> list[str]:
    """One sentence per network (and norm, when there are several) comparing its test accuracy
    (``metric="final_train_acc"``: its running train accuracy over the last epoch, the training
    error of He et al.'s degradation; none for runs still running) across depths, each accuracy
    with the training budget it was measured at:

        conv: test accuracy falls 31.3 points from depth 2 to 16: 41.3 % at depth 2 and 10.0 % at
        depth 16, each after 32 optimizer steps on 2,048 training images (2 epochs). Depth 16 is
        still at chance (10 %) after only 32 optimizer steps: too short a budget to tell whether
        this depth can learn.

    ``runs`` is a runs table (``Sweep.table()``: ``steps``, ``train_images``, ``epochs_done``;
    missing ones are left out of the words). Seeds of one depth are averaged ("mean of 3
    seeds"); a budget that differs between depths is named at each depth. At chance and short
    budget are ``analysis.training_budget``'s, against ``chance`` (default ``analysis.CHANCE``).
    Networks without any such accuracy (a probe, runs still at their first epoch) get no
    sentence; a depth without one says so with its status.
    """
    chance = analysis.CHANCE if chance is None else chance
    table = analysis.training_budget(analysis.settled_accuracies(runs), chance, metric)
    if table.empty:
        return []
    noun = ACCURACY_WORDS[metric]
    table = table.assign(accuracy=pd.to_numeric(table[metric], errors="coerce"),
                         words=[budget_words(r["steps"], r["train_images"], r["epochs_done"])
                                for r in table.to_dict("records")])
    several_norms = table["norm"].nunique(dropna=False) > 1
    keys = ["model", "block", "norm"]
    sentences = []
    ordered = analysis.sort_by_block(table, [*keys, "depth"])
    for _, group in ordered.groupby(keys, sort=False, dropna=False):
        if group["accuracy"].isna().all():
            continue
        first = group.iloc[0]
        name = analysis.network_label(first) + (f" ({norm_words(first['norm'])})" if several_norms else "")
        shared = group["words"].nunique() == 1
        parts, measured, barely, missing = [], [], [], []
        for depth, rows in group.groupby("depth", sort=True):
            depth_words = format_number(int(depth))
            accuracy = rows["accuracy"].dropna()
            after = "" if shared else " after " + _and(list(dict.fromkeys(rows["words"])))
            if accuracy.empty:
                status = ", ".join(dict.fromkeys(rows["status"].astype(str)))
                missing.append(f"depth {depth_words} has no {noun} ({status}{after})")
                continue
            seeds = f" (mean of {len(accuracy)} seeds)" if len(accuracy) > 1 else ""
            parts.append(f"{_percent(accuracy.mean())} at depth {depth_words}{seeds}{after}")
            measured.append((depth, accuracy.mean()))
            if rows["at_chance"].all():
                barely.append({"depth": depth, "short_budget": bool(rows["short_budget"].all()),
                               "steps": pd.to_numeric(rows["steps"], errors="coerce").max()})
        change = ""
        if len(measured) > 1:
            (shallow, low), (deep, high) = measured[0], measured[-1]
            points = round(100 * (high - low), 1)
            verb = "stays the same" if points == 0 else f"{'rises' if points > 0 else 'falls'} {abs(points):.1f} points"
            change = f" {verb} from depth {format_number(int(shallow))} to {format_number(int(deep))}:"
        sentence = f"{name}: {noun}{change} {_and(parts)}"
        if shared:
            each = "each " if group["accuracy"].notna().sum() > 1 else ""
            sentence += f", {each}after {group['words'].iloc[0]}"
        sentence += "".join(f"; {m}" for m in missing) + "."
        if barely:
            sentence += " " + _chance_clause(pd.DataFrame(barely), chance)
        sentences.append(sentence)
    return sentences


def depth_accuracy_sentences(runs: pd.DataFrame, chance: float | None = None) -> list[str]:
    """What a report says of accuracy against depth: ``accuracy_sentences`` of the test accuracy,
    then of the last epoch's train accuracy (the training error of He et al.'s degradation)."""
    return [*accuracy_sentences(runs, chance), *accuracy_sentences(runs, chance, metric="final_train_acc")]


def _run_budgets(runs: pd.DataFrame) -> pd.Series:
    """``budget_words`` of every run that records any part of its budget."""
    table = analysis.training_budget(runs)
    table = table.dropna(subset=["steps", "train_images", "epochs_done"], how="all")
    return pd.Series([budget_words(r["steps"], r["train_images"], r["epochs_done"])
                      for r in table.to_dict("records")], dtype=object)


def shared_budget(runs: pd.DataFrame) -> str | None:
    """The ``budget_words`` every run of ``runs`` trained for, or None when they differ or none says."""
    words = _run_budgets(runs)
    return words.iloc[0] if len(words) == len(runs) and words.nunique() == 1 else None


def budget_line(runs: pd.DataFrame) -> str | None:
    """"Training budget: 40 optimizer steps on 10,000 training images (1 epoch), every run", or
    each distinct budget with its number of runs; None when no run records one."""
    words = _run_budgets(runs)
    if words.empty:
        return None
    counts = words.value_counts(sort=False)
    counts = counts.iloc[np.argsort(-counts.to_numpy(), kind="stable")]  # the most common budget first
    if len(counts) == 1:
        budget = f"Training budget: {counts.index[0]}"
        if len(words) < len(runs):
            return f"{budget} ({len(words)} of the {len(runs)} runs record one)"
        return budget + (", every run" if len(runs) > 1 else "")
    return "Training budgets: " + "; ".join(f"{w}: {_count(n, 'run')}" for w, n in counts.items())


def short_budget_note(runs: pd.DataFrame) -> str | None:
    """What a short budget can and cannot show, when every run that records its steps trained
    fewer than ``analysis.SHORT_BUDGET_STEPS``; None otherwise (or when none records them)."""
    table = analysis.training_budget(runs)
    steps = pd.to_numeric(table["steps"], errors="coerce").dropna()
    if steps.empty or not table.loc[steps.index, "short_budget"].all():
        return None
    images = pd.to_numeric(table["train_images"], errors="coerce").dropna()
    on = f" on {_count(images.max(), 'training image')}" if len(images) and images.nunique() == 1 else ""
    return (f"A short training budget: {_steps_range(steps)}{on} per run, fewer than "
            f"{analysis.SHORT_BUDGET_STEPS:,}. That is enough to compare gradient flow at initialisation and in the "
            f"first steps of training, and to see which networks start learning first; it is too short to tell how "
            f"well a network of any depth can learn, so an accuracy near chance here says that a network has not "
            f"learned yet, not that it cannot. The notebook's experiment trains 30 epochs on 45,000 images "
            f"(5,280 steps of 256).")


# ---------------------------------------------------------------- the report


def _axis_values(values: pd.Series) -> list:
    """The sorted distinct values of a grid axis, as plain Python values."""
    distinct = [_json_value(v) for v in pd.unique(values.dropna())]
    return sorted(distinct, key=lambda v: (isinstance(v, str), v))


def _join(values: list) -> str:
    return ", ".join(str(v) for v in values) if values else MISSING


def _header(records: pd.DataFrame, runs: pd.DataFrame, diverged: pd.DataFrame, unreadable: dict) -> dict:
    """The sweep at a glance: counts and the values of each grid axis."""
    header = {"runs": int(len(runs))}
    if "status" in runs and len(runs):
        counts = runs["status"].value_counts()
        header["status"] = {str(k): int(v) for k, v in counts.items()}
    if len(diverged):
        header["diverged"] = [str(r) for r in diverged["run"]]
    if unreadable:
        header["unreadable"] = sorted(map(str, unreadable))
    axes = {"models": "model", "blocks": "block", "depths": "depth", "widths": "width", "norms": "norm",
            "seeds": "seed"}
    for key, column in axes.items():
        if column in runs:
            header[key] = _axis_values(runs[column])
    for frame in (runs, records):
        if "dataset" in frame:
            header["dataset"] = _axis_values(frame["dataset"])
            break
    return header


def _header_line(header: dict) -> str:
    runs = f"{header['runs']} run" + ("" if header["runs"] == 1 else "s")
    status = header.get("status", {})
    if status and set(status) != {"complete"}:
        runs += " (" + ", ".join(f"{n} {s}" for s, n in status.items()) + ")"
    status_diverged = status.get(DIVERGED, 0)
    found = len(header.get("diverged", [])) - status_diverged
    if found > 0:  # non-finite records in runs whose status does not say so (a probe, say)
        runs += f" ({found} diverged by their records)"
    axes = ("blocks", "depths", "norms", "seeds", "dataset")
    if len(header.get("widths", [])) > 1:  # one width is the run's option, not an axis
        axes = ("blocks", "depths", "widths", "norms", "seeds", "dataset")
    if any(m != schema.DEFAULT_MODEL for m in header.get("models", [])):  # a DeepCNN sweep needs no word
        axes = ("models", *axes)
    parts = [f"gradlab report: {runs}"]
    parts += [f"{key}: {_join(header[key])}" for key in axes if key in header]
    if header.get("unreadable"):
        parts.append(f"{len(header['unreadable'])} unreadable cell" + ("s" if len(header["unreadable"]) > 1 else ""))
    return SEP.join(parts)


def _deepest_runs(records: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The deepest recorded run of each (model, block, norm); ties go to the lowest seed, then
    run id. Per norm as well as per block, so that a sweep over norms shows both behaviours.
    """
    if records.empty or "run" not in records:
        return pd.DataFrame(columns=RUN_KEYS)
    recorded = set(map(str, pd.unique(records["run"])))
    candidates = runs.assign(run=runs["run"].astype(str)).reindex(columns=RUN_KEYS)
    candidates = candidates.loc[candidates["run"].isin(recorded)].sort_values(
        ["depth", "seed", "run"], ascending=[False, True, True], na_position="last", kind="stable"
    )
    deepest = candidates.drop_duplicates(["model", "block", "norm"])
    return analysis.sort_by_block(deepest, ["model", "block", "norm"]).reset_index(drop=True)


def _run_title(run: dict) -> str:
    """"conv-d16-s0 (conv, depth 16, batch norm)", "r18 (torchvision:resnet18, BasicBlock, depth 8, ...)"."""
    depth = format_number(run["depth"])
    return f"{run['run']} ({analysis.network_label(run)}, depth {depth}, {norm_words(run['norm'])})"


DIVERGED_COLUMNS = [*RUN_KEYS, "status", *DIVERGED_FIELDS, "source"]
UNREADABLE_COLUMNS = ["cell", "reason"]


def diverged_table(diverged: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """``analysis.divergence`` rows with each run's identity and status in front."""
    identity = runs.reindex(columns=[*RUN_KEYS, "status"]).assign(run=runs["run"].astype(str))
    table = diverged.merge(identity.drop_duplicates("run"), on="run", how="left")
    table = table.assign(**{c: pd.to_numeric(table[c], errors="coerce") for c in ("step", "epoch", "position")})
    order = ["model", "block", "norm", "depth", "seed", "run"]
    return analysis.sort_by_block(table, order)[DIVERGED_COLUMNS].reset_index(drop=True)


def layer_table_for_people(table: pd.DataFrame) -> pd.DataFrame:
    """An ``analysis.layer_table`` for reading: module paths through ``short_names``, no stack
    index (``MISSING``) outside the stack."""
    names = short_names(table["layer"])
    index = pd.to_numeric(table["stack_index"], errors="coerce")
    shown = [MISSING if pd.isna(i) or i < 0 else int(i) for i in index]
    return table.assign(layer=table["layer"].astype(str).map(names), stack_index=pd.Series(shown, dtype=object,
                                                                                           index=table.index))


def _sections(records: pd.DataFrame, runs: pd.DataFrame | None, unreadable: dict | None = None) -> dict:
    """Everything the report shows, as tidy frames (see ``report_text``)."""
    runs = analysis.run_table(records) if runs is None or runs.empty else runs
    unreadable = dict(unreadable or {})
    diverged = analysis.divergence(records, runs)
    deepest = _deepest_runs(records, runs)
    focus = records.loc[records["run"].isin(deepest["run"])] if len(deepest) else records.iloc[:0]
    layers = [
        analysis.layer_table(focus, run, "init").assign(run=run) for run in deepest["run"]
    ]
    flow = deepest[["run"]].merge(analysis.flow_summary(focus, phases=["init"], diverged=diverged), on="run")
    flow["sentence"] = [analysis.describe_flow(row) for row in flow.to_dict("records")]
    scaling = pd.concat([analysis.depth_scaling(records, runs, phase, diverged) for phase in ("init", "end")],
                        ignore_index=True)
    init_flow = analysis.flow_summary(records, runs, phases=["init"], diverged=diverged)
    spread = analysis.seed_spread(init_flow)
    spread = spread if len(spread) and spread["n_seeds"].max() > 1 else spread.iloc[:0]
    return {
        "header": _header(records, runs, diverged, unreadable),
        "depth_scaling": scaling,
        "width_depth": analysis.width_depth(runs),
        "width_effect": analysis.width_effect(scaling),
        "spread": spread,
        "spread_trend": analysis.spread_trend(spread),
        "phase_words": phase_words(runs),
        "deepest": deepest,
        "layers": pd.concat(layers, ignore_index=True)
        if layers
        else pd.DataFrame(columns=[*analysis.LAYER_TABLE_COLUMNS, "run"]),
        "flow": flow[[*analysis.FLOW_COLUMNS, "sentence"]],
        "diverged": diverged_table(diverged, runs),
        "unreadable": pd.DataFrame(sorted(unreadable.items()), columns=UNREADABLE_COLUMNS),
        "budget": analysis.training_budget(runs),
        "accuracy": depth_accuracy_sentences(analysis.at_base_width(runs)),
        "budget_line": budget_line(runs),
        "short_budget": short_budget_note(runs),
    }


def _machine_report(sections: dict, fmt: str) -> str:
    tables = {
        "depth_scaling": sections["depth_scaling"],
        "layers": sections["layers"][["run", *analysis.LAYER_TABLE_COLUMNS]],
        "flow": sections["flow"],
        "diverged": sections["diverged"],
        "unreadable": sections["unreadable"],
        "budget": sections["budget"],
        "width_depth": sections["width_depth"],
        "spread": sections["spread"],
    }
    if fmt == "json":
        report = {"header": sections["header"]} | {n: json_records(t) for n, t in tables.items()}
        return json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False)
    blocks = [f"# {_header_line(sections['header'])}"]
    blocks += [f"# {name}\n{render(table, 'csv')}" for name, table in tables.items()]
    return "\n\n".join(blocks) + "\n"


def _human_report(sections: dict, fmt: str) -> str:
    def title(text: str) -> str:
        return f"## {text}" if fmt == "markdown" else f"{text}\n{'=' * len(text)}"

    header = _header_line(sections["header"])
    blocks = [f"# {header}" if fmt == "markdown" else header]
    bullet = "- " if fmt == "markdown" else ""
    budget = [line for line in (sections["budget_line"], sections["short_budget"]) if line]
    if budget:
        blocks.append("\n\n".join(budget))
    if len(sections["unreadable"]):
        lines = "\n".join(f"{bullet}{row.cell}: {row.reason}" for row in sections["unreadable"].itertuples())
        blocks.append(f"{title('Unreadable cells (left out of this report)')}\n\n{lines}")
    diverged = sections["diverged"]
    if len(diverged):
        lines = "\n".join(bullet + diverged_line(row) for row in diverged.to_dict("records"))
        shown = diverged.drop(columns=list(RUN_KEYS[1:]))
        blocks.append(f"{title('Diverged runs')}\n\n{lines}\n\n{render(shown, fmt)}")
    phase_titles = {
        "init": "Depth scaling at initialisation (first recorded step)",
        "end": "Depth scaling at the end of training "
        f"(median of the last {analysis.END_STEPS} recorded steps)",
    }
    scaling = sections["depth_scaling"]
    for phase, text in phase_titles.items():
        frame = scaling.loc[scaling["phase"] == phase]
        body = render(depth_scaling_table(frame), fmt) if len(frame) else "(no runs)"
        blocks.append(f"{title(text)}\n\n{body}")
    if sections["accuracy"]:
        sentences = "\n".join(bullet + s for s in sections["accuracy"])
        blocks.append(f"{title('Test and train accuracy against depth, at the training budget')}\n\n{sentences}")
    blocks += _width_blocks(sections, fmt, title, bullet)
    layers = sections["layers"]
    verdicts = dict(zip(diverged["run"], (analysis.diverged_verdict(r) for r in diverged.to_dict("records"))))
    for run in sections["deepest"].to_dict("records"):
        table = layer_table_for_people(layers.loc[layers["run"] == run["run"]].drop(columns="run"))
        text = f"Gradient flow per layer at initialisation: {_run_title(run)}"
        if run["run"] in verdicts:
            text += f" — {verdicts[run['run']]}"
        blocks.append(f"{title(text)}\n\n{render(table, fmt)}")
    if len(sections["flow"]):
        sentences = "\n".join(bullet + s for s in sections["flow"]["sentence"])
        blocks.append(f"{title('Verdicts at initialisation')}\n\n{sentences}")
    return "\n\n".join(blocks) + "\n"


def phase_words(runs: pd.DataFrame) -> dict[str, str]:
    """Each phase in words with the budget it was measured at: "at initialisation", "at the end of
    training (after 40 optimizer steps on 2,048 training images (2 epochs))"."""
    budget = shared_budget(runs)
    end = f"{schema.PHASE_WORDS['end']} (after {budget})" if budget else f"{schema.PHASE_WORDS['end']} (each run's budget)"
    return {**schema.PHASE_WORDS, "end": end}


def _width_blocks(sections: dict, fmt: str, title, bullet: str) -> list[str]:
    """The human report's "Width against depth" blocks; none for a report of one width and one seed."""
    blocks = []
    lines, effect, spread = sections["width_depth"], sections["width_effect"], sections["spread"]
    if len(lines) and pd.to_numeric(lines["test_acc_mean"], errors="coerce").notna().any():
        budget = shared_budget_from(sections)
        text = "\n".join(bullet + s for s in width_depth_sentences(lines, budget))
        blocks.append(f"{title('Width against depth: test accuracy and parameters, grown wider and grown deeper')}"
                      f"\n\n{render(width_depth_table(lines), fmt)}\n\n{text}")
    if len(effect):
        text = "\n".join(bullet + s for s in width_sentences(effect, sections["phase_words"]))
        blocks.append(f"{title('First-to-last gradient ratio against width')}\n\n{text}")
    if len(spread):
        text = "\n".join(bullet + s for s in spread_sentences(spread, sections["spread_trend"]))
        blocks.append(f"{title('Spread over seeds at initialisation against Hanin β (Σ 1/width over hidden layers)')}"
                      f"\n\n{render(spread_table(spread), fmt)}\n\n{text}")
    return blocks


def shared_budget_from(sections: dict) -> str | None:
    """The budget every run of the report trained for (its budget table), or None."""
    return shared_budget(sections["budget"])


def diverged_line(row: dict) -> str:
    """"conv-d3-s0 (conv, depth 3, batch norm) diverged at step 12, epoch 0: the first non-finite
    gradient appeared at layers.2 (from its summary.json)"."""
    title = _run_title(row) if pd.notna(row.get("block")) else str(row["run"])
    step = row.get("step")
    if step is None or pd.isna(step):
        return f"{title}: status diverged; where it started is not recorded"
    when = f"step {int(step)}" + (f", epoch {int(row['epoch'])}" if pd.notna(row.get("epoch")) else "")
    cause, layer = row.get("cause"), row.get("layer")
    what = {"loss": "loss", "activation": "activation", "gradient": "gradient"}.get(cause, "value")
    where = "" if cause == "loss" or layer is None or pd.isna(layer) else f" at {layer}"
    source = "from its summary.json" if row.get("source") == "summary" else "found in its records"
    return f"{title} diverged at {when}: the first non-finite {what} appeared{where} ({source})"


def sweep_frames(sweep: Sweep, metrics: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(records, runs, unreadable) of a loaded sweep, the inputs of ``report_text``.

    Records are read one run at a time: a run whose records cannot be read is named in
    ``unreadable`` with the reason (joining the cells ``load_sweep`` could not read) and the
    others are reported. The runs table is ``Sweep.table()`` with the summary's divergence
    (``"diverged": {"step", "epoch", "layer", "position", "cause"}``) as ``diverged_*`` columns.
    """
    unreadable = dict(sweep.unreadable)
    frames = []
    for run in sweep.runs:
        try:
            frames.append(replace(sweep, runs=[run], unreadable={}).records(metrics=metrics))
        except RunError as exc:
            unreadable[run.name] = str(exc)
    frames = [f for f in frames if not f.empty]
    empty = pd.DataFrame(columns=[*RUN_KEYS, *RECORD_COLUMNS])
    records = pd.concat(frames, ignore_index=True) if frames else empty
    table = runs_table(sweep)
    return records, table.loc[~table["run"].isin(unreadable)].reset_index(drop=True), unreadable


def runs_table(sweep: Sweep) -> pd.DataFrame:
    """``Sweep.table()`` plus ``diverged_step, diverged_epoch, diverged_layer, diverged_position,
    diverged_cause`` from each summary's "diverged" object (NaN where there is none)."""
    table = sweep.table()
    details = [r.summary.get("diverged") if isinstance(r.summary.get("diverged"), dict) else {} for r in sweep.runs]
    for name in DIVERGED_FIELDS:
        column = f"diverged_{name}"
        if column in table:
            continue
        values = pd.Series([d.get(name) for d in details], index=table.index, dtype=object)
        if name in ("step", "epoch", "position"):  # a file may hold anything: numbers or NaN
            table[column] = pd.to_numeric(values, errors="coerce")
        else:
            table[column] = values.map(lambda v: None if v is None else str(v))
    return table


def report_text(
    records: pd.DataFrame, runs: pd.DataFrame | None = None, fmt: str = "table", unreadable: dict | None = None
) -> str:
    """The whole terminal report of a run or a sweep.

    Sections: a header line (run count and status, models when not all are
    DeepCNNs, blocks, depths, norms, seeds, and dataset when a ``dataset``
    column exists); the runs' training budget (``budget_line``) and, when it
    is short, what it can and cannot show (``short_budget_note``); the cells that could
    not be read, by name with the reason (``unreadable``: cell -> why); the
    diverged runs (``analysis.divergence``), a line each and a table; the
    depth-scaling table at init and at end; ``depth_accuracy_sentences``, a test-accuracy and
    a train-accuracy sentence per network, each accuracy with its budget; the per-layer gradient-flow table
    (at init) of the deepest run of each network (and norm), each probe point
    with its role and stack index; one
    ``describe_flow`` sentence per such run. Without ``runs`` the run fields
    come from ``records``. csv and json carry the tidy frames instead:
    "header" (json only; csv has the header line as a comment),
    "depth_scaling" (with a phase column), "layers" (with a run column),
    "flow" (with a sentence column), "diverged" and "unreadable" (cell,
    reason), both empty when there is nothing to say, and "budget"
    (``analysis.training_budget``: each run's steps, training images, epochs,
    test accuracy, at_chance and short_budget).
    """
    _check_format(fmt)
    sections = _sections(records, runs, unreadable)
    if fmt in ("csv", "json"):
        return _machine_report(sections, fmt)
    return _human_report(sections, fmt)


# ---------------------------------------------------------------- the lesson in characters

BAR_WIDTH = 16  # characters for the widest bar
MAX_ROWS = 12  # block rows shown per profile; deeper stacks are sampled evenly (first and last kept)


def _bar(value: float, low: float, high: float) -> str:
    """A log-scale bar: ``low`` draws one character, ``high`` BAR_WIDTH; 0 and non-finite are marked."""
    if not np.isfinite(value):
        return "!" + " " * (BAR_WIDTH - 1)
    if value <= 0:
        return " " * BAR_WIDTH  # exactly zero: no bar (the number beside it says 0)
    span = max(high - low, 1e-12)
    n = 1 + round((BAR_WIDTH - 1) * (np.clip(np.log10(value), low, high) - low) / span)
    return "█" * n + " " * (BAR_WIDTH - n)


def profile_bars(profile: pd.DataFrame, run_names: list[str]) -> str:
    """Side by side, one column per run: the blocks' gradient norm relative to the last block.

    ``profile`` is ``analysis.gradient_profile``; rows are the stack's blocks by stack index
    from the first (nearest the input) to the last, sampled to MAX_ROWS; bars share one log
    scale across all columns.
    """
    blocks = profile.loc[(profile["role"] == analysis.STACK) & profile["run"].isin(run_names)]
    if blocks.empty:
        return ""
    blocks = blocks.assign(stack_index=pd.to_numeric(blocks["stack_index"]).astype(int))
    table = blocks.pivot(index="stack_index", columns="run", values="relative").reindex(columns=run_names)
    if len(table) > MAX_ROWS:
        picks = np.unique(np.linspace(0, len(table) - 1, MAX_ROWS).round().astype(int))
        table = table.iloc[picks]
    finite = table.to_numpy(dtype=float)
    finite = finite[np.isfinite(finite) & (finite > 0)]
    high = float(np.log10(finite.max())) if finite.size else 0.0
    low = max(float(np.log10(finite.min())) if finite.size else -1.0, high - 20)  # at most 20 decades
    cell = 9 + BAR_WIDTH
    lines = ["block".ljust(7) + "".join(name.ljust(cell + 2) for name in run_names)]
    for index, row in table.iterrows():
        label = f"{index + 1:>5}  "
        lines.append(label + "".join(f"{format_number(v):>8} {_bar(v, low, high)}  " for v in row.to_numpy(dtype=float)))
    lines.append(f"(block 1 is nearest the input; values are ‖∂L/∂out‖ relative to the last block; "
                 f"bars on a log scale, {format_number(10 ** low)} to {format_number(10 ** high)}; 0 is exactly zero)")
    return "\n".join(line.rstrip() for line in lines)


def _ratio_cell(ratio, verdict) -> str:
    """"438 · exploding", "0/0 · vanishing", or the verdict alone when it says why there is no ratio."""
    part = _ratio_part({"first_to_last": ratio, "verdict": verdict})
    return SEP.join([*([part.removeprefix("ratio ")] if part else []), str(verdict)])


def ratio_table(flow: pd.DataFrame) -> pd.DataFrame:
    """Rows depth (and width, when there are several), columns network (and norm): "ratio ·
    verdict" of ``analysis.flow_summary`` rows, or of ``analysis.depth_scaling`` rows (one per
    cell: the geometric mean over seeds and their verdict) when there are several seeds."""
    frame = flow.copy()
    frame["column"] = analysis.network_labels(frame)
    if frame["norm"].nunique() > 1:
        frame["column"] = frame["column"] + " / " + frame["norm"].astype(str)
    frame["cell"] = [_ratio_cell(r, v) for r, v in zip(frame["first_to_last"], frame["verdict"])]
    order = list(dict.fromkeys(analysis.sort_by_block(frame, ["model", "block", "norm", "depth"])["column"]))
    table = frame.pivot(index=_row_keys(frame), columns="column", values="cell").reindex(columns=order).sort_index()
    table.columns.name = None
    return table.fillna(MISSING).reset_index()


# ---------------------------------------------------------------- width against depth


def _network_words(row: dict, several_norms: bool = True) -> str:
    """"conv (batch norm)": the network, and its norm when the frame holds several."""
    return analysis.network_label(row) + (f" ({norm_words(row['norm'])})" if several_norms else "")


def _ratio_words(x) -> str:
    """A ratio in a sentence: "2.7e3", "exactly 0", "no ratio" (0/0, diverged, n/a)."""
    if x is None or pd.isna(x):
        return "no ratio"
    return "exactly 0" if x == 0 else format_number(x)


def width_sentences(effect: pd.DataFrame, phase_words: dict | None = None) -> list[str]:
    """One sentence per ``analysis.width_effect`` row, what was measured and where:

        conv (batch norm), depth 32, at initialisation: first-to-last gradient ratio 2.7e3 at
        width 8 and 2.2e3 at width 128 (5 widths, geometric mean over seeds).

    and, per (phase, norm, depth) with several block types, what width and what the block type
    changed (``width_contrast``). ``phase_words`` names each phase with its budget (default
    ``schema.PHASE_WORDS``)."""
    words = {**schema.PHASE_WORDS, **(phase_words or {})}
    sentences = []
    several_norms = effect["norm"].nunique() > 1 if len(effect) else False
    for row in effect.to_dict("records"):
        subject = f"{_network_words(row, several_norms)}, depth {int(row['depth'])}, {words.get(row['phase'], row['phase'])}"
        if row["n_zero_widths"] == row["n_widths"]:
            sentences.append(f"{subject}: first-to-last gradient ratio exactly 0 at every width from {row['narrow']} "
                             f"to {row['wide']} ({row['n_widths']} widths): the gradient underflowed to 0 before "
                             "the first block.")
            continue
        change = ""
        narrow, wide = row["ratio_narrow"], row["ratio_wide"]
        if pd.notna(narrow) and pd.notna(wide) and narrow > 0 and wide > 0:
            change = f", ×{format_number(wide / narrow)} from the narrowest to the widest"
        zeros = f"; exactly 0 at {row['n_zero_widths']} of them" if row["n_zero_widths"] else ""
        seeds = f", geometric mean over {row['n_seeds']} seeds" if row.get("n_seeds", 1) > 1 else ""
        sentences.append(f"{subject}: first-to-last gradient ratio {_ratio_words(narrow)} at width {row['narrow']} "
                         f"and {_ratio_words(wide)} at width {row['wide']} ({row['n_widths']} widths{seeds}{zeros})"
                         f"{change}.")
    return sentences + width_contrast(effect, words)


def width_contrast(effect: pd.DataFrame, phase_words: dict | None = None) -> list[str]:
    """Per (phase, norm, depth) with two or more block types whose ratios are finite and positive:
    how far the width moved any block type's ratio (narrowest to widest) against how far the
    block type moved it at the same width (the largest over the smallest block ratio)."""
    words = {**schema.PHASE_WORDS, **(phase_words or {})}
    sentences = []
    if effect.empty:
        return sentences
    for (phase, norm, depth), group in effect.groupby(["phase", "norm", "depth"], sort=False, dropna=False):
        ok = group.loc[(group["ratio_narrow"] > 0) & (group["ratio_wide"] > 0)
                       & np.isfinite(group["ratio_narrow"]) & np.isfinite(group["ratio_wide"])]
        if ok["block"].nunique() < 2:
            continue
        by_width = np.maximum(ok["ratio_wide"] / ok["ratio_narrow"], ok["ratio_narrow"] / ok["ratio_wide"]).max()
        by_block = max(ok["ratio_narrow"].max() / ok["ratio_narrow"].min(), ok["ratio_wide"].max() / ok["ratio_wide"].min())
        widths = f"{int(ok['narrow'].min())} to {int(ok['wide'].max())}"
        sentences.append(f"{words.get(phase, phase).capitalize()}, depth {int(depth)}, {norm_words(norm)}: going from "
                         f"width {widths} moved a block type's ratio by at most ×{format_number(by_width)}; at the "
                         f"same width the block types' ratios differed by up to ×{format_number(by_block)} "
                         f"({_and([analysis.network_label(r) for r in ok.to_dict('records')])}).")
    return sentences


WIDTH_DEPTH_NAMES = {"direction": "grown", "n_params": "parameters", "beta": "β", "test_acc_mean": "test acc",
                     "n_seeds": "seeds"}


def width_depth_table(lines: pd.DataFrame) -> pd.DataFrame:
    """``analysis.width_depth`` for reading: network, norm, wider/deeper, depth, width,
    parameters, β and "41.2±0.8%" test accuracy (mean ± std over seeds)."""
    if lines.empty:
        return pd.DataFrame(columns=["network", "norm", *WIDTH_DEPTH_NAMES.values()])
    accuracy = [MISSING if pd.isna(m) else f"{format_number(100 * m)}" + ("" if pd.isna(s) else f"±{format_number(100 * s)}")
                + "%" for m, s in zip(lines["test_acc_mean"], lines["test_acc_std"])]
    table = lines.assign(network=analysis.network_labels(lines), test_acc_mean=accuracy,
                         n_params=pd.to_numeric(lines["n_params"], errors="coerce").astype("Int64"))
    table = table[["network", "norm", "direction", "depth", "width", "n_params", "beta", "n_seeds", "test_acc_mean"]]
    return table.rename(columns=WIDTH_DEPTH_NAMES)


def width_depth_sentences(lines: pd.DataFrame, budget: str | None = None) -> list[str]:
    """Per (network, norm): the test accuracy and parameters at the ends of the wider and the deeper
    line, measured "after <budget>" (each run's own budget when ``budget`` is None)."""
    sentences = []
    after = f"after {budget}" if budget else "at each run's training budget"
    several_norms = lines["norm"].nunique() > 1 if len(lines) else False
    for _, group in lines.groupby([*analysis.NETWORK_KEYS], sort=False, dropna=False):
        first = group.iloc[0]
        parts = []
        for direction in analysis.DIRECTIONS:
            line = group.loc[group["direction"] == direction]
            if len(line) < 2:
                continue
            start, end = line.iloc[0], line.iloc[-1]
            axis = "width" if direction == "wider" else "depth"
            fixed = f"depth {start['depth']}" if direction == "wider" else f"width {start['width']}"

            def point(row) -> str:
                accuracy = MISSING if pd.isna(row["test_acc_mean"]) else _percent(row["test_acc_mean"])
                return f"{accuracy} at {axis} {row[axis]} ({format_number(int(row['n_params']))} parameters)" \
                    if pd.notna(row["n_params"]) else f"{accuracy} at {axis} {row[axis]}"
            parts.append(f"grown {direction} at {fixed}, test accuracy went from {point(start)} to {point(end)}")
        if parts:
            sentences.append(f"{_network_words(first, several_norms)}: " + "; ".join(parts) + f", {after}.")
    return sentences


SPREAD_NAMES = {"n_params": "parameters", "beta": "β", "log_ratio_std": "std of ln ratio",
                "log_ratio_mean": "mean of ln ratio"}


def spread_table(spread: pd.DataFrame) -> pd.DataFrame:
    """``analysis.seed_spread`` for reading: network, norm, depth, width, parameters, β, seeds used
    ("3 of 3"), what was left out ("1 exactly 0", "2 non-finite"), mean and std of ln ratio."""
    if spread.empty:
        return pd.DataFrame(columns=["network", "norm", "depth", "width", "parameters", "β", "seeds", "left out",
                                     "mean of ln ratio", "std of ln ratio"])
    left_out = []
    for zero, bad in zip(spread["n_zero"], spread["n_nonfinite"]):
        parts = ([f"{int(zero)} exactly 0"] if zero else []) + ([f"{int(bad)} non-finite"] if bad else [])
        left_out.append(", ".join(parts) or "none")
    table = spread.assign(network=analysis.network_labels(spread),
                          seeds=[f"{int(u)} of {int(n)}" for u, n in zip(spread["n_used"], spread["n_seeds"])],
                          **{"left out": left_out},
                          n_params=pd.to_numeric(spread["n_params"], errors="coerce").astype("Int64"))
    table = table[["network", "norm", "depth", "width", "n_params", "beta", "seeds", "left out", "log_ratio_mean",
                   "log_ratio_std"]]
    return table.rename(columns=SPREAD_NAMES)


def spread_sentences(spread: pd.DataFrame, trend: pd.DataFrame) -> list[str]:
    """What the spread over seeds shows: per (network, norm, depth) with several widths, the std
    of ln ratio at the narrowest and the widest width with their β; per (network, norm), the rank
    correlation with β (``analysis.spread_trend``) in words; and how many seeds were left out."""
    sentences = []
    if spread.empty:
        return sentences
    several_norms = spread["norm"].nunique() > 1
    seeds = int(spread["n_seeds"].max())
    for _, group in spread.groupby([*analysis.NETWORK_KEYS, "depth"], sort=False, dropna=False):
        group = group.loc[group["log_ratio_std"].notna()].sort_values("width")
        if group["width"].nunique() < 2:
            continue
        narrow, wide = group.iloc[0], group.iloc[-1]
        sentences.append(f"{_network_words(narrow, several_norms)}, depth {int(narrow['depth'])}: the standard "
                         f"deviation of ln(first-to-last ratio) over seeds was {format_number(narrow['log_ratio_std'])} "
                         f"at width {int(narrow['width'])} (β = {format_number(narrow['beta'])}) and "
                         f"{format_number(wide['log_ratio_std'])} at width {int(wide['width'])} "
                         f"(β = {format_number(wide['beta'])}).")
    for row in trend.to_dict("records"):
        rho = row["rho"]
        if pd.isna(rho):
            how = "too few networks with a spread to tell how it depends on β"
        elif rho >= analysis.CLEAR_RHO:
            how = f"the spread rises with β: wider nets fluctuate less (Spearman ρ = {rho:.2f})"
        elif rho <= -analysis.CLEAR_RHO:
            how = f"the spread falls as β grows, against Hanin's prediction (Spearman ρ = {rho:.2f})"
        else:
            how = f"no clear relation between the spread and β (Spearman ρ = {rho:.2f})"
        sentences.append(f"{_network_words(row, several_norms)}: over {row['n_networks']} networks, {how}.")
    zero, bad, total = int(spread["n_zero"].sum()), int(spread["n_nonfinite"].sum()), int(spread["n_seeds"].sum())
    if zero or bad:
        sentences.append(f"Left out of every spread: {zero} of the {total} networks with a ratio of exactly 0 and "
                         f"{bad} without a finite ratio (0/0, diverged or too shallow); ln 0 is not a number.")
    return sentences if seeds > 1 else []
