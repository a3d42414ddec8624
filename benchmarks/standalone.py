"""Running one scenario module by itself: its own redis-server, its figures as a markdown table."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

from benchmarks.figures import Env, Figure
from messenger.embedded import EmbeddedRedis


def table(figures: list[Figure]) -> str:
    """One row per figure: median (min-max) of its repetitions."""

    def num(x: float) -> str:
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"

    rows = [
        "| figure | key | median | min-max | unit | n | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in figures:
        rows.append(
            f"| {f.label} | `{f.key}` | {num(f.median)} | {num(f.low)}-{num(f.high)} | {f.unit} "
            f"| {len(f.values)} | {f.notes} |"
        )
    return "\n".join(rows)


def run_alone(
    scenario: Callable[[Env], Coroutine[Any, Any, list[Figure]]], *, quick: bool, repeat: int
) -> list[Figure]:
    """Run `scenario` on a redis-server of its own (127.0.0.1, free port), started here on the
    main thread: it dies with this process even on kill -9 (messenger.embedded)."""
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory(prefix="bench-") as work:
        return asyncio.run(scenario(Env(server.url, quick, repeat, work)))
