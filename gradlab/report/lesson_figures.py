"""Figures of the lesson's two experiments: shattered gradients and the lesion study.

Like ``gradlab.report.figures`` (whose theme, colours and helpers these use): a tidy frame in, a
matplotlib ``Figure`` out, drawn without pyplot under the shared theme; the functions only draw.
A missing column gives a warning and a panel that says so; NaN values are left out, never drawn.
The frames come from ``gradlab.lessons`` (summaries) and ``gradlab.shatter`` (the gradient image).

``shatter_similarity``      neighbouring-gradient similarity against depth, a line per block type
``shatter_autocorrelation`` similarity against lag, a panel per block type, a line per depth
``gradient_lines``          the gradient along the line as an image, for each block type and depth
``lesion_k_blocks``         accuracy against the number of blocks deleted at once, chance marked
``lesion_single_blocks``    accuracy after deleting each single block along the stack
"""
from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from gradlab.lessons import CHANCE, WEIGHTS_WORDS
from gradlab.report.figures import (_depth_axis, _figure, _missing, _numeric, _panel_title, _percent, _say, _suptitle,
                                    _themed, block_color, block_order, depth_shades)
from gradlab.report.text import format_number

NOT_DELETABLE_MARKER = "x"


def _empty(text: str) -> Figure:
    fig, axes = _figure(1, 1, (6, 3.5))
    _say(axes[0, 0], text)
    return fig


def _chance(ax, chance: float | None) -> None:
    if chance is None:
        return
    ax.axhline(chance, color="0.4", linestyle=":", linewidth=1)
    ax.annotate("chance", (1, chance), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                textcoords="offset points", ha="right", fontsize=8, color="0.35")


def _legend_outside(ax, title: str) -> None:
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title=title, fontsize=8)


# ---------------------------------------------------------------- shattered gradients


@_themed
def shatter_similarity(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Neighbouring-gradient similarity (lag 1) against depth: a line per block type, bars of ±1
    standard deviation across image pairs; a panel per ``weights`` (init, trained) when both are
    there, a line style per ``norm`` when several. ``summary``: ``lessons.summarise_shatter``
    rows (``block, depth, mean``; ``lag`` (lag 1 is taken), ``std``, ``norm``, ``weights``)."""
    if _missing(summary, ["block", "depth", "mean"], "shatter_similarity") or summary.empty:
        return _empty("no shattered-gradient data")
    df = summary.loc[summary["lag"] == 1] if "lag" in summary else summary
    df = df.assign(depth=_numeric(df["depth"]), mean=_numeric(df["mean"]),
                   std=_numeric(df["std"]) if "std" in df else np.nan).dropna(subset=["depth", "mean"])
    if df.empty:
        return _empty("no finite similarity")
    panels = list(dict.fromkeys(df["weights"])) if "weights" in df else [None]
    norms = list(dict.fromkeys(df["norm"])) if "norm" in df else [None]
    styles = dict(zip(norms, ["-", "--", ":", "-."]))
    fig, axes = _figure(1, len(panels), (4.6, 3.6), sharey=True)
    for j, weights in enumerate(panels):
        ax = axes[0, j]
        data = df if weights is None else df.loc[df["weights"] == weights]
        for block in block_order(data["block"]):
            for norm in norms:
                rows = data.loc[data["block"].astype(str) == block]
                if norm is not None:
                    rows = rows.loc[rows["norm"] == norm]
                rows = rows.sort_values("depth")
                if rows.empty:
                    continue
                label = block if len(norms) == 1 else f"{block}, {norm}"
                ax.errorbar(rows["depth"], rows["mean"], yerr=rows["std"].fillna(0), color=block_color(block),
                            linestyle=styles[norm], marker="o", linewidth=2, capsize=3, label=label)
        ax.axhline(0, color="0.5", linewidth=1)
        ax.set_ylim(min(-0.05, float((df["mean"] - df["std"].fillna(0)).min()) - 0.05), 1.05)
        _depth_axis(ax, df["depth"])
        ax.set_ylabel("similarity of neighbouring gradients" if j == 0 else "")
        ax.set_title(WEIGHTS_WORDS.get(weights, "") if weights is not None else "")
        if j == len(panels) - 1:
            ax.legend()
            _legend_outside(ax, "block")
    _suptitle(fig, title or "How alike the input gradients are at neighbouring points, by depth "
                            "(mean cosine similarity; bars: ±1 sd over image pairs)")
    return fig


@_themed
def shatter_autocorrelation(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Mean cosine similarity of gradients k points apart against k: a panel per block type, a line
    per depth (darker: deeper), a band of ±1 standard deviation. ``summary``: ``block, depth,
    lag, mean`` (``std``)."""
    if _missing(summary, ["block", "depth", "lag", "mean"], "shatter_autocorrelation") or summary.empty:
        return _empty("no shattered-gradient data")
    df = summary.assign(depth=_numeric(summary["depth"]), lag=_numeric(summary["lag"]), mean=_numeric(summary["mean"]),
                        std=_numeric(summary["std"]) if "std" in summary else 0.0).dropna(subset=["depth", "lag"])
    blocks = block_order(df["block"])
    fig, axes = _figure(1, len(blocks), (3.6, 3.2), sharey=True, sharex=True)
    for j, block in enumerate(blocks):
        ax = axes[0, j]
        data = df.loc[df["block"].astype(str) == block]
        shades = depth_shades(block, data["depth"].astype(int))
        for depth, rows in data.groupby("depth"):
            rows = rows.sort_values("lag")
            colour = shades[int(depth)]
            ax.plot(rows["lag"], rows["mean"], color=colour, linewidth=2, label=format_number(int(depth)))
            ax.fill_between(rows["lag"], rows["mean"] - rows["std"].fillna(0), rows["mean"] + rows["std"].fillna(0),
                            color=colour, alpha=0.15, linewidth=0)
        ax.axhline(0, color="0.5", linewidth=1)
        _panel_title(ax, block, block_color(block))
        ax.set_xlabel("lag (points apart)")
        ax.set_ylabel("mean cosine similarity" if j == 0 else "")
        ax.legend(title="depth", fontsize=8)
    _suptitle(fig, title or "Autocorrelation of the input gradient along the line (bands: ±1 sd over image pairs)")
    return fig


@_themed
def gradient_lines(images: pd.DataFrame, title: str | None = None, depths: str = "extremes") -> Figure:
    """The gradient along the line as an image: x is the position t from image a to image b, y the
    input values of one pixel row (every channel), colour the gradient divided by its norm at that
    point. A row of panels per block type; the shallowest and the deepest network of each
    (``depths="extremes"``) or every depth (``"all"``). ``images``: the ``images`` frame of
    ``gradlab.shatter`` (``block, depth, point, t, channel, column, value``)."""
    need = ["block", "depth", "point", "channel", "column", "value"]
    if _missing(images, need, "gradient_lines") or images.empty:
        return _empty("no gradient images")
    df = images.assign(depth=_numeric(images["depth"]).astype("Int64"))
    blocks = block_order(df["block"])
    columns = {}
    for block in blocks:
        present = sorted(set(df.loc[df["block"].astype(str) == block, "depth"].dropna().astype(int)))
        columns[block] = present if depths == "all" else sorted({present[0], present[-1]})
    n_cols = max(len(c) for c in columns.values())
    fig, axes = _figure(len(blocks), n_cols, (3.4, 2.4))
    for i, block in enumerate(blocks):
        for j in range(n_cols):
            ax = axes[i, j]
            if j >= len(columns[block]):
                ax.set_axis_off()
                continue
            depth = columns[block][j]
            data = df.loc[(df["block"].astype(str) == block) & (df["depth"] == depth)]
            data = data.loc[data["run"] == data["run"].iloc[0]] if "run" in data else data
            grid = data.pivot_table(index=["channel", "column"], columns="point", values="value", aggfunc="first")
            values = grid.to_numpy(float)
            finite = np.abs(values[np.isfinite(values)])
            limit = float(np.quantile(finite, 0.99)) if finite.size and finite.max() > 0 else 1.0
            ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                      interpolation="nearest", extent=(0, 1, len(values), 0))
            channels = grid.index.get_level_values("channel")
            starts = [k for k in range(len(channels)) if k == 0 or channels[k] != channels[k - 1]]
            ax.set_yticks([s + 0.5 * (channels == channels[s]).sum() for s in starts])
            ax.set_yticklabels(["RGB"[c] if c < 3 else str(c) for c in channels[starts]])
            ax.grid(False)
            ax.set_xticks([0, 1])
            ax.set_xticklabels(["a", "b"])
            _panel_title(ax, f"{block}, depth {depth}", block_color(block))
    fig.supxlabel("position on the line from image a to image b · rows: one pixel row of each channel · "
                  "colour: gradient / its norm", fontsize=8)
    _suptitle(fig, title or "The input gradient along the line between two test images")
    return fig


# ---------------------------------------------------------------- lesion study


def _by_block(df: pd.DataFrame) -> list[tuple[str, list[str], dict]]:
    """Per block type in ``BLOCK_ORDER``: its runs, shallowest first (depth as a number), and
    run -> colour in the block type's depth shades."""
    panels = []
    df = df.assign(block=df["block"].astype(str))
    for block in block_order(df["block"]):
        firsts = df.loc[df["block"] == block].drop_duplicates("run")
        depths = _numeric(firsts["depth"]).fillna(0).astype(int) if "depth" in firsts else pd.Series(0, index=firsts.index)
        shades = depth_shades(block, depths)
        ordered = firsts.assign(_depth=depths).sort_values("_depth", kind="stable")
        panels.append((block, ordered["run"].tolist(), {r: shades[d] for r, d in zip(ordered["run"], ordered["_depth"])}))
    return panels


def _run_label(row: dict) -> str:
    depth = row.get("depth")
    return f"depth {format_number(int(depth))}" if pd.notna(depth) else str(row["run"])


def _block_panels(df: pd.DataFrame, panel: tuple[float, float]):
    """A figure with one panel per block type of ``df``, sharing the accuracy axis."""
    panels = _by_block(df)
    fig, axes = _figure(1, len(panels), panel, sharey=True)
    return fig, [(axes[0, j], *p) for j, p in enumerate(panels)]


def _accuracy_panel(ax, block: str, chance: float | None, first: bool) -> None:
    _chance(ax, chance)
    _panel_title(ax, block, block_color(block))
    ax.set_ylabel("test accuracy" if first else "")
    _percent(ax)
    ax.legend(fontsize=7, loc="best")


def _accuracy_limit(values: pd.Series) -> float:
    return min(1.0, max(0.3, float(values.max()) + 0.1))


@_themed
def lesion_k_blocks(k_summary: pd.DataFrame, chance: float | None = CHANCE, title: str | None = None) -> Figure:
    """Test accuracy against the number of blocks deleted at once (0: intact): a panel per block
    type, a line per network in its depth shade, bars of ±1 standard deviation over the random
    sets, chance dotted. k runs 0, 1, 2, 4, ...: the axis is logarithmic past 1, so that the
    small k where networks differ most are not crowded together.
    ``k_summary``: ``lessons.lesion_k`` rows (``run, block, k, mean``; ``std``, ``depth``)."""
    if _missing(k_summary, ["run", "block", "k", "mean"], "lesion_k_blocks") or k_summary.empty:
        return _empty("no lesion data")
    df = k_summary.assign(k=_numeric(k_summary["k"]), mean=_numeric(k_summary["mean"]),
                          std=_numeric(k_summary["std"]) if "std" in k_summary else np.nan).dropna(subset=["k", "mean"])
    fig, panels = _block_panels(df, (3.6, 3.4))
    for j, (ax, block, runs, colours) in enumerate(panels):
        for run in runs:
            rows = df.loc[df["run"] == run].sort_values("k")
            ax.errorbar(rows["k"], rows["mean"], yerr=rows["std"].fillna(0), color=colours[run], marker="o",
                        linewidth=2, capsize=3, label=_run_label(rows.iloc[0].to_dict()))
        ks = sorted(set(df.loc[df["run"].isin(runs), "k"].astype(int)))
        if ks and max(ks) > 2:
            ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
        ax.set_xlabel("blocks deleted at once")
        _accuracy_panel(ax, block, chance, j == 0)
    panels[0][0].set_ylim(0, _accuracy_limit(df["mean"]))
    _suptitle(fig, title or "Test accuracy with k blocks deleted (mean over random sets; bars: ±1 sd)")
    return fig


@_themed
def lesion_single_blocks(single: pd.DataFrame, chance: float | None = CHANCE, title: str | None = None) -> Figure:
    """Test accuracy after deleting each single block, along the stack: a panel per block type, a
    line per network in its depth shade, its intact accuracy dashed in the same colour, blocks
    that cannot be deleted marked × at the bottom. ``single``: ``lessons.lesion_single`` rows
    (``run, block, stack_index, accuracy``; ``deletable``, ``intact``, ``depth``)."""
    if _missing(single, ["run", "block", "stack_index", "accuracy"], "lesion_single_blocks") or single.empty:
        return _empty("no lesion data")
    df = single.assign(stack_index=_numeric(single["stack_index"]), accuracy=_numeric(single["accuracy"]))
    fig, panels = _block_panels(df, (3.6, 3.4))
    stuck_any = False
    for j, (ax, block, runs, colours) in enumerate(panels):
        for run in runs:
            rows = df.loc[df["run"] == run].sort_values("stack_index")
            colour = colours[run]
            ax.plot(rows["stack_index"], rows["accuracy"], color=colour, marker="o", markersize=3.5, linewidth=1.6,
                    label=_run_label(rows.iloc[0].to_dict()))
            if "intact" in rows and _numeric(rows["intact"]).notna().any():
                ax.axhline(float(_numeric(rows["intact"]).dropna().iloc[0]), color=colour, linestyle="--",
                           linewidth=1)
            if "deletable" in rows:
                stuck = rows.loc[~rows["deletable"].astype(bool)]
                if len(stuck):
                    stuck_any = True
                    ax.scatter(stuck["stack_index"], np.full(len(stuck), 0.01), marker=NOT_DELETABLE_MARKER, s=50,
                               color=colour, zorder=5, clip_on=False)
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(nbins=6, integer=True))
        ax.set_xlabel("deleted block (stack index)")
        _accuracy_panel(ax, block, chance, j == 0)
    intact = _numeric(df["intact"]) if "intact" in df else df["accuracy"]
    panels[0][0].set_ylim(0, _accuracy_limit(pd.concat([df["accuracy"], intact])))
    notes = ["stack index 0: the block nearest the input", "dashed: the intact network"]
    notes += ["× changes the shape: cannot be deleted"] if stuck_any else []
    fig.supxlabel(" · ".join(notes), fontsize=8)
    _suptitle(fig, title or "Test accuracy after deleting one block")
    return fig
