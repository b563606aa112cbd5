"""Lesion study (Veit et al. 2016): test accuracy of a trained network with blocks of its stack deleted.

What is measured
----------------
A trained run's ``best.pt`` in eval mode on the whole test set (normalised as in training, in
batches under ``inference_mode``, with the run's precision and memory format). One row per
evaluation, in the ``experiment`` column:

``intact``
    The network as trained (k = 0). It is the run's test accuracy with the best checkpoint.
``delete``
    ``k`` stack blocks replaced by ``nn.Identity`` at once. k = 1: every block in turn, so the
    k = 1 rows are also the accuracy after deleting each single block along the stack. k = 2, 4,
    8, … below the number ``m`` of deletable blocks, and k = m (all of them): ``draws`` sets of
    k blocks drawn at random (seeded by ``seed`` and k; every set when there are no more than
    ``draws``).
``swap``
    With ``reorder``: two adjacent deletable blocks exchanged, for every such pair (k = 0).

The blocks are the probe points of role ``stack`` (``gradlab.probes.select``: DeepCNN's
``layers.0 …``, a torchvision ResNet's ``layer1.0 … layer4.1``); a model without them is refused
(ValueError). A block is deletable when one forward pass shows that it maps one tensor to a
tensor of the same shape; the others (a ResNet stage's first block, which downsamples) get a
k = 1 row with ``deletable`` False and accuracy NaN, and are never deleted or swapped.

Columns: ``experiment, k``, ``draw`` (the set's number within its k; for k = 1 the block's
stack index), ``blocks`` (the deleted blocks' names joined by ``+``, or ``a<->b`` for a swap,
"" intact), ``stack_index`` (of the single deleted block or of the swap's first block; -1
otherwise), ``deletable, images, accuracy``, and for a stored run ``checkpoint, draws,
lesion_seed``. ``gradlab.lessons`` summarises them.

Speed: no deletion touches the layers before the stack, so the test set's input to the first
stack block is computed once (``stack_inputs``) and each evaluation runs only the rest of the
network, as a ``torch.fx`` graph that reads the (possibly deleted or swapped) blocks from the
model at every call (``tail_graph``). A model that torch.fx cannot trace, or whose layers after
the stack read another value from before it, is evaluated whole; the results are the same.

Stored results: ``lesion.parquet`` in the run directory, written atomically. A rerun reads it
instead of evaluating when its ``checkpoint`` key (the checkpoint's content digest, else its size
and modification time), the options and the number of test images are the same; a new
``best.pt`` is evaluated again.
"""
from __future__ import annotations

import itertools
import math
import os
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.fx as fx
import torch.nn as nn

from . import lessons, resources, runs
from .data import DeviceLoader, Splits, make_splits, normalize
from .probes import ProbePoint, select
from .schema import NOT_IN_STACK
from .train import load_checkpoint, resolve_device

LESION = lessons.LESION  # in the run directory
EXPERIMENTS = ("intact", "delete", "swap")
COLUMNS = ["experiment", "k", "draw", "blocks", "stack_index", "deletable", "images", "accuracy"]
STORED_COLUMNS = [*COLUMNS, "checkpoint", "draws", "lesion_seed"]
DEFAULT_DRAWS = 5
MIN_DRAWS = 1


# --- the stack and what can be deleted --------------------------------------------------------


def stack_points(model: nn.Module) -> list[ProbePoint]:
    """The model's block stack (probe points of role ``stack``); ValueError when it has none."""
    try:
        points = [p for p in select(model) if p.role == "stack"]
    except ValueError:
        points = []
    if not points:
        raise ValueError(f"{type(model).__name__} is a network without a block stack (no probe point of role "
                         "'stack'; a DeepCNN of depth 0 has none): there is no block to delete")
    return points


def deletable_blocks(model: nn.Module, points: list[ProbePoint], example: torch.Tensor) -> dict[str, bool]:
    """Block name -> whether it maps one tensor to a tensor of the same shape and dtype, seen in one
    forward pass of ``example``; a block the pass never reaches is not deletable. Every hook is
    removed before returning."""
    seen: dict[str, bool] = {}

    def watch(name: str):
        def record(module, args, output) -> None:
            x = args[0] if len(args) == 1 else None
            seen[name] = (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor)
                          and x.shape == output.shape and x.dtype == output.dtype)
        return record

    handles = [p.module.register_forward_hook(watch(p.name)) for p in points]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return {p.name: seen.get(p.name, False) for p in points}


@contextmanager
def replaced(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with the named sub-modules replaced, put back on exit however it is left."""
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, new in replacements.items():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            originals.append((owner, child, owner.get_submodule(child)))
        for (owner, child, _), new in zip(originals, replacements.values()):
            setattr(owner, child, new)  # an nn.Sequential keeps the child's place
        yield model
    finally:
        for owner, child, old in reversed(originals):
            setattr(owner, child, old)


def deleted(model: nn.Module, names) -> AbstractContextManager[nn.Module]:
    """``model`` with the blocks ``names`` replaced by the identity."""
    return replaced(model, {name: nn.Identity() for name in names})


def swapped(model: nn.Module, first: str, second: str) -> AbstractContextManager[nn.Module]:
    """``model`` with the blocks ``first`` and ``second`` exchanged."""
    return replaced(model, {first: model.get_submodule(second), second: model.get_submodule(first)})


# --- evaluation -------------------------------------------------------------------------------


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024,
             channels_last: bool = False, precision: str = "fp32") -> float:
    """Accuracy of ``model`` (in eval mode) on uint8 ``images``, normalised per batch on their device,
    as ``gradlab.train.Trainer.evaluate`` computes it."""
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for x, y in DeviceLoader(images, labels, batch_size=batch_size, channels_last=channels_last):
        with autocast:
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
    return correct.item() / len(labels)  # host sync: once per evaluation


class _StackTracer(fx.Tracer):
    """Traces into every module except the stack's blocks (and torch.nn's own), which stay one call."""

    def __init__(self, blocks: set[str]) -> None:
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return name in self.blocks or super().is_leaf_module(module, name)


def tail_graph(model: nn.Module, points: list[ProbePoint]) -> fx.Graph | None:
    """The model's computation from the first stack block's input to the output, as a graph whose one
    input is that tensor; None when torch.fx cannot trace the model or when a layer after the stack
    reads a value from before it other than the stack's input."""
    try:
        graph = _StackTracer({p.name for p in points}).trace(model)
    except Exception:  # data-dependent control flow and the like: the model is evaluated whole
        return None
    nodes = list(graph.nodes)
    first = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == points[0].name), None)
    if first is None or len(nodes[first].args) != 1 or nodes[first].kwargs:
        return None
    entry, before = nodes[first].args[0], set(nodes[:first])
    if not isinstance(entry, fx.Node) or any(used in before and used is not entry
                                             for n in nodes[first:] for used in n.all_input_nodes):
        return None
    tail = fx.Graph()
    copies = {entry: tail.placeholder("stack_input")}
    for node in nodes[first:]:
        copies[node] = tail.node_copy(node, lambda used: copies[used])
    return tail


class _Stop(Exception):
    """Ends a forward pass at the first stack block, once its input is seen."""


def stack_inputs(model: nn.Module, first: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 1024, channels_last: bool = False,
                 precision: str = "fp32") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(the input of the block ``first``, labels) for each test batch: the forward pass up to it."""
    seen: list[torch.Tensor] = []

    def stop(module, args) -> None:
        seen.append(args[0])
        raise _Stop

    handle = first.register_forward_pre_hook(stop)
    batches = []
    autocast = torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        with torch.inference_mode(), autocast:
            for x, y in DeviceLoader(images, labels, batch_size=batch_size, channels_last=channels_last):
                try:
                    model(x)
                except _Stop:
                    batches.append((seen.pop(), y))
    finally:
        handle.remove()
    return batches


@torch.inference_mode()
def evaluate_tail(model: nn.Module, tail: fx.Graph, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  precision: str = "fp32") -> float:
    """Accuracy of ``model`` from its stack on: ``tail`` run on each batch of ``stack_inputs``, the
    modules looked up in ``model`` at every call (so deletions and swaps there apply)."""
    correct = torch.zeros((), dtype=torch.long, device=batches[0][1].device)
    autocast = torch.autocast(batches[0][1].device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    runner = fx.Interpreter(model, graph=tail)
    with autocast:
        for z, y in batches:
            correct += (runner.run(z).argmax(1) == y).sum()
    return correct.item() / sum(len(y) for _, y in batches)  # host sync: once per evaluation


def k_values(m: int) -> list[int]:
    """1, 2, 4, … below ``m``, then ``m``: how many of the ``m`` deletable blocks go at once."""
    if m < 1:
        return []
    ks = [2 ** i for i in range(m.bit_length()) if 2 ** i < m]
    return ks + [m]


def draw_sets(m: int, k: int, draws: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``draws`` distinct sets of ``k`` of ``range(m)`` (sorted), seeded by (seed, k); every set
    when there are no more than ``draws``."""
    if math.comb(m, k) <= draws:
        return list(itertools.combinations(range(m), k))
    rng = np.random.default_rng([seed, k])
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < draws:
        chosen.setdefault(tuple(sorted(rng.choice(m, k, replace=False).tolist())), None)
    return list(chosen)


def _check_draws(draws: int, seed: int) -> None:
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < MIN_DRAWS:
        raise ValueError(f"draws must be an integer >= {MIN_DRAWS}, got {draws!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def plan(points: list[ProbePoint], deletable: dict[str, bool], draws: int = DEFAULT_DRAWS, seed: int = 0,
         reorder: bool = False) -> list[dict]:
    """The evaluations of a lesion study, in order: row dicts without ``images`` and ``accuracy``,
    and with ``names``, the blocks to delete (or the two to swap)."""
    _check_draws(draws, seed)
    rows = [{"experiment": "intact", "k": 0, "draw": 0, "names": (), "stack_index": NOT_IN_STACK, "deletable": True}]
    for p in points:
        rows.append({"experiment": "delete", "k": 1, "draw": p.stack_index, "names": (p.name,),
                     "stack_index": p.stack_index, "deletable": deletable[p.name]})
    free = [p for p in points if deletable[p.name]]
    for k in k_values(len(free))[1:]:  # k = 1 is every single block, above
        for draw, chosen in enumerate(draw_sets(len(free), k, draws, seed)):
            rows.append({"experiment": "delete", "k": k, "draw": draw, "names": tuple(free[i].name for i in chosen),
                         "stack_index": NOT_IN_STACK, "deletable": True})
    if reorder:
        for first, second in zip(points, points[1:]):
            if deletable[first.name] and deletable[second.name]:
                rows.append({"experiment": "swap", "k": 0, "draw": 0, "names": (first.name, second.name),
                             "stack_index": first.stack_index, "deletable": True})
    return rows


def lesion_study(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, draws: int = DEFAULT_DRAWS,
                 seed: int = 0, reorder: bool = False, batch_size: int = 1024, channels_last: bool = False,
                 precision: str = "fp32", on_evaluation: Callable[[int, int], None] | None = None,
                 shortcut: bool = True) -> pd.DataFrame:
    """The lesion study of ``model`` on the uint8 test ``images`` (see the module docstring);
    ``on_evaluation(done, total)`` after each evaluation; ``shortcut=False`` evaluates the whole
    model every time (the results are the same). The model ends in eval mode, unchanged."""
    points = stack_points(model)
    model.eval()
    deletable = deletable_blocks(model, points, normalize(images[:2]))
    rows = plan(points, deletable, draws, seed, reorder)
    measured = [row for row in rows if row["deletable"]]
    tail = tail_graph(model, points) if shortcut else None
    if tail is not None:
        batches = stack_inputs(model, points[0].module, images, labels, batch_size, channels_last, precision)
    for done, row in enumerate(measured, start=1):
        if row["experiment"] == "swap":
            change = swapped(model, *row["names"])
        else:
            change = deleted(model, row["names"])
        with change:
            if tail is not None:
                row["accuracy"] = evaluate_tail(model, tail, batches, precision)
            else:
                row["accuracy"] = evaluate(model, images, labels, batch_size, channels_last, precision)
        if on_evaluation is not None:
            on_evaluation(done, len(measured))
    frame = pd.DataFrame([{**row, "blocks": ("<->" if row["experiment"] == "swap" else "+").join(row["names"]),
                           "images": len(labels), "accuracy": row.get("accuracy", np.nan)} for row in rows])
    return frame[COLUMNS]


# --- trained runs -----------------------------------------------------------------------------


def build_network(train: dict) -> nn.Module:
    """The untrained network a run's ``config.json`` ``train`` options describe."""
    from dataclasses import fields

    from .train import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: (tuple(map(tuple, v)) if k == "model_args" else v)
                            for k, v in train.items() if k in known})
    return config.spec().build(**config.model_kwargs())


def unusable(run: runs.Run) -> str | None:
    """Why ``run`` holds no trained network to study (diverged, no checkpoint), or None."""
    status = run.summary.get("status", "running")
    if status == "diverged":
        where = run.summary.get("diverged") or {}
        return (f"{run.path}: the run diverged (first non-finite {where.get('cause', 'value')} at step "
                f"{where.get('step', '?')}, {where.get('layer', '?')}), so it holds no trained network; "
                "train it again with a smaller --lr")
    if not (run.path / runs.BEST).is_file():
        return (f"{run.path / runs.BEST}: missing, so the run (status {status}) holds no trained network; "
                f"train it first: gradlab train ... --out {run.path}")
    return None


def trained_runs(path: str | os.PathLike) -> tuple[list[runs.Run], dict[str, str]]:
    """The runs of a run or sweep directory that hold a trained network, and the others with the
    reason. A single run that holds none, or a sweep none of whose cells does, is a RunError."""
    path = Path(path)
    if runs.is_run_dir(path):
        run = runs.load_run(path)
        problem = unusable(run)
        if problem:
            raise runs.RunError(problem)
        return [run], {}
    sweep = runs.load_sweep(path)
    usable, skipped = [], dict(sweep.unreadable)
    for run in sweep.runs:
        problem = unusable(run)
        if problem:
            skipped[run.name] = problem
        else:
            usable.append(run)
    if not usable:
        reasons = "; ".join(f"{name}: {why}" for name, why in list(skipped.items())[:3])
        raise runs.RunError(f"{path}: no cell of the sweep holds a trained network" + (f" ({reasons})" if reasons else ""))
    return usable, skipped


def checkpoint_key(path: Path, state: dict) -> str:
    """What identifies a checkpoint's content: its digest, else its size and modification time."""
    if isinstance(state.get("digest"), str):
        return f"sha256:{state['digest']}"
    stat = Path(path).stat()
    return f"size:{stat.st_size}:mtime_ns:{stat.st_mtime_ns}"


def load_trained(run: runs.Run, device: torch.device | str = "cpu") -> tuple[nn.Module, str]:
    """``run``'s network with the weights of its ``best.pt``, in eval mode on ``device``, and the
    checkpoint's key; RunError naming the file when the weights do not fit the run's options."""
    path = run.path / runs.BEST
    state = load_checkpoint(path, map_location=device)
    model = build_network(run.train)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise runs.RunError(f"{path}: does not fit the network config.json describes ({type(exc).__name__}: "
                            f"{reason}); {runs.RESTART_HINT}") from None
    return model.to(device).eval(), checkpoint_key(path, state)


def _stored(run: runs.Run, key: str, draws: int, seed: int, reorder: bool, images: int) -> pd.DataFrame | None:
    """The stored study when it was made of the same checkpoint with the same options on as many
    test images, else None."""
    path = run.path / LESION
    if not path.is_file():
        return None
    try:
        frame = runs.read_parquet(path)
    except runs.RunError:
        return None  # unreadable: evaluated again and overwritten
    if not set(STORED_COLUMNS) <= set(frame.columns) or frame.empty:
        return None
    same = ((frame["checkpoint"] == key).all() and (frame["draws"] == draws).all()
            and (frame["lesion_seed"] == seed).all() and (frame["images"] == images).all())
    if not same or (reorder and not (frame["experiment"] == "swap").any()):
        return None
    return frame if reorder else frame.loc[frame["experiment"] != "swap"].reset_index(drop=True)


def lesion_run(run: runs.Run, splits: Splits | Callable[[], Splits], draws: int = DEFAULT_DRAWS, seed: int = 0,
               reorder: bool = False, batch_size: int | None = None, device: torch.device | str = "cpu",
               recompute: bool = False, on_evaluation: Callable[[int, int], None] | None = None) -> tuple[pd.DataFrame, bool]:
    """The lesion study of one trained run (stored columns), and whether it was read from the run's
    ``lesion.parquet`` rather than evaluated on the test split (and then written there).
    ``splits``: the data, or a function that loads it, called only when an evaluation is needed."""
    _check_draws(draws, seed)
    model, key = load_trained(run, device)
    if not recompute:
        # a loader (not yet called) gives the whole test split; given data may be a part of it
        images = len(splits.test[1]) if isinstance(splits, Splits) else resources.TEST_IMAGES
        stored = _stored(run, key, draws, seed, reorder, images)
        if stored is not None:
            return stored[STORED_COLUMNS], True
    if callable(splits):
        splits = splits()
    train = run.train
    channels_last = bool(train.get("channels_last", False))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    frame = lesion_study(model, *splits.test, draws=draws, seed=seed, reorder=reorder,
                         batch_size=batch_size or int(train.get("eval_batch_size", 1024)), channels_last=channels_last,
                         precision=train.get("precision", "fp32"), on_evaluation=on_evaluation)
    frame = frame.assign(checkpoint=key, draws=draws, lesion_seed=seed)
    runs.write_parquet(run.path / LESION, frame)
    return frame, False


def lesion_runs(path: str | os.PathLike, draws: int = DEFAULT_DRAWS, seed: int = 0, reorder: bool = False,
                batch_size: int | None = None, data_root: str | None = None, device: str = "auto",
                recompute: bool = False, splits: Splits | None = None,
                on_evaluation: Callable[[str, int, int], None] | None = None) -> tuple[pd.DataFrame, dict[str, str], list[str]]:
    """The lesion study of every trained run of a run or sweep directory.

    Returns (the rows with the run keys in front, the skipped cells with the reason, the names of
    runs whose stored results were reused). The test split is loaded once, from the first
    evaluated run's dataset (``data_root`` overrides where its files are), and only when needed.
    """
    _check_draws(draws, seed)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = resolve_device(device)
    usable, skipped = trained_runs(path)
    loaded: list[Splits] = []

    def test_data(train: dict) -> Splits | Callable[[], Splits]:
        if splits is not None:
            return splits

        def load() -> Splits:  # the whole test split, loaded once, when a run needs evaluating
            if not loaded:
                loaded.append(make_splits(train.get("dataset", "cifar10"), data_root or train.get("data_root"),
                                          seed=train.get("seed", 0), device=device))
            return loaded[0]
        return load

    frames, reused = [], []
    for run in usable:
        progress = None if on_evaluation is None else (lambda done, total, name=run.name: on_evaluation(name, done, total))
        frame, was_stored = lesion_run(run, test_data(run.train), draws, seed, reorder, batch_size, device, recompute,
                                       progress)
        if was_stored:
            reused.append(run.name)
        frames.append(frame.assign(**lessons.run_keys(run)))
    frame = pd.concat(frames, ignore_index=True)
    keys = list(lessons.RUN_KEYS)
    return frame[keys + [c for c in frame.columns if c not in keys]], skipped, reused
