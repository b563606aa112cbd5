"""The gradlab command line: the only module that prints or exits.

Every bad input becomes one line on stderr and exit status 2; library errors
(ValueError and its subclasses DataError and RunError) carry the message.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import fields

import click

from . import __version__
from .recorder import RecordConfig
from .train import Callback, RunFinished, TrainConfig

EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    """One line on stderr, exit status 2."""

    exit_code = EXIT_BAD_INPUT

    def show(self, file=None) -> None:
        click.echo(f"gradlab: error: {self.format_message()}", err=True)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# --- options: one per TrainConfig / RecordConfig field, help text with its default --------------

_TRAIN_HELP = {
    "block": "Block type of the network: conv (plain ConvBlock), res (identity residual), resdown, skip (concatenation).",
    "depth": "Number of blocks (the notebook's num_blocks); 0 gives the stem and head alone.",
    "width": "Channels through the stem and every block; even, at least 2.",
    "norm": "batch: BatchNorm as in the notebook; none: every BatchNorm replaced by an identity.",
    "epochs": "Passes over the training split.",
    "batch_size": "Images per optimizer step.",
    "lr": "Adam learning rate.",
    "seed": "Seeds initialisation, the train/validation split and shuffling.",
    "dataset": "cifar10, or synthetic (seeded noise with learnable labels, for tests and machines without data).",
    "data_root": "Folder holding cifar-10-batches-py (downloaded there when absent). Default: $GRADLAB_DATA, else ~/.cache/gradlab/data.",
    "subset": "Train on the first N images of the 45,000-image training split (validation and test stay whole). Default: all.",
    "val_fraction": "Fraction of the 50,000 training images held out for validation.",
    "device": "auto (CUDA when present), cpu or cuda.",
    "eval_batch_size": "Batch size for evaluation (no gradients; changes speed, not results).",
}
_CHOICES = {"block": ("conv", "res", "resdown", "skip"), "norm": ("batch", "none"),
            "dataset": ("cifar10", "synthetic"), "device": ("auto", "cpu", "cuda")}
_TYPES = {"depth": click.IntRange(min=0), "width": click.IntRange(min=2), "epochs": click.IntRange(min=1),
          "batch_size": click.IntRange(min=1), "eval_batch_size": click.IntRange(min=1),
          "subset": click.IntRange(min=1), "lr": float, "val_fraction": click.FloatRange(0, 1, min_open=True, max_open=True),
          "seed": int, "data_root": click.Path(file_okay=False)}


SWEPT = ("block", "depth", "seed", "norm")  # the grid's axes: lists in `gradlab sweep`


def train_options(command, exclude: tuple[str, ...] = ()):
    """Decorate ``command`` with one option per TrainConfig field (except ``exclude``)."""
    for field in reversed(fields(TrainConfig)):
        if field.name in exclude:
            continue
        name = "--" + field.name.replace("_", "-")
        kind = click.Choice(_CHOICES[field.name]) if field.name in _CHOICES else _TYPES[field.name]
        command = click.option(name, field.name, type=kind, default=field.default, show_default=field.default is not None,
                               help=_TRAIN_HELP[field.name])(command)
    return command


def record_options(command):
    command = click.option("--record-every", "record_every", type=click.IntRange(min=0), default=RecordConfig.every,
                           show_default=True, help="Record gradient and activation statistics every N-th step; 0 disables recording.")(command)
    command = click.option("--record-schedule", "record_schedule", type=click.Choice(["every", "log"]),
                           default=RecordConfig.schedule, show_default=True,
                           help="every: steps 0, N, 2N, ...; log: log-spaced steps (dense early, sparse late).")(command)
    return command


def _split_options(options: dict) -> tuple[TrainConfig, RecordConfig]:
    train_config = TrainConfig(**{f.name: options.pop(f.name) for f in fields(TrainConfig) if f.name in options})
    record = RecordConfig(every=options.pop("record_every"), schedule=options.pop("record_schedule"))
    return train_config, record


# --- progress -------------------------------------------------------------------------------------

class _Console(Callback):
    """A tqdm bar over steps and a line per epoch."""

    LOSS_EVERY = 25  # steps between loss read-outs for the bar

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.bar = quiet, None

    def on_fit_start(self, trainer) -> None:
        from tqdm.auto import tqdm

        config = trainer.config
        click.echo(f"{config.block} network, depth {config.depth}, width {config.width}, norm {config.norm}: "
                   f"{trainer.n_params:,} parameters on {trainer.device}")
        if trainer.splits.synthetic:
            click.echo("note: synthetic data (seeded noise with learnable labels), not CIFAR-10")
        if trainer.epoch:
            click.echo(f"resuming after epoch {trainer.epoch} (step {trainer.step})")
        steps = len(trainer.train_loader)
        self.bar = tqdm(total=config.epochs * steps, initial=trainer.epoch * steps, unit="step",
                        desc="train", disable=self.quiet, dynamic_ncols=True, leave=False)

    def on_after_forward(self, trainer, loss) -> None:
        if not self.quiet and trainer.step % self.LOSS_EVERY == 0:
            self.bar.set_postfix_str(f"epoch {trainer.epoch + 1} loss {loss.item():.3f}", refresh=False)  # host sync: every 25 steps

    def on_after_step(self, trainer) -> None:
        self.bar.update(1)

    def on_epoch_end(self, trainer, epoch, metrics) -> None:
        if not self.quiet:
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


@main.command()
@train_options
@record_options
@click.option("--out", required=True, type=click.Path(), help="Run directory to write (or resume). Required.")
@click.option("--restart", is_flag=True, help="Discard what --out holds and train from scratch.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines; only the result.")
def train(out: str, restart: bool, quiet: bool, **options) -> None:
    """Train one DeepCNN on CIFAR-10 into a run directory, recording gradient flow.

    Running the same command again resumes from the last checkpoint.
    """
    from .train import train_run

    try:
        config, record = _split_options(options)
        summary = train_run(config, out, record=record, restart=restart, callbacks=[_Console(quiet)])
    except RunFinished as done:
        click.echo(str(done))
        return
    except ValueError as exc:  # DataError, RunError and bad options all derive from ValueError
        raise BadInput(str(exc)) from None
    click.echo(f"best validation accuracy {_pct(summary['best_val_acc'])} (epoch {summary['best_epoch'] + 1}); "
               f"test accuracy {_pct(summary['test_acc_best'])} with the best checkpoint, "
               f"{_pct(summary['test_acc_last'])} with the last; {summary['wall_seconds']:.1f} s")
    click.echo(f"run directory: {out}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(","))


@main.command()
@click.option("--blocks", default="conv,res,skip", show_default=True, help="Block types to sweep, comma separated.")
@click.option("--depths", default="2,4,8,16,32", show_default=True, help="Depths (blocks per network), comma separated.")
@click.option("--seeds", default="0", show_default=True, help="Seeds, comma separated: each seed is one more run per cell.")
@click.option("--norms", default="batch", show_default=True, help="Normalisations, comma separated: batch, none.")
@functools.partial(train_options, exclude=SWEPT)
@record_options
@click.option("--out", required=True, type=click.Path(), help="Sweep directory to write (or resume). Required.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: one Ray task per cell (needs gradlab[ray]).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells trained at once; the CPU threads are divided among them.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (ray executor); default: start a local Ray instance.")
def sweep(blocks: str, depths: str, seeds: str, norms: str, out: str, executor: str, jobs: int,
          ray_address: str | None, **options) -> None:
    """Train a grid of networks (blocks x norms x depths x seeds), one run directory per cell.

    Running the same command again skips complete cells, resumes partial ones and reruns failed ones.
    """
    from tqdm.auto import tqdm

    from .sweep import SweepGrid, expand, run_sweep

    try:
        base, record = _split_options(options)
        grid = SweepGrid(blocks=_name_list(blocks), depths=_int_list(depths), seeds=_int_list(seeds), norms=_name_list(norms))
        n_cells = len(expand(grid, base))
        bar = tqdm(total=n_cells, unit="cell", desc="sweep", dynamic_ncols=True)

        def cell_done(result: dict) -> None:
            status = result["status"]
            if status == "failed":
                bar.write(f"{result['name']}: failed: {result['error']}")
            elif status == "complete":
                bar.write(f"{result['name']}: test accuracy {_pct(result['test_acc'])} ({result['seconds']:.0f} s)")
            bar.update(1)

        with bar:
            results = run_sweep(grid, base, out, record=record, executor=executor, jobs=jobs,
                                ray_address=ray_address, on_cell_done=cell_done)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    counts = {s: sum(r["status"] == s for r in results) for s in ("complete", "skipped", "failed")}
    click.echo(f"{n_cells} cells: {counts['complete']} trained, {counts['skipped']} already complete, "
               f"{counts['failed']} failed; sweep directory: {out}")
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

        try:
            written = write_report(path, html_file or None)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        except OSError as exc:
            raise BadInput(f"cannot write {html_file or 'the HTML report'}: {exc}") from None
        click.echo(f"wrote {written}")
        return
    from .runs import load_sweep

    try:
        sweep = load_sweep(path)
        text = report_text(sweep.records(), sweep.table(), fmt=fmt)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    click.echo(text)
    for name, why in sweep.unreadable.items():
        click.echo(f"gradlab: warning: skipped {name}: {why}", err=True)


if __name__ == "__main__":
    main()
