"""What the unit tests on fakeredis share: a fake clock (the coordinator's `now`), and Redis's own
clock read the way the scripts read it. Their fixtures (`clock`, `redis`) are in conftest.py."""

from __future__ import annotations

from typing import Any

T0 = 1_000_000_000_000  # ms since the epoch: where every fake clock starts


class FakeClock:
    """Milliseconds that move only when a test says so (`advance`)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1000)


async def redis_ms(redis: Any) -> int:
    """Redis's clock in ms, as `TIME` inside a script reckons it."""
    secs, micros = await redis.time()
    return int(secs) * 1000 + int(micros) // 1000
