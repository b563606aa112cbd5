"""The gradlab command line: the only module that prints or exits.

Every bad input becomes one line on stderr and exit status 2; library errors
(ValueError and its subclasses DataError, RunError, LockError and ResourceError) carry the
message. A file system error (a full disk, say) is one line and exit status 1. The library's
notes (a stale lock taken over) arrive through the ``gradlab`` logger and are printed here.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import click

from . import __version__, schema
from .recorder import RecordConfig
from .specs import split_model_arg
from .train import Callback, RunFinished, TrainConfig

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    """One line on stderr, exit status 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"gradlab: error: {self.format_message()}", err=True)


class Failed(BadInput):
    """One line on stderr, exit status 1: the input was fine, the system was not (a full disk, say)."""

    exit_code = 1


def _os_error(exc: OSError, doing: str) -> Failed:
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    return Failed(f"{doing}: cannot write{where} ({exc.strerror or exc}); check the path and the free space")


class _Notes(logging.Handler):
    """The library's warnings as ``gradlab: note: ...`` lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"gradlab: note: {record.getMessage()}", err=True)


def _show_notes() -> None:
    logger = logging.getLogger("gradlab")
    if not any(isinstance(h, _Notes) for h in logger.handlers):
        logger.addHandler(_Notes())
        logger.propagate = False


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# --- options: one per TrainConfig / RecordConfig field, help text with its default --------------

_DEEPCNN_ONLY = " deepcnn only; other models ignore it."
_TRAIN_HELP = {
    "model": "The network: deepcnn (the notebook's DeepCNN, shaped by --block/--depth/--width/--norm), "
             "torchvision:NAME (resnet18, resnet50, ...: 10 classes, random initialisation, never a download), "
             "path/to/file.py:factory or package.module:factory (your function returning an nn.Module).",
    "model_args": "Keyword option for a torchvision or factory model, KEY=VALUE (an int, a float, true/false, else "
                  "a string); repeat it for several. Default: none.",
    "block": "Block type of the network: conv (plain ConvBlock), res (identity residual), resdown, skip "
             "(concatenation)." + _DEEPCNN_ONLY,
    "depth": "Number of blocks (the notebook's num_blocks); 0 gives the stem and head alone." + _DEEPCNN_ONLY,
    "width": "Channels through the stem and every block; even, at least 2." + _DEEPCNN_ONLY,
    "norm": "batch: BatchNorm as in the notebook; none: every BatchNorm replaced by an identity." + _DEEPCNN_ONLY,
    "epochs": "Passes over the training split.",
    "batch_size": "Images per optimizer step.",
    "lr": "Learning rate (Adam at 1e-4 is the notebook's; SGD on ResNets: about 0.05 with --momentum 0.9).",
    "optimizer": "adam (the notebook's), or sgd (with --momentum and --weight-decay: the ResNet recipe).",
    "momentum": "SGD momentum, from 0 to below 1 (0.9 for ResNets); sgd only.",
    "weight_decay": "L2 penalty on every parameter (SGD's weight decay; Adam adds it to the gradient, as torch's Adam).",
    "seed": "Seeds initialisation, the train/validation split and shuffling.",
    "dataset": "cifar10, or synthetic (seeded noise with learnable labels, for tests and machines without data).",
    "data_root": "Folder holding cifar-10-batches-py (downloaded there when absent). Default: $GRADLAB_DATA, else ~/.cache/gradlab/data.",
    "subset": "Train on the first N images of the 45,000-image training split (validation and test stay whole). Default: all.",
    "val_fraction": "Fraction of the 50,000 training images held out for validation.",
    "device": "auto (CUDA when present), cpu or cuda.",
    "eval_batch_size": "Batch size for evaluation (no gradients; changes speed, not results).",
    "precision": "fp32, or bf16: bfloat16 autocast for the forward pass (CUDA, or a CPU with AVX512-BF16/AMX); "
                 "recorded statistics stay float32.",
    "channels_last": "Channels-last (NHWC) activations: faster convolutions on CPU and GPU; same weights and results "
                     "up to rounding.",
    "on_nonfinite": "After the first non-finite loss or gradient: stop (status diverged), or continue to the "
                    "last epoch (still marked diverged).",
}
_CHOICES = {"block": ("conv", "res", "resdown", "skip"), "norm": ("batch", "none"), "optimizer": ("adam", "sgd"),
            "dataset": ("cifar10", "synthetic"), "device": ("auto", "cpu", "cuda"),
            "on_nonfinite": ("stop", "continue"), "precision": ("fp32", "bf16")}
_TYPES = {"depth": click.IntRange(min=0), "width": click.IntRange(min=2), "epochs": click.IntRange(min=1),
          "batch_size": click.IntRange(min=1), "eval_batch_size": click.IntRange(min=1),
          "subset": click.IntRange(min=1), "lr": float, "val_fraction": click.FloatRange(0, 1, min_open=True, max_open=True),
          "seed": click.IntRange(min=0), "data_root": click.Path(file_okay=False), "model": str,
          "momentum": float, "weight_decay": float}


SWEPT = ("model", "block", "depth", "seed", "norm")  # the grid's axes: lists in `gradlab sweep`


def _model_args(ctx, param, values) -> tuple[tuple[str, str], ...]:
    """``--model-arg key=value`` (repeated) as the (key, value) pairs of TrainConfig.model_args."""
    try:
        return tuple(split_model_arg(v) for v in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def model_arg_option(command):
    return click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", callback=_model_args,
                        help=_TRAIN_HELP["model_args"])(command)


def probes_option(command):
    return click.option("--probes", "probes", default=None, metavar="PATTERNS",
                        help="Probe points to record, comma separated: module names or globs over the model's "
                             "module names (layer*.*: '*' within one dotted name, '**' across them). Default: "
                             "DeepCNN's stem, blocks and head; for other models the automatic choice "
                             "(see gradlab probe --list-probes).")(command)


def train_options(command, exclude: tuple[str, ...] = ()):
    """Decorate ``command`` with one option per TrainConfig field (except ``exclude``)."""
    for field in reversed(fields(TrainConfig)):
        if field.name in exclude:
            continue
        if field.name == "model_args":
            command = model_arg_option(command)
            continue
        name = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):  # a flag pair: --channels-last / --no-channels-last
            command = click.option(f"{name}/--no-{name[2:]}", field.name, default=field.default, show_default=True,
                                   help=_TRAIN_HELP[field.name])(command)
            continue
        kind = click.Choice(_CHOICES[field.name]) if field.name in _CHOICES else _TYPES[field.name]
        command = click.option(name, field.name, type=kind, default=field.default, show_default=field.default is not None,
                               help=_TRAIN_HELP[field.name])(command)
    return command


def record_options(command):
    command = probes_option(command)
    command = click.option("--record-every", "record_every", type=click.IntRange(min=0), default=RecordConfig.every,
                           show_default=True, help="Record gradient and activation statistics every N-th step; 0 disables recording.")(command)
    command = click.option("--record-schedule", "record_schedule", type=click.Choice(["every", "log"]),
                           default=RecordConfig.schedule, show_default=True,
                           help="every: steps 0, N, 2N, ...; log: log-spaced steps (dense early, sparse late).")(command)
    return command


def _split_options(options: dict) -> tuple[TrainConfig, RecordConfig]:
    train_config = TrainConfig(**{f.name: options.pop(f.name) for f in fields(TrainConfig) if f.name in options})
    record = RecordConfig(every=options.pop("record_every"), schedule=options.pop("record_schedule"),
                          probes=_probe_patterns(options.pop("probes")))
    return train_config, record


def _probe_patterns(text: str | None) -> tuple[str, ...] | None:
    """``--probes`` as a tuple of names or globs; None when not given."""
    if text is None:
        return None
    patterns = tuple(p.strip() for p in text.split(",") if p.strip())
    if not patterns:
        raise BadInput(f"--probes {text!r}: give module names or globs, comma separated (layer*.*, say)")
    return patterns


# --- progress -------------------------------------------------------------------------------------

class _Console(Callback):
    """A tqdm bar over steps and a line per epoch."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def on_fit_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        config = trainer.config
        if trainer.spec.kind == "deepcnn":
            click.echo(f"{config.block} network, depth {config.depth}, width {config.width}, norm {config.norm}: "
                       f"{trainer.n_params:,} parameters on {trainer.device}")
        else:
            click.echo(f"{trainer.spec.name} ({type(trainer.model).__name__}): {trainer.n_params:,} parameters on "
                       f"{trainer.device}")
        if trainer.splits.synthetic:
            click.echo("note: synthetic data (seeded noise with learnable labels), not CIFAR-10")
        if trainer.epoch:
            click.echo(f"resuming after epoch {trainer.epoch} (step {trainer.step})")
        steps = len(trainer.train_loader)
        self.bar = tqdm(total=config.epochs * steps, initial=trainer.epoch * steps, unit="step",
                        desc="train", disable=self.quiet, dynamic_ncols=True, leave=False)

    def on_after_step(self, trainer) -> None:
        self.bar.update(1)

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        if not self.quiet:
            # The epoch's numbers arrive with the epoch's one host sync; the bar never syncs per step.
            self.bar.set_postfix_str(f"loss {metrics['train_loss']:.3f} val {_pct(metrics['val_acc'])}", refresh=False)
            best = " (best)" if metrics["is_best"] else ""
            self.bar.write(f"epoch {epoch + 1}/{trainer.config.epochs}: loss {metrics['train_loss']:.4f}, "
                           f"train {_pct(metrics['train_acc'])}, val {_pct(metrics['val_acc'])}{best}, "
                           f"{metrics['images_per_s']:.0f} images/s")

    def on_fit_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


# --- commands ---------------------------------------------------------------------------------

class _Group(click.Group):
    """Usage errors as one line and exit status 2, not click's usage block."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("gradlab: aborted", err=True)
            sys.exit(130)
        except click.UsageError as exc:
            hint = f" (see 'gradlab {exc.ctx.info_name} --help')" if exc.ctx is not None and exc.ctx.parent is not None else ""
            click.echo(f"gradlab: error: {exc.format_message()}{hint}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gradlab")
def main() -> None:
    """gradlab: see how gradients flow through plain, residual and skip CNNs."""
    _show_notes()


@main.command()
@train_options
@record_options
@click.option("--out", required=True, type=click.Path(), help="Run directory to write (or resume). Required.")
@click.option("--restart", is_flag=True, help="Discard what --out holds and train from scratch.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines; only the result.")
@click.option("--tensorboard", "tensorboard", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Also write the records, losses and accuracies as TensorBoard scalars into DIR while training "
                   "(needs gradlab[tensorboard]). Default: none.")
def train(out: str, restart: bool, quiet: bool, tensorboard: str | None, **options) -> None:
    """Train one network on CIFAR-10 into a run directory, recording gradient flow.

    The network is the notebook's DeepCNN unless --model names a torchvision model or your own factory.

    Running the same command again resumes from the last checkpoint.
    """
    from .train import train_run

    problem = _unwritable(tensorboard, folder=True) if tensorboard else None
    if problem:
        raise BadInput(f"--tensorboard {tensorboard}: {problem}; choose another DIR")
    try:
        config, record = _split_options(options)
        summary = train_run(config, out, record=record, restart=restart, callbacks=[_Console(quiet)],
                            tensorboard=tensorboard)
    except RunFinished as done:
        click.echo(str(done))
        return
    except (ValueError, ImportError) as exc:  # DataError, RunError, bad options; a missing extra
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc, f"training into {out}") from None
    if summary.get("diverged"):
        click.echo(_diverged_line(summary["diverged"], config.on_nonfinite))
    if summary["test_acc_last"] is None:  # stopped at the divergence
        best = "none (no epoch finished)" if summary["test_acc_best"] is None else _pct(summary["test_acc_best"])
        click.echo(f"test accuracy with the best checkpoint before the divergence: {best}; "
                   f"{summary['wall_seconds']:.1f} s")
    else:
        click.echo(f"best validation accuracy {_pct(summary['best_val_acc'])} (epoch {summary['best_epoch'] + 1}); "
                   f"test accuracy {_pct(summary['test_acc_best'])} with the best checkpoint, "
                   f"{_pct(summary['test_acc_last'])} with the last; {summary['wall_seconds']:.1f} s")
    click.echo(f"run directory: {out}")


def _diverged_line(diverged: dict, on_nonfinite: str) -> str:
    where = "in the loss" if diverged["layer"] == "model" else f"at {diverged['layer']} (position {diverged['position']})"
    then = "training went on to the last epoch" if on_nonfinite == "continue" else "training stopped there"
    return (f"diverged: the first non-finite {diverged['cause']} appeared at step {diverged['step']} "
            f"(epoch {diverged['epoch'] + 1}) {where}; {then}. A smaller --lr trains; gradlab report shows the blow-up")


def _unwritable(path: str, folder: bool) -> str | None:
    """Why ``path`` cannot be written as a folder (``folder``) or as a file, or None if it seems it can."""
    target = Path(path)
    if target.exists() and folder != target.is_dir():
        return "is a file, not a folder" if folder else "is a folder, not a file"
    parent = target if folder else target.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def _int_list(text: str) -> tuple[int, ...]:
    """Comma-separated integers; an empty text is an empty list (which the library refuses by name)."""
    try:
        return tuple(int(v) for v in text.split(",")) if text.strip() else ()
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def _check_width_options(ctx, widths: str | None, shape: str = "product") -> None:
    """--width is one width, --widths several: both at once only with --shape wider-deeper, where
    --width is the width the deeper line grows at."""
    given = ctx.get_parameter_source("width") == click.core.ParameterSource.COMMANDLINE
    if widths is not None and given and shape == "product":
        raise BadInput("give --width (one width) or --widths (several), not both; with --shape wider-deeper, "
                       "--width is the width the deeper line grows at")
    if widths is not None and not widths.strip():
        raise BadInput("--widths must not be empty; leave it out for --width alone")


def _name_list(text: str) -> tuple[str, ...]:
    """Comma-separated names; an empty text is an empty list (which the library refuses by name)."""
    return tuple(v.strip() for v in text.split(",")) if text.strip() else ()


class CellsFailed(BadInput):
    """One line on stderr, exit status 3: the sweep finished every cell it could, and some failed."""

    exit_code = 3


_SWEEP_EPILOG = """\b
Exit status: 0 every cell is done (complete, diverged or already finished);
1 the system failed (a full disk, the Ray head went away: rerun to resume);
2 bad input, or the Ray cluster cannot be joined (address, token);
3 the sweep ran every cell it could and some failed (reasons above and in runs/*/summary.json)."""


@main.command(epilog=_SWEEP_EPILOG)
@click.option("--models", "--model", "models", default="deepcnn", show_default=True,
              help="Models to sweep, comma separated: deepcnn, torchvision:NAME, path/to/file.py:factory, "
                   "package.module:factory. deepcnn is expanded over --blocks x --norms x --depths; every other "
                   "model is one cell per seed, named by a short tag (tv-resnet18-s0) and given the --model-arg options.")
@click.option("--blocks", default="conv,res,skip", show_default=True,
              help="Block types to sweep, comma separated (deepcnn only).")
@click.option("--depths", default="2,4,8,16,32", show_default=True,
              help="Depths (blocks per network), comma separated (deepcnn only).")
@click.option("--widths", default=None,
              help="Widths (channels) to sweep, comma separated, each even and at least 2 (deepcnn only). A cell's "
                   "name shows a width other than 32 (conv-d2-w64-s0). Default: --width alone (names as before).")
@click.option("--shape", type=click.Choice(["product", "wider-deeper"]), default="product", show_default=True,
              help="Which depth x width cells to train. product: every depth at every width. wider-deeper: two "
                   "lines from the shallowest depth at --width: every --widths at the shallowest depth (grown wider) "
                   "and every --depths at --width (grown deeper); --widths must include --width. "
                   "--depths 2,8,16,32 --widths 16,32,64,128 --shape wider-deeper trains 7 cells per block, not 16.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma separated: each seed is one more run per cell.")
@click.option("--norms", default="batch", show_default=True,
              help="Normalisations, comma separated: batch, none (deepcnn only).")
@functools.partial(train_options, exclude=SWEPT)
@record_options
@click.option("--out", required=True, type=click.Path(), help="Sweep directory to write (or resume). Required.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: one Ray task per cell (needs gradlab[ray]).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells trained at once; the CPU threads are divided among them.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (ray executor); default: start a local Ray instance.")
@click.pass_context
def sweep(ctx, models: str, blocks: str, depths: str, widths: str | None, shape: str, seeds: str, norms: str, out: str,
          executor: str, jobs: int, ray_address: str | None, **options) -> None:
    """Train a grid of networks (models x blocks x norms x depths x widths x seeds), one run directory per cell.

    Running the same command again skips complete cells, resumes partial ones and reruns failed ones.
    On a Ray cluster every cell uses the data root and settings this shell resolves; each progress
    line names the node the cell ran on.
    """
    from tqdm.auto import tqdm

    from .sweep import ClusterLost, SweepGrid, describe_node, expand, run_sweep

    _check_width_options(ctx, widths, shape)
    try:
        base, record = _split_options(options)
        grid = SweepGrid(blocks=_name_list(blocks), depths=_int_list(depths), seeds=_int_list(seeds), norms=_name_list(norms),
                         models=_name_list(models), widths=_int_list(widths or ""), shape=shape)
        n_cells = len(expand(grid, base))
        # delay: a sweep refused before its first cell (bad folder, corrupt sweep.json) prints one line, no bar
        bar = tqdm(total=n_cells, unit="cell", desc="sweep", dynamic_ncols=True, delay=1.0)

        def cell_done(result: dict) -> None:
            status = result["status"]
            name = result["name"] + (f" on {describe_node(result['node'])}" if result.get("node") else "")
            if result.get("retried"):
                name += " (retried)"
            if status == "failed":
                bar.write(f"{name}: failed: {result['error']}")
            elif status == "complete":
                bar.write(f"{name}: test accuracy {_pct(result['test_acc'])} ({result['seconds']:.0f} s)")
            elif status == "diverged":
                bar.write(f"{name}: {_diverged_line(result['diverged'], base.on_nonfinite)}")
            bar.update(1)

        with bar:
            results = run_sweep(grid, base, out, record=record, executor=executor, jobs=jobs,
                                ray_address=ray_address, on_cell_done=cell_done)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc, f"sweeping into {out}") from None
    except ClusterLost as exc:
        raise Failed(str(exc)) from None
    counts = {s: sum(r["status"] == s for r in results) for s in ("complete", "diverged", "skipped", "failed")}
    click.echo(f"{n_cells} cells: {counts['complete']} trained, {counts['diverged']} diverged, "
               f"{counts['skipped']} already finished, {counts['failed']} failed; sweep directory: {out}")
    if counts["failed"]:
        raise CellsFailed(f"{counts['failed']} of {n_cells} cells failed (reasons above, and in "
                          f"{Path(out) / 'runs'}/<cell>/summary.json); run the same command again to retry them")
    click.echo(f"next: gradlab report {out}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="table and markdown for people; csv and json (full precision) for other tools.")
@click.option("--html", "html_file", is_flag=False, flag_value="", default=None, metavar="FILE",
              help="Write one self-contained HTML page with figures instead (FILE default: reports/<name>.html).")
def report(path: str, fmt: str, html_file: str | None) -> None:
    """Depth-scaling and gradient-flow report of a run or a sweep directory."""
    from .report.text import report_text

    if html_file is not None:
        from .report.html import write_report

        problem = _unwritable(html_file, folder=False) if html_file else None
        if problem:
            raise BadInput(f"--html {html_file}: {problem}; choose another FILE for --html")
        try:
            written = write_report(path, html_file or None)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        except OSError as exc:
            raise BadInput(f"cannot write {html_file or 'the HTML report'} ({exc.strerror or exc}); "
                           "choose another FILE for --html") from None
        click.echo(f"wrote {written}")
        return
    from .runs import load_sweep

    from .report.text import sweep_frames

    try:
        records, table, unreadable = sweep_frames(load_sweep(path))  # a corrupt cell is named, not fatal
        text = report_text(records, table, fmt=fmt, unreadable=unreadable)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    click.echo(text)
    for name, why in unreadable.items():
        click.echo(f"gradlab: warning: skipped {name}: {why}", err=True)


def _print_grid(records, runs_table, flow, fmt: str, budget: str) -> None:
    """``gradlab probe`` over several widths or seeds: the ratio per depth and width (geometric mean
    over seeds), what width changed, and the spread over seeds against Hanin's β."""
    from . import analysis
    from .report.text import ratio_table, render, spread_sentences, spread_table, width_sentences

    scaling = analysis.depth_scaling(records, runs_table, "init")
    seeds = int(flow["seed"].nunique())
    over = f"; geometric mean over {seeds} seeds" if seeds > 1 else ""
    click.echo(f"First-to-last gradient ratio at initialisation by depth and width (first block / last block; above "
               f"10: exploding, below 0.1: vanishing{over})")
    click.echo(render(ratio_table(scaling), fmt))
    words = {"init": f"at initialisation ({budget}{', ' + str(seeds) + ' seeds' if seeds > 1 else ''})"}
    effect = analysis.width_effect(scaling)
    if len(effect):
        click.echo("")
        for sentence in width_sentences(effect, words):
            click.echo(sentence)
    spread = analysis.seed_spread(flow)
    if seeds > 1 and len(spread):
        click.echo(f"\nSpread over {seeds} seeds at initialisation (same batches, only the initialisation changes) "
                   "against Hanin's β = Σ 1/width over the hidden layers (channels as widths):")
        click.echo(render(spread_table(spread), fmt))
        for sentence in spread_sentences(spread, analysis.spread_trend(spread)):
            click.echo(sentence)
    click.echo("")


def _print_profiles(flow, profile, fmt: str = "table") -> None:
    """The ratio table, then the deepest networks' profiles side by side, one panel per norm."""
    from . import analysis
    from .report.text import profile_bars, ratio_table, render

    click.echo("First-to-last gradient ratio at initialisation (first block / last block; above 10: exploding, "
               "below 0.1: vanishing)")
    click.echo(render(ratio_table(flow), fmt))
    _print_bars(flow, profile)


def _print_bars(flow, profile) -> None:
    """The deepest networks' gradient profiles side by side, one panel per norm."""
    from . import analysis
    from .report.text import profile_bars

    several_models = flow["model"].nunique() > 1
    for (model, norm), group in flow.groupby(["model", "norm"], sort=False):
        deepest = analysis.sort_by_block(group.loc[group["depth"] == group["depth"].max()], ["block"])
        which = f"{model} " if several_models else ""
        click.echo(f"\nGradient norm along the depth-{int(group['depth'].max())} {which}networks, "
                   f"{schema.norm_words(norm)}:")
        click.echo(profile_bars(profile, deepest["run"].tolist()))


def _print_flow(records, runs_table, fmt: str, shatter_summary=None, budget: str = "") -> None:
    """The probe's terminal report: ratio table, profiles with bars, signal propagation, sentences;
    with ``shatter_summary`` (``gradlab probe --shatter``) each network's neighbouring-gradient
    similarity (``similarity``, ``similarity_std``: mean and spread over image pairs) beside its ratio.
    Over several widths or seeds: the ratio table has a row per depth and width (geometric means
    over seeds), the profiles and sentences are of the base width's lowest seed, and the width and
    spread-over-seeds findings follow. ``budget``: the probe's batches, named in the sentences."""
    from . import analysis, lessons
    from .report.text import render

    flow = analysis.flow_summary(records, runs_table, phases=("init",))
    if shatter_summary is not None:
        similarity = lessons.similarity(shatter_summary)[["run", "mean", "std"]]
        flow = flow.merge(similarity.rename(columns={"mean": "similarity", "std": "similarity_std"}), on="run",
                          how="left")
    if fmt in ("csv", "json"):
        click.echo(render(flow, fmt))
        return
    several = flow["width"].nunique() > 1 or flow["seed"].nunique() > 1
    if not several:
        _print_profiles(flow, analysis.gradient_profile(records, "init"), fmt)
    else:
        _print_grid(records, runs_table, flow, fmt, budget)
        lowest = analysis.at_base_width(flow)
        flow = lowest.loc[lowest["seed"] == lowest.groupby(["model", "block", "norm", "depth"])["seed"].transform("min")]
        records = records.loc[records["run"].isin(set(flow["run"]))]
        widths = ", ".join(str(int(w)) for w in sorted(flow["width"].dropna().unique()))
        click.echo(f"The profiles and sentences below: width {widths}, lowest seed.")
        _print_bars(flow, analysis.gradient_profile(records, "init"))
    if shatter_summary is not None:
        click.echo("\nNeighbouring-gradient similarity at initialisation (Balduzzi et al. 2017): mean cosine "
                   "similarity of input gradients at neighbouring points on a line between two test images "
                   "(mean ± standard deviation over image pairs)")
        click.echo(render(lessons.similarity_table(shatter_summary), fmt))
    signal = analysis.activation_profile(records, "init")
    blocks = signal.loc[signal["role"] == "stack"]
    if not blocks.empty:
        last = blocks.loc[blocks.groupby("run")["position"].transform("max") == blocks["position"]]
        table = last.pivot_table(index="run", columns="metric", values="value", aggfunc="first").reset_index()
        click.echo("\nSignal propagation at the last block (Brock et al. 2021: channel mean² and channel variance):")
        click.echo(render(table, fmt))
    click.echo("")
    for row in analysis.sort_by_block(flow, ["model", "block", "norm", "depth"]).to_dict("records"):
        click.echo(analysis.describe_flow(row))
    for sentence in lessons.describe_shatter(shatter_summary) if shatter_summary is not None else []:
        click.echo(sentence)


@main.command()
@click.option("--model", "--models", "models", default="deepcnn", show_default=True,
              help="Models, comma separated, measured side by side: deepcnn (expanded over --blocks x --norm x "
                   "--depths), torchvision:NAME, path/to/file.py:factory, package.module:factory (each once).")
@model_arg_option
@click.option("--blocks", default="conv,res,skip", show_default=True, help="Block types, comma separated (deepcnn only).")
@click.option("--depths", default="2,8,32,64", show_default=True,
              help="Depths (blocks per network), comma separated (deepcnn only).")
@click.option("--norm", "norms", default="batch", show_default=True,
              help="Normalisations, comma separated: batch, none (none shows the classic vanishing gradient; deepcnn only).")
@click.option("--width", type=click.IntRange(min=2), default=32, show_default=True, help="Channels, even (deepcnn only).")
@click.option("--widths", default=None,
              help="Several widths, comma separated, each even and at least 2: one network per width, the ratio "
                   "against width in the table (deepcnn only). Default: --width alone.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch.")
@click.option("--batches", type=click.IntRange(min=1), default=3, show_default=True,
              help="Batches averaged per network (every network sees the same ones).")
@click.option("--seed", type=click.IntRange(min=0, max=2 ** 63 - 1), default=0, show_default=True,
              help="Seeds the choice of batches, and initialisation when --seeds is not given.")
@click.option("--seeds", default=None,
              help="Initialisations, comma separated: one network per seed, all on the same batches; adds the spread "
                   "of the log ratio over seeds against Hanin's β. Default: --seed alone.")
@click.option("--dataset", type=click.Choice(["cifar10", "synthetic"]), default="cifar10", show_default=True,
              help="cifar10, or synthetic noise with learnable labels.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding cifar-10-batches-py. Default: $GRADLAB_DATA, else ~/.cache/gradlab/data.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when present.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also store the measurements as a sweep directory (gradlab report reads it). Default: none, or a temporary one for --html.")
@click.option("--html", "html_file", default=None, metavar="FILE", help="Write the HTML report of the probe to FILE.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="Output format of the terminal report.")
@probes_option
@click.option("--list-probes", is_flag=True,
              help="Print the probe points chosen on each network (name, role, stack index, module type, residual "
                   "declaration) and exit, without data or measurements.")
@click.option("--shatter", "with_shatter", is_flag=True,
              help="Also measure shattered gradients (as gradlab shatter does, on the same data, BatchNorm statistics "
                   "from --batches batches): adds the neighbouring-gradient similarity to the table, and to --out "
                   "(OUT/shatter) and the --html report (deepcnn only).")
@click.pass_context
def probe(ctx, models, model_args, blocks, depths, norms, width, widths, batch_size, batches, seed, seeds, dataset,
          data_root, device, out, html_file, fmt, probes, list_probes, with_shatter) -> None:
    """Gradient flow at initialisation, without training: seconds, even at depth 64.

    Builds each network, runs forward and backward on real CIFAR-10 batches (averaged) and prints
    the first-to-last gradient ratio, the profile along depth and a verdict per network.
    """
    import tempfile

    from .probe import ProbeConfig, probe as run_probe

    _check_width_options(ctx, widths)
    if seeds is not None and not seeds.strip():
        raise BadInput("--seeds must not be empty; leave it out for --seed alone")
    for path, option, folder in ((out, "--out", True), (html_file, "--html", False)):
        problem = _unwritable(path, folder) if path else None
        if problem:
            raise BadInput(f"{option} {path}: {problem}; choose another {option}")
    try:
        config = ProbeConfig(blocks=_name_list(blocks), depths=_int_list(depths), norms=_name_list(norms), width=width,
                             widths=_int_list(widths or ""), seeds=_int_list(seeds or ""),
                             batch_size=batch_size, batches=batches, seed=seed, dataset=dataset,
                             data_root=data_root, device=device, models=_name_list(models), model_args=model_args,
                             probes=_probe_patterns(probes))
        config.validate()
        if list_probes:
            _list_probes(config, fmt)
            return
        _check_probe_memory(config)
        if with_shatter and "deepcnn" not in config.models:
            raise ValueError("--shatter measures the deepcnn networks of --blocks, --depths and --norm; "
                             "add deepcnn to --model")
        if with_shatter and (len(config.width_list()) > 1 or len(config.seed_list()) > 1):
            raise ValueError("--shatter measures one width and one seed; leave out --widths and --seeds")
        with tempfile.TemporaryDirectory(prefix="gradlab-probe-") as scratch:
            store = out or (scratch if html_file else None)
            splits = _probe_splits(config) if with_shatter else None  # one copy of the data for both measurements
            records, runs_table, synthetic = run_probe(config, splits=splits, out=store)
            similarity = _probe_shatter(config, splits, store) if with_shatter else None
            if synthetic and fmt in ("table", "markdown"):
                click.echo("note: synthetic data (seeded noise with learnable labels), not CIFAR-10")
            _print_flow(records, runs_table, fmt, similarity, budget=f"{config.batches} batch"
                        f"{'es' if config.batches != 1 else ''} of {config.batch_size} images")
            if html_file:
                from .report.html import write_report

                click.echo(f"wrote {write_report(store, html_file)}")
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"cannot write {exc.filename or out or html_file} ({exc.strerror or exc}); "
                       "choose another --out or --html") from None


def _probe_splits(config):
    from .data import make_splits
    from .train import resolve_device

    return make_splits(config.dataset, config.data_root, seed=config.seed, device=resolve_device(config.device))


def _probe_shatter(config, splits, store):
    """``gradlab probe --shatter``: the shatter summary of the probe's deepcnn grid on its own data,
    stored in ``store/shatter`` when the probe is stored (the report reads it there)."""
    from . import lessons
    from .shatter import ShatterConfig, shatter, write

    shatter_config = ShatterConfig(blocks=config.blocks, depths=config.depths, norms=config.norms, width=config.width,
                                   stat_batches=config.batches, stat_batch_size=config.batch_size, seed=config.seed,
                                   dataset=config.dataset, data_root=config.data_root, device=config.device)
    result = shatter(shatter_config, splits=splits)
    if store is not None:
        write(result, Path(store) / lessons.SHATTER_FOLDER)
    return result.summary


def _check_probe_memory(config) -> None:
    """ResourceError when the largest probed network's batch cannot fit (no optimizer: weights, gradients)."""
    from . import resources
    from .probe import largest_memory
    from .train import resolve_device

    device = resolve_device(config.device)
    what, estimate = largest_memory(config, device)
    resources.check_memory(estimate, device, what, "use a smaller --batch-size, --depths or --width, or smaller models")


def _list_probes(config, fmt: str) -> None:
    """``gradlab probe --list-probes``: the probe points of every network, built on the CPU, nothing measured."""
    import pandas as pd
    import torch

    from . import probes as probing
    from .probe import networks
    from .report.text import render

    tables = []
    for i, network in enumerate(networks(config)):
        torch.manual_seed(config.seed)
        model = network.build()
        points = probing.describe(probing.select(model, config.probes))
        table = pd.DataFrame(points, columns=["name", "role", "stack_index", "module_type", "residual"])
        if fmt in ("csv", "json"):  # one table for other tools, the network in front
            tables.append(table.assign(network=network.name)[["network", *table.columns]])
            continue
        if i:
            click.echo("")
        click.echo(f"{network.name} ({network.spec.name}, {type(model).__name__}): {len(points)} probe points")
        click.echo(render(table.rename(columns={"stack_index": "stack index", "module_type": "module type"}), fmt))
    if tables:
        click.echo(render(pd.concat(tables, ignore_index=True), fmt))


@main.command()
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding cifar-10-batches-py. Default: $GRADLAB_DATA, else ~/.cache/gradlab/data "
                   "(downloaded when absent; offline without data the demo runs on synthetic data and says so).")
@click.option("--out", "html", type=click.Path(dir_okay=False), default="runs/demo/demo.html", show_default=True,
              help="Where to write the HTML report (the gallery's copy: --out reports/demo.html).")
@click.option("--work-dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Where the probed and trained networks are stored (rerunning resumes).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when present.")
def demo(data_root, html, work_dir, device) -> None:
    """The gradient-flow lesson in about a minute on a laptop CPU.

    Probes plain (conv), residual (res) and skip networks at depths 2, 8 and 32 at initialisation,
    measures the shattering of their input gradients at depths 2 and 32, trains a depth-2 and a
    depth-16 network of each kind briefly, deletes their blocks one and several at a time, prints
    what was measured and writes an HTML report.
    """
    import pandas as pd

    from . import analysis, lessons
    from .demo import DemoConfig, run_demo
    from .report.text import accuracy_sentences, format_number, render

    config = DemoConfig(data_root=data_root, html=html, work_dir=work_dir, device=device)
    for path, option in ((work_dir, "--work-dir"), (html, "--out")):
        problem = _unwritable(path, folder=option == "--work-dir")
        if problem:
            raise BadInput(f"{option} {path}: {problem}; choose another {option}")
    try:
        result = run_demo(config, on_progress=lambda m: click.echo(f"· {m}", err=True))
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"cannot write {exc.filename or work_dir} ({exc.strerror or exc}); "
                       "choose another --work-dir or --out") from None
    if result.synthetic:
        click.echo(f"NOTE: no CIFAR-10 here ({result.data_note}); this demo ran on SYNTHETIC data, not CIFAR-10.")
    flow = result.probe_flow
    click.echo("\n1. At initialisation: how the gradient changes on its way back from the last block to the first\n")
    _print_profiles(flow, result.probe_profile)
    trained = result.trained
    click.echo(f"\n2. Training briefly ({config.epochs} epochs on {config.subset} images), shallow against deep\n")
    shown = pd.DataFrame({"network": trained["run"],
                          "loss first → last step": [f"{format_number(a)} → {format_number(b)}"
                                                     for a, b in zip(trained["first_loss"], trained["last_loss"])],
                          "train acc": trained["final_train_acc"].map(_pct), "test acc": trained["test_acc"].map(_pct),
                          "gradient at init": trained["verdict_init"], "at end": trained["verdict_end"]})
    click.echo(render(shown, "table"))
    click.echo("\n3. What was measured\n")
    for row in analysis.sort_by_block(flow.loc[flow["depth"] == flow["depth"].max()], ["block", "norm"]).to_dict("records"):
        click.echo("   " + analysis.describe_flow(row))
    for sentence in accuracy_sentences(trained):
        click.echo(f"   {sentence}")
    click.echo("\n   Shattered gradients at initialisation (Balduzzi et al. 2017): on a line between two test images, "
               "1 means neighbouring inputs have the same gradient direction, 0 unrelated ones (white noise).")
    for sentence in lessons.describe_shatter(result.shatter_summary):
        click.echo(f"   {sentence}")
    click.echo(f"\n   Lesion study of the trained networks (Veit et al. 2016): test accuracy on the first "
               f"{config.lesion_images:,} test images with blocks replaced by the identity.")
    for sentence in lessons.describe_lesion(result.lesion):
        click.echo(f"   {sentence}")
    click.echo(f"\nHTML report: {result.html}")
    total = sum(result.seconds.values())
    click.echo(f"({total:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) + ")")



# --- the lesson's two experiments: shattered gradients and the lesion study -------------------


def _print_sections(sections: dict, titles: dict[str, str], sentences: list[str], fmt: str) -> None:
    """Titled tables and the reading for people (table, markdown); the tidy frames for tools: csv as
    ``# name`` sections, json as one object with a key per section and the sentences."""
    import json

    from .report.text import json_records, render

    if fmt == "json":
        report = {name: json_records(frame) for name, (frame, _) in sections.items()}
        click.echo(json.dumps(report | {"reading": sentences}, indent=2, allow_nan=False, ensure_ascii=False))
        return
    if fmt == "csv":
        click.echo("\n\n".join(f"# {name}\n{render(frame, 'csv')}" for name, (frame, _) in sections.items()))
        return
    for name, (_, shown) in sections.items():
        if len(shown):
            click.echo(f"{titles[name]}\n{render(shown, fmt)}\n")
    for sentence in sentences:
        click.echo(sentence)


_GRID_OPTIONS = ("blocks", "depths", "norms", "width", "stat_batches", "stat_batch_size", "dataset")


@main.command()
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--blocks", default="conv,res,skip", show_default=True,
              help="At initialisation: block types, comma separated.")
@click.option("--depths", default="2,8,16,32", show_default=True, help="At initialisation: depths, comma separated.")
@click.option("--norm", "norms", default="batch", show_default=True, help="At initialisation: batch, none, comma separated.")
@click.option("--width", type=click.IntRange(min=2), default=32, show_default=True, help="At initialisation: channels, even.")
@click.option("--points", type=int, default=256, show_default=True,
              help="Points on the line between two test images (at least 8, and twice --max-lag).")
@click.option("--pairs", type=int, default=8, show_default=True,
              help="Test-image pairs per network; the mean and its spread are over these (at least 2).")
@click.option("--target", default="logit", show_default=True,
              help="What is differentiated: logit (of image a's true class) or loss (cross-entropy against it).")
@click.option("--max-lag", type=int, default=16, show_default=True, help="Autocorrelation lags 0 ... N, in points.")
@click.option("--stat-batches", type=click.IntRange(min=1), default=4, show_default=True,
              help="At initialisation: training batches that estimate BatchNorm's running statistics.")
@click.option("--stat-batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="At initialisation: images per such batch.")
@click.option("--seed", type=click.IntRange(min=0, max=2 ** 63 - 1), default=0, show_default=True,
              help="Seeds initialisation, the image pairs and the statistics batches.")
@click.option("--dataset", type=click.Choice(["cifar10", "synthetic"]), default="cifar10", show_default=True,
              help="At initialisation: cifar10, or synthetic noise with learnable labels (a run uses its own).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding cifar-10-batches-py. Default: the run's, else $GRADLAB_DATA, else ~/.cache/gradlab/data.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when present.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Store the measurements in this folder (shatter.parquet, shatter-images.parquet). Default: with "
                   "PATH, PATH/shatter (gradlab report --html PATH shows them); without, none.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="table and markdown for people; csv and json (tidy, full precision) for other tools.")
@click.pass_context
def shatter(ctx, path, blocks, depths, norms, width, points, pairs, target, max_lag, stat_batches, stat_batch_size,
            seed, dataset, data_root, device, out, fmt) -> None:
    """Shattered gradients (Balduzzi et al. 2017): how alike input gradients are at neighbouring inputs.

    On the line between two test images, the gradient of the output with respect to the input at
    each point, and the mean cosine similarity of gradients k points apart (k = 1: neighbours),
    averaged over image pairs. Every point is evaluated on its own (eval mode). Without PATH:
    networks at initialisation, BatchNorm statistics estimated from training batches first; with a
    run or sweep directory: its trained networks (best.pt).
    """
    from tqdm.auto import tqdm

    from . import lessons
    from .shatter import ShatterConfig, check_line, shatter as measure, shatter_runs, write

    stored_beside = out is None and path is not None
    if stored_beside:
        out = str(Path(path) / lessons.SHATTER_FOLDER)  # beside the runs, where the report looks
    problem = _unwritable(out, folder=True) if out else None
    if problem:
        raise BadInput(f"--out {out}: {problem}; choose another --out")
    if path is not None:
        given = [name for name in _GRID_OPTIONS
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            option = "--norm" if given[0] == "norms" else "--" + given[0].replace("_", "-")
            raise BadInput(f"{option} describes networks at initialisation; with {path} the networks are its "
                           "trained runs: leave it out")
    try:
        check_line(points, pairs, max_lag, target)
        if path is None:
            config = ShatterConfig(blocks=_name_list(blocks), depths=_int_list(depths), norms=_name_list(norms),
                                   width=width, points=points, pairs=pairs, target=target, max_lag=max_lag,
                                   stat_batches=stat_batches, stat_batch_size=stat_batch_size, seed=seed,
                                   dataset=dataset, data_root=data_root, device=device)
            config.validate()
            total = len(config.blocks) * len(config.norms) * len(config.depths)
            with tqdm(total=total, unit="network", desc="shatter", dynamic_ncols=True, delay=1.0) as bar:
                result = measure(config, on_network_done=lambda name: bar.update(1))
        else:
            with tqdm(unit="network", desc="shatter", dynamic_ncols=True, delay=1.0) as bar:
                result = shatter_runs(path, points=points, pairs=pairs, target=target, max_lag=max_lag, seed=seed,
                                      data_root=data_root, device=device, on_network_done=lambda name: bar.update(1))
        if out:
            write(result, out)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc, f"storing the measurements in {out}") from None
    if result.synthetic and fmt in ("table", "markdown"):
        click.echo("note: synthetic data (seeded noise with learnable labels), not CIFAR-10")
    summary = result.summary
    sections = {"similarity": (lessons.similarity(summary), lessons.similarity_table(summary)),
                "autocorrelation": (summary, lessons.autocorrelation_table(summary))}
    titles = {"similarity": "Neighbouring-gradient similarity: mean cosine similarity of input gradients at "
                            "neighbouring points (mean ± standard deviation over image pairs)",
              "autocorrelation": "Autocorrelation: mean cosine similarity of input gradients k points apart "
                                 "(mean over image pairs)"}
    _print_sections(sections, titles, lessons.describe_shatter(summary), fmt)
    if stored_beside:
        click.echo(f"gradlab: note: stored in {out} (gradlab report --html {path} shows it)", err=True)
    for name, why in result.skipped.items():
        click.echo(f"gradlab: warning: skipped {name}: {why}", err=True)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--draws", type=int, default=5, show_default=True,
              help="Random sets of k blocks deleted at once, per k (every set when there are no more).")
@click.option("--seed", type=click.IntRange(min=0, max=2 ** 63 - 1), default=0, show_default=True,
              help="Seeds the random sets.")
@click.option("--reorder", is_flag=True, help="Also swap each pair of adjacent blocks.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Test images per batch (speed only). Default: the run's evaluation batch size.")
@click.option("--recompute", is_flag=True,
              help="Evaluate again even when the run directory holds results for the same checkpoint and options.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding cifar-10-batches-py. Default: the run's, else $GRADLAB_DATA, else ~/.cache/gradlab/data.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: CUDA when present.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True, help="table and markdown for people; csv and json (tidy, full precision) for other tools.")
def lesion(path, draws, seed, reorder, batch_size, recompute, data_root, device, fmt) -> None:
    """Lesion study (Veit et al. 2016): test accuracy of trained networks with blocks deleted.

    On each trained run's best.pt (a run, or every trained cell of a sweep), in eval mode on the
    test set: every single stack block replaced by the identity, then k = 2, 4, ... blocks at
    once (random sets). Blocks that change the shape are reported as not deletable. Results are
    stored in the run directory (lesion.parquet) and reused while the checkpoint is the same.
    """
    from tqdm.auto import tqdm

    from . import lessons
    from .lesion import lesion_runs

    bar = tqdm(unit="evaluation", desc="lesion", dynamic_ncols=True, delay=1.0)

    def progress(name: str, done: int, total: int) -> None:
        if done == 1:
            bar.reset(total=total)
            bar.set_description(f"lesion {name}")
        bar.update(1)

    try:
        with bar:
            frame, skipped, reused = lesion_runs(path, draws=draws, seed=seed, reorder=reorder, batch_size=batch_size,
                                                 data_root=data_root, device=device, recompute=recompute,
                                                 on_evaluation=progress)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc, f"storing the lesion study in {path}") from None
    images = int(frame["images"].iloc[0])
    sections = {"single": (lessons.lesion_single(frame), lessons.single_table(frame)),
                "k_blocks": (lessons.lesion_k(frame), lessons.k_table(frame)),
                "swaps": (frame.loc[frame["experiment"] == "swap"].reset_index(drop=True), lessons.swap_table(frame))}
    if not reorder:
        del sections["swaps"]
    titles = {"single": f"Test accuracy with one block deleted (best.pt, eval mode, {images:,} test images)",
              "k_blocks": "Test accuracy with k blocks deleted at once (mean ± standard deviation in points over "
                          "random sets (how many); k = 0: intact)",
              "swaps": "Test accuracy with two adjacent blocks swapped"}
    _print_sections(sections, titles, lessons.describe_lesion(frame), fmt)
    for name in reused:
        click.echo(f"gradlab: note: {name}: reused its stored lesion study (same checkpoint and options; "
                   "--recompute evaluates again)", err=True)
    for name, why in skipped.items():
        click.echo(f"gradlab: warning: skipped {name}: {why}", err=True)


TENSORBOARD_SAMPLES = 1000  # steps per scalar tag that TensorBoard shows by default


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--tensorboard", "logdir", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for the TensorBoard runs: DIR/<run name> per gradlab run (needs gradlab[tensorboard]).")
def export(path: str, logdir: str) -> None:
    """Export a run or a sweep to TensorBoard: every record, loss and accuracy as a scalar.

    One TensorBoard run per gradlab run, so a whole sweep can be compared in
    `tensorboard --logdir DIR`. TensorBoard shows at most 1,000 steps per tag unless started with
    `--samples_per_plugin scalars=N`; the command to view the export says N when it matters.
    Exporting again replaces an earlier export of the same run.
    """
    from .integrations.tensorboard import export as export_runs

    problem = _unwritable(logdir, folder=True)
    if problem:
        raise BadInput(f"--tensorboard {logdir}: {problem}; choose another DIR")
    try:
        written = export_runs(path, logdir)
    except (ValueError, ImportError) as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise _os_error(exc, f"exporting to {logdir}") from None
    steps = max(run.steps for run in written.values())
    click.echo(f"wrote {sum(run.scalars for run in written.values()):,} scalars of {len(written)} run(s) to {logdir}")
    every_step = f" --samples_per_plugin scalars={steps}" if steps > TENSORBOARD_SAMPLES else ""
    click.echo(f"view them with: tensorboard --logdir {logdir}{every_step}")


if __name__ == "__main__":
    main()
