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


def profile(blocks=("conv", "res"), depths=(2, 4), phases=("init", "end"), value=None) -> pd.DataFrame:
    """A gradient_profile-like frame: stem (2 probes), the blocks, the head; grows toward the input."""
    rows = []
    for phase in phases:
        for block in blocks:
            for depth in depths:
                layers = ["conv1", "conv2", *(f"layers.{i}" for i in range(depth)), "linear1"]
                for position, layer in enumerate(layers):
                    index = position - 2 if 2 <= position < 2 + depth else -1
                    role = "stem" if position < 2 else "head" if index < 0 else "stack"
                    relative = 2.0 ** (depth + 1 - position)
                    rows.append({"run": f"{block}-d{depth}", "model": "deepcnn", "block": block, "depth": depth,
                                 "norm": "batch", "seed": 0, "phase": phase, "layer": layer, "position": position,
                                 "role": role, "stack_index": index,
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
    verdicts = pd.DataFrame({"phase": ["init"], "block": ["conv"], "norm": ["batch"], "depth": [4],
                             "first_to_last": [41.0], "verdict": ["exploding"]})
    fig = figures.gradient_flow(profile(), verdicts=verdicts, title="conv explodes toward the input")
    text = _texts(fig)
    assert "×41 toward input — exploding" in text
    assert "conv explodes toward the input" in text


def test_gradient_flow_states_the_verdicts_from_shallow_to_deep():
    verdicts = pd.DataFrame({"block": "conv", "norm": "batch", "depth": [2, 32, 8],  # flow_summary's order: by run name
                             "first_to_last": [1.3, 4355.0, 6.2], "verdict": ["stable", "exploding", "stable"]})
    fig = figures.gradient_flow(profile(blocks=("conv",), depths=(2, 8, 32), phases=("init",)), verdicts=verdicts)
    title = _panels(fig)[0].get_title(loc="left")
    assert [title.index(f"depth {d}:") for d in (2, 8, 32)] == sorted(title.index(f"depth {d}:") for d in (2, 8, 32))


def test_gradient_flow_colours_are_shades_of_the_block_type():
    fig = figures.gradient_flow(profile(blocks=("res",), depths=(4,), phases=("init",)))
    (line,) = _data_lines(_panels(fig)[0])
    assert np.allclose(to_rgb(line.get_color()), to_rgb(figures.PALETTE["res"]))


def test_one_block_type_puts_the_phases_side_by_side():
    fig = figures.gradient_flow(profile(blocks=("skip",)))
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
    (figures.gradient_flow, pd.DataFrame({"block": ["conv"], "depth": [2]})),
    (figures.depth_scaling_ratio, pd.DataFrame({"block": ["conv"]})),
    (figures.accuracy_vs_depth, pd.DataFrame({"block": ["conv"], "depth": [2]})),
    (figures.signal_propagation, pd.DataFrame({"run": ["a"]})),
    (figures.branch_skip, pd.DataFrame({"block": ["res"], "depth": [2]})),
    (figures.run_heatmaps, pd.DataFrame({"run": ["a"], "step": [0]})),
    (figures.accuracy_vs_params, pd.DataFrame({"block": ["conv"], "depth": [2]})),
    (figures.ratio_vs_width, pd.DataFrame({"block": ["conv"], "depth": [2]})),
    (figures.spread_vs_beta, pd.DataFrame({"block": ["conv"], "beta": [1.0]})),
])
def test_a_missing_column_warns_and_leaves_the_panel_empty(draw, frame):
    with pytest.warns(UserWarning, match="missing column"):
        fig = draw(frame)
    assert isinstance(fig, Figure)


def test_training_curves_warn_on_missing_columns():
    with pytest.warns(UserWarning, match="missing column"):
        fig = figures.training_curves(pd.DataFrame({"run": ["a"], "block": ["conv"], "depth": [2]}),
                                      pd.DataFrame({"run": ["a"], "block": ["conv"], "depth": [2]}))
    assert "no loss per step" in _texts(fig)


def scaling() -> pd.DataFrame:
    rows = []
    for phase in ("init", "end"):
        for block, base in (("conv", 4.0), ("res", 1.1), ("skip", 0.5)):
            for depth in (2, 8, 32):
                rows.append({"phase": phase, "model": "deepcnn", "block": block, "norm": "batch", "depth": depth,
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
    for block in ("conv", "res"):
        for depth in (2, 8):
            for seed in (0, 1):
                rows.append({"run": f"{block}-d{depth}-s{seed}", "block": block, "depth": depth, "norm": "batch",
                             "seed": seed, "test_acc": 0.5 + 0.01 * depth, "best_val_acc": 0.52,
                             "final_train_acc": 0.6 - 0.01 * depth, "status": "complete"})
    return pd.DataFrame(rows)


def test_accuracy_vs_depth_has_a_panel_per_accuracy_and_survives_nan():
    table = runs_table()
    table.loc[0, "test_acc"] = np.nan
    table.loc[1, "final_train_acc"] = np.inf
    fig = figures.accuracy_vs_depth(table, chance=0.1)
    axes = _panels(fig)
    assert len(axes) == 2
    assert [ax.get_title() for ax in axes] == ["test accuracy", "train accuracy (last epoch)"]
    assert all(len(ax.get_lines()) >= 2 for ax in axes)  # a line per block type (and the chance line)
    assert [ax.get_ylim() for ax in axes] == [(0.0, 0.7)] * 2  # from 0, never zoomed onto the spread


def test_the_train_accuracy_panel_leaves_out_runs_still_training():
    """A running run's train accuracy is its latest checkpoint's epoch, not its budget's last."""
    table = runs_table()
    table.loc[table["run"] == "conv-d8-s1", ["status", "test_acc"]] = ["running", np.nan]
    test, train = _panels(figures.accuracy_vs_depth(table))
    dots = [sum(len(c.get_offsets()) for c in ax.collections) for ax in (test, train)]
    assert dots == [7, 7]
    drawn = np.concatenate([c.get_offsets()[:, 1] for c in train.collections])
    assert sorted(np.round(drawn, 2)) == sorted(np.round(table.loc[table["status"] == "complete",
                                                                   "final_train_acc"], 2))


def test_accuracies_near_chance_are_drawn_on_an_axis_from_zero():
    table = runs_table().assign(test_acc=lambda t: 0.09 + 0.002 * t["depth"], final_train_acc=0.1)
    fig = figures.accuracy_vs_depth(table, chance=0.1)
    assert all(ax.get_ylim() == (0.0, 0.2) for ax in _panels(fig))


def test_accuracy_vs_depth_says_when_no_run_finished():
    fig = figures.accuracy_vs_depth(runs_table().assign(test_acc=np.nan, final_train_acc=np.nan))
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


def activation(block="res", run="r") -> pd.DataFrame:
    rows = []
    metrics = ["act_chan_mean_sq", "act_chan_var"] + (["branch_chan_var", "skip_chan_var"] if block == "res" else [])
    for position in range(5):
        for metric in metrics:
            rows.append({"run": run, "block": block, "depth": 3, "norm": "batch", "seed": 0, "layer": f"l{position}",
                         "position": position, "role": "stack", "stack_index": position, "metric": metric,
                         "value": 0.1 * (position + 1)})
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
        for block in ("res", "resdown"):
            for depth in (2, 4):
                for i in range(depth):
                    rows.append({"run": f"{block}{depth}", "block": block, "depth": depth, "phase": phase,
                                 "position": 2 + i, "branch_share": [0.5, np.nan, 0.2, np.inf][i]})
    fig = figures.branch_skip(pd.DataFrame(rows))
    axes = _panels(fig)
    assert len(axes) == 4
    assert axes[0].get_ylim() == pytest.approx((-0.03, 1.03))


def test_training_curves_have_loss_and_accuracy_panels_per_block_type_and_norm():
    steps, history = [], []
    for block in ("conv", "res"):
        for norm in ("batch", "none"):
            run = f"{block}-{norm}"
            steps += [{"run": run, "block": block, "norm": norm, "depth": 2, "step": s,
                       "loss": [2.3, np.nan, np.inf, 2.0, 1.9][s]} for s in range(5)]
            history += [{"run": run, "block": block, "norm": norm, "depth": 2, "epoch": e,
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
    assert figures.block_color("unknown") == figures.block_color("unknown")  # stable for other block types


def test_figures_leave_global_matplotlib_settings_alone():
    before = dict(mpl.rcParams)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures.gradient_flow(profile())
    assert dict(mpl.rcParams) == before


def test_the_report_side_never_imports_torch():
    code = "import sys, gradlab.report.html; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- diverged runs and non-finite values


def _drawn_points(fig: Figure) -> np.ndarray:
    """Every y value the figure draws: line vertices (NaN is a gap, not a point) and scatter offsets."""
    values = []
    for ax in _panels(fig):
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), dtype=float)
            values.append(y[~np.isnan(y)])
        for collection in ax.collections:
            offsets = np.ma.getdata(collection.get_offsets())
            if offsets.size:
                values.append(np.asarray(offsets, dtype=float)[:, 1])
    return np.concatenate(values) if values else np.array([])


def _crosses(fig: Figure) -> list:
    """The ✕ markers (DIVERGED_MARKER scatter collections) as (axes, x) pairs."""
    crosses = []
    for ax in _panels(fig):
        for collection in ax.collections:
            path = collection.get_paths()[0] if collection.get_paths() else None
            marker = mpl.markers.MarkerStyle(figures.DIVERGED_MARKER).get_path().transformed(
                mpl.markers.MarkerStyle(figures.DIVERGED_MARKER).get_transform())
            if path is not None and len(path.vertices) == len(marker.vertices):
                crosses += [(ax, float(x)) for x in np.ma.getdata(collection.get_offsets())[:, 0]]
    return crosses


def test_gradient_flow_leaves_non_finite_values_out_and_marks_the_diverged_run():
    frame = profile(blocks=("conv",), depths=(2, 4), phases=("init", "end"))
    bad = (frame["run"] == "conv-d4") & (frame["phase"] == "end") & (frame["position"] <= 3)
    frame.loc[bad, "value"] = np.inf  # the diverged run's measured norms overflowed ...
    frame.loc[bad, "relative"] = np.inf  # ... so their ratios are inf too, and must not be drawn as "▲ inf"
    diverged = pd.DataFrame({"run": ["conv-d4"], "phase": ["end"], "step": [12], "layer": ["layers.1"],
                             "position": [3], "cause": ["gradient"]})
    fig = figures.gradient_flow(frame, diverged=diverged)
    fig.canvas.draw()
    assert np.isfinite(_drawn_points(fig)).all()
    text = _texts(fig)
    assert "4 non-finite values left out (not drawn)" in text and "exactly inf" not in text
    assert "✕ conv-d4: diverged at step 12 (layer layers.1)" in text
    init, end = _panels(fig)
    assert [x for ax, x in _crosses(fig)] == [3.0] and _crosses(fig)[0][0] is end  # only where it had diverged
    assert len(_data_lines(init)) == 2


def test_training_curves_mark_the_divergence_step_and_go_logarithmic():
    steps = pd.DataFrame({"run": ["a"] * 6 + ["b"] * 6, "block": "conv", "depth": [2] * 6 + [8] * 6,
                          "step": list(range(6)) * 2,
                          "loss": [2.3, 2.1, 2.0, 1.9, 1.8, 1.7, 2.3, 4e12, np.inf, np.nan, np.nan, np.nan]})
    history = pd.DataFrame({"run": ["a", "b"], "block": "conv", "depth": [2, 8], "epoch": [0, 0],
                            "train_acc": [0.3, 0.1], "val_acc": [0.25, np.nan]})
    diverged = pd.DataFrame({"run": ["b"], "step": [2], "layer": ["model"], "position": [-1], "cause": ["loss"]})
    fig = figures.training_curves(steps, history, diverged=diverged)
    fig.canvas.draw()
    top = _panels(fig)[0]
    assert top.get_yscale() == "log"  # 1.7 to 4e12: the diverging loss would flatten the other run
    assert np.isfinite(_drawn_points(fig)).all()
    assert [(ax, x) for ax, x in _crosses(fig)] == [(top, 2.0)]
    text = " ".join(t.get_text() for t in top.texts)
    assert "4 non-finite values left out" in text and "✕ b: diverged at step 2 (loss)" in text


def test_run_heatmaps_draw_a_line_at_the_divergence_step():
    frame = records(steps=6, metrics=("grad_out_norm",))
    frame.loc[(frame["run"] == "b") & (frame["step"] >= 3) & (frame["metric"] == "grad_out_norm"), "value"] = np.nan
    diverged = pd.DataFrame({"run": ["b"], "step": [3], "layer": ["layers.1"], "position": [2], "cause": ["gradient"]})
    fig = figures.run_heatmaps(frame, metrics=("grad_out_norm",), diverged=diverged)
    fig.canvas.draw()
    a, b = _panels(fig)
    assert [x for ax, x in _crosses(fig)] == [3.0] and _crosses(fig)[0][0] is b
    assert any(list(line.get_xdata()) == [3.0, 3.0] for line in b.get_lines())
    assert "grey: not finite" in " ".join(ax.get_ylabel() for ax in fig.axes)
    assert "✕ b: diverged at step 3 (layer layers.1)" in _texts(fig)


def test_depth_scaling_and_accuracy_mark_diverged_runs():
    frame = scaling().assign(n_diverged=0)
    frame.loc[(frame["block"] == "conv") & (frame["depth"] == 32), ["first_to_last", "n_diverged"]] = [np.nan, 2]
    fig = figures.depth_scaling_ratio(frame)
    assert sorted(x for _, x in _crosses(fig)) == [32.0, 32.0]  # one per phase panel
    assert "conv, depth 32: 2 runs diverged, left out of the ratio" in _texts(fig)
    table = runs_table().assign(status="complete")
    table.loc[table["run"] == "conv-d8-s1", ["status", "test_acc"]] = ["diverged", 0.1]
    fig = figures.accuracy_vs_depth(table)
    assert len(_crosses(fig)) == 2 and "✕ diverged (1)" in _texts(fig)


def test_signal_propagation_leaves_overflowed_statistics_out():
    frame = activation("res")
    frame.loc[(frame["metric"] == "act_chan_var") & (frame["position"] >= 3), "value"] = np.inf
    frame.loc[(frame["metric"] == "act_chan_mean_sq") & (frame["position"] == 4), "value"] = np.nan
    fig = figures.signal_propagation(frame)
    fig.canvas.draw()
    assert np.isfinite(_drawn_points(fig)).all()
    assert "3 non-finite values left out" in _texts(fig) and "exactly inf" not in _texts(fig)
    everything = frame.assign(value=np.inf)
    assert "no finite values" in _texts(figures.signal_propagation(everything))


def test_figures_of_real_runs_that_diverged(tmp_path, small_splits):
    """The figures of a real sweep with a diverged run and a real lr-1e8 run: drawn, finite, marked."""
    from test_report_text import broken_sweep

    from gradlab import analysis
    from gradlab.report.text import runs_table as read_runs
    from gradlab.runs import load_sweep

    root = broken_sweep(tmp_path / "sweep", small_splits)
    sweep = load_sweep(root)
    good = [r for r in sweep.runs if r.name != "skip-d3-s0"]  # its records are corrupt
    records = pd.concat([r.records().assign(**r.identity()) for r in good])
    table = read_runs(sweep)
    diverged = analysis.divergence(records, table)
    assert sorted(diverged["run"]) == ["conv-d3-s0-none", "conv-d3-s1"]
    profile = pd.concat([analysis.gradient_profile(records, p).assign(phase=p) for p in ("init", "end")])
    flow = analysis.flow_summary(records, table, phases=("init", "end"), diverged=diverged)
    hit = flow.loc[flow["verdict"].str.startswith("diverged"), ["run", "phase"]].merge(diverged, on="run")
    fig = figures.gradient_flow(profile, verdicts=flow, diverged=hit)
    fig.canvas.draw()
    assert np.isfinite(_drawn_points(fig)).all()
    assert len(_crosses(fig)) == 2  # conv-d3-s1 and the lr-1e8 run, in the end panel
    assert "✕ conv-d3-s1: diverged at step 5 (layer layers.1)" in _texts(fig)
    steps = pd.concat([r.steps.assign(**r.identity()) for r in good])
    history = pd.concat([r.history.assign(**r.identity()) for r in good])
    fig = figures.training_curves(steps, history, diverged=diverged)
    fig.canvas.draw()
    assert np.isfinite(_drawn_points(fig)).all()
    assert sorted(x for _, x in _crosses(fig)) == [1.0, 5.0]


# ---------------------------------------------------------------- any model


def test_a_mixed_sweep_gets_a_panel_and_a_colour_per_network():
    from test_analysis import make_records, make_resnet

    from gradlab import analysis

    records = pd.concat([make_records("conv-d8", depth=8), make_resnet("r18", gain=1.2)], ignore_index=True)
    frame = analysis.gradient_profile(records).assign(phase="init")
    flow = analysis.flow_summary(records, phases=["init"])
    fig = figures.gradient_flow(frame, verdicts=flow)
    conv, resnet = _panels(fig)
    title = " ".join(resnet.get_title(loc="left").split())  # titles wrap to the panel
    assert " ".join(conv.get_title(loc="left").split()).startswith("conv — at initialisation")
    assert title.startswith("torchvision:resnet18, BasicBlock — at initialisation")
    assert "depth 8: ×3.58 toward input — stable" in title
    assert len(_data_lines(conv)) == 1 and len(_data_lines(resnet)) == 1
    (line,) = _data_lines(resnet)
    assert list(line.get_xdata()) == list(range(10))  # conv1, layer1.0 .. layer4.1, fc by position
    assert "stem" in [t.get_text() for t in resnet.texts]  # the stem (role) is shaded
    colours = {figures.block_color(n) for n in ("conv", "torchvision:resnet18, BasicBlock")}
    assert len(colours) == 2
    scaling = analysis.depth_scaling(records, None)
    fig = figures.depth_scaling_ratio(scaling)
    legend = [t.get_text() for t in _panels(fig)[0].get_legend().get_texts()]
    assert legend == ["conv", "torchvision:resnet18, BasicBlock"]


def test_run_heatmaps_shorten_long_module_names_without_ambiguity():
    frame = records(runs=("a",))
    long = {"conv1": "model.backbone.conv1", "layers.0": "model.backbone.stages.0.blocks.0.mixer",
            "layers.1": "model.backbone.stages.0.blocks.1.mixer", "linear1": "model.head"}
    frame["layer"] = frame["layer"].replace(long)
    fig = figures.run_heatmaps(frame, metrics=("grad_out_norm",))
    (ax,) = _panels(fig)
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "backbone.conv1", "…stages.0.blocks.0.mixer", "…stages.0.blocks.1.mixer", "head"]


# ---------------------------------------------------------------- training curves: what the data supports


def _curve_frames(epochs: int, depths=(2, 8, 32), steps_per_epoch: int = 40) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Loss per step and accuracy per epoch of one conv run per depth."""
    steps = pd.DataFrame([{"run": f"conv-d{d}", "block": "conv", "depth": d, "step": s, "loss": 2.3 - s / 1000}
                          for d in depths for s in range(epochs * steps_per_epoch)])
    history = pd.DataFrame([{"run": f"conv-d{d}", "block": "conv", "depth": d, "epoch": e,
                             "train_acc": 0.1 + 0.02 * e + 0.1 / d, "val_acc": 0.09 + 0.02 * e + 0.1 / d}
                            for d in depths for e in range(epochs)])
    return steps, history


def _tick_labels(ax) -> list[str]:
    """The x tick labels drawn inside the axis' view."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [t.get_text() for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if low <= x <= high]


def test_one_epoch_draws_its_accuracy_as_markers_on_a_whole_epoch_axis():
    fig = figures.training_curves(*_curve_frames(epochs=1))
    loss, accuracy = _panels(fig)
    assert [len(line.get_xdata()) for line in _data_lines(loss)] == [40, 40, 40]  # the loss of every step
    assert [line for line in accuracy.get_lines() if len(line.get_xdata()) > 1] == []  # no line through epochs
    markers = [c.get_offsets() for c in accuracy.collections]
    assert sorted(len(m) for m in markers) == [3, 3]  # train and validation: a marker per run
    assert {float(x) for m in markers for x in m[:, 0]} == {1.0}  # drawn at epoch 1
    assert _tick_labels(accuracy) == ["1"]  # whole epochs only, never 0.95 or 1.05
    assert accuracy.get_xlim() == (0.5, 1.5)
    assert accuracy.get_ylim()[0] == 0  # an accuracy axis from 0, not a zoom on one dot
    legend = [t.get_text() for t in accuracy.get_legend().get_texts()]
    assert legend == ["train", "validation"]
    assert all(h.get_linestyle() == "None" for h in accuracy.get_legend().legend_handles)  # markers, no lines


def test_many_epochs_draw_a_line_per_run_and_split_with_a_point_per_epoch():
    fig = figures.training_curves(*_curve_frames(epochs=5))
    loss, accuracy = _panels(fig)
    assert [len(line.get_xdata()) for line in _data_lines(loss)] == [200, 200, 200]
    lines = [line for line in accuracy.get_lines() if len(line.get_xdata()) > 1]
    assert len(lines) == 6  # 3 runs x (train, validation)
    assert all(list(line.get_xdata()) == [1, 2, 3, 4, 5] for line in lines)
    assert sorted(line.get_linestyle() for line in lines) == ["-"] * 3 + ["--"] * 3  # train solid, validation dashed
    assert len(accuracy.collections) == 0  # no stray single markers
    assert _tick_labels(accuracy) == ["1", "2", "3", "4", "5"]
    long = _panels(figures.training_curves(*_curve_frames(epochs=30, depths=(2,), steps_per_epoch=2)))[1]
    labels = _tick_labels(long)
    assert labels and all(label.isdigit() for label in labels)  # whole epochs, thinned out
    assert {len(line.get_xdata()) for line in long.get_lines() if len(line.get_xdata()) > 1} == {30}


def test_a_run_of_one_epoch_beside_runs_of_several_is_a_marker_beside_lines():
    steps, history = _curve_frames(epochs=3, depths=(2, 8))
    history = history.loc[~((history["run"] == "conv-d8") & (history["epoch"] > 0))]  # conv-d8 stopped after one
    accuracy = _panels(figures.training_curves(steps, history))[1]
    assert len([line for line in accuracy.get_lines() if len(line.get_xdata()) > 1]) == 2  # conv-d2's two splits
    assert sorted(len(c.get_offsets()) for c in accuracy.collections) == [1, 1]  # conv-d8: a marker per split
    assert _tick_labels(accuracy) == ["1", "2", "3"]


def width_scaling() -> pd.DataFrame:
    rows = []
    for block, base in (("conv", 2700.0), ("res", 8.0)):
        for norm in ("batch", "none"):
            for depth in (8, 32):
                for width in (8, 32, 128):
                    ratio = 0.0 if (block, norm, depth) == ("conv", "none", 32) else base / (1 + width / 1000)
                    rows.append({"phase": "init", "model": "deepcnn", "block": block, "norm": norm, "depth": depth,
                                 "width": width, "first_to_last": ratio})
    return pd.DataFrame(rows)


def test_ratio_vs_width_has_a_log_panel_per_block_type_a_line_per_depth_and_norm_and_marks_zeros():
    frame = width_scaling()
    frame.loc[0, "first_to_last"] = np.nan  # 0/0: left out, counted
    fig = figures.ratio_vs_width(frame)
    fig.canvas.draw()
    panels = _panels(fig)
    assert len(panels) == 2 and all(ax.get_yscale() == "log" and ax.get_xscale() == "log" for ax in panels)
    assert [len([l for l in ax.get_lines() if len(l.get_xdata()) == 3]) for ax in panels] == [4, 4]
    text = _texts(fig)
    assert "exactly 0" in text and "1 point without a ratio" in text


def test_accuracy_vs_params_draws_a_wider_and_a_deeper_line_per_block_type():
    lines = pd.DataFrame({"model": "deepcnn", "block": ["conv"] * 4 + ["res"] * 4, "norm": "batch",
                          "direction": ["wider", "wider", "deeper", "deeper"] * 2, "depth": [2, 2, 2, 8] * 2,
                          "width": [32, 64, 32, 32] * 2, "n_params": [1e4, 4e4, 1e4, 3e4] * 2,
                          "test_acc_mean": [0.4, 0.5, 0.4, 0.45, 0.42, 0.52, 0.42, 0.5]})
    fig = figures.accuracy_vs_params(lines, chance=0.1)
    ax = _panels(fig)[0]
    styles = sorted((l.get_linestyle(), l.get_color()) for l in ax.get_lines()
                    if len(l.get_xdata()) == 2 and l.get_linestyle() != ":")  # ":" is the chance line
    assert styles == sorted([("-", figures.block_color("conv")), ("--", figures.block_color("conv")),
                             ("-", figures.block_color("res")), ("--", figures.block_color("res"))])
    assert ax.get_xscale() == "log" and ax.get_ylim()[0] == 0


def test_spread_vs_beta_has_a_marker_per_network_and_counts_what_it_leaves_out():
    spread = pd.DataFrame({"model": "deepcnn", "block": ["conv", "conv", "res", "res"], "norm": "batch",
                           "beta": [3.0, 0.75, 3.0, np.nan], "log_ratio_std": [0.4, 0.1, np.nan, 0.1]})
    fig = figures.spread_vs_beta(spread)
    fig.canvas.draw()
    ax = _panels(fig)[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 2 and ax.get_xscale() == "log"
    assert "2 networks without a spread" in _texts(fig)


def test_step_axes_of_a_long_run_have_few_separated_labels_that_never_overlap():
    """30 epochs of 176 steps: the step axes of the training curves and the heatmaps keep at most
    five labels, thousands separated, and no two labels overlap once drawn."""
    steps = pd.DataFrame({"run": "conv-d8", "block": "conv", "depth": 8, "step": range(5280),
                          "loss": np.linspace(2.3, 0.7, 5280)})
    history = pd.DataFrame({"run": "conv-d8", "block": "conv", "depth": 8, "epoch": range(30),
                            "train_acc": np.linspace(0.2, 0.8, 30), "val_acc": np.linspace(0.2, 0.6, 30)})
    curves = figures.training_curves(steps, history)
    heatmaps = figures.run_heatmaps(records(runs=("a",), steps=5281).query("step % 20 == 0"))
    for fig, ax in ((curves, _panels(curves)[0]), (heatmaps, _panels(heatmaps)[0])):
        fig.canvas.draw()
        shown = [t for t in ax.get_xticklabels() if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0]
                 <= ax.get_xlim()[1]]
        assert 3 <= len(shown) <= 5
        assert "2,000" in [t.get_text() for t in shown]
        boxes = [t.get_window_extent() for t in shown]
        assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
