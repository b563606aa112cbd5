"""The lesson's figures: a frame in, a Figure out, missing columns and NaN survived, global matplotlib
settings untouched, and the report side's modules free of torch."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from gradlab import lessons
from gradlab.report import lesson_figures as lf


def shatter_summary() -> pd.DataFrame:
    rows = []
    for block, decay in (("conv", 0.5), ("res", 0.9), ("skip", 0.7)):
        for depth in (2, 8, 32):
            for lag in range(9):
                mean = (decay ** (depth / 8)) ** lag
                rows.append({"run": f"{block}-d{depth}", "model": "deepcnn", "block": block, "depth": depth, "width": 8,
                             "norm": "batch", "seed": 0, "weights": "init", "target": "logit", "points": 64,
                             "statistics": "estimated", "lag": lag, "distance": lag / 63, "mean": mean, "std": 0.05,
                             "min": mean - 0.1, "max": mean + 0.1, "pairs": 4})
    return pd.DataFrame(rows)


def gradient_images() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frames = []
    for block in ("conv", "res"):
        for depth in (2, 8, 32):
            point, channel, column = np.meshgrid(np.arange(16), np.arange(3), np.arange(32), indexing="ij")
            frames.append(pd.DataFrame({"run": f"{block}-d{depth}", "block": block, "depth": depth,
                                        "point": point.ravel(), "t": point.ravel() / 15, "channel": channel.ravel(),
                                        "column": column.ravel(), "value": rng.normal(size=point.size)}))
    return pd.concat(frames, ignore_index=True)


def lesion_frame() -> pd.DataFrame:
    rows = []
    for block, depth, intact in (("conv", 8, 0.6), ("res", 16, 0.62), ("res", 4, 0.55)):
        run = f"{block}-d{depth}"
        keys = {"run": run, "model": "deepcnn", "block": block, "depth": depth, "width": 32, "norm": "batch", "seed": 0}
        rows.append({**keys, "experiment": "intact", "k": 0, "draw": 0, "blocks": "", "stack_index": -1,
                     "deletable": True, "images": 100, "accuracy": intact})
        for i in range(depth):
            rows.append({**keys, "experiment": "delete", "k": 1, "draw": i, "blocks": f"layers.{i}", "stack_index": i,
                         "deletable": i != 2, "images": 100, "accuracy": np.nan if i == 2 else intact - 0.05 * (i % 3)})
        for draw in range(3):
            rows.append({**keys, "experiment": "delete", "k": 2, "draw": draw, "blocks": "layers.0+layers.1",
                         "stack_index": -1, "deletable": True, "images": 100, "accuracy": intact - 0.1 - 0.01 * draw})
    return pd.DataFrame(rows)


DRAWINGS = {
    "shatter_similarity": lambda: lf.shatter_similarity(shatter_summary()),
    "shatter_autocorrelation": lambda: lf.shatter_autocorrelation(shatter_summary()),
    "gradient_lines": lambda: lf.gradient_lines(gradient_images()),
    "lesion_k_blocks": lambda: lf.lesion_k_blocks(lessons.lesion_k(lesion_frame())),
    "lesion_single_blocks": lambda: lf.lesion_single_blocks(lessons.lesion_single(lesion_frame())),
}


@pytest.mark.parametrize("name", list(DRAWINGS))
def test_each_figure_is_drawn_and_leaves_matplotlib_settings_alone(name):
    before = dict(mpl.rcParams)
    fig = DRAWINGS[name]()
    assert isinstance(fig, Figure) and fig.axes
    fig.canvas.draw()  # renders through Agg without pyplot
    assert dict(mpl.rcParams) == before


def test_similarity_has_a_line_per_block_type():
    fig = lf.shatter_similarity(shatter_summary())
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["conv", "res", "skip"]


def test_gradient_lines_show_the_shallowest_and_deepest_network_of_each_block_type():
    fig = lf.gradient_lines(gradient_images())
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_title(loc="left")]
    assert titles == ["conv, depth 2", "conv, depth 32", "res, depth 2", "res, depth 32"]
    assert len([ax for ax in fig.axes if ax.images]) == 4
    every = lf.gradient_lines(gradient_images(), depths="all")
    assert len([ax for ax in every.axes if ax.images]) == 6


def test_lesion_figures_mark_what_cannot_be_deleted_and_draw_a_line_per_network():
    """A panel per block type (in the block order), a line per network, shallowest first."""
    single = lf.lesion_single_blocks(lessons.lesion_single(lesion_frame()))
    assert "cannot be deleted" in single._supxlabel.get_text()
    k = lf.lesion_k_blocks(lessons.lesion_k(lesion_frame()))
    for fig in (single, k):
        assert [ax.get_title(loc="left") for ax in fig.axes] == ["conv", "res"]
        assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes] == [
            ["depth 8"], ["depth 4", "depth 16"]]
    conv, res = single.axes
    drawn = {tuple(line.get_xdata()): list(line.get_ydata()) for line in res.get_lines() if len(line.get_xdata()) > 2}
    expected = lessons.lesion_single(lesion_frame()).query("run == 'res-d16'").sort_values("stack_index")
    assert np.allclose(drawn[tuple(expected["stack_index"])], expected["accuracy"], equal_nan=True)
    assert [int(t) for t in k.axes[1].get_xticks()] == [0, 1, 2]


@pytest.mark.parametrize("name, draw", [
    ("shatter_similarity", lf.shatter_similarity), ("shatter_autocorrelation", lf.shatter_autocorrelation),
    ("gradient_lines", lf.gradient_lines), ("lesion_k_blocks", lf.lesion_k_blocks),
    ("lesion_single_blocks", lf.lesion_single_blocks)])
def test_a_missing_column_warns_and_an_empty_frame_says_so(name, draw):
    with pytest.warns(UserWarning, match=f"{name}: missing column"):
        fig = draw(pd.DataFrame({"other": [1]}))
    assert isinstance(fig, Figure)
    assert isinstance(draw(pd.DataFrame({c: [] for c in ("run", "block", "depth", "lag", "k", "mean", "point",
                                                         "channel", "column", "value", "stack_index", "accuracy")})),
                      Figure)


def test_nan_values_are_left_out_not_fatal():
    summary = shatter_summary()
    summary.loc[summary.index[:5], ["mean", "std"]] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.shatter_similarity(summary).canvas.draw()
        lf.shatter_autocorrelation(summary).canvas.draw()
    images = gradient_images()
    images.loc[images.index[:50], "value"] = np.nan
    lf.gradient_lines(images).canvas.draw()


def test_the_lessons_report_side_never_imports_torch():
    code = ("import sys, gradlab.lessons, gradlab.report.lesson_figures; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
