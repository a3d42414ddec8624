"""Token buckets per session, pure: no Redis, no I/O, a clock that tests can inject.

Each key (a session id) has a bucket of at most `burst` tokens that refills at `rate` tokens per
second; a request takes one token, and a request that finds the bucket empty is refused. So a
session can send `burst` requests at once and `rate` per second for ever, and no faster.

Memory stays bounded whatever the clients do: a bucket that has been idle long enough to be full
again is indistinguishable from a new one, so it is forgotten; and past `max_buckets` the least
recently used bucket is forgotten too (which can only hand that session a fresh burst, never
refuse anyone more).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float  # when `tokens` was reckoned (seconds, on the limiter's clock)


class RateLimiter:
    """Allows each key `burst` requests at once and `rate` requests per second after that.

    Args:
        rate: tokens per second, > 0.
        burst: the bucket's size, >= 1 (else no request could ever pass).
        clock: monotonic seconds; time.monotonic by default.
        max_buckets: how many keys are tracked at most.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = 100_000,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, not {max_buckets!r}")
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._clock = clock
        # Seconds an empty bucket takes to fill: idle that long, a bucket is as good as new.
        self._refill = burst / rate
        # Least recently used first, so both forgetting rules look only at the front.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """How many buckets are held (for tests and the bound on memory)."""
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        """Take one token from `key`'s bucket; False (and nothing taken) if it has none."""
        now = self._clock()
        self._forget_idle(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            # max(): a clock that steps back (a test's, or a bug) must not drain the bucket.
            elapsed = max(0.0, now - bucket.at)
            bucket = _Bucket(min(self.burst, bucket.tokens + elapsed * self.rate), now)
        allowed = bucket.tokens >= 1
        if allowed:
            bucket.tokens -= 1
        self._buckets[key] = bucket  # now the most recently used
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return allowed

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that are full again; the front is the longest idle, so this stops
        at the first one that is not, and costs O(1) amortized."""
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if now - bucket.at < self._refill:
                return
            self._buckets.popitem(last=False)
