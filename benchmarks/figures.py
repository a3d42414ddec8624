"""What every benchmark scenario returns: figures, each a median of repetitions with min and max.

A scenario module exposes `async def run(env: Env) -> list[Figure]` (see benchmarks/__main__.py
for the runner that calls them in order and writes benchmarks/results/latest.json and .md). A
figure that compares itself with a reference names it (`ref`): the report shows the ratio of the
two medians, both measured in the same run on the same Redis, because absolute times drift on
shared machines.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any


class NotRun(Exception):
    """Raised by a scenario that cannot run here (a missing package or tool): the report says
    why, and the other scenarios still run. Not a failure, so not a crash either."""


class Partial(Exception):
    """Raised by a scenario some of whose parts failed: the figures it did measure are kept,
    and the report names each part that failed and why."""

    def __init__(self, figures: list[Figure], errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{part}: {why}" for part, why in errors.items()))
        self.figures = figures
        self.errors = errors


@dataclass(frozen=True)
class Env:
    """What a scenario gets: the Redis it may use, and how hard to try."""

    redis_url: str  # an admin URL of a redis-server started for this run (127.0.0.1, free port)
    quick: bool  # quick mode: the whole suite under 60 s; full mode: as long as it takes
    repeat: int  # repetitions per figure (at least 3)
    work_dir: str  # a private temporary directory for runtime dirs, sockets, files
    # A cut-down quick mode (tests/test_benchmarks.py): it runs everything, the figures mean little.
    smoke: bool = False


@dataclass(frozen=True)
class Figure:
    """One measured quantity: `key` is stable (JSON consumers rely on it), `label` is for
    people, `values` are the repetitions."""

    key: str  # e.g. "throughput.awaited.8pairs.messenger"
    label: str  # e.g. "one-way msgs/s, 8 pairs, each send awaited: messenger"
    unit: str  # "msgs/s", "µs", "ms", "%", "B", "s"
    values: tuple[float, ...]
    ref: str | None = None  # the key of the reference this figure is compared with
    better: str = "higher"  # "higher" or "lower": which way is good (for the ratio's reading)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = list(self.values)
        out |= {"median": self.median, "min": self.low, "max": self.high}
        return out


async def repeat(times: int, once: Callable[[], Awaitable[float]]) -> tuple[float, ...]:
    """Run `once` (which returns one value) `times` times; the values in order."""
    return tuple([await once() for _ in range(times)])


def per_second(count: int, started: float) -> float:
    """`count` events since `started` (time.perf_counter()) as a rate."""
    return count / max(time.perf_counter() - started, 1e-9)
