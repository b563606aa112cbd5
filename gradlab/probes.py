"""Probe points: which modules of a model gradlab measures, and what each one is.

A probe point is described, never guessed from a name: its module path, its role (``stem``,
``stack``, ``head``), its index in the block stack, its class name and, for a residual block,
a declared decomposition (``Residual``) from which the recorder splits the input gradient into
its branch and skip parts. A block without a declaration gets every generic metric and no
split, never a wrong one.

Choosing probe points (``select``):

- ``None``: the model's declared points (``DeepCNN``: the stem convolutions, every block of
  ``layers``, the head), else the automatic rule below;
- a module name or glob, or a list of them: ``*`` matches within one dotted segment
  (``layer*.*`` is ``layer1.0``, ``layer4.1``, ...), ``**`` any number of segments; every
  match joins the stack, in the model's module order;
- a callable ``(name, module) -> bool``: likewise;
- ``ProbePoint`` objects, used as they are.

The automatic rule, for a model without a declaration: the stack is the largest set of
children of ``nn.Sequential`` and ``nn.ModuleList`` containers that share one class (a
ResNet's ``BasicBlock``s across ``layer1`` ... ``layer4``; an MLP's ``Linear``s), counting
only children with parameters and no normalisation layers, flattened in module order; a set
that lies inside the members of another set (the convolutions inside each block) does not
compete, and ties go to the class with more parameters. Without such a set, every leaf module with parameters
(normalisation layers aside) is the stack. The first and the last leaf with parameters
outside the stack become the stem (when it comes before the stack) and the head (after it).
``gradlab probe --list-probes`` prints the choice.

Declaring a residual block of your own (``declare``)::

    class MyBlock(nn.Module):          # out = relu(self.body(x) + self.proj(x))
        ...
    declare(MyBlock, Residual(branch="body", skip="proj", entry="body", post="relu"))

or, when the decomposition depends on the instance, a function of the module that returns a
``Residual`` or None.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import torch.nn as nn

from . import models
from .schema import NOT_IN_STACK

ROLES = ("stem", "stack", "head")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Residual:
    """A residual block's declared decomposition: ``out = post(branch + skip)``.

    ``branch`` is the sub-module whose output is the residual branch just before the addition.
    ``skip`` is None when the block's input itself is added (an identity), else the sub-module
    that projects it (torchvision's ``downsample``). With a projection, ``entry`` names the
    branch's first sub-module: the input gradient's branch part is what flows back through it,
    the skip part what flows back through ``skip``. ``pre_relu``: both paths read ``relu(input)``
    rather than the input (the notebook's ResDownBlock); the parts then pass that ReLU's mask.
    ``post``: an operation after the addition (``"relu"`` in torchvision's blocks), or None.
    """

    branch: str
    skip: str | None = None
    entry: str | None = None
    pre_relu: bool = False
    post: str | None = None

    def __post_init__(self) -> None:
        if self.skip is not None and self.entry is None:
            raise ValueError(f"a residual block with the projection {self.skip!r} needs entry: the branch's first "
                             "sub-module, whose input gradient is the branch part")
        if self.skip is None and self.pre_relu:
            raise ValueError("pre_relu needs a projection skip: an identity skip adds the raw input")

    def describe(self) -> str:
        skip = "identity" if self.skip is None else self.skip
        text = f"branch {self.branch} + skip {skip}"
        if self.pre_relu:
            text = f"relu(input) → {text}"
        return text if self.post is None else f"{self.post}({text})"

    def check(self, module: nn.Module, name: str) -> None:
        """ValueError unless every sub-module this declaration names exists in ``module``."""
        for part in (self.branch, self.skip, self.entry):
            if part is not None and _submodule(module, part) is None:
                raise ValueError(f"{name} ({type(module).__name__}) has no sub-module {part!r}, "
                                 "which its residual declaration names")


Declaration = Union[Residual, Callable[[nn.Module], "Residual | None"]]
DECLARATIONS: dict[type, Declaration] = {
    models.ResBlock: Residual(branch="conv2"),  # conv2(...) + x
    models.ResDownBlock: Residual(branch="conv2", skip="conv3", entry="conv1", pre_relu=True),
}


def declare(cls: type[nn.Module], residual: Declaration | None) -> None:
    """Declare how blocks of ``cls`` decompose (a ``Residual``, or a function of the module that
    returns one or None); None removes a declaration."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"declare takes an nn.Module subclass, got {cls!r}")
    if residual is None:
        DECLARATIONS.pop(cls, None)
    elif isinstance(residual, Residual) or callable(residual):
        DECLARATIONS[cls] = residual
    else:
        raise ValueError(f"declare takes a Residual or a function returning one, got {residual!r}")


def declared(module: nn.Module) -> Residual | None:
    """The residual declaration for ``module``'s exact class (subclasses declare their own)."""
    found = DECLARATIONS.get(type(module))
    if found is None or isinstance(found, Residual):
        return found
    return found(module)


def _torchvision_blocks() -> None:
    """torchvision's BasicBlock and Bottleneck: ``relu(bn_last(...) + identity)``, the identity
    through ``downsample`` when a stage changes the shape."""
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # torchvision is a dependency, but the probes work without it
        return

    def resnet_block(last_bn: str) -> Callable[[nn.Module], Residual]:
        def residual(block: nn.Module) -> Residual:
            projected = getattr(block, "downsample", None) is not None
            return Residual(branch=last_bn, skip="downsample" if projected else None,
                            entry="conv1" if projected else None, post="relu")

        return residual

    DECLARATIONS.setdefault(BasicBlock, resnet_block("bn2"))
    DECLARATIONS.setdefault(Bottleneck, resnet_block("bn3"))


_torchvision_blocks()


@dataclass(frozen=True)
class ProbePoint:
    """A module whose input and output gradient-flow statistics are recorded."""

    name: str  # module path: "conv1", "layers.3", "layer2.1" (the `layer` column)
    position: int  # forward order, 0 first
    role: str  # stem | stack | head
    stack_index: int  # 0 ... n-1 along the stack; -1 for stem and head
    module_type: str  # the module's class name
    module: nn.Module
    residual: Residual | None = None  # the declared decomposition, for residual blocks


Selection = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool], Sequence[ProbePoint]]


def select(model: nn.Module, probes: Selection = None) -> list[ProbePoint]:
    """The probe points of ``model`` (see the module docstring); ValueError when none fit."""
    if probes is None:
        points = _declared_points(model)
        if points is None:
            points = _automatic(model)
    elif isinstance(probes, str) or callable(probes):
        points = _matching(model, probes)
    else:
        items = list(probes)
        if items and all(isinstance(p, ProbePoint) for p in items):
            points = items
        elif items and all(isinstance(p, str) for p in items):
            points = _matching(model, items)
        else:
            raise ValueError("probes must be module names or globs, a function (name, module) -> bool, "
                             f"or ProbePoint objects; got {probes!r}")
    if not points:
        raise ValueError(f"no probe points in {type(model).__name__}: nothing matches {probes!r}; "
                         "list the model's modules with gradlab probe --list-probes")
    return points


def describe(points: Iterable[ProbePoint]) -> list[dict]:
    """One plain dict per point: name, position, role, stack_index, module_type, residual."""
    return [{"name": p.name, "position": p.position, "role": p.role, "stack_index": p.stack_index,
             "module_type": p.module_type, "residual": "" if p.residual is None else p.residual.describe()}
            for p in points]


# -- how the points are found --------------------------------------------------------------------


def _point(name: str, position: int, role: str, stack_index: int, module: nn.Module) -> ProbePoint:
    residual = declared(module)
    if residual is not None:
        residual.check(module, name)
    return ProbePoint(name, position, role, stack_index, type(module).__name__, module, residual)


def _numbered(entries: Sequence[tuple[str, str, nn.Module]]) -> list[ProbePoint]:
    """(name, role, module) in forward order -> points with positions and stack indices."""
    points, index = [], 0
    for position, (name, role, module) in enumerate(entries):
        points.append(_point(name, position, role, index if role == "stack" else NOT_IN_STACK, module))
        index += role == "stack"
    return points


def _declared_points(model: nn.Module) -> list[ProbePoint] | None:
    """The notebook's DeepCNN: three stem convolutions, every block, the linear head."""
    if not isinstance(model, models.DeepCNN):
        return None
    entries = [(name, "stem", getattr(model, name)) for name in ("conv1", "conv2", "conv3")]
    if isinstance(model.layers, nn.Sequential):
        entries += [(f"layers.{i}", "stack", block) for i, block in enumerate(model.layers)]
    entries.append(("linear1", "head", model.linear1))
    return _numbered(entries)


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules with parameters of their own, normalisation layers aside, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if name and not any(True for _ in m.children()) and _has_params(m) and not isinstance(m, _NORMS)]


def _automatic(model: nn.Module) -> list[ProbePoint]:
    groups: dict[type, list[tuple[str, nn.Module]]] = {}
    for name, container in model.named_modules():
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            for child_name, child in container.named_children():
                if _has_params(child) and not isinstance(child, _NORMS):
                    groups.setdefault(type(child), []).append((f"{name}.{child_name}" if name else child_name, child))
    stack: list[tuple[str, nn.Module]] = []
    # A set whose members all lie inside the members of another set (the convolutions inside
    # each block of a stack of blocks) is part of that stack, not a stack of its own.
    outer = [members for members in groups.values()
             if not any(other is not members and len(other) >= 2
                        and all(any(n.startswith(o + ".") for o, _ in other) for n, _ in members)
                        for other in groups.values())]
    if outer:
        def size(members: list[tuple[str, nn.Module]]) -> tuple[int, int]:
            return len(members), sum(p.numel() for _, m in members for p in m.parameters())

        stack = max(outer, key=size)
        stack = [(n, m) for n, m in stack if not any(n.startswith(o + ".") for o, _ in stack)]  # no nesting
        if len(stack) < 2:
            stack = []
    leaves = _leaf_layers(model)
    if not stack:
        stack = leaves
    if not stack and _has_params(model):  # a model that is one layer: itself
        return [_point(type(model).__name__, 0, "stack", 0, model)]
    if not stack:
        return []
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    inside = {n for n, _ in stack}

    def outside(name: str) -> bool:
        return name not in inside and not any(name.startswith(s + ".") for s in inside)

    entries = []
    first_stack, last_stack = order[stack[0][0]], order[stack[-1][0]]
    stem = next(((n, m) for n, m in leaves if outside(n) and order[n] < first_stack), None)
    head = next(((n, m) for n, m in reversed(leaves) if outside(n) and order[n] > last_stack), None)
    if stem is not None:
        entries.append((stem[0], "stem", stem[1]))
    entries += [(n, "stack", m) for n, m in stack]
    if head is not None:
        entries.append((head[0], "head", head[1]))
    return _numbered(entries)


def _glob_match(pattern: str, name: str) -> bool:
    """``*`` within one dotted segment, ``**`` across any number of segments."""

    def match(p: list[str], n: list[str]) -> bool:
        if not p:
            return not n
        if p[0] == "**":
            return any(match(p[1:], n[i:]) for i in range(len(n) + 1))
        return bool(n) and fnmatch.fnmatchcase(n[0], p[0]) and match(p[1:], n[1:])

    return match(pattern.split("."), name.split("."))


def _matching(model: nn.Module, probes) -> list[ProbePoint]:
    if callable(probes) and not isinstance(probes, str):
        chosen = [(n, m) for n, m in model.named_modules() if n and probes(n, m)]
    else:
        patterns = [probes] if isinstance(probes, str) else list(probes)
        names = dict(model.named_modules())
        for pattern in patterns:
            if not any(_glob_match(pattern, n) for n in names if n):
                raise ValueError(f"no module of {type(model).__name__} matches {pattern!r}; "
                                 "list them with gradlab probe --list-probes")
        chosen = [(n, m) for n, m in names.items() if n and any(_glob_match(p, n) for p in patterns)]
    return _numbered([(n, "stack", m) for n, m in chosen])


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def submodule(module: nn.Module, path: str) -> nn.Module:
    """``module``'s sub-module at ``path`` (dotted), which a declaration has already checked."""
    return module.get_submodule(path)
