"""Will it fit? Memory and disk estimated from the options, checked before any work starts.

What the checks need to know about a network is a ``ModelShape``: its parameters, the bytes
autograd keeps for the backward pass per image, its largest activation per image, and how many
modules and probe points it has. For the notebook's DeepCNN it is a closed formula in the
network's shape (``deepcnn_shape``), so a depth of a million costs nothing to refuse: per image, a
stem part and a part per block, both linear in the width (fp32; maxpool indices are int64). The
constants were measured by tracing the networks on the meta device, and tests/test_faults.py
checks them against autograd's saved tensors for every block and norm. Any other network is
traced (``trace_shape``): one forward pass and the loss at two batch sizes, on the ``meta``
device where the model allows it (shapes only: no memory, no arithmetic), recording every tensor
autograd saves and every module's output; the difference between the two batch sizes is the
cost of one image. For DeepCNN both give the same numbers (tests/test_specs.py). The check
refuses only what cannot fit: the estimate leaves out the allocator's slack and the CUDA context.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import schema
from .runs import RunError

GiB = 1024 ** 3
IMAGE_BYTES = 3 * 32 * 32  # one uint8 CIFAR-10 image
POOL_IMAGES = schema.POOL_IMAGES  # the training pool of both datasets, split into train and validation
TEST_IMAGES = 10_000

# Bytes autograd saves for backward, per image: stem = a + b * width, block = c * width.
_STEM = {"batch": (12_336, 14_592), "none": (12_336, 9_472)}
_BLOCK = {("batch", "conv"): 512, ("batch", "res"): 512, ("batch", "skip"): 512, ("batch", "resdown"): 768,
          ("none", "conv"): 384, ("none", "res"): 384, ("none", "skip"): 384, ("none", "resdown"): 512}
_LARGEST = 4 * 32 * 32  # bytes per channel of the largest activation (the stem's 32x32 fp32 maps)
HOST_BYTES_PER_BLOCK = 8 * 1024  # Python objects of a block's modules, parameters and hooks (measured: 9-17 KB)
HOST_BYTES_PER_MODULE = 2 * 1024  # the same per module, for traced networks (a DeepCNN block holds four)
INPUT_SHAPE = (3, 32, 32)  # one CIFAR-10 image

# Disk: the recorder's rows cost about 10 bytes each in Parquet (measured on real sweeps); a probe
# point has at most 17 metrics a step. A checkpoint holds the weights and Adam's two moments.
RECORD_BYTES_PER_PROBE_STEP = 17 * 10
RECORD_PART_BYTES = 8 * 1024  # Parquet footer and schema of each flushed part
CHECKPOINT_EXTRA = 256 * 1024  # pickled structure, history, RNG state
SLACK = 4 * 1024 ** 2  # config, summary, tables, sample images


class ResourceError(RunError):
    """The run cannot fit in the memory of its device or on its output disk."""


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n < 100 * GiB else f"{n / GiB:,.0f} GiB"


@dataclass(frozen=True)
class ModelShape:
    """What the memory and disk checks need to know about one network."""

    n_params: int  # scalar parameters
    saved_per_image: int  # bytes autograd keeps for backward per training image (fp32, parameters excluded)
    largest_per_image: int  # bytes of the largest activation (a module's output) per image
    host_bytes: int  # Python objects of the modules on the host (counted on the CPU only)
    n_probes: int  # probe points the recorder measures (the model row excluded)


def deepcnn_shape(block: str, depth: int, width: int, norm: str) -> ModelShape:
    """The DeepCNN's shape in closed form: no model is built."""
    return ModelShape(n_parameters(block, depth, width, norm), saved_bytes_per_image(block, depth, width, norm),
                      _LARGEST * width, depth * HOST_BYTES_PER_BLOCK, depth + 4)  # three stem convolutions, the head


def trace_shape(model, n_probes: int, input_shape: tuple[int, ...] = INPUT_SHAPE, batches: tuple[int, int] = (2, 3)):
    """(the ModelShape of ``model``, its training-mode output at ``batches[0]``), from a forward pass
    and the cross-entropy loss at each of two batch sizes on the model's device (``meta`` ideally).

    Counts every tensor autograd saves for backward, except parameters and buffers, once (as
    tests/test_faults.py measures the DeepCNN formulas), and the largest output of any module.
    The model is put in training mode; on a real device its BatchNorm statistics change, so trace
    a copy. Raises what the model raises.
    """
    import torch
    import torch.nn.functional as F

    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    owned = {id(t) for t in tensors}
    modules = list(model.modules())
    model.train()

    def run(batch: int):
        seen: dict[int, int] = {}
        largest = [0]

        def pack(t):
            if id(t) not in owned:
                seen[id(t)] = t.numel() * t.element_size()
            return t

        def output_size(module, args, output) -> None:
            for t in (output if isinstance(output, (tuple, list)) else (output,)):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel() * t.element_size())

        handles = [m.register_forward_hook(output_size) for m in modules]
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = model(torch.zeros(batch, *input_shape, device=device))
                if isinstance(output, torch.Tensor) and output.dim() == 2:
                    F.cross_entropy(output, torch.zeros(batch, dtype=torch.long, device=device))
        finally:
            for handle in handles:
                handle.remove()
        return sum(seen.values()), largest[0], output

    small, large = batches
    saved_small, largest_small, output = run(small)
    saved_large, largest_large, _ = run(large)
    per_image = max(0, (saved_large - saved_small) // (large - small))
    largest = max(0, (largest_large - largest_small) // (large - small))
    n_params = sum(p.numel() for p in model.parameters())
    return ModelShape(n_params, per_image, largest, len(modules) * HOST_BYTES_PER_MODULE, n_probes), output


def n_parameters(block: str, depth: int, width: int, norm: str) -> int:
    """``count_parameters(build_model(...))`` without building the model."""
    w, bn = width, norm == "batch"
    stem = (27 * w + w) + 2 * (9 * w * w + w) + (4 * w if bn else 0) + 16 * w * 10 + 10
    half = w // 2
    per_block = {
        "conv": 9 * w * half + half + 9 * half * w + w + (2 * half if bn else 0),
        "skip": 9 * w * half + half + 9 * half * half + half + (2 * half if bn else 0),
        "resdown": 3 * (9 * w * w + w) + (2 * w if bn else 0),
    }
    per_block["res"] = per_block["conv"]
    return stem + depth * per_block[block]


def saved_bytes_per_image(block: str, depth: int, width: int, norm: str) -> int:
    """What autograd keeps for backward per training image (fp32, parameters excluded)."""
    a, b = _STEM[norm]
    return a + b * width + depth * _BLOCK[norm, block] * width


@dataclass(frozen=True)
class MemoryEstimate:
    data: int  # the uint8 splits on the device (and the loaded arrays, on the CPU)
    parameters: int  # weights, gradients, Adam's two moments, the recorder's copy (and the modules, on the CPU)
    activations: int  # kept for backward, plus the gradient of the largest activation
    evaluation: int  # one evaluation batch's largest activations (not at the same time as training)

    @property
    def total(self) -> int:
        return self.data + self.parameters + max(self.activations, self.evaluation)


def estimate_memory(block: str, depth: int, width: int, norm: str, batch_size: int, n_images: int,
                    eval_batch_size: int = 0, optimizer: bool = True, on_cpu: bool = True,
                    bytes_per_value: float = 4) -> MemoryEstimate:
    """Peak memory of training (``optimizer``: Adam) or probing one DeepCNN, in bytes (closed form)."""
    return estimate_model_memory(deepcnn_shape(block, depth, width, norm), batch_size, n_images, eval_batch_size,
                                 optimizer_states=2 if optimizer else None, on_cpu=on_cpu,
                                 bytes_per_value=bytes_per_value)


def estimate_model_memory(shape: ModelShape, batch_size: int, n_images: int, eval_batch_size: int = 0,
                          optimizer_states: int | None = 2, on_cpu: bool = True,
                          bytes_per_value: float = 4) -> MemoryEstimate:
    """Peak memory of training or probing a network of ``shape``, in bytes.

    ``n_images``: images held on the device (every split); ``optimizer_states``: tensors the
    optimizer keeps per parameter (Adam 2, SGD with momentum 1, plain SGD 0; training adds the
    recorder's copy too), None when probing (weights and gradients only); ``bytes_per_value``: 4
    (fp32), about 2 under bf16 autocast.
    """
    scale = bytes_per_value / 4
    batch = min(batch_size, n_images)
    data = n_images * IMAGE_BYTES + ((POOL_IMAGES + TEST_IMAGES) * IMAGE_BYTES if on_cpu else 0)
    copies = 2 if optimizer_states is None else 3 + optimizer_states  # weights, gradients (+ recorder, states)
    params = shape.n_params * 4 * copies + (shape.host_bytes if on_cpu else 0)
    per_image = shape.saved_per_image + 2 * shape.largest_per_image  # plus the largest activation's gradient
    evaluation = min(eval_batch_size, n_images) * 3 * shape.largest_per_image
    return MemoryEstimate(data, params, int(batch * per_image * scale), int(evaluation * scale))


def available_memory(device) -> int | None:
    """Bytes this process may still allocate on ``device``; None when the system does not say."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # cgroup v1
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2 ** 60:
                limits.append(int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_memory(estimate: MemoryEstimate, device, what: str, fix: str, copies: int = 1) -> None:
    """ResourceError when ``copies`` runs of ``estimate`` cannot fit in ``device``'s free memory."""
    free = available_memory(device)
    need = estimate.total * copies
    if free is not None and need > free:
        at_once = f"{copies} at once, " if copies > 1 else ""
        raise ResourceError(
            f"{what} needs about {gib(need)} of memory on {getattr(device, 'type', device)} ({at_once}"
            f"{gib(estimate.activations * copies)} of it activations kept for backward), but only "
            f"{gib(free)} is free; {fix}")


def recorded_steps(record, start: int, stop: int) -> int:
    """How many of the steps start, ..., stop - 1 the RecordConfig ``record`` records."""
    if record is None or record.every <= 0 or stop <= start:
        return 0
    if record.schedule == "log":  # recorder.logspaced(10): 0 and round(10 ** (k / 10))
        steps, k = {0}, 0
        while (step := math.floor(10 ** (k / 10) + 0.5)) < stop:
            steps.add(step)
            k += 1
        return sum(start <= s < stop for s in steps)
    n = record.every
    return -(-stop // n) - (-(-start // n))


def estimate_disk(block: str, depth: int, width: int, norm: str, total_steps: int, done_steps: int,
                  record, flushes: int, checkpoints_missing: int = 2) -> int:
    """Bytes a DeepCNN run trained with Adam will still add to its run directory (closed form)."""
    return estimate_model_disk(deepcnn_shape(block, depth, width, norm), total_steps, done_steps, record, flushes,
                               checkpoints_missing)


def estimate_model_disk(shape: ModelShape, total_steps: int, done_steps: int, record, flushes: int,
                        checkpoints_missing: int = 2, optimizer_states: int = 2) -> int:
    """Bytes a run will still add to its run directory, at the peak (with a checkpoint's temporary copy)."""
    probes = shape.n_probes + 1  # and the model row
    records = recorded_steps(record, done_steps, total_steps) * probes * RECORD_BYTES_PER_PROBE_STEP
    records += flushes * RECORD_PART_BYTES if records else 0
    checkpoint = shape.n_params * 4 * (1 + optimizer_states) + CHECKPOINT_EXTRA  # weights and optimizer states
    return records + checkpoint * (1 + checkpoints_missing) + 16 * total_steps + SLACK


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(need: int, out: str | os.PathLike, what: str) -> None:
    free = free_disk(out)
    if need > free:
        raise ResourceError(f"{what} will write about {gib(need)} to {out} (checkpoints and records), but "
                            f"only {gib(free)} is free there; free some space, choose another --out, or "
                            "record less often (--record-every N, --record-schedule log)")
