"""gradlab.report.figures: each figure on small constructed frames; missing columns, NaN, inf and 0."""
import subprocess
import sys
import warnings

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from gradlab.report import figures


def _panels(fig: Figure) -> list:
    """The plotting axes of a figure (colour bars left out)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def _data_lines(ax) -> list:
    """Lines drawn from data: more than two points (axhline and legend handles have two or fewer)."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 2]


def _texts(fig: Figure) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [ax.get_title(loc="left"), ax.get_title(), *(t.get_text() for t in ax.texts)]
    if fig._suptitle is not None:
        parts.append(fig._suptitle.get_text())
    if fig._supxlabel is not None:
        parts.append(fig._supxlabel.get_text())
    return "\n".join(parts)


def profile(archs=("conv", "res"), depths=(2, 4), phases=("init", "end"), value=None) -> pd.DataFrame:
    """A gradient_profile-like frame: stem (2 probes), the blocks, the head; grows toward the input."""
    rows = []
    for phase in phases:
        for arch in archs:
            for depth in depths:
                layers = ["conv1", "conv2", *(f"layers.{i}" for i in range(depth)), "linear1"]
                for position, layer in enumerate(layers):
                    block = "stem" if layer.startswith("conv") else "head" if layer == "linear1" else arch
                    relative = 2.0 ** (depth + 1 - position)
                    rows.append({"run": f"{arch}-d{depth}", "arch": arch, "depth": depth, "norm": "batch", "seed": 0,
                                 "phase": phase, "layer": layer, "position": position, "block": block,
                                 "value": 0.01 * relative if value is None else value, "relative": relative})
    return pd.DataFrame(rows)


def test_gradient_flow_has_a_log_panel_per_phase_and_block_type_and_a_line_per_run():
    fig = figures.gradient_flow(profile())
    axes = _panels(fig)
    assert isinstance(fig, Figure) and len(axes) == 4  # 2 phases x 2 block types
    for ax in axes:
        assert ax.get_yscale() == "log"
        assert len(_data_lines(ax)) == 2  # one line per depth (run)
    assert "conv — at initialisation" in _texts(fig)


def test_gradient_flow_title_states_the_verdicts():
    verdicts = pd.DataFrame({"phase": ["init"], "arch": ["conv"], "norm": ["batch"], "depth": [4],
                             "first_to_last": [41.0], "verdict": ["exploding"]})
    fig = figures.gradient_flow(profile(), verdicts=verdicts, title="conv explodes toward the input")
    text = _texts(fig)
    assert "×41 toward input — exploding" in text
    assert "conv explodes toward the input" in text


def test_gradient_flow_colours_are_shades_of_the_block_type():
    fig = figures.gradient_flow(profile(archs=("res",), depths=(4,), phases=("init",)))
    (line,) = _data_lines(_panels(fig)[0])
    assert np.allclose(to_rgb(line.get_color()), to_rgb(figures.PALETTE["res"]))


def test_one_block_type_puts_the_phases_side_by_side():
    fig = figures.gradient_flow(profile(archs=("skip",)))
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in _panels(fig)] == [(1, 2), (1, 2)]


def test_zero_nan_and_inf_are_drawn_not_fatal():
    frame = profile(phases=("init",))
    frame.loc[2, "relative"] = 0.0
    frame.loc[3, "relative"] = np.inf
    frame.loc[4, "relative"] = np.nan
    fig = figures.gradient_flow(frame)
    fig.canvas.draw()  # drawing, not only building, must work
    text = _texts(fig)
    assert "exactly 0" in text and "exactly inf" in text
    markers = [c for ax in fig.axes for c in ax.collections if c.get_offsets().shape[0]]
    assert markers  # the zero and the inf are marked


def test_all_zero_or_all_nan_values_still_make_a_figure():
    assert isinstance(figures.gradient_flow(profile(value=0.0).assign(relative=0.0)), Figure)
    fig = figures.gradient_flow(profile().assign(relative=np.nan))
    assert "no finite values" in _texts(fig)


def test_raw_values_can_be_drawn_instead_of_relative_ones():
    fig = figures.gradient_flow(profile(), y="value")
    assert all(ax.get_yscale() == "log" for ax in _panels(fig))


@pytest.mark.parametrize("draw, frame", [
    (figures.gradient_flow, pd.DataFrame({"arch": ["conv"], "depth": [2]})),
    (figures.depth_scaling_ratio, pd.DataFrame({"arch": ["conv"]})),
    (figures.accuracy_vs_depth, pd.DataFrame({"arch": ["conv"], "depth": [2]})),
    (figures.signal_propagation, pd.DataFrame({"run": ["a"]})),
    (figures.branch_skip, pd.DataFrame({"arch": ["res"], "depth": [2]})),
    (figures.run_heatmaps, pd.DataFrame({"run": ["a"], "step": [0]})),
])
def test_a_missing_column_warns_and_leaves_the_panel_empty(draw, frame):
    with pytest.warns(UserWarning, match="missing column"):
        fig = draw(frame)
    assert isinstance(fig, Figure)


def test_training_curves_warn_on_missing_columns():
    with pytest.warns(UserWarning, match="missing column"):
        fig = figures.training_curves(pd.DataFrame({"run": ["a"], "arch": ["conv"], "depth": [2]}),
                                      pd.DataFrame({"run": ["a"], "arch": ["conv"], "depth": [2]}))
    assert "no loss per step" in _texts(fig)


def scaling() -> pd.DataFrame:
    rows = []
    for phase in ("init", "end"):
        for arch, base in (("conv", 4.0), ("res", 1.1), ("skip", 0.5)):
            for depth in (2, 8, 32):
                rows.append({"phase": phase, "arch": arch, "norm": "batch", "depth": depth,
                             "first_to_last": base ** (depth / 2), "verdict": "stable"})
    return pd.DataFrame(rows)


def test_depth_scaling_ratio_has_a_log_panel_per_phase_and_a_line_per_block_type():
    frame = scaling()
    flow = frame.assign(run=[f"r{i}" for i in range(len(frame))])
    fig = figures.depth_scaling_ratio(frame, flow=flow)
    axes = _panels(fig)
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_yscale() == "log" and ax.get_xscale() == "log"  # depths 2..32: log-2 x
        colours = {to_rgb(line.get_color()) for line in _data_lines(ax)}
        assert colours == {to_rgb(figures.PALETTE[a]) for a in ("conv", "res", "skip")}


def test_depth_scaling_ratio_draws_zero_and_inf_at_the_edges():
    frame = scaling()
    frame.loc[0, "first_to_last"] = 0.0
    frame.loc[1, "first_to_last"] = np.inf
    frame.loc[2, "first_to_last"] = np.nan
    fig = figures.depth_scaling_ratio(frame)
    fig.canvas.draw()
    assert "exactly 0" in _texts(fig) and "exactly inf" in _texts(fig)


def runs_table() -> pd.DataFrame:
    rows = []
    for arch in ("conv", "res"):
        for depth in (2, 8):
            for seed in (0, 1):
                rows.append({"run": f"{arch}-d{depth}-s{seed}", "arch": arch, "depth": depth, "norm": "batch",
                             "seed": seed, "test_acc": 0.5 + 0.01 * depth, "best_val_acc": 0.52})
    return pd.DataFrame(rows)


def test_accuracy_vs_depth_has_a_panel_per_accuracy_and_survives_nan():
    table = runs_table()
    table.loc[0, "test_acc"] = np.nan
    table.loc[1, "best_val_acc"] = np.inf
    fig = figures.accuracy_vs_depth(table, chance=0.1)
    axes = _panels(fig)
    assert len(axes) == 2
    assert [ax.get_title() for ax in axes] == ["test accuracy", "best validation accuracy"]
    assert all(len(ax.get_lines()) >= 2 for ax in axes)  # a line per block type (and the chance line)


def test_accuracy_vs_depth_says_when_no_run_finished():
    fig = figures.accuracy_vs_depth(runs_table().assign(test_acc=np.nan, best_val_acc=np.nan))
    assert "no finished runs" in _texts(fig)


def records(runs=("a", "b"), steps=5, metrics=("grad_out_norm", "act_std")) -> pd.DataFrame:
    rows = []
    for run in runs:
        for step in range(steps):
            for position, layer in enumerate(["conv1", "layers.0", "layers.1", "linear1"]):
                for metric in metrics:
                    rows.append({"run": run, "step": step, "layer": layer, "position": position,
                                 "metric": metric, "value": 10.0 ** (-position) * (1 + step)})
            rows.append({"run": run, "step": step, "layer": "model", "position": -1, "metric": "loss",
                         "value": 2.3})
    return pd.DataFrame(rows)


def test_run_heatmaps_have_a_row_per_run_and_one_colour_scale_per_metric():
    fig = figures.run_heatmaps(records(), labels={"a": "run a", "b": "run b"})
    axes = _panels(fig)
    assert len(axes) == 4  # 2 runs x 2 metrics
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2
    meshes = [ax.collections[0] for ax in axes]
    assert meshes[0].norm is meshes[2].norm  # grad_out_norm of run a and run b share the scale
    assert "run a" in _texts(fig)
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["conv1", "layers.0", "layers.1", "linear1"]


def test_run_heatmaps_with_zero_nan_inf_and_a_missing_metric():
    frame = records(metrics=("grad_out_norm",))
    frame.loc[0, "value"] = 0.0
    frame.loc[1, "value"] = np.nan
    frame.loc[2, "value"] = np.inf
    fig = figures.run_heatmaps(frame)
    fig.canvas.draw()
    assert "act_std not recorded" in _texts(fig)
    assert "exactly 0" in " ".join(ax.get_ylabel() for ax in fig.axes)


def activation(arch="res", run="r") -> pd.DataFrame:
    rows = []
    metrics = ["act_chan_mean_sq", "act_chan_var"] + (["branch_chan_var", "skip_chan_var"] if arch == "res" else [])
    for position in range(5):
        for metric in metrics:
            rows.append({"run": run, "arch": arch, "depth": 3, "norm": "batch", "seed": 0, "layer": f"l{position}",
                         "position": position, "block": arch, "metric": metric, "value": 0.1 * (position + 1)})
    return pd.DataFrame(rows)


def test_signal_propagation_has_three_log_panels_with_branch_and_skip():
    fig = figures.signal_propagation(pd.concat([activation("res", "r"), activation("conv", "c")]))
    axes = _panels(fig)
    assert len(axes) == 3
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert len(_data_lines(axes[0])) == 2  # one line per run
    assert len(_data_lines(axes[2])) == 2  # branch and skip of the res run


def test_signal_propagation_without_residual_blocks_says_so():
    frame = activation("conv")
    frame.loc[0, "value"] = 0.0
    fig = figures.signal_propagation(frame)
    assert "no residual blocks" in _texts(fig)


def test_branch_skip_has_a_row_per_block_type_and_a_column_per_phase():
    rows = []
    for phase in ("init", "end"):
        for arch in ("res", "resdown"):
            for depth in (2, 4):
                for i in range(depth):
                    rows.append({"run": f"{arch}{depth}", "arch": arch, "depth": depth, "phase": phase,
                                 "position": 2 + i, "branch_share": [0.5, np.nan, 0.2, np.inf][i]})
    fig = figures.branch_skip(pd.DataFrame(rows))
    axes = _panels(fig)
    assert len(axes) == 4
    assert axes[0].get_ylim() == pytest.approx((-0.03, 1.03))


def test_training_curves_have_loss_and_accuracy_panels_per_block_type_and_norm():
    steps, history = [], []
    for arch in ("conv", "res"):
        for norm in ("batch", "none"):
            run = f"{arch}-{norm}"
            steps += [{"run": run, "arch": arch, "norm": norm, "depth": 2, "step": s,
                       "loss": [2.3, np.nan, np.inf, 2.0, 1.9][s]} for s in range(5)]
            history += [{"run": run, "arch": arch, "norm": norm, "depth": 2, "epoch": e,
                         "train_acc": 0.3 + 0.1 * e, "val_acc": 0.25} for e in range(3)]
    fig = figures.training_curves(pd.DataFrame(steps), pd.DataFrame(history))
    axes = _panels(fig)
    assert len(axes) == 8  # (2 block types x 2 norms) x (loss, accuracy)
    assert "conv — no normalisation" in _texts(fig)
    fig.canvas.draw()


def test_sample_grid_shows_each_image_with_its_class_name():
    images = np.random.default_rng(0).integers(0, 255, size=(8, 3, 32, 32), dtype=np.uint8)
    labels = ["cat", "dog", "ship", "frog", "cat", "bird", "$x$", "truck"]
    fig = figures.sample_grid(images, labels)
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes] == labels
    assert fig.axes[0].get_images()[0].get_array().shape == (32, 32, 3)
    fig.canvas.draw()  # "$x$" stays text (names come from files), it is not parsed as math
    channels_last = figures.sample_grid(images.transpose(0, 2, 3, 1), labels)
    assert len(channels_last.axes) == 8


def test_sample_grid_warns_on_a_bad_shape():
    with pytest.warns(UserWarning, match="expected images"):
        fig = figures.sample_grid(np.zeros((3, 32)), [])
    assert isinstance(fig, Figure)


def test_depth_shades_keep_the_block_colour_and_darken_with_depth():
    shades = figures.depth_shades("conv", [32, 2, 8])
    assert list(shades) == [2, 8, 32]
    brightness = [sum(shades[d]) for d in (2, 8, 32)]
    assert brightness == sorted(brightness, reverse=True)
    assert figures.depth_shades("res", [4]) == {4: to_rgb(figures.PALETTE["res"])}
    assert figures.arch_color("unknown") == figures.arch_color("unknown")  # stable for other archs


def test_figures_leave_global_matplotlib_settings_alone():
    before = dict(mpl.rcParams)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures.gradient_flow(profile())
    assert dict(mpl.rcParams) == before


def test_the_report_side_never_imports_torch():
    code = "import sys, gradlab.report.html; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
