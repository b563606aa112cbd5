"""Which steps are recorded: schedules are callables ``step -> bool`` (``every``,
``logspaced``), and ``RecordConfig`` is the recorder's one visible configuration."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Schedule = Callable[[int], bool]
SCHEDULES = ("every", "log")

def every(n: int) -> Schedule:
    """Record steps 0, n, 2n, ...; ``n = 0`` records nothing."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"every must be an integer >= 0 (0 disables recording), got {n!r}")
    if n == 0:
        return lambda step: False
    return lambda step: step % n == 0


def logspaced(per_decade: int = 10) -> Schedule:
    """Record step 0 and the steps ``round(10 ** (k / per_decade))`` for k = 0, 1, 2, ...

    Evenly spaced in log(step), about ``per_decade`` steps for every factor of 10; the
    default gives 0, 1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, ...
    Dense early, when the gradient flow changes fastest, and sparse later.
    """
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
        raise ValueError(f"per_decade must be an integer >= 1, got {per_decade!r}")

    def scheduled(step: int) -> bool:
        if step <= 1:
            return step >= 0
        k = round(per_decade * math.log10(step))
        return any(math.floor(10 ** (j / per_decade) + 0.5) == step for j in (k - 1, k, k + 1))

    return scheduled


def _as_schedule(every_n: int | Schedule) -> Schedule:
    return every_n if callable(every_n) else every(every_n)


@dataclass(frozen=True)
class RecordConfig:
    """What the recorder records and how often it moves records to the host."""

    every: int = 1  # record every N-th step; 0 disables
    schedule: str = "every"  # "every" | "log": 0, 1, 2, ..., 8, 10, 13, 16, 20, ... (every > 0 switches it on)
    flush_every: int = 64  # recorded steps held on the device between host syncs
    probes: tuple[str, ...] | None = None  # module names or globs to record; None: probes.select's default

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"every must be an integer >= 0 (0 disables recording), got {self.every!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if isinstance(self.flush_every, bool) or not isinstance(self.flush_every, int) or self.flush_every < 1:
            raise ValueError(f"flush_every must be an integer >= 1, got {self.flush_every!r}")
        if self.probes is not None:
            probes = (self.probes,) if isinstance(self.probes, str) else tuple(self.probes)
            if not probes or not all(isinstance(p, str) and p.strip() for p in probes):
                raise ValueError(f"probes must be module names or globs, got {self.probes!r}")
            object.__setattr__(self, "probes", probes)

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def make_schedule(self) -> Schedule:
        """The schedule callable this configuration describes."""
        if self.schedule == "log" and self.every > 0:
            return logspaced()
        return every(self.every)
