"""Model specifications: which network a run trains, as one line of text.

    deepcnn                   the notebook's DeepCNN, shaped by block, depth, width and norm (the default)
    torchvision:NAME          a torchvision classification constructor (resnet18, resnet50, ...), built
                              with num_classes=10 and weights=None: randomly initialised, never a download
    path/to/file.py:factory   a function (or class) in a Python file that returns an nn.Module
    package.module:factory    the same from an importable module

``ModelSpec.parse(text)`` checks the text (the torchvision name exists, the file exists; a file's
content is hashed so that a resumed run can tell that it changed); ``spec.build(**model_args)``
imports and calls the constructor. Keyword options come from ``--model-arg key=value``
(``parse_model_args``: int, float, true/false, else a string). ``check_output`` runs one CIFAR-10
batch through a built model. Every problem is a ValueError of one line naming the spec and what
went wrong; the command line turns it into exit status 2.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

DEEPCNN = "deepcnn"  # schema.DEFAULT_MODEL
KINDS = ("deepcnn", "torchvision", "file", "module")
NUM_CLASSES = 10  # CIFAR-10
INPUT_SHAPE = (3, 32, 32)  # one CIFAR-10 image
CHECK_BATCH = 2  # images in the output check (BatchNorm needs more than one value per channel in training mode)
FIXED_TORCHVISION_ARGS = ("num_classes", "weights")  # gradlab sets these: 10 classes, random initialisation
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FORMS = "deepcnn, torchvision:NAME, path/to/file.py:factory or package.module:factory"


@dataclass(frozen=True)
class ModelSpec:
    """One parsed ``--model`` value."""

    text: str  # as given on the command line and stored in config.json
    kind: str  # deepcnn | torchvision | file | module
    target: str = ""  # the torchvision name, the file's path, or the module's dotted path
    factory: str = ""  # the function (or class) in the file or module; dots reach attributes
    sha256: str | None = None  # a file's content hash when it was parsed; None for the other kinds

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """The spec ``text`` describes; ValueError naming what is wrong with it."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"model must be one of {FORMS}; got {text!r}")
        text = text.strip()
        if text == DEEPCNN:
            return cls(text, "deepcnn")
        target, colon, factory = text.rpartition(":")
        if not colon:
            hint = f"; did you mean torchvision:{text}?" if text in _torchvision_names() else ""
            raise ValueError(f"unknown model {text!r}: use {FORMS}{hint}")
        if target == "torchvision":
            return cls(text, "torchvision", _check_torchvision_name(factory))
        if not target or not factory:
            raise ValueError(f"model {text!r}: both a file or module and a factory name are needed, as in "
                             "path/to/file.py:factory or package.module:factory")
        if not all(_IDENTIFIER.match(part) for part in factory.split(".")):
            raise ValueError(f"model {text!r}: {factory!r} is not a Python name of a factory function")
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target).expanduser()
            if not path.is_file():
                why = "is a folder" if path.is_dir() else "does not exist"
                raise ValueError(f"model {text!r}: the file {target} {why}")
            return cls(text, "file", target, factory, file_sha256(path))
        if not all(_IDENTIFIER.match(part) for part in target.split(".")):
            raise ValueError(f"model {text!r}: {target!r} is neither a .py file nor a dotted module name")
        return cls(text, "module", target, factory)

    @property
    def name(self) -> str:
        """A short display name: deepcnn, torchvision:resnet18, net.py:make_mlp, pkg.models:make."""
        if self.kind == "file":
            return f"{Path(self.target).name}:{self.factory}"
        return self.text

    @property
    def tag(self) -> str:
        """A short name for run directories, safe in a path: tv-resnet18, net-make_mlp, models-make.
        DeepCNN runs keep their names (conv-d6-s0), so this is "deepcnn" only as a fallback."""
        if self.kind == "deepcnn":
            return DEEPCNN
        if self.kind == "torchvision":
            return f"tv-{self.target}"
        stem = Path(self.target).stem if self.kind == "file" else self.target.rsplit(".", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{stem}-{self.factory}")

    def describe(self) -> dict:
        """The spec as config.json stores it (with the file's absolute path and content hash)."""
        out = {"spec": self.text, "kind": self.kind, "name": self.name}
        if self.kind == "file":
            out.update(path=str(Path(self.target).expanduser().resolve()), sha256=self.sha256)
        return out

    def constructor(self) -> Callable[..., Any]:
        """The callable that builds the model (imported now); ValueError when it cannot be found."""
        if self.kind == "deepcnn":
            from .models import build_model

            return build_model
        if self.kind == "torchvision":
            from torchvision import models

            return models.get_model_builder(self.target)
        module = _import_file(self) if self.kind == "file" else _import_module(self)
        found: Any = module
        for part in self.factory.split("."):
            if not hasattr(found, part):
                where = self.target if self.kind == "file" else f"module {self.target}"
                raise ValueError(f"model {self.text!r}: {where} has no {self.factory!r}")
            found = getattr(found, part)
        if not callable(found):
            raise ValueError(f"model {self.text!r}: {self.factory!r} is not callable (it is of type "
                             f"{type(found).__name__}); name a function or class that returns an nn.Module")
        return found

    def build(self, **model_args: Any) -> nn.Module:
        """A freshly initialised model on the default device (deepcnn: ``block, depth, width, norm``;
        torchvision: its constructor's options, plus num_classes=10 and weights=None; a factory: its
        keyword options). ValueError when the constructor raises or returns no nn.Module."""
        build = self.constructor()
        if self.kind == "torchvision":
            fixed = sorted(set(model_args) & set(FIXED_TORCHVISION_ARGS))
            if fixed:
                raise ValueError(f"model {self.text!r}: --model-arg {fixed[0]} is fixed by gradlab "
                                 "(num_classes=10 for CIFAR-10, weights=None: never a download)")
            model_args = {**model_args, "num_classes": NUM_CLASSES, "weights": None}
        try:
            model = build(**model_args)
        except Exception as exc:  # the user's code: any exception is one line, never a traceback
            raise ValueError(f"model {self.text!r}: {self._who()} raised {_exception_line(exc)}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {self.text!r}: {self._who()} returned an object of type {type(model).__name__}, "
                             "not a torch.nn.Module")
        return model

    def _who(self) -> str:
        return f"torchvision.models.{self.target}" if self.kind == "torchvision" else f"{self.factory}()"


def parse(text: str) -> ModelSpec:
    """``ModelSpec.parse``."""
    return ModelSpec.parse(text)


def norm_of(model: nn.Module) -> str:
    """The normalisation a model uses, as a run key: "batch", "group", "layer", else "none"."""
    kinds = {nn.modules.batchnorm._BatchNorm: "batch", nn.GroupNorm: "group", nn.LayerNorm: "layer"}
    for module in model.modules():
        for kind, name in kinds.items():
            if isinstance(module, kind):
                return name
    return "none"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex)."""
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


def _exception_line(exc: BaseException) -> str:
    message = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --- torchvision ------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    """Every torchvision classification constructor (not detection, segmentation or video)."""
    try:
        from torchvision import models
    except ImportError:  # torchvision is a dependency; without it, no torchvision specs
        return []
    return models.list_models(module=models)


def _check_torchvision_name(name: str) -> str:
    names = _torchvision_names()
    if name in names:
        return name
    if not names:
        raise ValueError(f"model torchvision:{name}: torchvision is not installed")
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"some names: {', '.join(names[:6])}, ..."
    raise ValueError(f"unknown torchvision model {name!r}; {hint} ({len(names)} classification models in all: "
                     "torchvision.models.list_models(module=torchvision.models))")


# --- the user's code --------------------------------------------------------------------------------


def _import_file(spec: ModelSpec):
    """The file as a module, imported once per content (sys.modules holds it under a name with its hash,
    so that its classes pickle and deepcopy like any module's)."""
    path = Path(spec.target).expanduser()
    try:
        sha = file_sha256(path)
    except OSError as exc:
        raise ValueError(f"model {spec.text!r}: cannot read {spec.target} ({exc.strerror or exc})") from None
    stem = re.sub(r"\W", "_", path.stem)
    name = f"gradlab_user_{stem}_{sha[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"model {spec.text!r}: {spec.target} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the user's folder
    try:
        loader_spec.loader.exec_module(module)
    except BaseException as exc:  # a syntax error, a failing import, even sys.exit in the user's file
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ValueError(f"model {spec.text!r}: importing {spec.target} raised {_exception_line(exc)}") from None
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


def _import_module(spec: ModelSpec):
    try:
        return importlib.import_module(spec.target)
    except ModuleNotFoundError as exc:
        raise ValueError(f"model {spec.text!r}: cannot import module {spec.target!r} ({_exception_line(exc)}); "
                         "is it installed or on PYTHONPATH?") from None
    except Exception as exc:
        raise ValueError(f"model {spec.text!r}: importing {spec.target} raised {_exception_line(exc)}") from None


# --- model options ----------------------------------------------------------------------------------


def split_model_arg(text: str) -> tuple[str, str]:
    """``"key=value"`` as ``(key, value)``; ValueError unless key is a Python name."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if not equals or not _IDENTIFIER.match(key):
        raise ValueError(f"--model-arg {text!r}: expected key=value with a Python name as key (hidden=64, say)")
    return key, value.strip()


def parse_value(text: str) -> int | float | bool | str:
    """A --model-arg value: an int, a float, true/false (any case), else the string itself."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model_args(pairs) -> dict[str, int | float | bool | str]:
    """``((key, value), ...)`` with string values as the factory's keyword arguments; ValueError for a
    malformed pair or a key given twice."""
    args: dict[str, int | float | bool | str] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ValueError(f"model_args must be (key, value) pairs of strings, got {pair!r}")
        key, value = pair
        if not _IDENTIFIER.match(key):
            raise ValueError(f"--model-arg {key}={value}: {key!r} is not a Python name")
        if key in args:
            raise ValueError(f"--model-arg {key} is given more than once")
        args[key] = parse_value(value)
    return args


# --- does it fit CIFAR-10? --------------------------------------------------------------------------


def check_output(spec: ModelSpec, output: Any, batch: int, training: bool) -> None:
    """ValueError unless ``output`` is a tensor of shape [batch, 10] (CIFAR-10's classes)."""
    mode = "training" if training else "eval"
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"model {spec.text!r}: in {mode} mode it returns an object of type {type(output).__name__}, "
                         f"not a tensor of logits of shape [{batch}, {NUM_CLASSES}] (auxiliary outputs? turn them off "
                         "with --model-arg)")
    if tuple(output.shape) != (batch, NUM_CLASSES):
        raise ValueError(f"model {spec.text!r}: a CIFAR-10 batch of shape [{batch}, {', '.join(map(str, INPUT_SHAPE))}] "
                         f"gives an output of shape {list(output.shape)}, not [{batch}, {NUM_CLASSES}]")


def forward_check(spec: ModelSpec, model: nn.Module, device: torch.device | str = "cpu") -> None:
    """One CIFAR-10 batch (2 x 3 x 32 x 32) through ``model`` in eval mode, without gradients; ValueError
    when it raises or its output is not [2, 10]. The model's training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(CHECK_BATCH, *INPUT_SHAPE, device=device))
    except Exception as exc:
        raise ValueError(f"model {spec.text!r}: fails on a CIFAR-10 batch of shape "
                         f"[{CHECK_BATCH}, {', '.join(map(str, INPUT_SHAPE))}]: {_exception_line(exc)}") from None
    finally:
        model.train(was_training)
    check_output(spec, output, CHECK_BATCH, training=False)


def inspect(spec: ModelSpec, model_args: dict[str, Any], probes: Any = None):
    """Build the model, check it on CIFAR-10's shapes and measure it: a ``resources.ModelShape``.

    Built and traced on the ``meta`` device when the model allows it (shapes only: no memory, no
    arithmetic, nothing downloaded), else on the CPU. Checks that the output of a batch of 2 is a
    [2, 10] tensor in training and in eval mode, and that ``probes`` (a ``RecordConfig.probes``
    selection) matches modules of the model. Every problem is one ValueError. The global random
    state is left as it was.
    """
    import warnings

    from . import resources

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constructors' notes (torchvision's FutureWarnings) come with the real build
        model = None
        try:
            with torch.device("meta"):
                model = spec.build(**model_args)
        except ValueError:
            pass  # some constructors need real tensors; the CPU build below says what is wrong, if anything
        if model is not None:
            try:
                shape, output = resources.trace_shape(model, 0)
                forward_check(spec, model, "meta")
            except Exception:  # an operation without a meta kernel, or one that reads values
                model = None
        if model is None:
            model = spec.build(**model_args)
            forward_check(spec, model)  # before training mode changes the BatchNorm statistics
            try:
                shape, output = resources.trace_shape(model, 0)
            except Exception as exc:
                raise ValueError(f"model {spec.text!r}: fails on a CIFAR-10 batch in training mode: "
                                 f"{_exception_line(exc)}") from None
        check_output(spec, output, CHECK_BATCH, training=True)
        return replace(shape, n_probes=_count_probes(model, probes))


def _count_probes(model: nn.Module, probes: Any) -> int:
    """How many probe points the recorder will measure on ``model``; ValueError when ``probes``
    selects nothing."""
    from . import probes as probing

    return len(probing.select(model, probes))
