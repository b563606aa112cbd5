"""Report figures: one function per figure, a tidy frame in, a matplotlib Figure out.

Figure functions only draw. They read no files and compute no statistics beyond picking
columns and reshaping (a pivot for a heatmap, a melt for two accuracy columns); the numbers
come from ``gradlab.analysis``. A missing column gives a ``warnings.warn`` and a panel that
says what is missing, never an exception; NaN and inf values never crash a figure.

Figures are plain ``matplotlib.figure.Figure`` objects made without pyplot: no backend is
chosen, nothing is registered globally and nothing has to be closed. ``Figure.savefig``
renders through Agg, and Jupyter's inline backend displays them like any other figure.

Every figure is drawn under one seaborn theme (``THEME``, applied by ``_themed`` inside an
``rc_context``, so importing this module changes no global setting) and colours each network
with ``PALETTE`` everywhere; where depth is the hue, deeper nets get darker shades of their
network's colour (``depth_shades``). A network is a block type (``block``: ``conv``,
``res``, ...), with the model in front when it is not a DeepCNN (``model``: "torchvision:
resnet18, BasicBlock", ``analysis.network_label``); panels and colours are per network, so a
sweep that mixes models draws each model's stack on its own. Axis and colour-bar labels are the
metric labels of ``schema.METRICS``; phase words are ``schema.PHASE_WORDS``.

Log axes and exact zeros: a gradient that is exactly 0 is a result, so it is drawn at a
floor one decade below the smallest positive value, with a ▼ marker, and the floor line is
labelled "0"; a ratio that is +inf because its denominator is exactly 0 is drawn the same way
at a ceiling with ▲ and "inf". A measured value that is NaN or inf (a diverged run, or a
float32 sum of squares that overflowed) is never drawn: the point is left out, the panel
still drawn, and a note says how many were left out.

Diverged runs: figures that take ``diverged`` (``analysis.divergence`` rows: ``run, step,
layer, position, cause``, optionally ``phase``) mark each such run with ✕ — at the divergence
step on a step axis, at the probe point where it first appeared on a position axis — and
name it in a note ("✕ conv-d3-s1: diverged at step 5 (layer layers.1)").
"""
from __future__ import annotations

import functools
import math
import textwrap
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory

from gradlab import analysis
from gradlab.report.text import format_number, short_names
from gradlab.schema import DIVERGED, MODEL_POSITION, PHASE_WORDS, metric_label, norm_words

# Okabe & Ito's colour-blind-safe palette; conv gets the alarm colour because it explodes.
PALETTE = {"conv": "#D55E00", "res": "#0072B2", "resdown": "#009E73", "skip": "#CC79A7"}
_EXTRA_COLOURS = ("#E69F00", "#56B4E9", "#F0E442", "#000000")  # for block types not in PALETTE
THEME = {"context": "notebook", "style": "whitegrid", "font_scale": 0.85, "color_codes": False,
         "rc": {"axes.titleweight": "bold", "figure.titleweight": "bold", "legend.frameon": False}}
ACCURACY_LABELS = {"test_acc": "test accuracy", "best_val_acc": "best validation accuracy",
                   "final_train_acc": "train accuracy (last epoch)"}
ZERO_MARKER, INF_MARKER, DIVERGED_MARKER = "v", "^", "X"


# ---------------------------------------------------------------- theme and colours


def _themed(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under ``THEME`` without leaving it behind in matplotlib's global rcParams."""

    @functools.wraps(draw)
    def themed(*args, **kwargs) -> Figure:
        with mpl.rc_context():
            sns.set_theme(**THEME)
            return draw(*args, **kwargs)

    return themed


def block_color(network: str) -> str:
    """The colour of a network (a block type, or "model, block type") in every figure."""
    if network in PALETTE:
        return PALETTE[network]
    return _EXTRA_COLOURS[sum(map(ord, str(network))) % len(_EXTRA_COLOURS)]


def _mix(colour: Sequence[float], other: Sequence[float], amount: float) -> tuple:
    return tuple((1 - amount) * c + amount * o for c, o in zip(colour, other))


def depth_shades(network: str, depths: Iterable) -> dict:
    """depth -> colour: shades of the network's colour, light for shallow, dark for deep."""
    depths = sorted(set(depths))
    base = to_rgb(block_color(network))
    if len(depths) == 1:
        return {depths[0]: base}
    light, dark = _mix(base, (1, 1, 1), 0.6), _mix(base, (0, 0, 0), 0.45)
    steps = np.linspace(0, 1, len(depths))
    return {d: _mix(light, dark, t) for d, t in zip(depths, steps)}


def block_order(networks: Iterable) -> list:
    """Networks in ``analysis.BLOCK_ORDER``, the others after them by name."""
    present = {str(a) for a in networks if pd.notna(a)}
    known = [a for a in analysis.BLOCK_ORDER if a in present]
    return known + sorted(present - set(known))


def _with_network(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``network`` column, ``analysis.network_label`` of its ``model`` (optional)
    and ``block``: the key of panels and colours."""
    return df.assign(network=analysis.network_labels(df))


# ---------------------------------------------------------------- small helpers


def _missing(df: pd.DataFrame, columns: Sequence[str], figure: str) -> list[str]:
    """The columns ``df`` lacks, with a warning naming them (the caller skips the panel)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        warnings.warn(f"{figure}: missing column(s) {missing}; that panel is left empty", stacklevel=3)
    return missing


def _say(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True,
            parse_math=False)
    ax.set_xticks([])
    ax.set_yticks([])


def _numeric(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce").astype(float)


def _log_limits(values: pd.Series) -> tuple[float, float]:
    """(floor, ceiling) for a log axis: a decade beyond the finite positive values."""
    v = values.to_numpy(float)
    positive = v[np.isfinite(v) & (v > 0)]
    if positive.size == 0:
        return 1e-12, 1.0
    return 10.0 ** (math.floor(math.log10(positive.min())) - 1), 10.0 ** (math.ceil(math.log10(positive.max())) + 1)


def _log_view(values: pd.Series, floor: float, ceiling: float, include: Sequence[float] = ()) -> tuple[float, float]:
    """y limits for a log axis: the finite positive values, the floor when there are zeros, the
    ceiling when there is +inf, and ``include`` (thresholds to keep in view), with a margin."""
    v = _numeric(values).to_numpy(float)
    shown = [*v[np.isfinite(v) & (v > 0)], *include]
    if (v == 0).any():
        shown.append(floor)
    if (v == np.inf).any():
        shown.append(ceiling)
    if not shown:
        return floor, ceiling
    return min(shown) / 1.6, max(shown) * 1.6


def _log_ticks(ax) -> None:
    """Plain numbers on a log y axis ("0.1", "2", "1e-5"); 1-2-5 ticks when it spans under 2 decades."""
    low, high = ax.get_ylim()
    if low > 0 and high > 0 and math.log10(high / low) < 2:
        ax.yaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: format_number(v)))
    ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())


def _for_log(values: pd.Series, floor: float, ceiling: float) -> pd.Series:
    """0 -> floor, +inf -> ceiling, negative, -inf and NaN -> NaN (a gap)."""
    v = _numeric(values)
    v = v.mask(v == 0, floor).mask(v == np.inf, ceiling)
    return v.where(v > 0)


def _mark_clipped(ax, x: pd.Series, raw: pd.Series, floor: float, ceiling: float, colours) -> list[str]:
    """▼ at the floor for exact zeros and ▲ at the ceiling for +inf; returns the notes to print."""
    raw = _numeric(raw)
    notes = []
    for mask, level, marker, word in ((raw == 0, floor, ZERO_MARKER, "0"), (raw == np.inf, ceiling, INF_MARKER, "inf")):
        if not mask.any():
            continue
        colour = colours[mask] if isinstance(colours, pd.Series) else colours
        ax.scatter(x[mask], np.full(int(mask.sum()), level), marker=marker, s=40, c=colour, zorder=5,
                   edgecolors="black", linewidths=0.5)
        ax.axhline(level, color="0.5", linestyle=":", linewidth=1)
        ax.annotate(word, (0, level), xycoords=("axes fraction", "data"), xytext=(2, 2),
                    textcoords="offset points", fontsize=8, color="0.3")
        notes.append(f"{'▼' if word == '0' else '▲'} exactly {word}, drawn at {format_number(level)}")
    return notes


def _unique_notes(notes: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(notes))


def _measured(values: pd.Series) -> tuple[pd.Series, int]:
    """``values`` with ±inf measurements as NaN (left out), and how many were NaN or inf."""
    v = _numeric(values)
    bad = ~np.isfinite(v)
    return v.mask(bad), int(bad.sum())


def _left_out(count: int) -> list[str]:
    return [f"{count} non-finite value{'s' if count != 1 else ''} left out (not drawn)"] if count else []


def _diverged_rows(diverged: pd.DataFrame | None, runs: Iterable, phase=None) -> pd.DataFrame:
    """The rows of ``diverged`` (``analysis.divergence``; optional ``phase``) for ``runs``."""
    if diverged is None or diverged.empty or "run" not in diverged.columns:
        return pd.DataFrame(columns=["run", "step", "layer", "position", "cause"])
    rows = diverged.loc[diverged["run"].astype(str).isin({str(r) for r in runs})]
    if phase is not None and "phase" in rows.columns:
        rows = rows.loc[rows["phase"] == phase]
    return rows.drop_duplicates("run")


def _mark_diverged(ax, x: float, colour, label: str) -> str:
    """✕ at ``x`` (data) on the top edge of ``ax``; returns the note naming the run."""
    where = blended_transform_factory(ax.transData, ax.transAxes)
    ax.scatter([x], [0.97], transform=where, marker=DIVERGED_MARKER, s=70, c=[colour], edgecolors="black",
               linewidths=0.6, zorder=6, clip_on=False)
    return f"✕ {label}"


def _diverged_label(row: Mapping) -> str:
    return f"{row['run']}: {analysis.diverged_verdict(row)}"


def _figure(nrows: int, ncols: int, panel: tuple[float, float], **subplots) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(panel[0] * ncols, 4.0), panel[1] * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplots)
    return fig, axes


def _percent(ax) -> None:
    ax.yaxis.set_major_formatter(mpl.ticker.PercentFormatter(1.0, decimals=None))


def _wrap(text: str, inches: float, points: float) -> str:
    """``text`` wrapped line by line to fit ``inches`` at a font of ``points`` (bold, ~0.56 em a character)."""
    width = max(20, int(inches * 72 / (0.56 * points)))
    return "\n".join(textwrap.fill(line, width) if line else line for line in text.split("\n"))


def _suptitle(fig: Figure, text: str) -> None:
    size = mpl.rcParams["figure.titlesize"]
    points = mpl.font_manager.FontProperties(size=size).get_size_in_points()
    fig.suptitle(_wrap(text, fig.get_figwidth() - 0.2, points), parse_math=False)


def _panel_title(ax, text: str, colour=None) -> None:
    points = mpl.font_manager.FontProperties(size=10).get_size_in_points()
    inches = 0.92 * ax.figure.get_figwidth() / ax.get_subplotspec().get_gridspec().ncols
    colour = {"color": colour} if colour is not None else {}
    ax.set_title(_wrap(text, inches, points), fontsize=10, loc="left", parse_math=False, **colour)


def _step_axis(ax) -> None:
    """A training-step axis: whole steps, at most five ticks, thousands separated ("2,000"), so
    that the labels of a run of thousands of steps never run into each other."""
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(nbins=4, integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{int(round(v)):,}"))


def _depth_ints(series: pd.Series) -> pd.Series:
    return _numeric(series).round().astype("Int64")


# ---------------------------------------------------------------- 1. gradient flow


def _verdict_lines(verdicts: pd.DataFrame | None, phase, network: str, several_norms: bool) -> list[str]:
    """"depth 8: ×41 toward the input — exploding", one per norm (formatting, no statistics)."""
    if verdicts is None or verdicts.empty or not {"block", "verdict"} <= set(verdicts.columns):
        return []
    verdicts = _with_network(verdicts)
    rows = verdicts.loc[verdicts["network"] == network]
    if phase is not None and "phase" in rows:
        rows = rows.loc[rows["phase"] == phase]
    if "depth" in rows:  # shallow to deep, as the legend: flow_summary's rows come sorted by run name (d2, d32, d8)
        rows = rows.iloc[np.argsort(_numeric(rows["depth"]).to_numpy(), kind="stable")]
    lines = []
    for row in rows.to_dict("records"):
        depth = row.get("depth")
        ratio = row.get("first_to_last", np.nan)
        head = f"depth {format_number(int(depth))}" if pd.notna(depth) else "depth ?"
        if several_norms and pd.notna(row.get("norm")):
            head += f" ({norm_words(row['norm'])})"
        change = f"×{format_number(ratio)} toward input — " if pd.notna(ratio) else ""
        lines.append(f"{head}: {change}{row['verdict']}")
    return lines


def _verdict_bands(ax, floor: float, ceiling: float, labels: str = "right") -> None:
    """analysis's thresholds on a ratio axis: shaded beyond them, a dashed line at ×1; the labels
    sit on the ``labels`` side, where the data stays nearest ×1 (the last block of a gradient
    profile; the shallowest depth of a depth axis)."""
    x, ha = (0.01, "left") if labels == "left" else (0.99, "right")
    ax.axhspan(analysis.EXPLODING_RATIO, ceiling, color="0.5", alpha=0.1, linewidth=0, zorder=0)
    ax.axhspan(floor, analysis.VANISHING_RATIO, color="0.5", alpha=0.1, linewidth=0, zorder=0)
    ax.axhline(1, color="0.45", linewidth=1, linestyle="--", zorder=1)
    where = ax.get_yaxis_transform()
    ax.text(x, analysis.EXPLODING_RATIO * 1.2, f"exploding (≥ ×{format_number(analysis.EXPLODING_RATIO)})",
            transform=where, ha=ha, va="bottom", fontsize=8, color="0.3")
    ax.text(x, analysis.VANISHING_RATIO / 1.2, f"vanishing (≤ ×{format_number(analysis.VANISHING_RATIO)})",
            transform=where, ha=ha, va="top", fontsize=8, color="0.3")


@_themed
def gradient_flow(profile: pd.DataFrame, verdicts: pd.DataFrame | None = None, title: str | None = None,
                  y: str = "relative", diverged: pd.DataFrame | None = None) -> Figure:
    """Gradient norm against position, one line per run (hue: depth), one panel per network.

    ``profile`` is ``analysis.gradient_profile`` output (``block, depth, run, position`` and
    ``y``; optional ``model`` (the network's name), ``phase`` (one row of panels per phase),
    ``norm`` (line style) and ``role`` (the stem is shaded)). ``y="relative"`` (the norm divided by the norm at the
    last block) puts every line through 1 at its last block, so the height of its left end is
    the first-to-last ratio and the exploding and vanishing bands apply; ``y="value"`` draws
    the raw norms. ``verdicts`` holds ``flow_summary`` or ``depth_scaling`` rows (``phase,
    model, block, depth, first_to_last, verdict``) printed under each panel's title. Log y, shared axes.
    A point whose raw ``value`` is NaN or inf is left out; ``diverged`` runs get ✕ above the
    probe point where their divergence first appeared (the output end for the loss), in the
    panels of their ``phase`` (every panel without a ``phase`` column).
    """
    need = ["block", "depth", "run", "position", y]
    if _missing(profile, need, "gradient_flow") or profile.empty:
        fig, axes = _figure(1, 1, (6, 3.5))
        _say(axes[0, 0], "no gradient records")
        return fig
    df = _with_network(profile).assign(depth=_depth_ints(profile["depth"]), position=_numeric(profile["position"]))
    # a non-finite measurement is left out; an inf ratio over an exact 0 is a result (drawn ▲)
    measured, dropped = _measured(df["value"] if "value" in df else df[y])
    df[y] = _numeric(df[y]).where(measured.notna())
    phases = [p for p in analysis.PHASES if "phase" in df and p in set(df["phase"])] or [None]
    networks = block_order(df["network"])
    several_norms = "norm" in df and df["norm"].nunique() > 1
    floor, ceiling = _log_limits(df[y])
    thresholds = (analysis.VANISHING_RATIO, analysis.EXPLODING_RATIO) if y == "relative" else ()
    low, high = _log_view(df[y], floor, ceiling, thresholds)
    df["shown"] = _for_log(df[y], floor, ceiling)
    # one network: the phases side by side rather than stacked in one narrow column
    side_by_side = len(networks) == 1
    shape = (1, len(phases)) if side_by_side else (len(phases), len(networks))
    fig, axes = _figure(*shape, (4.6 if side_by_side else 4.0, 3.3), sharex=True, sharey=True)
    notes = []
    for i, phase in enumerate(phases):
        for j, network in enumerate(networks):
            ax = axes[0, i] if side_by_side else axes[i, j]
            first_row, first_column = (True, i == 0) if side_by_side else (i == 0, j == 0)
            ax.set_yscale("log")
            ax.set_ylim(low, high)
            if y == "relative":
                _verdict_bands(ax, low, high)
            data = df.loc[df["network"].astype(str) == network]
            if phase is not None:
                data = data.loc[data["phase"] == phase]
            data = data.dropna(subset=["depth"])
            shades = depth_shades(network, data["depth"].tolist() or [0])
            if "role" in data and (data["role"] == "stem").any():
                stem = data.loc[data["role"] == "stem", "position"]
                ax.axvspan(stem.min() - 0.5, stem.max() + 0.5, color="0.85", alpha=0.5, linewidth=0, zorder=0)
                ax.text(stem.mean(), 0.02, "stem", transform=ax.get_xaxis_transform(), ha="center", fontsize=8,
                        color="0.4")
            if data["shown"].notna().any():
                sns.lineplot(data=data, x="position", y="shown", hue="depth", palette=shades,
                             hue_order=sorted(shades), units="run", estimator=None,
                             style="norm" if several_norms else None, marker="o", markersize=4,
                             linewidth=2, legend="full" if first_row else False, ax=ax)
                colours = data["depth"].map(shades)
                notes += _mark_clipped(ax, data["position"], data[y], floor, ceiling, colours)
            else:
                _say(ax, "no finite values")
            for row in _diverged_rows(diverged, data["run"].unique(), phase).to_dict("records"):
                mine = data.loc[data["run"].astype(str) == str(row["run"])]
                position = pd.to_numeric(pd.Series([row.get("position")]), errors="coerce").iloc[0]
                x = position if pd.notna(position) and position >= 0 else mine["position"].max()  # loss: output end
                notes.append(_mark_diverged(ax, x, shades.get(mine["depth"].iloc[0], block_color(network)),
                                            _diverged_label(row)))
            if ax.get_legend() is not None:
                ax.legend(title="depth", fontsize=8, title_fontsize=8, loc="best", ncol=min(len(shades), 3))
            header = network if phase is None else f"{network} — {PHASE_WORDS.get(phase, phase)}"
            lines = _verdict_lines(verdicts, phase, network, several_norms)
            _panel_title(ax, "\n".join([header, *lines]), block_color(network))
            ax.set_xlabel("")
            if first_column:
                ax.set_ylabel("gradient norm ÷ norm at last block" if y == "relative" else "gradient norm")
            else:
                ax.set_ylabel("")
    for ax in axes.flat:
        _log_ticks(ax)
    label = "probe point position: input (stem) on the left → blocks → output head on the right; " \
            "the gradient travels right to left"
    notes += _left_out(dropped)
    fig.supxlabel(_wrap("\n".join([label, *_unique_notes(notes)]), fig.get_figwidth(), 8), fontsize=9,
                  parse_math=False)  # notes hold run and layer names from files
    _suptitle(fig, title or "Gradient norm through the network")
    return fig


# ---------------------------------------------------------------- 2. depth scaling


def _depth_axis(ax, depths: pd.Series) -> None:
    """Log-2 x for depths spanning a factor of 4 or more, else linear; ticks at the depths run."""
    values = sorted(set(depths.dropna().astype(int)))
    if values and values[0] > 0 and values[-1] / values[0] >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda x, _: format_number(int(round(x)))))
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    ax.set_xlabel("depth (blocks)")


@_themed
def depth_scaling_ratio(scaling: pd.DataFrame, flow: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """First-to-last gradient ratio against depth, one colour per network, log y.

    ``scaling`` is ``analysis.depth_scaling`` output (``block, depth, first_to_last``; optional
    ``model``;
    ``phase``: one panel per phase; ``norm``: line style). ``flow`` (``flow_summary`` rows)
    adds one dot per seed. The exploding and vanishing bands use analysis's thresholds. A
    depth with diverged runs (``n_diverged`` > 0) gets ✕ on the top edge: those runs have no
    ratio, so the line there stands for the others, or has a gap.
    """
    need = ["block", "depth", "first_to_last"]
    if _missing(scaling, need, "depth_scaling_ratio") or scaling.empty:
        fig, axes = _figure(1, 1, (6, 3.5))
        _say(axes[0, 0], "no depth-scaling data")
        return fig
    df = _with_network(scaling).assign(depth=_numeric(scaling["depth"]))
    phases = [p for p in analysis.PHASES if "phase" in df and p in set(df["phase"])] or [None]
    values = [df["first_to_last"]]
    if flow is not None and not _missing(flow, [*need, "phase"] if phases != [None] else need, "depth_scaling_ratio"):
        values.append(flow["first_to_last"])
    else:
        flow = None
    flow = _with_network(flow) if flow is not None else None
    everything = pd.concat(values, ignore_index=True)
    floor, ceiling = _log_limits(everything)
    low, high = _log_view(everything, floor, ceiling, (analysis.VANISHING_RATIO, analysis.EXPLODING_RATIO))
    networks = block_order(df["network"])
    several_norms = "norm" in df and df["norm"].nunique() > 1
    fig, axes = _figure(1, len(phases), (4.6, 3.6), sharey=True)
    notes = []
    for j, phase in enumerate(phases):
        ax = axes[0, j]
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        _verdict_bands(ax, low, high, labels="left")
        data = df if phase is None else df.loc[df["phase"] == phase]
        data = data.assign(shown=_for_log(data["first_to_last"], floor, ceiling))
        if data["shown"].notna().any():
            sns.lineplot(data=data, x="depth", y="shown", hue="network", palette={a: block_color(a) for a in networks},
                         hue_order=[a for a in networks if a in set(data["network"])],
                         style="norm" if several_norms else None, units="norm" if several_norms else None,
                         estimator=None, marker="o", linewidth=2, legend=j == len(phases) - 1, ax=ax)
            colours = data["network"].map(block_color)
            notes += _mark_clipped(ax, data["depth"], data["first_to_last"], floor, ceiling, colours)
        if flow is not None:
            seeds = flow if phase is None else flow.loc[flow["phase"] == phase]
            seeds = seeds.assign(depth=_numeric(seeds["depth"]), shown=_for_log(seeds["first_to_last"], floor, ceiling))
            ax.scatter(seeds["depth"], seeds["shown"], s=14, c=seeds["network"].astype(str).map(block_color).tolist(),
                       alpha=0.45, linewidths=0, zorder=3)
        if "n_diverged" in data:
            for row in data.loc[_numeric(data["n_diverged"]) > 0].to_dict("records"):
                count = int(row["n_diverged"])
                label = (f"{row['network']}, depth {format_number(int(row['depth']))}: {count} run"
                         f"{'s' if count != 1 else ''} diverged, left out of the ratio")
                notes.append(_mark_diverged(ax, row["depth"], block_color(row["network"]), label))
        _depth_axis(ax, df["depth"])
        ax.set_ylabel("gradient ratio first block / last block" if j == 0 else "")
        ax.set_title(PHASE_WORDS.get(phase, "") if phase else "")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="block", fontsize=8)
    for ax in axes.flat:
        _log_ticks(ax)
    notes = _unique_notes(notes)
    if flow is not None:
        notes.insert(0, "line: geometric mean over seeds · dots: single seeds")
    if notes:
        fig.supxlabel("\n".join(notes), fontsize=8, parse_math=False)
    _suptitle(fig, title or "How much the gradient grows from the last block to the first, by depth")
    return fig


@_themed
def accuracy_vs_depth(runs: pd.DataFrame, chance: float | None = None, title: str | None = None,
                      metrics: Sequence[str] = ("test_acc", "final_train_acc")) -> Figure:
    """Accuracy against depth per network: one panel per accuracy column (default: test accuracy,
    and the train accuracy of the last epoch, whose fall with depth is He et al.'s degradation),
    one dot per run, a line through the mean over seeds (seaborn's estimator). Running runs' train
    accuracy is left out (``analysis.settled_accuracies``). ``chance`` draws a dotted line.
    Runs whose ``status`` is "diverged" are drawn as ✕ instead of a dot. The accuracy axis
    starts at 0: a zoomed axis would make a few points between networks at chance look like a
    result."""
    fig, axes = _figure(1, len(metrics), (4.3, 3.4), sharey=True)
    base = _missing(runs, ["block", "depth"], "accuracy_vs_depth")
    runs = analysis.settled_accuracies(runs)
    top = 0.0  # the highest finite accuracy drawn, for the shared axis
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        ax.set_title(ACCURACY_LABELS.get(metric, metric))
        if base or _missing(runs, [metric], "accuracy_vs_depth"):
            _say(ax, f"no {metric} column")
            continue
        data = _with_network(runs).assign(depth=_numeric(runs["depth"]),
                                          acc=_numeric(runs[metric]).where(lambda s: np.isfinite(s)))
        data = data.dropna(subset=["acc", "depth"])
        if data.empty:
            _say(ax, "no finished runs")
            continue
        networks = block_order(data["network"])
        palette = {a: block_color(a) for a in networks}
        several_norms = "norm" in data and data["norm"].nunique() > 1
        sns.lineplot(data=data, x="depth", y="acc", hue="network", hue_order=networks, palette=palette,
                     style="norm" if several_norms else None, errorbar=None, linewidth=2, ax=ax,
                     legend=j == len(metrics) - 1)
        bad = data["status"].astype(str) == DIVERGED if "status" in data else data["acc"].isna()
        sns.scatterplot(data=data.loc[~bad], x="depth", y="acc", hue="network", hue_order=networks, palette=palette,
                        s=28, alpha=0.6, legend=False, ax=ax)
        if bad.any():
            ax.scatter(data.loc[bad, "depth"], data.loc[bad, "acc"], marker=DIVERGED_MARKER, s=60,
                       c=data.loc[bad, "network"].astype(str).map(block_color).tolist(), edgecolors="black",
                       linewidths=0.6, zorder=6)
            ax.text(0.01, 0.99, f"✕ diverged ({int(bad.sum())})", transform=ax.transAxes, ha="left", va="top",
                    fontsize=8, color="0.3")
        if chance is not None:
            ax.axhline(chance, color="0.4", linestyle=":", linewidth=1)
            ax.annotate("chance", (1, chance), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                        textcoords="offset points", ha="right", fontsize=8, color="0.35")
        _depth_axis(ax, data["depth"])
        top = max(top, float(data["acc"].max()), chance or 0.0)
        ax.set_ylim(0, min(1.0, math.ceil((top + 0.05) * 10) / 10))
        _percent(ax)
        ax.set_ylabel("accuracy" if j == 0 else "")
        if ax.get_legend() is not None:
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="block", fontsize=8)
    _suptitle(fig, title or "Accuracy against depth (line: mean over seeds; dots: runs)")
    return fig


# ---------------------------------------------------------------- 2b. width against depth

DIRECTION_STYLES = {"wider": "-", "deeper": "--"}  # accuracy against parameters: line style per direction


def _log2_axis(ax, values: pd.Series, label: str) -> None:
    """A log-2 x axis with a tick at every value run (widths)."""
    ticks = sorted(set(_numeric(values).dropna().astype(int)))
    if ticks and ticks[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda x, _: format_number(int(round(x)))))
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    ax.set_xlabel(label)


@_themed
def accuracy_vs_params(lines: pd.DataFrame, chance: float | None = None, title: str | None = None) -> Figure:
    """Test accuracy against parameter count: per network a solid line grown wider and a dashed
    line grown deeper (``analysis.width_depth``: ``block, direction, depth, width, n_params,
    test_acc_mean``; optional ``model``, ``norm``: one panel per norm). Log x; the accuracy axis
    starts at 0; each point is labelled with its width (wider) or depth (deeper)."""
    need = ["block", "direction", "depth", "width", "n_params", "test_acc_mean"]
    if _missing(lines, need, "accuracy_vs_params") or lines.empty:
        fig, axes = _figure(1, 1, (6, 3.5))
        _say(axes[0, 0], "no runs at two or more widths")
        return fig
    df = _with_network(lines).assign(n_params=_numeric(lines["n_params"]),
                                     acc=_numeric(lines["test_acc_mean"]).where(lambda v: np.isfinite(v)))
    norms = list(dict.fromkeys(df["norm"])) if "norm" in df else [None]
    fig, axes = _figure(1, len(norms), (5.2, 3.8), sharey=True)
    top = chance or 0.0
    for j, norm in enumerate(norms):
        ax = axes[0, j]
        data = df if norm is None else df.loc[df["norm"] == norm]
        data = data.dropna(subset=["acc", "n_params"])
        if data.empty:
            _say(ax, "no finished runs")
            continue
        for (network, direction), line in data.groupby(["network", "direction"], sort=False):
            line = line.sort_values("n_params")
            ax.plot(line["n_params"], line["acc"], DIRECTION_STYLES.get(direction, ":"), marker="o",
                    color=block_color(network), linewidth=2, markersize=5, label=f"{network}, {direction}")
            key = "width" if direction == "wider" else "depth"
            for x, y, value in zip(line["n_params"], line["acc"], line[key]):
                ax.annotate(f"{key[0]}{int(value)}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7,
                            color="0.3")
        if chance is not None:
            ax.axhline(chance, color="0.4", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log)")
        ax.set_ylabel("test accuracy" if j == 0 else "")
        top = max(top, float(data["acc"].max()))
        ax.set_title(norm_words(norm) if norm is not None and len(norms) > 1 else "")
        ax.legend(fontsize=7, loc="best")
    for ax in axes.flat:
        ax.set_ylim(0, min(1.0, math.ceil((top + 0.05) * 10) / 10))
        _percent(ax)
    fig.supxlabel("solid: grown wider (labels w = width) · dashed: grown deeper (labels d = depth)", fontsize=8)
    _suptitle(fig, title or "Test accuracy against parameters: wider or deeper?")
    return fig


@_themed
def ratio_vs_width(scaling: pd.DataFrame, title: str | None = None) -> Figure:
    """First-to-last gradient ratio against width: one panel per network, a line per depth (darker:
    deeper), solid with BatchNorm and dashed without (``norm``), a column of panels per
    ``phase``. ``scaling`` is ``analysis.depth_scaling`` output (``block, depth, width,
    first_to_last``). Log y with the verdict bands; a ratio of exactly 0 is drawn ▼ at the floor;
    NaN (0/0, diverged) is left out and counted in a note."""
    need = ["block", "depth", "width", "first_to_last"]
    if _missing(scaling, need, "ratio_vs_width") or scaling.empty:
        fig, axes = _figure(1, 1, (6, 3.5))
        _say(axes[0, 0], "no ratios at two or more widths")
        return fig
    df = _with_network(scaling).assign(depth=_depth_ints(scaling["depth"]), width=_numeric(scaling["width"]),
                                       ratio=_numeric(scaling["first_to_last"]))
    df = df.dropna(subset=["width", "depth"])
    df = df if "norm" in df else df.assign(norm=None)
    phases = [p for p in analysis.PHASES if "phase" in df and p in set(df["phase"])] or [None]
    networks = block_order(df["network"])
    floor, ceiling = _log_limits(df["ratio"])
    low, high = _log_view(df["ratio"], floor, ceiling, (analysis.VANISHING_RATIO, analysis.EXPLODING_RATIO))
    fig, axes = _figure(len(phases), len(networks), (4.2, 3.3), sharex=True, sharey=True)
    notes, missing = [], int(df["ratio"].isna().sum())
    for i, phase in enumerate(phases):
        for j, network in enumerate(networks):
            ax = axes[i, j]
            ax.set_yscale("log")
            ax.set_ylim(low, high)
            _verdict_bands(ax, low, high)
            data = df.loc[df["network"] == network]
            if phase is not None:
                data = data.loc[data["phase"] == phase]
            shades = depth_shades(network, data["depth"].tolist() or [0])
            for (depth, norm), line in data.groupby(["depth", "norm"], sort=True, dropna=False):
                line = line.sort_values("width")
                shown = _for_log(line["ratio"], floor, ceiling)
                ax.plot(line["width"], shown, "--" if norm == "none" else "-", marker="o", color=shades[depth],
                        linewidth=2, markersize=4,
                        label=f"depth {depth}" + (f", {norm_words(norm)}" if isinstance(norm, str) else ""))
                notes += _mark_clipped(ax, line["width"], line["ratio"], floor, ceiling, [shades[depth]])
            _log2_axis(ax, df["width"], "width (channels)" if i == len(phases) - 1 else "")
            heading = network if phase is None else f"{network} — {PHASE_WORDS.get(phase, phase)}"
            _panel_title(ax, heading, block_color(network))
            ax.set_ylabel("gradient ratio first / last block" if j == 0 else "")
            if len(data):
                ax.legend(fontsize=7, loc="best")
    for ax in axes.flat:
        _log_ticks(ax)
    if missing:
        notes.append(f"{missing} point{'s' if missing != 1 else ''} without a ratio (0/0 or diverged) left out")
    if notes:
        fig.supxlabel("\n".join(_unique_notes(notes)), fontsize=8, parse_math=False)
    _suptitle(fig, title or "First-to-last gradient ratio against width, at fixed depth")
    return fig


@_themed
def spread_vs_beta(spread: pd.DataFrame, title: str | None = None) -> Figure:
    """The standard deviation over seeds of ln first_to_last against Hanin's β, one marker per
    network (``analysis.seed_spread``: ``block, beta, log_ratio_std``; optional ``model``;
    ``norm``: ○ batch norm, △ none). Log x. Networks without a spread (fewer than two usable
    seeds) or without β are left out and counted."""
    need = ["block", "beta", "log_ratio_std"]
    if _missing(spread, need, "spread_vs_beta") or spread.empty:
        fig, axes = _figure(1, 1, (6, 3.5))
        _say(axes[0, 0], "no spread over seeds")
        return fig
    df = _with_network(spread).assign(beta=_numeric(spread["beta"]), std=_numeric(spread["log_ratio_std"]))
    shown = df.loc[np.isfinite(df["beta"]) & (df["beta"] > 0) & np.isfinite(df["std"])]
    fig, axes = _figure(1, 1, (6.2, 4.0))
    ax = axes[0, 0]
    if shown.empty:
        _say(ax, "no network has a spread over seeds and a β")
        return fig
    markers = {"batch": "o", "none": "^"}
    shown = shown if "norm" in shown else shown.assign(norm=None)
    for (network, norm), group in shown.groupby(["network", "norm"], sort=False, dropna=False):
        ax.scatter(group["beta"], group["std"], s=36, marker=markers.get(norm, "s"), color=block_color(network),
                   edgecolors="black", linewidths=0.4, label=network + (f", {norm_words(norm)}" if isinstance(norm, str) else ""))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: format_number(v)))
    ax.set_xlabel("Hanin's β = Σ 1/width over hidden layers (channels as widths; log)")
    ax.set_ylabel("std over seeds of ln(first / last)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")
    left = len(df) - len(shown)
    if left:
        fig.supxlabel(f"{left} network{'s' if left != 1 else ''} without a spread (fewer than "
                      f"{analysis.MIN_SPREAD_SEEDS} seeds with a finite, non-zero ratio) or without β left out",
                      fontsize=8)
    _suptitle(fig, title or "Do wider nets fluctuate less? Spread over seeds at initialisation against β")
    return fig


# ---------------------------------------------------------------- 3. per-run heatmaps


def _log_colour_scale(values: np.ndarray) -> LogNorm | None:
    """One log colour scale over the finite positive ``values`` (None when there are none)."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return None
    low, high = float(positive.min()), float(positive.max())
    if low == high:
        low, high = low / 1.1, high * 1.1
    return LogNorm(vmin=low, vmax=high)


def _log_colourbar(fig: Figure, mesh, axes, label: str, zeros: bool) -> None:
    bar = fig.colorbar(mesh, ax=axes, extend="min" if zeros else "neither", shrink=0.9, aspect=30)
    decades = math.log10(mesh.norm.vmax / mesh.norm.vmin)
    subs = (1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 1 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    bar.ax.yaxis.set_major_locator(mpl.ticker.LogLocator(base=10, subs=subs))
    bar.ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: format_number(v)))
    bar.ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    bar.set_label(label + (" (black: exactly 0)" if zeros else ""))


@_themed
def run_heatmaps(records: pd.DataFrame, metrics: Sequence[str] = ("grad_out_norm", "act_std"),
                 labels: Mapping[str, str] | None = None, title: str | None = None,
                 diverged: pd.DataFrame | None = None) -> Figure:
    """Probe point × training step: one row of panels per run, one column per metric.

    ``records``: long record rows (``run, step, layer, position, metric, value``), runs in
    the order they first appear; ``labels`` maps a run to its row title. Each column has one
    log colour scale shared by all runs, so runs compare at a glance. Exact zeros are black
    (below the scale); NaN and inf are not drawn (light grey, the colour bar says so).
    ``diverged`` runs get a dashed line and ✕ at their divergence step.
    """
    need = ["run", "step", "layer", "position", "metric", "value"]
    runs = list(dict.fromkeys(records["run"])) if "run" in records else []
    fig, axes = _figure(max(len(runs), 1), len(metrics), (4.6, 2.5))
    if _missing(records, need, "run_heatmaps") or not runs:
        for ax in axes.flat:
            _say(ax, "no per-step records")
        return fig
    cmaps = {"grad_out_norm": "rocket", "act_std": "mako"}
    notes = []
    for j, metric in enumerate(metrics):
        rows = records.loc[(records["metric"] == metric) & (_numeric(records["position"]) != MODEL_POSITION)]
        # pivot, not pivot_table: a NaN cell stays a (grey) cell instead of dropping its step
        grids = {run: rows.loc[rows["run"] == run].drop_duplicates(["position", "layer", "step"])
                 .pivot(index=["position", "layer"], columns="step", values="value") for run in runs}
        values = [g.to_numpy(float).ravel() for g in grids.values() if g.size]
        norm = _log_colour_scale(np.concatenate(values)) if values else None
        cmap = sns.color_palette(cmaps.get(metric, "viridis"), as_cmap=True).with_extremes(under="black", bad="0.85")
        mesh, zeros, gaps = None, False, False
        marked = {str(r["run"]): r for r in _diverged_rows(diverged, runs).to_dict("records")}
        for i, run in enumerate(runs):
            ax = axes[i, j]
            ax.grid(False)
            grid = grids[run].sort_index(level="position")
            heading = metric_label(metric)
            _panel_title(ax, f"{(labels or {}).get(run, run)}\n{heading}" if j == 0 else f"\n{heading}")
            if grid.empty or norm is None:
                _say(ax, f"{metric} not recorded" if grid.empty else "no finite positive values")
                continue
            shown = grid.to_numpy(float)
            zeros |= bool((shown == 0).any())
            gaps |= bool((~np.isfinite(shown)).any())
            shown = np.where(shown == 0, norm.vmin / 10, shown)
            shown = np.ma.masked_invalid(np.where(np.isinf(shown), np.nan, shown))
            mesh = ax.pcolormesh(grid.columns.to_numpy(float), np.arange(len(grid)), shown, cmap=cmap, norm=norm,
                                 shading="nearest", rasterized=True)
            names = grid.index.get_level_values("layer").tolist()
            shorts = short_names(names)  # long module paths shortened, never ambiguously
            names = [shorts[n] for n in names]
            every = max(1, math.ceil(len(names) / 14))
            ax.set_yticks(np.arange(len(names))[::every], names[::every], fontsize=7, parse_math=False)
            ax.set_ylim(len(names) - 0.5, -0.5)  # the input at the top, the head at the bottom
            _step_axis(ax)
            ax.set_xlabel("training step" if i == len(runs) - 1 else "")
            row = marked.get(str(run))
            if row is not None and pd.notna(pd.to_numeric(row.get("step"), errors="coerce")):
                ax.axvline(float(row["step"]), color="white", linestyle="--", linewidth=1.2)
                notes.append(_mark_diverged(ax, float(row["step"]), "white", _diverged_label(row)))
        if mesh is not None:
            label = f"{metric_label(metric)} (log)" + ("; grey: not finite" if gaps else "")
            _log_colourbar(fig, mesh, axes[:, j], label, zeros)
    if notes:
        fig.supxlabel("\n".join(_unique_notes(notes)), fontsize=8, parse_math=False)
    _suptitle(fig, title or "Per probe point over training")
    return fig


# ---------------------------------------------------------------- 4. signal propagation


@_themed
def signal_propagation(activation: pd.DataFrame, title: str | None = None) -> Figure:
    """Activation statistics against position (Brock et al. 2021's signal-propagation plots).

    ``activation`` is ``analysis.activation_profile`` output (``run, block, position, metric,
    value``; optional ``model``). Panels: channel mean², channel variance, and branch (solid)
    versus skip (dashed) variance of residual blocks. Hue: network; one line per run; log y. NaN and inf (an
    overflowing sum of squares, a diverged run) are left out; exact zeros are drawn ▼.
    """
    panels = [(metric_label("act_chan_mean_sq"), ["act_chan_mean_sq"]),
              (metric_label("act_chan_var"), ["act_chan_var"]),
              ("residual branch vs skip variance", ["branch_chan_var", "skip_chan_var"])]
    fig, axes = _figure(1, len(panels), (4.0, 3.4), sharex=True)
    if _missing(activation, ["run", "block", "position", "metric", "value"], "signal_propagation"):
        for ax in axes[0]:
            _say(ax, "no activation statistics")
        return fig
    measured, dropped = _measured(activation["value"])
    df = _with_network(activation).assign(position=_numeric(activation["position"]), value=measured)
    floor, ceiling = _log_limits(df["value"])
    df["shown"] = _for_log(df["value"], floor, ceiling)
    networks = block_order(df["network"])
    palette = {a: block_color(a) for a in networks}
    parts = {"branch_chan_var": "branch", "skip_chan_var": "skip"}
    notes = []
    for j, (label, metrics) in enumerate(panels):
        ax = axes[0, j]
        ax.set_yscale("log")
        ax.set_title(label)
        data = df.loc[df["metric"].isin(metrics)]
        if data["shown"].notna().sum() == 0:
            _say(ax, "no finite values" if len(data) else "not recorded" if len(metrics) == 1 else "no residual blocks")
            continue
        data = data.assign(part=data["metric"].map(parts))
        sns.lineplot(data=data, x="position", y="shown", hue="network", palette=palette,
                     hue_order=[a for a in networks if a in set(data["network"])], units="run", estimator=None,
                     style="part" if len(metrics) > 1 else None,
                     style_order=["branch", "skip"] if len(metrics) > 1 else None,
                     linewidth=1.8, legend=True, ax=ax)
        notes += _mark_clipped(ax, data["position"], data["value"], floor, ceiling, data["network"].map(block_color))
        ax.set_xlabel("")
        ax.set_ylabel("value (log)" if j == 0 else "")
        if ax.get_legend() is not None:
            ax.legend(fontsize=7, loc="best")
    for ax in axes.flat:
        if ax.get_yscale() == "log":
            _log_ticks(ax)
    notes += _left_out(dropped)
    fig.supxlabel("\n".join(["probe point position: input → output", *_unique_notes(notes)]), fontsize=9,
                  parse_math=False)
    _suptitle(fig, title or "Signal propagation: activation statistics through the network")
    return fig


# ---------------------------------------------------------------- 5. branch versus skip


@_themed
def branch_skip(share: pd.DataFrame, title: str | None = None) -> Figure:
    """Share of each residual block's input gradient (squared norms) through the branch.

    ``share`` is ``analysis.branch_skip_share`` output (``block, depth, run, position,
    branch_share``; optional ``model``; optional ``phase``: one column of panels per phase).
    One row of panels per network, hue depth; 0 means everything flows through the skip path, 1 through the
    branch.
    """
    need = ["block", "depth", "run", "position", "branch_share"]
    if _missing(share, need, "branch_skip") or share.empty:
        fig, axes = _figure(1, 1, (6, 3.2))
        _say(axes[0, 0], "no residual blocks")
        return fig
    df = _with_network(share).assign(depth=_depth_ints(share["depth"]), position=_numeric(share["position"]),
                      branch_share=_numeric(share["branch_share"]).where(lambda s: np.isfinite(s)))
    phases = [p for p in analysis.PHASES if "phase" in df and p in set(df["phase"])] or [None]
    networks = block_order(df["network"])
    fig, axes = _figure(len(networks), len(phases), (4.8, 2.9), sharex=True, sharey=True)
    for i, network in enumerate(networks):
        for j, phase in enumerate(phases):
            ax = axes[i, j]
            data = df.loc[df["network"].astype(str) == network].dropna(subset=["depth"])
            if phase is not None:
                data = data.loc[data["phase"] == phase]
            ax.axhspan(-0.03, 0.5, color="0.5", alpha=0.08, linewidth=0, zorder=0)
            ax.axhline(0.5, color="0.45", linestyle="--", linewidth=1)
            ax.text(0.99, 0.03, "mostly through the skip", transform=ax.transAxes, ha="right", fontsize=8, color="0.35")
            ax.text(0.99, 0.93, "mostly through the branch", transform=ax.transAxes, ha="right", fontsize=8,
                    color="0.35")
            if data["branch_share"].notna().any():
                shades = depth_shades(network, data["depth"].tolist())
                sns.lineplot(data=data, x="position", y="branch_share", hue="depth", palette=shades,
                             hue_order=sorted(shades), units="run", estimator=None, marker="o", markersize=4,
                             linewidth=2, legend="full" if j == len(phases) - 1 else False, ax=ax)
                if ax.get_legend() is not None:
                    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="depth", fontsize=8,
                                    title_fontsize=8)
            else:
                _say(ax, "no finite shares")
            ax.set_ylim(-0.03, 1.03)
            heading = network if phase is None else f"{network} — {PHASE_WORDS.get(phase, phase)}"
            _panel_title(ax, heading, block_color(network))
            ax.set_xlabel("")
            ax.set_ylabel("branch share of ‖∂L/∂input‖²" if j == 0 else "")
    fig.supxlabel("block position: input → output", fontsize=9)
    _suptitle(fig, title or "Residual blocks: how the input gradient splits between branch and skip")
    return fig


# ---------------------------------------------------------------- 6. training curves


def _panels(frames: Sequence[pd.DataFrame]) -> list[tuple[str, object]]:
    """(network, norm) pairs in display order; norm is None when the frames hold one norm or none."""
    frames = [_with_network(f) for f in frames if "block" in f]
    if not frames:
        return []
    keys = pd.concat([f.reindex(columns=["network", "norm"]) for f in frames], ignore_index=True)
    keys = keys.dropna(subset=["network"])
    keys = keys.assign(network=keys["network"].astype(str))
    several_norms = keys["norm"].nunique() > 1
    pairs = keys.drop_duplicates() if several_norms else keys.drop_duplicates("network").assign(norm=None)
    rank = {a: i for i, a in enumerate(block_order(pairs["network"]))}
    pairs = pairs.assign(_rank=pairs["network"].map(rank)).sort_values(["_rank", "norm"], kind="stable")
    return list(zip(pairs["network"], pairs["norm"]))


def _panel_rows(frame: pd.DataFrame, network: str, norm) -> pd.DataFrame:
    frame = _with_network(frame)
    mine = frame.loc[frame["network"] == network]
    return mine if norm is None or "norm" not in mine else mine.loc[mine["norm"] == norm]


SPLIT_STYLES = {"train": "-", "validation": "--"}  # accuracy splits: line style; validation markers are open


def _epoch_axis(ax, last_epoch: int) -> None:
    """Epochs 1 .. ``last_epoch`` with whole-number ticks only: accuracy is measured after an
    epoch, never between two."""
    ax.set_xlim(0.5, max(1, last_epoch) + 0.5)
    if last_epoch <= 12:
        ax.xaxis.set_major_locator(mpl.ticker.FixedLocator(range(1, max(1, last_epoch) + 1)))
    else:
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda x, _: str(int(round(x)))))
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())


def _accuracy_per_epoch(ax, data: pd.DataFrame, shades: Mapping, legend: bool) -> None:
    """``data`` (``run, depth, epoch, split, accuracy``; finite, epochs from 1) on ``ax``: a line
    per run and split over several epochs, a marker alone for a run measured after one epoch."""
    epochs = data.groupby(["run", "split"], sort=False)["epoch"].transform("nunique")
    size = 4 if data["epoch"].nunique() <= 12 else 2.5  # markers of a long run would hide its line
    for (_, split), rows in data.loc[epochs > 1].groupby(["run", "split"], sort=False):
        rows = rows.sort_values("epoch")
        colour = shades.get(rows["depth"].iloc[0], "0.3")
        ax.plot(rows["epoch"], rows["accuracy"], color=colour, linestyle=SPLIT_STYLES[split], linewidth=1.5,
                marker="o", markersize=size, markeredgecolor=colour,
                markerfacecolor=colour if split == "train" else "white")
    single = data.loc[epochs == 1]
    for split, rows in single.groupby("split", sort=False):
        colours = rows["depth"].map(lambda d: shades.get(d, "0.3")).tolist()
        ax.scatter(rows["epoch"], rows["accuracy"], s=30, zorder=4, linewidths=1.2, edgecolors=colours,
                   c=colours if split == "train" else "white")
    _epoch_axis(ax, int(data["epoch"].max()))
    ax.set_ylim(0, min(1.05, math.ceil((data["accuracy"].max() + 0.05) * 10) / 10))
    _percent(ax)
    if legend:
        lines = (epochs > 1).any()
        handles = [Line2D([], [], color="0.3", linestyle=SPLIT_STYLES[split] if lines else "none", marker="o",
                          markersize=5, markerfacecolor="0.3" if split == "train" else "white", label=split)
                   for split in SPLIT_STYLES]
        ax.legend(handles=handles, fontsize=7, loc="best")


@_themed
def training_curves(steps: pd.DataFrame, history: pd.DataFrame, title: str | None = None,
                    columns: int = 4, diverged: pd.DataFrame | None = None) -> Figure:
    """The notebook's two plots for many runs: loss per step (upper panel) and accuracy per
    epoch (lower panel), one pair of panels per network (and norm, when there are several),
    at most ``columns`` pairs a row; hue depth, one line per run.

    The accuracy panel draws only what was measured: accuracy exists after whole epochs, so
    the epoch axis has whole-number ticks only, and a run with several epochs is a line
    through its epochs (train solid with filled markers, validation dashed with open ones)
    while a run of one epoch is a marker alone (filled: train, open: validation), never a
    line or an axis of fractional epochs. Its y axis starts at 0.

    ``steps``: ``run, block, depth, step, loss``; ``history``: ``run, block, depth, epoch,
    train_acc, val_acc`` (epoch counted from 0, drawn from 1); ``model`` and ``norm`` optional. Non-finite
    losses and accuracies are left out (the panel says how many); a loss axis spanning more
    than three decades is logarithmic; ``diverged`` runs get ✕ at their divergence step.
    """
    steps, history = steps.reset_index(drop=True), history.reset_index(drop=True)  # seaborn needs a unique index
    panels = _panels([steps, history])
    ncols = max(1, min(len(panels), columns))
    fig, axes = _figure(2 * max(1, math.ceil(len(panels) / ncols)), ncols, (3.9, 2.6))
    if not panels:
        for ax in axes.flat:
            _say(ax, "no runs")
        return fig
    has_steps = not _missing(steps, ["run", "block", "depth", "step", "loss"], "training_curves")
    has_history = not _missing(history, ["run", "block", "depth", "epoch", "train_acc", "val_acc"], "training_curves")
    for k, (network, norm) in enumerate(panels):
        top, bottom = axes[2 * (k // ncols), k % ncols], axes[2 * (k // ncols) + 1, k % ncols]
        heading = network if norm is None else f"{network} — {norm_words(norm)}"
        _panel_title(top, heading, block_color(network))
        mine_steps = _panel_rows(steps, network, norm) if has_steps else steps.iloc[:0]
        mine_history = _panel_rows(history, network, norm) if has_history else history.iloc[:0]
        depths = pd.concat([_depth_ints(f["depth"]) for f in (mine_steps, mine_history) if "depth" in f])
        shades = depth_shades(network, depths.dropna().tolist() or [0])
        data, dropped = None, 0
        if has_steps:
            loss, dropped = _measured(mine_steps["loss"])
            data = mine_steps.assign(depth=_depth_ints(mine_steps["depth"]).to_numpy(), loss=loss.to_numpy())
        if data is not None and data["loss"].notna().any():
            sns.lineplot(data=data, x="step", y="loss", hue="depth", palette=shades, hue_order=sorted(shades),
                         units="run", estimator=None, linewidth=1.2, legend="full", ax=top)
            finite = data.dropna(subset=["loss"])
            alone = finite.loc[finite.groupby("run")["step"].transform("size") == 1]  # no line through one point
            if len(alone):
                top.scatter(alone["step"], alone["loss"], s=14, c=alone["depth"].map(shades).tolist(), zorder=4)
            top.legend(title="depth", fontsize=7, title_fontsize=7, loc="upper right", ncol=min(len(shades), 3))
            _step_axis(top)
            positive = data["loss"].loc[data["loss"] > 0]
            if len(positive) and positive.max() / positive.min() > 1e3:  # a diverging loss flattens the rest
                top.set_yscale("log")
                top.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: format_number(v)))
            notes = _left_out(dropped)
            for row in _diverged_rows(diverged, data["run"].unique()).to_dict("records"):
                step = pd.to_numeric(row.get("step"), errors="coerce")
                if pd.notna(step):
                    left, right = top.get_xlim()
                    top.set_xlim(min(left, step - 0.5), max(right, step + 0.5))  # the step may lie past the data
                    depth = data.loc[data["run"].astype(str) == str(row["run"]), "depth"].iloc[0]
                    notes.append(_mark_diverged(top, float(step), shades.get(depth, block_color(network)),
                                                _diverged_label(row)))
            if notes:
                top.text(0.01, 0.02, _wrap("\n".join(notes), 3.6, 7), transform=top.transAxes, fontsize=7,
                         color="0.3", va="bottom", parse_math=False)
        else:
            _say(top, "no finite losses" if has_steps else "no loss per step")
        top.set_xlabel("step")
        top.set_ylabel("training loss" if k % ncols == 0 else "")
        if has_history:
            data = mine_history[["run", "depth", "epoch", "train_acc", "val_acc"]].melt(
                id_vars=["run", "depth", "epoch"], value_vars=["train_acc", "val_acc"],
                var_name="split", value_name="accuracy")
            data = data.assign(depth=_depth_ints(data["depth"]), epoch=_numeric(data["epoch"]) + 1,
                               split=data["split"].map({"train_acc": "train", "val_acc": "validation"}),
                               accuracy=_numeric(data["accuracy"]).where(lambda s: np.isfinite(s)))
        if has_history and data["accuracy"].notna().any():
            _accuracy_per_epoch(bottom, data.dropna(subset=["accuracy", "epoch"]), shades, legend=k == 0)
        else:
            _say(bottom, ("no finite accuracies" if len(mine_history) else "no finished epochs") if has_history
                 else "no accuracy per epoch")
        bottom.set_xlabel("epoch")
        bottom.set_ylabel("accuracy" if k % ncols == 0 else "")
    for k in range(len(panels), axes.shape[0] // 2 * ncols):
        axes[2 * (k // ncols), k % ncols].axis("off")
        axes[2 * (k // ncols) + 1, k % ncols].axis("off")
    _suptitle(fig, title or "Training curves: loss per step, train and validation accuracy per epoch")
    return fig


# ---------------------------------------------------------------- 7. sample inputs


@_themed
def sample_grid(images: np.ndarray, labels: Sequence[str], title: str | None = None, columns: int = 4) -> Figure:
    """A grid of uint8 images ([n, 3, H, W] or [n, H, W, 3]) with their class names."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0 or 3 not in (images.shape[1], images.shape[-1]):
        warnings.warn(f"sample_grid: expected images [n, 3, H, W] or [n, H, W, 3], got shape {images.shape}",
                      stacklevel=2)
        fig, axes = _figure(1, 1, (4, 2))
        _say(axes[0, 0], "no sample images")
        return fig
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    n = images.shape[0]
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(1.7 * min(n, columns), 1.9 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, min(n, columns), squeeze=False)
    labels = list(labels) + [""] * max(0, n - len(labels))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(str(labels[k]), fontsize=10, parse_math=False)  # names come from files
    _suptitle(fig, title or "Sample test images")
    return fig
