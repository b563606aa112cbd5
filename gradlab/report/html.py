"""One self-contained HTML page of a run or a sweep: text, tables and figures, nothing external.

``build_report(path)`` reads a run or sweep directory through ``gradlab.runs``, computes the
analysis frames (``gradlab.analysis``), draws the figures (``gradlab.report.figures``) and
returns a ``Report``; ``Report.to_html()`` renders it with jinja2 (autoescaped: every run
name and config value is text, never markup). ``write_report(path, out)`` does both and
writes the file.

The page needs nothing but itself: CSS in a ``<style>`` block, figures as PNG data URIs
rendered at ``FIGURE_DPI`` (2× a 96-dpi screen, shown at half their pixel size, so they stay
crisp on high-density screens), no scripts, fonts or links to anything outside the file.

Bounded work for big sweeps:
- records are read one run at a time and only for the metrics a figure needs, then cut to
  the rows the ``init`` and ``end`` phases read (``_phase_rows``), so the sweep-wide frames
  hold at most 1 + ``analysis.END_STEPS`` steps per run;
- the per-step heatmaps read two metrics of at most ``MAX_HEATMAP_RUNS`` runs (beyond that,
  the deepest run of each block type and norm);
- gradient-flow panels show at most ``MAX_DEPTHS`` depths per block type, training curves at
  most ``MAX_CURVE_RUNS`` runs; the page says what it left out.

Accuracies name their budget: the facts and the run list give each run's optimizer steps,
training images and epochs; every sentence comparing accuracies across depths says the budget it
was measured at (``text.accuracy_sentences``); and when every run trained fewer than
``analysis.SHORT_BUDGET_STEPS`` steps, a caption under the title says what so short a budget can
and cannot show (``text.short_budget_note``).

Runs that go wrong stay on the page without breaking it: a diverged run (its summary says so,
or its records hold non-finite values: ``analysis.divergence``) gets a badge, a row in the
"Diverged runs" section and ✕ in the figures, and is left out of every ratio; a cell that
cannot be read (``Sweep.unreadable``, or records that fail to load) is named with the reason
in "Unreadable cells" while the others are reported. Both sections appear only when needed.

The lesson's two experiments get a section each when the directory holds them (``LESSON_SECTIONS``):
"Shattered gradients" reads what ``gradlab shatter PATH`` stored in ``PATH/shatter/``
(``lessons.read_shatter``), "Lesion study" the ``lesion.parquet`` of each run
(``lessons.read_lesions``); both are drawn by ``gradlab.report.lesson_figures`` and say in words
what was measured (``lessons.describe_shatter``, ``lessons.describe_lesion``).

Any model: runs are grouped by network (``analysis.network_label``: the block type, with the
model in front when it is not a DeepCNN) and norm; the gradient-flow section lists, for the
deepest run of each, every probe point by its real module path with its role and stack index
(``text.layer_table_for_people``).
"""
from __future__ import annotations

import base64
import io
import math
import time
from dataclasses import dataclass, field, replace
from html import escape
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd

from gradlab import __version__, analysis, lessons, schema
from gradlab.report import figures, lesson_figures
from gradlab.report.text import (MISSING, budget_line, depth_accuracy_sentences, depth_scaling_table, diverged_line,
                                 diverged_table, format_number, layer_table_for_people, phase_words, ratio_table,
                                 runs_table, shared_budget, short_budget_note, spread_sentences, spread_table,
                                 width_depth_sentences, width_depth_table, width_sentences)
from gradlab.runs import Run, RunError, Sweep, load_sweep
from gradlab.schema import DIVERGED, EVIDENCE, PHASE_WORDS, RECORD_COLUMNS, RUN_KEYS, first_nonfinite, norm_words

FIGURE_DPI = 192  # 2 × 96: PNGs shown at half their pixel width
SCREEN_DPI = 96
INLINE_HEIGHT = 800  # CSS pixels of the frame a notebook shows the page in; the page scrolls inside it
MAX_HEATMAP_RUNS = 8  # more runs than this: the deepest of each (network, norm)
MAX_DEPTHS = 6  # depths per network in the gradient-flow and branch/skip panels
MAX_SEED_LINES = 12  # more lines than this per panel: only the lowest seed is drawn
MAX_CURVE_RUNS = 24  # training curves beyond this: lowest seed, then a selection of depths
REPORTS_FOLDER = "reports"
PHASES = ("init", "end")  # the report's two moments: at initialisation, at the end of training
PHASE_METRICS = sorted({*analysis.LAYER_TABLE_METRICS, *analysis.ACTIVATION_METRICS,
                        "grad_in_branch_norm", "grad_in_skip_norm"})
READ_METRICS = sorted({*PHASE_METRICS, *EVIDENCE})  # what a run's records are read for
HEATMAP_METRICS = ("grad_out_norm", "act_std")
RESIDUAL_BLOCKS = ("res", "resdown")  # the DeepCNN's blocks that record branch and skip parts
SAMPLES = "samples.npz"  # written by gradlab.train._write_samples: uint8 images and class names

SECTIONS = {  # id -> heading; every page has all of them, in this order
    "run": "1 · What was run",
    "gradient-flow": "2 · Gradient flow",
    "depth-scaling": "3 · Depth scaling",
    "width-depth": "4 · Width against depth",
    "heatmaps": "5 · Per-run heatmaps",
    "signal-propagation": "6 · Signal propagation",
    "branch-skip": "7 · Residual branch versus skip path",
    "training-curves": "8 · Training curves",
    "samples": "9 · Sample inputs",
    "depth-table": "10 · Depth-scaling table",
}
LESSON_SECTIONS = {  # id -> heading; only on pages whose directory holds the measurement, after SECTIONS, numbered on
    "shatter": "Shattered gradients",  # gradlab shatter PATH (or gradlab probe --out PATH --shatter): PATH/shatter/
    "lesion": "Lesion study",  # gradlab lesion PATH: lesion.parquet in each run directory
}
PROBLEM_SECTIONS = {  # id -> heading; only on pages that have something to list, right after "run"
    "diverged": "⚠ Diverged runs",
    "unreadable": "⚠ Unreadable cells",
}


# ---------------------------------------------------------------- the report object


@dataclass
class Image:
    """One figure as a PNG data URI, with the width (CSS pixels) to show it at."""

    uri: str
    alt: str
    width: int


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)  # one CSS class per row ("" for none)
    collapsed: bool = False  # inside <details>: long tables stay out of the way


@dataclass
class Section:
    id: str
    title: str
    lead: str = ""  # what to notice, in one or two sentences
    images: list[Image] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # selections, caveats, what a sweep would add
    badge: str = ""  # a short warning beside the heading, e.g. "2 diverged"


@dataclass
class Report:
    """Everything the page shows; ``to_html`` renders it, Jupyter shows it inline."""

    title: str
    facts: list[tuple[str, str]]
    banners: list[str]  # prominent warnings: synthetic data, failed runs, unreadable cells
    sections: list[Section]
    build_seconds: float = 0.0
    caption: str = ""  # under the title: what the runs' training budget can and cannot show, when it is short

    def to_html(self) -> str:
        return _TEMPLATE.render(report=self, version=__version__)

    def _repr_html_(self) -> str:
        """The page in a frame: its stylesheet (body, h2, table, ...) would otherwise restyle the
        whole notebook around it."""
        return (f'<iframe srcdoc="{escape(self.to_html(), quote=True)}" title="{escape(self.title, quote=True)}" '
                f'style="width: 100%; height: {INLINE_HEIGHT}px; border: 1px solid #d9dee2;"></iframe>')

    def section(self, id: str) -> Section:
        return next(s for s in self.sections if s.id == id)


# ---------------------------------------------------------------- reading


def _one_run(sweep: Sweep, run: Run) -> Sweep:
    return replace(sweep, runs=[run], unreadable={})


def _phase_rows(records: pd.DataFrame) -> pd.DataFrame:
    """The rows the ``init`` and ``end`` phases read (analysis's definitions): each (run,
    metric)'s first recorded step and its last ``END_STEPS`` recorded steps."""
    if records.empty:
        return records
    steps = records.groupby(["run", "metric"], observed=True, sort=False)["step"]
    first = records["step"] == steps.transform("min")
    last = steps.rank(method="dense", ascending=False) <= analysis.END_STEPS
    return records.loc[first | last]


def _first_nonfinite_step(records: pd.DataFrame) -> pd.DataFrame:
    """The evidence rows of the run's first non-finite step (``schema.first_nonfinite``; empty
    when there is none): all that ``analysis.divergence`` needs to find it again."""
    found = first_nonfinite(records, by=())
    if found.empty:
        return records.iloc[:0]
    step = found["step"].iloc[0]
    return records.loc[(records["step"] == step) & records["metric"].isin(list(EVIDENCE))]


def _phase_records(sweep: Sweep) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """(phase rows of ``PHASE_METRICS``, first non-finite step's rows, unreadable runs -> why),
    read one run at a time; a run whose records cannot be read is named, not fatal."""
    frames, evidence, unreadable = [], [], {}
    for run in sweep.runs:
        try:
            records = _one_run(sweep, run).records(metrics=READ_METRICS)
        except RunError as exc:
            unreadable[run.name] = str(exc)
            continue
        if records.empty:
            continue
        frames.append(_phase_rows(records.loc[records["metric"].isin(PHASE_METRICS)]))
        evidence.append(_first_nonfinite_step(records))
    empty = pd.DataFrame(columns=[*RUN_KEYS, *RECORD_COLUMNS])
    frames, evidence = [f for f in frames if not f.empty], [f for f in evidence if not f.empty]
    return (pd.concat(frames, ignore_index=True) if frames else empty,
            pd.concat(evidence, ignore_index=True) if evidence else empty, unreadable)


def _samples(runs: list[Run]) -> tuple[np.ndarray, list[str]] | None:
    for run in runs:
        path = run.path / SAMPLES
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as stored:
                    return stored["images"], [str(x) for x in stored["labels"]]
            except (OSError, ValueError, KeyError):  # a corrupt file: the next run's copy will do
                continue
    return None


# ---------------------------------------------------------------- selections


def _spread(values: list, k: int) -> list:
    """At most ``k`` of the sorted ``values``, evenly spread, always the first and the last."""
    values = sorted(values)
    if len(values) <= k:
        return values
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, k)).astype(int))
    return [values[i] for i in picks]


def _networks(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``network`` column (``analysis.network_labels``): what panels are per."""
    return runs.assign(network=analysis.network_labels(runs))


def _depth_selection(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Runs of at most ``MAX_DEPTHS`` depths per (network, norm) and, when panels would get more
    than ``MAX_SEED_LINES`` lines, only the lowest seed; plus a sentence saying so."""
    if runs.empty:
        return runs, ""
    keep, notes = [], []
    for (network, norm), group in _networks(runs).groupby(["network", "norm"], sort=False, dropna=False):
        depths = _spread(group["depth"].dropna().unique().tolist(), MAX_DEPTHS)
        if len(depths) < group["depth"].nunique():
            notes.append(f"{network}: depths {', '.join(format_number(int(d)) for d in depths)}")
        keep.append(group.loc[group["depth"].isin(depths)])
    chosen = pd.concat(keep)
    per_panel = chosen.groupby(["network"], sort=False).size().max()
    if per_panel > MAX_SEED_LINES:
        lowest = chosen.groupby(["network", "norm", "depth"], dropna=False)["seed"].transform("min")
        chosen = chosen.loc[chosen["seed"] == lowest]
        notes.append("one line per depth (the lowest seed)")
    note = f"Showing {len(chosen)} of {len(runs)} runs — " + "; ".join(notes) + "." if notes else ""
    return chosen.drop(columns="network"), note


def _deepest(runs: pd.DataFrame) -> pd.DataFrame:
    """The deepest run of each (network, norm); ties go to the lowest seed, then the run name."""
    if runs.empty:
        return runs
    ordered = _networks(runs).sort_values(["depth", "seed", "run"], ascending=[False, True, True], kind="stable")
    deepest = ordered.drop_duplicates(["network", "norm"]).drop(columns="network")
    return analysis.sort_by_block(deepest, ["model", "block", "norm"])


def _curve_selection(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if len(runs) <= MAX_CURVE_RUNS:
        return runs, ""
    runs = _networks(runs)
    lowest = runs.groupby(["network", "norm", "depth"], dropna=False)["seed"].transform("min")
    chosen, how = runs.loc[runs["seed"] == lowest], ["the lowest seed"]
    groups = chosen.groupby(["network", "norm"], dropna=False).ngroups
    per_group = max(2, MAX_CURVE_RUNS // max(groups, 1))
    if len(chosen) > MAX_CURVE_RUNS:
        parts = []
        for _, group in chosen.groupby(["network", "norm"], sort=False, dropna=False):
            parts.append(group.loc[group["depth"].isin(_spread(group["depth"].unique().tolist(), per_group))])
        chosen = pd.concat(parts)
        how.append(f"at most {per_group} depths per network, evenly spread from shallowest to deepest")
    return chosen.drop(columns="network"), f"Showing {len(chosen)} of {len(runs)} runs: {' and '.join(how)}."


# ---------------------------------------------------------------- text


def _join(values) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    return ", ".join(format_number(v) if not isinstance(v, str) else v for v in distinct) or MISSING


def _span(values: pd.Series) -> str:
    """"12,410" or "1,382 to 21,786": the range of a count over the runs."""
    known = pd.to_numeric(values, errors="coerce").dropna().astype(int)
    if known.empty:
        return MISSING
    low, high = int(known.min()), int(known.max())
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def _ratio(x) -> str:
    return f"×{format_number(x)}" if pd.notna(x) else "no ratio"


def _verdict_sentence(rows: pd.DataFrame) -> str:
    """"conv explodes toward the input (×41); res (×1.3) and skip (×2) stay within ×0.1–×10",
    with "at depth N" after each ratio unless the rows share one depth (the caller says it)."""
    if rows.empty:
        return "no gradient records"
    several_norms = rows["norm"].nunique() > 1
    one_depth = rows["depth"].nunique() == 1
    band = f"×{format_number(analysis.VANISHING_RATIO)}–×{format_number(analysis.EXPLODING_RATIO)}"
    parts = []
    for verdict in ["exploding", "vanishing", "stable", "non-finite", "n/a", DIVERGED]:
        mine = rows.loc[rows["verdict"].astype(str).str.split(" ").str[0] == verdict]
        if mine.empty:
            continue
        if verdict == DIVERGED:  # each with its own step and layer
            for row in mine.to_dict("records"):
                norm = f" ({norm_words(row['norm'])})" if several_norms else ""
                where = "" if one_depth else f" at depth {format_number(int(row['depth']))}"
                parts.append(f"{analysis.network_label(row)}{norm}{where} {row['verdict']}")
            continue
        names = []
        for row in mine.to_dict("records"):
            name = analysis.network_label(row) + (f" ({norm_words(row['norm'])})" if several_norms else "")
            where = "" if one_depth else f" at depth {format_number(int(row['depth']))}"
            names.append(f"{name} ({_ratio(row['first_to_last'])}{where})")
        one = len(names) == 1
        listed = names[0] if one else ", ".join(names[:-1]) + " and " + names[-1]
        verbs = {"exploding": f"{'explodes' if one else 'explode'} toward the input",
                 "vanishing": f"{'vanishes' if one else 'vanish'} toward the input",
                 "stable": f"{'stays' if one else 'stay'} within {band}",
                 "non-finite": "non-finite", "n/a": "too shallow to tell"}
        parts.append(f"{listed} {verbs[verdict]}")
    return "; ".join(parts)


def _deepest_verdicts(scaling: pd.DataFrame) -> pd.DataFrame:
    """The depth-scaling row (seeds pooled) of the deepest depth of each (phase, model, block, norm)."""
    rows = scaling.dropna(subset=["verdict"])
    if rows.empty:
        return rows
    keys = ["phase", "model", "block", "norm"]
    rows = rows.sort_values("depth", ascending=False, kind="stable").drop_duplicates(keys)
    return analysis.sort_by_block(rows, keys)


def _png(fig, alt: str, dpi: int) -> Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    width = int(round(fig.get_figwidth() * SCREEN_DPI))
    fig.clear()  # the Figure was made without pyplot: dropping it frees it, nothing to close
    return Image("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), alt, width)


def _table(frame: pd.DataFrame, caption: str, index_name: str | None = None, collapsed: bool = False,
           row_classes: list[str] | None = None) -> Table:
    if index_name is not None:
        frame = frame.reset_index().rename(columns={frame.index.name or "index": index_name})
    cells = [[v if isinstance(v, str) else format_number(v) for v in row]
             for row in frame.itertuples(index=False, name=None)]
    return Table(caption, [str(c) for c in frame.columns], cells, row_classes or [], collapsed)


# ---------------------------------------------------------------- the sections


def _wall_words(wall: pd.Series, lower_bound: pd.Series) -> str:
    """"12,345 s of training in total, longest run 4,567 s", and how many runs' times are lower
    bounds (``runs._wall_seconds``)."""
    words = f"{format_number(wall.sum())} s of training in total, longest run {format_number(wall.max())} s"
    if lower_bound.any():
        n = int(lower_bound.sum())
        words += (f" (at least: {n} run{'s' if n > 1 else ''} written by an older gradlab, resumed or still "
                  f"running, recorded less wall time than {'their' if n > 1 else 'its'} epochs' measured training "
                  f"time, which is counted instead)")
    return words


def _header(sweep: Sweep, runs: pd.DataFrame, path: Path,
            diverged: pd.DataFrame) -> tuple[list[tuple[str, str]], list[str], Table]:
    """The facts list (what, how, on what, how long), the banners and the run list."""
    configs = [r.config for r in sweep.runs]

    def each(section: str, key: str) -> str:
        """The distinct values of ``config[section][key]`` over the runs, joined."""
        return _join([(c.get(section) or {}).get(key) for c in configs])

    synthetic = any(bool(c.get("synthetic")) for c in configs)
    counts = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items()) if len(runs) else ""
    kind = "single run" if not sweep.config and len(sweep.runs) == 1 else "sweep"
    what = f"{path.name} ({kind}: {len(runs)} run{'s' if len(runs) != 1 else ''}{', ' + counts if counts else ''})"
    machine = f"{_join([c.get('device') for c in configs])} · {each('hardware', 'processor')} · " \
              f"{each('hardware', 'cpu_count')} CPUs"
    if each("hardware", "cuda") != MISSING:
        machine += f" · GPU {each('hardware', 'cuda')}"
    dataset = ("SYNTHETIC DATA (seeded noise with learnable labels, not real images)" if synthetic
               else _join([c.get("dataset") for c in configs]))
    if any((c.get("train") or {}).get("subset") for c in configs):
        dataset += f" · first {each('train', 'subset')} training images"
    wall = pd.to_numeric(runs["wall_seconds"], errors="coerce") if len(runs) else pd.Series(dtype=float)
    lower_bound = runs["wall_lower_bound"].fillna(False).astype(bool)  # runs._wall_seconds
    facts = [
        ("Report of", what),
        ("Models", _join(runs["model"])),
        ("Blocks", _join(runs["block"])),
        ("Depths", _join(runs["depth"])),
        ("Parameters", _span(runs["n_params"]) if len(runs) else MISSING),
        ("Norms", _join([norm_words(n) for n in runs["norm"]])),
        ("Seeds", _join(runs["seed"])),
        ("Epochs", each("train", "epochs")),
        ("Training budget", (budget_line(runs) or MISSING).removeprefix("Training budgets: ")
         .removeprefix("Training budget: ")),
        ("Width · batch · learning rate", f"{_join(runs['width'])} · {each('train', 'batch_size')} · "
                                          f"{each('train', 'lr')}"),  # width: a DeepCNN's option alone
        ("Dataset", dataset),
        ("Hardware", machine),
        ("Versions", f"gradlab {each('versions', 'gradlab')} · torch {each('versions', 'torch')} · "
                     f"Python {each('versions', 'python')}"),
        ("Wall time", _wall_words(wall, lower_bound) if wall.notna().any() else MISSING),
    ]
    banners = []
    if synthetic:
        banners.append("Synthetic data: these runs trained on seeded noise images, not on CIFAR-10. "
                       "Accuracies say nothing about real images; gradient flow at initialisation still does.")
    bad = runs.loc[runs["status"].isin(["failed", DIVERGED]) | runs["is_diverged"]] if len(runs) else runs
    if len(bad):
        banners.append(f"{len(bad)} run(s) failed or diverged: {', '.join(bad['run'].astype(str))}. "
                       "They are marked in the run list; their figures stop where their records stop, and "
                       "diverged runs are left out of every gradient ratio.")
    running = runs.loc[runs["status"] == "running"] if len(runs) else runs
    if len(running):
        banners.append(f"{len(running)} run(s) still running or interrupted: {', '.join(running['run'].astype(str))}.")
    cells = sweep.config.get("cells") or []
    if len(cells) > len(sweep.runs) + len(sweep.unreadable):
        waiting = len(cells) - len(sweep.runs) - len(sweep.unreadable)
        banners.append(f"{waiting} of the sweep's {len(cells)} cells have not started yet; this page shows the others.")
    if sweep.unreadable:
        banners.append(f"{len(sweep.unreadable)} cell(s) could not be read and are left out: "
                       f"{', '.join(sweep.unreadable)}. See Unreadable cells.")
    columns = ["run", "model", "block", "depth", "width", "norm", "seed", "n_params", "beta", "status", "diverged",
               "epochs_done", "steps", "train_images", "final_train_acc", "best_val_acc", "test_acc", "wall_seconds",
               "error"]
    where = {row["run"]: analysis.diverged_verdict(row).removeprefix(DIVERGED).strip() or "yes"
             for row in diverged.to_dict("records")}
    listing = runs.assign(diverged=[where.get(r, "") for r in runs["run"]]).reindex(columns=columns)
    for column in ("final_train_acc", "best_val_acc", "test_acc"):
        listing[column] = [f"{format_number(100 * v)}%" if pd.notna(v) else MISSING
                           for v in pd.to_numeric(listing[column], errors="coerce")]
    listing["wall_seconds"] = [MISSING if pd.isna(v) else f"≥ {format_number(v)}" if low else format_number(v)
                               for v, low in zip(wall, lower_bound)]
    classes = ["diverged" if d else s if s in ("failed", "running") else ""
               for s, d in zip(listing["status"].astype(str), runs["is_diverged"])]
    table = _table(listing, f"All {len(runs)} runs", collapsed=len(runs) > 12, row_classes=classes)
    return facts, banners, table


def _gradient_flow(profile, scaling, runs, flow, diverged, layers, dpi) -> Section:
    section = Section("gradient-flow", SECTIONS["gradient-flow"])
    if profile.empty:
        section.notes.append("No gradient records: these runs were trained with recording off (--record-every 0).")
        return section
    shown, note = _depth_selection(runs.loc[runs["run"].isin(set(profile["run"]))])
    verdicts = _deepest_verdicts(scaling.loc[scaling["depth"].isin(set(shown["depth"]))])
    lines = []
    for phase in PHASES:
        rows = verdicts.loc[verdicts["phase"] == phase]
        if len(rows):
            depth = f" (depth {format_number(int(rows['depth'].iloc[0]))})" if rows["depth"].nunique() == 1 else ""
            lines.append(f"{PHASE_WORDS[phase].capitalize()}{depth}: {_verdict_sentence(rows)}.")
    section.lead = (
        "Each line is one network: the norm of the loss gradient at each probe point, input on the left, "
        "output on the right. The gradient starts at the output and travels left; a line that climbs "
        "toward the left means gradients grow (explode) on their way to the input, one that falls means "
        "they vanish. Flat lines are healthy.")
    # ✕ where a run diverged, in the panels of the phases it had diverged by
    hit = flow.loc[flow["verdict"].astype(str).str.startswith(DIVERGED), ["run", "phase"]]
    fig = figures.gradient_flow(profile.loc[profile["run"].isin(set(shown["run"]))], verdicts=verdicts,
                                title="\n".join(lines), diverged=hit.merge(diverged, on="run"))
    section.images.append(_png(fig, "Gradient norm against position, per network, at initialisation and at "
                                    "the end of training. " + " ".join(lines), dpi))
    section.notes += [n for n in [note] if n]
    section.notes.append(f"Verdicts compare the gradient at the first block with the last block: ×"
                         f"{format_number(analysis.EXPLODING_RATIO)} or more is exploding, ×"
                         f"{format_number(analysis.VANISHING_RATIO)} or less vanishing. The end of training is "
                         f"the median of the last {analysis.END_STEPS} recorded steps.")
    for row in runs.loc[runs["run"].isin(list(layers))].to_dict("records"):
        title = (f"Per probe point at initialisation: {row['run']} ({analysis.network_label(row)}, depth "
                 f"{format_number(row['depth'])}, {norm_words(row['norm'])})")
        section.tables.append(_table(layer_table_for_people(layers[row["run"]]), title, collapsed=True))
    return section


def _depth_scaling(scaling, flow, runs, chance, dpi) -> Section:
    section = Section("depth-scaling", SECTIONS["depth-scaling"])
    if runs.empty:
        section.notes.append("No runs yet.")
        return section
    if runs["depth"].nunique() < 2:
        depth = _join(runs["depth"])
        section.notes.append(
            f"This report covers one depth ({depth}). A sweep over depths — for example "
            "`gradlab sweep --blocks conv,res,skip --depths 2,8,32` — adds the gradient ratio and the "
            "accuracy against depth for each block type, the picture of how trainability scales.")
        return section
    budget = shared_budget(runs)
    section.lead = ("Top: how many times larger the gradient is at the first block than at the last, for each "
                    "depth. Lines that rise with depth are exploding nets; lines that stay near ×1 keep "
                    "their gradients usable at any depth; lines that fall below it are vanishing ones. Bottom: "
                    "the test accuracy each depth reached, and its train accuracy in the last epoch (a plain "
                    "stack whose training accuracy falls with depth shows He et al.'s degradation), "
                    + (f"after {budget}." if budget else "at its own training budget (see the run list)."))
    if scaling["first_to_last"].notna().any():
        fig = figures.depth_scaling_ratio(scaling, flow=flow)
        section.images.append(_png(fig, "First-to-last gradient ratio against depth per block type.", dpi))
    else:
        section.notes.append("No gradient ratios (no records, or every net has fewer than 2 blocks).")
    shown = runs.assign(status=runs["status"].mask(runs["is_diverged"], DIVERGED))  # ✕ for diverged runs
    after = f"after {budget}" if budget else "at each run's training budget"
    fig = figures.accuracy_vs_depth(shown, chance=chance,
                                    title=f"Accuracy against depth, {after}; line: mean over seeds, dots: runs")
    section.images.append(_png(fig, f"Test accuracy and last-epoch train accuracy against depth per block type, "
                                    f"{after}.", dpi))
    section.notes += depth_accuracy_sentences(runs, chance)
    return section


def _heatmaps(sweep: Sweep, runs: pd.DataFrame, diverged: pd.DataFrame, dpi: int) -> Section:
    section = Section("heatmaps", SECTIONS["heatmaps"])
    section.lead = ("Each row is a probe point (input at the top), each column a training step; colour is "
                    "the gradient norm (left) and the activation standard deviation (right), on a log "
                    "scale. A vertical colour gradient means the scale changes with depth; a horizontal "
                    "one, that training changes it.")
    recorded = runs.loc[runs["has_records"]]
    if recorded.empty:
        section.notes.append("No per-step records to draw.")
        return section
    chosen = recorded if len(recorded) <= MAX_HEATMAP_RUNS else _deepest(recorded)
    if len(chosen) < len(recorded):
        section.notes.append(f"Showing {len(chosen)} of {len(recorded)} runs: the deepest run of each block "
                             "type and norm (lowest seed).")
    by_name = {r.name: r for r in sweep.runs}
    frames, labels = [], {}
    for row in chosen.to_dict("records"):
        columns = ["step", "layer", "position", "metric", "value"]
        records = by_name[row["run"]].records(metrics=list(HEATMAP_METRICS), columns=columns)
        frames.append(records.assign(run=row["run"]))
        labels[row["run"]] = (f"{row['run']}: {analysis.network_label(row)}, depth {format_number(int(row['depth']))}, "
                              f"{norm_words(row['norm'])}")
        if row["status"] == "failed" or row["is_diverged"]:
            labels[row["run"]] += " (diverged)" if row["is_diverged"] else " (failed)"
    fig = figures.run_heatmaps(pd.concat(frames, ignore_index=True), HEATMAP_METRICS, labels=labels,
                               title="Gradient norm and activation std per probe point and step", diverged=diverged)
    section.images.append(_png(fig, "Heatmaps of gradient norm and activation std per probe point and training "
                                    f"step for {', '.join(chosen['run'])}.", dpi))
    return section


def _signal(activation: pd.DataFrame, runs: pd.DataFrame, dpi: int) -> Section:
    section = Section("signal-propagation", SECTIONS["signal-propagation"])
    section.lead = ("How the forward signal changes through the net at initialisation (Brock et al. 2021): "
                    "the squared channel mean grows when activations drift off zero; the channel variance "
                    "shows whether the signal blows up or dies; in residual blocks the branch variance "
                    "against the skip variance says which path carries the signal.")
    if activation.empty:
        section.notes.append("No activation statistics recorded.")
        return section
    chosen = _deepest(runs.loc[runs["run"].isin(set(activation["run"]))])
    fig = figures.signal_propagation(activation.loc[activation["run"].isin(set(chosen["run"]))])
    section.images.append(_png(fig, "Activation channel mean squared, channel variance and branch versus skip "
                                    "variance against position.", dpi))
    section.notes.append(f"The deepest run of each network{' and norm' if runs['norm'].nunique() > 1 else ''}: "
                         f"{', '.join(chosen['run'])}.")
    return section


def _branch_skip(share: pd.DataFrame, runs: pd.DataFrame, dpi: int) -> Section:
    section = Section("branch-skip", SECTIONS["branch-skip"])
    residual = (runs["model"] == schema.DEFAULT_MODEL) & runs["block"].isin(RESIDUAL_BLOCKS)
    if share.empty and residual.any():
        section.notes.append("No branch/skip gradient records for the residual runs (recording was off).")
        return section
    if share.empty:
        section.notes.append("No residual blocks with branch and skip records in this report, so there is no "
                             "branch/skip split to show. A sweep with --blocks res adds it.")
        return section
    section.lead = ("For each residual block, the share of the squared input-gradient norm that came through "
                    "the residual branch rather than the identity skip. Near 0 the skip path carries the "
                    "gradient, which is why residual nets keep it from exploding.")
    shown, note = _depth_selection(runs.loc[runs["run"].isin(set(share["run"]))])
    fig = figures.branch_skip(share.loc[share["run"].isin(set(shown["run"]))])
    section.images.append(_png(fig, "Branch share of the input gradient per residual block.", dpi))
    section.notes += [n for n in [note] if n]
    section.notes.append("Shares of b² / (b² + s²) for branch part b and skip part s; the parts are not "
                         "orthogonal, so this is a share of squared part norms, not of the total.")
    return section


def _training(sweep: Sweep, runs: pd.DataFrame, diverged: pd.DataFrame, dpi: int) -> Section:
    section = Section("training-curves", SECTIONS["training-curves"])
    section.lead = ("The training loss at every step (top) and the train and validation accuracy after every "
                    "epoch (bottom: train solid with filled markers, validation dashed with open ones; a run of "
                    "one epoch has only a marker each, as accuracy is measured after whole epochs); darker "
                    "colours are deeper nets.")
    chosen, note = _curve_selection(runs)
    by_name = {r.name: r for r in sweep.runs}
    shown = replace(sweep, runs=[by_name[name] for name in chosen["run"]])
    steps, history = shown.steps(), shown.history()
    if steps.empty and history.empty:
        section.notes.append("No finished epochs yet.")
        return section
    fig = figures.training_curves(steps, history, diverged=diverged)
    section.images.append(_png(fig, "Training loss per step and accuracy per epoch, per block type.", dpi))
    section.notes += [n for n in [note] if n]
    return section


def _samples_section(sweep: Sweep, synthetic: bool, dpi: int) -> Section:
    section = Section("samples", SECTIONS["samples"])
    samples = _samples(sweep.runs)
    if samples is None:
        section.notes.append(f"No {SAMPLES} in the run directories.")
        return section
    images, labels = samples
    kind = "synthetic" if synthetic else "test"
    section.lead = f"The first {len(labels)} {kind} images the nets were evaluated on, with their class names."
    fig = figures.sample_grid(images, labels, title=f"Sample {kind} images")
    section.images.append(_png(fig, "Sample images: " + ", ".join(labels) + ".", dpi))
    return section


def _base_width_runs(runs: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs at each network's base width (``analysis.at_base_width``) and, when that leaves
    runs out, a note saying so."""
    chosen = analysis.at_base_width(runs)
    if len(chosen) == len(runs):
        return runs, ""
    widths = _join(pd.to_numeric(chosen["width"], errors="coerce").dropna().astype(int).tolist())
    return chosen, (f"Width {widths} only ({len(chosen)} of {len(runs)} runs): the other widths are in "
                    f"{SECTIONS['width-depth']}.")


def _noted(section: Section, note: str) -> Section:
    if note:
        section.notes.insert(0, note)
    return section


def _probe_budget(sweep: Sweep) -> str | None:
    """"3 batches of 256 images" for a stored probe (its sweep.json), else None."""
    probe = sweep.config.get("probe") if isinstance(sweep.config, dict) else None
    if not isinstance(probe, dict) or not isinstance(probe.get("batches"), int):
        return None
    batches = probe["batches"]
    return f"{batches} batch{'es' if batches != 1 else ''} of {probe.get('batch_size')} images"


def _width_depth(scaling: pd.DataFrame, flow: pd.DataFrame, runs: pd.DataFrame, chance, probe_budget: str | None,
                 dpi: int) -> Section:
    section = Section("width-depth", SECTIONS["width-depth"])
    widths = pd.to_numeric(runs["width"], errors="coerce").dropna().unique() if len(runs) else []
    if len(widths) < 2:
        section.notes.append(
            f"This report covers one width ({_join(list(widths))}). A sweep over widths — for example `gradlab sweep "
            "--blocks conv,res --depths 2,8,16,32 --widths 16,32,64,128 --shape wider-deeper` — adds test accuracy "
            "against parameters for networks grown wider and grown deeper, and the gradient ratio against width; "
            "`gradlab probe --widths 8,32,128 --seeds 0,1,2` adds the spread over seeds against Hanin's β.")
        return section
    words = phase_words(runs)
    seeds = int(runs["seed"].nunique())
    if probe_budget:
        words["init"] = f"at initialisation ({probe_budget}" + (f", {seeds} seeds)" if seeds > 1 else ")")
    section.lead = ("A network can grow wider (more channels per layer) or deeper (more blocks). Here both, measured: "
                    "the first-to-last gradient ratio against width at fixed depth, and where the runs trained, test "
                    "accuracy against the parameters spent growing each way.")
    lines = analysis.width_depth(runs)
    if len(lines) and pd.to_numeric(lines["test_acc_mean"], errors="coerce").notna().any():
        budget = shared_budget(runs)
        after = f"after {budget}" if budget else "at each run's training budget"
        section.images.append(_png(figures.accuracy_vs_params(lines, chance=chance,
                                                              title=f"Test accuracy against parameters, {after}"),
                                   f"Test accuracy against parameter count, grown wider and grown deeper, {after}.",
                                   dpi))
        section.notes += width_depth_sentences(lines, budget)
        section.tables.append(_table(width_depth_table(lines), "Grown wider (at the base depth) and grown deeper (at "
                                     "the base width): parameters, β and test accuracy (mean ± std over seeds)"))
    trained = (pd.to_numeric(runs["epochs_done"], errors="coerce").fillna(0) > 0).any()
    phases = [p for p in PHASES if p in set(flow["phase"]) and (p == "init" or trained)]  # a probe has no end
    shown = scaling.loc[scaling["phase"].isin(phases)]
    if shown["first_to_last"].notna().any() or (shown["first_to_last"] == 0).any():
        section.images.append(_png(figures.ratio_vs_width(shown), "First-to-last gradient ratio against width, a "
                                   "panel per block type, a line per depth.", dpi))
        effect = analysis.width_effect(shown)
        section.notes += width_sentences(effect, words)
        for phase in phases:
            rows = shown.loc[shown["phase"] == phase]
            if len(rows):
                section.tables.append(_table(ratio_table(rows), f"First-to-last gradient ratio {words[phase]} "
                                             "(geometric mean over seeds · verdict)", collapsed=True))
    spread = analysis.seed_spread(flow, runs)
    if seeds > 1 and len(spread):
        section.images.append(_png(figures.spread_vs_beta(spread), "Standard deviation over seeds of the log "
                                   "gradient ratio at initialisation against Hanin's β, one marker per network.", dpi))
        section.notes.append("Hanin (2018): for fully connected ReLU nets the fluctuation of gradients grows with β = "
                             "Σ 1/width over the hidden layers. Here a layer's width is its channel count, an "
                             "approximation: the theorem does not cover convolutions, BatchNorm or skips.")
        section.notes += spread_sentences(spread, analysis.spread_trend(spread))
        section.tables.append(_table(spread_table(spread), "Spread over seeds of ln(first-to-last ratio) at "
                                     "initialisation, per network, with what was left out"))
    return section


def _diverged_section(diverged: pd.DataFrame, runs: pd.DataFrame) -> Section | None:
    if diverged.empty:
        return None
    section = Section("diverged", PROBLEM_SECTIONS["diverged"], badge=f"{len(diverged)} diverged")
    section.lead = ("These runs produced a non-finite loss, activation or gradient. What they record after that "
                    "step means nothing, so they are left out of every gradient ratio and verdict from then on; "
                    "the figures mark them with ✕ and leave their non-finite points out.")
    table = diverged_table(diverged, runs)
    section.notes = [diverged_line(row) for row in table.to_dict("records")]
    section.tables.append(_table(table, "Where each run diverged (source: its summary.json, or the first "
                                        "non-finite value in its records)",
                                 row_classes=["diverged"] * len(table)))
    return section


def _unreadable_section(unreadable: dict[str, str]) -> Section | None:
    if not unreadable:
        return None
    section = Section("unreadable", PROBLEM_SECTIONS["unreadable"], badge=f"{len(unreadable)} unreadable")
    section.lead = ("These cells could not be read, so this page leaves them out and reports the others. "
                    "Each reason names the file that failed.")
    frame = pd.DataFrame(sorted(unreadable.items()), columns=["cell", "reason"])
    section.tables.append(_table(frame, "Cells left out", row_classes=["failed"] * len(frame)))
    return section


def _depth_table(scaling: pd.DataFrame, runs: pd.DataFrame) -> Section:
    section = Section("depth-table", SECTIONS["depth-table"])
    budget = shared_budget(runs)
    after = f"after {budget}" if budget else "at each run's training budget (see the run list)"
    section.lead = (f"Per depth and block type: test accuracy (mean ± std over seeds) {after}, the first-to-last "
                    "gradient ratio (geometric mean over seeds) and the verdict.")
    titles = {"init": "at initialisation", "end": f"at the end of training (median of the last "
                                                  f"{analysis.END_STEPS} recorded steps)"}
    for phase in PHASES:
        rows = scaling.loc[scaling["phase"] == phase]
        if len(rows):
            section.tables.append(_table(depth_scaling_table(rows), f"Depth scaling {titles[phase]}",
                                         index_name="depth"))
    if not section.tables:
        section.notes.append("No runs to tabulate.")
    return section


def _lesson_title(id: str, present: list[str]) -> str:
    """"10 · Shattered gradients": numbered after ``SECTIONS`` among the lesson sections present."""
    return f"{len(SECTIONS) + 1 + present.index(id)} · {LESSON_SECTIONS[id]}"


def _shatter_section(path: Path, title: str, dpi: int) -> Section:
    section = Section("shatter", title)
    section.lead = ("Shattered gradients (Balduzzi et al. 2017): on the line between two test images, the gradient "
                    "of the output with respect to the input at each point, and the mean cosine similarity of "
                    "gradients at neighbouring points (1: the same direction; 0: unrelated, like white noise). "
                    "Every point is evaluated on its own, in eval mode.")
    try:
        stored = lessons.read_shatter(path / lessons.SHATTER_FOLDER)
    except RunError as exc:
        section.notes.append(f"The stored measurement could not be read: {exc}")
        return section
    pairs, images = stored
    summary = lessons.summarise_shatter(pairs)
    if summary.empty:
        section.notes.append("The stored measurement holds no rows.")
        return section
    section.images.append(_png(lesson_figures.shatter_similarity(summary), "Neighbouring-gradient similarity "
                               "against depth, a line per block type, ±1 standard deviation over image pairs.", dpi))
    section.images.append(_png(lesson_figures.shatter_autocorrelation(summary), "Mean cosine similarity of "
                               "gradients k points apart against k, a panel per block type, a line per depth.", dpi))
    if not images.empty:
        section.images.append(_png(lesson_figures.gradient_lines(images), "The input gradient along the line "
                                   "between two test images, for the shallowest and deepest network of each "
                                   "block type.", dpi))
    section.notes += lessons.describe_shatter(summary)
    section.tables.append(_table(lessons.similarity_table(summary), "Neighbouring-gradient similarity (mean ± "
                                 "standard deviation over image pairs), per depth and block type"))
    section.tables.append(_table(lessons.autocorrelation_table(summary), "Mean cosine similarity of gradients "
                                 "k points apart (lag k), per network", collapsed=True))
    return section


def _lesion_section(frame: pd.DataFrame, title: str, chance: float | None, dpi: int) -> Section:
    section = Section("lesion", title)
    images = int(frame["images"].max()) if "images" in frame and frame["images"].notna().any() else None
    on = f"{images:,} test images" if images else "the test images"
    section.lead = ("Lesion study (Veit et al. 2016): the test accuracy of each trained network (best.pt, eval "
                    f"mode, BatchNorm with the checkpoint's running statistics, on {on}) with single blocks "
                    "of its stack replaced by the identity, and with k blocks deleted at once (random sets).")
    chance = chance if chance is not None else lessons.CHANCE
    k_summary, single = lessons.lesion_k(frame), lessons.lesion_single(frame)
    section.images.append(_png(lesson_figures.lesion_k_blocks(k_summary, chance=chance), "Test accuracy against "
                               "the number of blocks deleted at once, a line per network, chance marked.", dpi))
    section.images.append(_png(lesson_figures.lesion_single_blocks(single, chance=chance), "Test accuracy after "
                               "deleting each single block along the stack, a line per network.", dpi))
    section.notes += lessons.describe_lesion(frame)
    section.tables.append(_table(lessons.k_table(frame), "Test accuracy with k blocks deleted at once (mean ± "
                                 "standard deviation in points over random sets (how many); k = 0: intact)"))
    section.tables.append(_table(lessons.single_table(frame), "Test accuracy with one block deleted"))
    swaps = lessons.swap_table(frame)
    if len(swaps):
        section.tables.append(_table(swaps, "Test accuracy with two adjacent blocks swapped", collapsed=True))
    return section


def _lesson_sections(sweep: Sweep, path: Path, dpi: int) -> list[Section]:
    """The lesson's sections whose data the directory holds, in ``LESSON_SECTIONS`` order."""
    lesions = lessons.read_lesions(sweep)
    present = [id for id, here in (("shatter", (path / lessons.SHATTER_FOLDER / lessons.SHATTER).is_file()),
                                   ("lesion", not lesions.empty)) if here]
    sections = []
    if "shatter" in present:
        sections.append(_shatter_section(path, _lesson_title("shatter", present), dpi))
    if "lesion" in present:
        sections.append(_lesion_section(lesions, _lesson_title("lesion", present), _chance(sweep), dpi))
    return sections


# ---------------------------------------------------------------- building


def _chance(sweep: Sweep) -> float | None:
    classes = [len(r.config.get("classes") or []) for r in sweep.runs]
    classes = [c for c in classes if c]
    return 1 / max(classes) if classes else None


def build_report(path, dpi: int = FIGURE_DPI) -> Report:
    """Read the run or sweep directory ``path`` and draw every section of the page."""
    start = time.perf_counter()
    path = Path(path).resolve()  # "." has a name once resolved
    sweep = load_sweep(path)
    records, evidence, bad_records = _phase_records(sweep)
    # a run whose records cannot be read is left out like a cell that cannot be read at all
    sweep = replace(sweep, runs=[r for r in sweep.runs if r.name not in bad_records],
                    unreadable={**sweep.unreadable, **bad_records})
    runs = runs_table(sweep)
    diverged = analysis.divergence(evidence, runs)
    runs["has_records"] = runs["run"].isin(set(records["run"]))
    runs["is_diverged"] = runs["run"].isin(set(diverged["run"]))
    plain_runs = runs.drop(columns=["has_records", "is_diverged"])
    profile = pd.concat([analysis.gradient_profile(records, p).assign(phase=p) for p in PHASES], ignore_index=True)
    flow = analysis.flow_summary(records, phases=PHASES, diverged=diverged)
    scaling = pd.concat([analysis.depth_scaling(records, plain_runs, p, diverged) for p in PHASES],
                        ignore_index=True)
    activation = analysis.activation_profile(records, "init")
    deepest = _deepest(runs.loc[runs["has_records"]])
    layers = {run: analysis.layer_table(records, run, "init") for run in deepest["run"]}
    share = pd.concat([analysis.branch_skip_share(records, p).assign(phase=p) for p in PHASES], ignore_index=True)
    del records, evidence

    facts, banners, listing = _header(sweep, runs, path, diverged)
    # depth-only views draw the base width; the width section draws the rest
    depth_runs, width_note = _base_width_runs(runs)
    header = Section("run", SECTIONS["run"], tables=[listing])
    synthetic = any(bool(r.config.get("synthetic")) for r in sweep.runs)
    problems = [_diverged_section(diverged, plain_runs), _unreadable_section(sweep.unreadable)]
    sections = [
        header,
        *[s for s in problems if s is not None],
        _noted(_gradient_flow(profile, scaling, depth_runs, flow, diverged, layers, dpi), width_note),
        _noted(_depth_scaling(analysis.at_base_width(scaling), flow.loc[flow["run"].isin(set(depth_runs["run"]))],
                              depth_runs, _chance(sweep), dpi), width_note),
        _width_depth(scaling, flow, plain_runs, _chance(sweep), _probe_budget(sweep), dpi),
        _heatmaps(sweep, runs, diverged, dpi),
        _signal(activation, runs, dpi),
        _noted(_branch_skip(share, depth_runs, dpi), width_note),
        _noted(_training(sweep, depth_runs, diverged, dpi), width_note),
        _samples_section(sweep, synthetic, dpi),
        _depth_table(scaling, plain_runs),
        *_lesson_sections(sweep, path, dpi),
    ]
    title = f"gradlab report: {path.name}"
    report = Report(title, facts, banners, sections, caption=short_budget_note(plain_runs) or "")
    report.build_seconds = time.perf_counter() - start
    return report


def default_html_path(path) -> Path:
    """``reports/<name>.html`` for the run or sweep directory ``path``."""
    return Path(REPORTS_FOLDER) / f"{Path(path).resolve().name}.html"


def write_report(path, out_file=None, dpi: int = FIGURE_DPI) -> Path:
    """Build the report of ``path`` and write it to ``out_file`` (default ``default_html_path``)."""
    out = Path(out_file) if out_file is not None else default_html_path(path)
    html = build_report(path, dpi=dpi).to_html()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html, encoding="utf-8")
    return out


# ---------------------------------------------------------------- the page

_CSS = """
:root { --ink: #1d2327; --muted: #5b6770; --rule: #d9dee2; --warn: #9a3412; --warn-bg: #fff4e5; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #fafbfc; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; background: #fff; }
h1 { font-size: 1.6rem; margin: 0 0 4px; }
h2 { font-size: 1.25rem; margin: 40px 0 8px; padding-top: 12px; border-top: 1px solid var(--rule); }
nav { font-size: .9rem; margin: 8px 0 16px; color: var(--muted); }
nav a { color: inherit; margin-right: 12px; white-space: nowrap; }
.banner { background: var(--warn-bg); color: var(--warn); border-left: 5px solid var(--warn);
          padding: 10px 14px; margin: 10px 0; font-weight: 600; }
.badge { display: inline-block; background: var(--warn); color: #fff; border-radius: 4px; padding: 1px 8px;
         font-size: .8rem; font-weight: 600; vertical-align: middle; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 12px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.lead { max-width: 60em; }
.caption { max-width: 60em; margin: 4px 0 8px; padding: 8px 12px; border-left: 4px solid var(--muted);
           background: #f1f3f5; }
.note { color: var(--muted); font-size: .9rem; max-width: 60em; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: .85rem; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 4px 0; }
th, td { border-bottom: 1px solid var(--rule); padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; }
tr.failed td, tr.diverged td { background: #fde8e8; }
tr.running td { background: #fff8e1; }
details summary { cursor: pointer; color: var(--muted); }
footer { margin-top: 48px; color: var(--muted); font-size: .8rem; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ report.title }}</title>
<style>{{ css|safe }}</style>{# our own constant: escaping would break CSS quotes #}
</head>
<body>
<main>
<h1>{{ report.title }}</h1>
{% if report.caption %}<p class="caption">{{ report.caption }}</p>{% endif %}
<nav>{% for s in report.sections %}<a href="#{{ s.id }}">{{ s.title }}</a> {% endfor %}</nav>
{% for text in report.banners %}<div class="banner">{{ text }}</div>
{% endfor %}
{% for s in report.sections %}
<section id="{{ s.id }}">
<h2>{{ s.title }}{% if s.badge %} <span class="badge">{{ s.badge }}</span>{% endif %}</h2>
{% if s.id == "run" %}
<dl class="facts">{% for key, value in report.facts %}<dt>{{ key }}</dt><dd>{{ value }}</dd>{% endfor %}</dl>
{% endif %}
{% if s.lead %}<p class="lead">{{ s.lead }}</p>{% endif %}
{% for image in s.images %}<figure><img src="{{ image.uri }}" alt="{{ image.alt }}" width="{{ image.width }}"></figure>
{% endfor %}
{% for note in s.notes %}<p class="note">{{ note }}</p>
{% endfor %}
{% for t in s.tables %}
{% if t.collapsed %}<details><summary>{{ t.caption }}</summary>{% endif %}
<table>
{% if not t.collapsed %}<caption>{{ t.caption }}</caption>{% endif %}
<thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in t.rows %}{% set css = t.row_classes[loop.index0] if t.row_classes else "" %}
<tr{% if css %} class="{{ css }}"{% endif %}>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% if t.collapsed %}</details>{% endif %}
{% endfor %}
</section>
{% endfor %}
<footer>Made by gradlab {{ version }} in {{ "%.1f"|format(report.build_seconds) }} s.
Self-contained: no scripts, fonts or requests beyond this file.</footer>
</main>
</body>
</html>
"""

_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    _PAGE, globals={"css": _CSS})
