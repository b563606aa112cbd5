"""The notebook's networks: ConvBlock, ResBlock, ResDownBlock, SkipBlock and DeepCNN.

Layer names, order and shapes follow the teaching notebook's ``Deep_CNN`` exactly,
so a notebook ``state_dict`` loads with ``strict=True`` and gives identical outputs.
Two additions, both off by default: blocks are chosen by name through ``BLOCKS``,
and ``norm="none"`` swaps every BatchNorm for an identity (the classic
vanishing-gradient setting of Glorot & Bengio 2010).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("batch", "none")


def _norm(channels: int, norm: str) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; known: {list(NORMS)}")


def _conv3x3(channels_in: int, channels_out: int) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=1, padding=1)


class ConvBlock(nn.Module):
    """Plain block, no skip: relu -> conv(c -> c/2) -> bn -> relu -> conv(c/2 -> c)."""

    def __init__(self, channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels // 2)
        self.bn1 = _norm(channels // 2, norm)
        self.conv2 = _conv3x3(channels // 2, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x)
        out = F.relu(self.bn1(self.conv1(out)))
        out = self.conv2(out)
        return out


class ResBlock(ConvBlock):
    """Identity residual: the raw input (before the block's ReLU) is added to the branch.

    The same layers as ConvBlock (so the same state_dict); only the forward differs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(x)
        out = F.relu(self.bn1(self.conv1(out)))
        branch = self.conv2(out)
        return branch + identity


class ResDownBlock(nn.Module):
    """Residual with a side convolution (conv3) on the skip path to change the width."""

    def __init__(self, channels_in: int, channels_out: int | None = None, norm: str = "batch") -> None:
        super().__init__()
        channels_out = channels_in if channels_out is None else channels_out
        # Attribute order matches the notebook so state_dict keys line up.
        self.conv1 = _conv3x3(channels_in, channels_out)
        self.conv2 = _conv3x3(channels_out, channels_out)
        self.bn1 = _norm(channels_out, norm)
        self.conv3 = _conv3x3(channels_in, channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x)
        skip = self.conv3(out)
        out = F.relu(self.bn1(self.conv1(out)))
        branch = self.conv2(out)
        return branch + skip


class SkipBlock(nn.Module):
    """Concatenating skip: conv1's raw output is stacked with conv2's along channels."""

    def __init__(self, channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels // 2)
        self.bn1 = _norm(channels // 2, norm)
        self.conv2 = _conv3x3(channels // 2, channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x)
        x1 = self.conv1(out)
        out = F.relu(self.bn1(x1))
        x3 = self.conv2(out)
        return torch.cat((x1, x3), 1)


BLOCKS: dict[str, type[nn.Module]] = {
    "conv": ConvBlock,
    "res": ResBlock,
    "resdown": ResDownBlock,
    "skip": SkipBlock,
}


def block_class(name: str) -> type[nn.Module]:
    """The block class registered under ``name``; ValueError listing the known names."""
    try:
        return BLOCKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown block {name!r}; known: {sorted(BLOCKS)}") from None


def block_name(cls: type[nn.Module]) -> str:
    """The registry name of a block class (``ResBlock`` -> ``"res"``)."""
    for name, registered in BLOCKS.items():
        if registered is cls:
            return name
    raise ValueError(f"block class {cls.__name__} is not registered; known: {sorted(BLOCKS)}")


def check_architecture(depth: int, width: int, block: str = "conv", norm: str = "batch") -> None:
    """Raise ValueError for an architecture the notebook's classes cannot build."""
    block_class(block)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {list(NORMS)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0 (number of blocks), got {depth!r}")
    # ConvBlock and SkipBlock halve the width; an odd width breaks SkipBlock's concatenation.
    if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
        raise ValueError(f"width must be an even integer >= 2, got {width!r}")


def check_axes(**axes) -> None:
    """Raise ValueError unless every list of a grid (``blocks=(...)``, ``depths=(...)``) is non-empty
    and names each value once; the message names the list and the value."""
    for name, values in axes.items():
        values = tuple(values)
        if not values:
            raise ValueError(f"{name} must not be empty")
        for value in values:
            if values.count(value) > 1:
                raise ValueError(f"{name} lists {value!r} more than once")


class DeepCNN(nn.Module):
    """The notebook's ``Deep_CNN``: a 3-conv stem (32x32 -> 8x8), ``num_blocks`` blocks, a linear head."""

    def __init__(
        self,
        channels_in: int = 3,
        num_blocks: int = 2,  # the notebook's default; its experiment uses 6
        ch_width: int = 32,  # channels through the stem and every block
        layer_type: str | type[nn.Module] = "res",  # a BLOCKS name or a block class
        norm: str = "batch",  # "none": every BatchNorm becomes an identity
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        block = layer_type if isinstance(layer_type, str) else block_name(layer_type)
        check_architecture(num_blocks, ch_width, block, norm)
        self.block, self.depth, self.width, self.norm = block, num_blocks, ch_width, norm

        self.conv1 = _conv3x3(channels_in, ch_width)
        self.bn1 = _norm(ch_width, norm)
        self.conv2 = _conv3x3(ch_width, ch_width)
        self.bn2 = _norm(ch_width, norm)
        self.conv3 = _conv3x3(ch_width, ch_width)
        self.maxpool = nn.MaxPool2d(kernel_size=2)
        cls = BLOCKS[block]
        if num_blocks > 0:
            self.layers = nn.Sequential(*(cls(ch_width, norm=norm) for _ in range(num_blocks)))
        else:
            self.layers = nn.Identity()
        self.drop_out = nn.Dropout(p=0.5)
        self.linear1 = nn.Linear(ch_width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.maxpool(F.relu(self.bn2(self.conv2(out))))
        out = self.conv3(out)  # no ReLU: each block receives the raw output
        out = self.maxpool(F.relu(self.layers(out)))
        out = torch.flatten(out, 1)  # flatten, not view: accepts channels_last tensors
        out = self.drop_out(out)
        return self.linear1(out)


def build_model(block: str = "conv", depth: int = 6, width: int = 32, norm: str = "batch") -> DeepCNN:
    """``DeepCNN`` from registry names, as the CLI and sweeps describe it."""
    return DeepCNN(channels_in=3, num_blocks=depth, ch_width=width, layer_type=block, norm=norm)


def hanin_beta(model: nn.Module) -> float:
    """Hanin's β = Σ 1/n over the hidden layers (Hanin 2018: gradient fluctuations grow with it).

    The theorem is for fully connected ReLU nets, n the layer's width; for a CNN the width of a
    layer is taken as its channel count: every Conv2d's ``out_channels`` and every Linear's
    ``out_features``, except the network's output layer (the last Conv2d or Linear in module
    order, the DeepCNN's ``linear1``). 0.0 for a model with no hidden layer.
    """
    widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
              for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum(1.0 / n for n in widths[:-1]))


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters, as the notebook prints it."""
    return sum(p.numel() for p in model.parameters())
