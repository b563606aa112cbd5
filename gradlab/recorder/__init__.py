"""Forward and backward hooks on every probe point: gradient norms and activation statistics
per block, every step, for a few percent of the step time.

``Recorder`` registers its hooks on enter and removes every one of them on exit::

    with Recorder(model, optimizer=opt) as rec:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            rec.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()  # the step advances here; without an optimizer, after each backward
    df = rec.frame()  # step, epoch, layer, position, role, stack_index, module_type, metric, value

The trainer attaches the same object through ``RecorderCallback`` and its named events.

The parts: ``schedule`` (which steps, ``RecordConfig``), ``core`` (the ``Recorder``: hooks
registered, routed and removed), ``buffer`` (the moments of each recorded step on the device,
flushed to the host in one copy), ``measure`` (how moments are computed: compiled kernels or
eager ops, chosen once per buffer) and ``callback`` (the trainer's adapter).

How it stays cheap: the hooks of a step that the schedule skips return at once. On a
recorded step every hook reduces its tensor to a few *moments* (sums, sums of squares,
counts; ``stats.py``) and writes them straight into this step's row of a preallocated
buffer: no per-hook results to gather, copy or stack. On a CPU the moments of a tensor come
from one pass of a compiled kernel (``native``), which reads the tensor once and writes to
the buffer's address; elsewhere, or without a C compiler, from eager ops with ``out=``.
Parameter norms are one pass per list of tensors. ``flush`` moves the buffer to the host in
one copy, the only host sync, every ``flush_every`` recorded steps, and turns the moments
into the published metrics in numpy. Gradient norms come from pre-hooks on the graph nodes
that made the probe points' outputs and inputs; a block's input is usually the previous
block's output, so one hook and one pass serve both, and an identity residual block's
branch part of the input gradient (``grad - skip gradient``) is measured in that same pass.

What is left of the cost on a CPU (``benchmarks/recorder_overhead.py``) is memory traffic:
each measured activation and gradient is read once more, and the hooks' Python runs between
large kernels, where caches are cold and every call into torch costs microseconds, so the
hooks make as few of those calls as they can.
"""
from gradlab.schema import MODEL_LAYER, METRIC_NAMES as METRICS, RECORD_COLUMNS as COLUMNS, empty_columns

from .buffer import Sink
from .callback import RecorderCallback
from .core import Recorder
from .schedule import SCHEDULES, RecordConfig, Schedule, every, logspaced

__all__ = ["COLUMNS", "METRICS", "MODEL_LAYER", "SCHEDULES", "RecordConfig", "Recorder", "RecorderCallback",
           "Schedule", "Sink", "empty_columns", "every", "logspaced"]
