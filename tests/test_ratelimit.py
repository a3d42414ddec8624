"""The token buckets, on a fake clock (exact and instant), and the settings of the limit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messenger.errors import ConfigError
from messenger.ratelimit import RateLimiter
from messenger.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rate: float, burst: float, **kw: int) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(rate, burst, clock=clock, **kw), clock


def test_a_burst_then_the_rate() -> None:
    rl, clock = limiter(rate=8, burst=3)  # rates and times are dyadic here: exact floats
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    clock.now += 0.0625
    assert not rl.allow("a")  # half a token
    clock.now += 0.0625
    assert rl.allow("a")
    assert not rl.allow("a")


def test_sessions_have_buckets_of_their_own() -> None:
    rl, _ = limiter(rate=1, burst=2)
    assert [rl.allow("flooder") for _ in range(5)] == [True, True, False, False, False]
    assert rl.allow("honest")
    assert rl.allow("honest")


def test_a_bucket_never_holds_more_than_the_burst() -> None:
    rl, clock = limiter(rate=10, burst=3)
    rl.allow("a")
    clock.now += 3600
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]


def test_idle_buckets_are_forgotten() -> None:
    rl, clock = limiter(rate=8, burst=2)
    for key in ("a", "b", "c"):
        rl.allow(key)
    assert len(rl) == 3
    clock.now += 0.125
    rl.allow("c")
    assert len(rl) == 3  # 1/8 s: not full again yet (2 tokens take 1/4 s)
    clock.now += 0.125
    rl.allow("d")
    assert len(rl) == 2  # a and b are full again: forgotten; c (used 0.1 s ago) and d stay


def test_the_number_of_buckets_is_capped() -> None:
    rl, _ = limiter(rate=1, burst=1, max_buckets=3)
    for key in ("a", "b", "c", "d"):
        assert rl.allow(key)
    assert len(rl) == 3
    # a, the least recently used, was forgotten: it starts again from a full bucket ...
    assert rl.allow("a")
    # ... while d, remembered, is still empty
    assert not rl.allow("d")


def test_a_bucket_in_use_is_kept_and_the_least_recently_used_goes_first() -> None:
    rl, clock = limiter(rate=8, burst=1, max_buckets=3)  # dyadic: exact floats
    for key in ("a", "b"):
        rl.allow(key)
    clock.now += 0.0625
    rl.allow("a")  # a is in use again; b is now the longest idle
    clock.now += 0.0625
    rl.allow("c")
    assert len(rl) == 2  # b (idle 1/8 s: full again) is forgotten behind a, which is not
    rl.allow("d")
    rl.allow("e")  # past the cap: a, the least recently used, goes; not c, d or e
    assert len(rl) == 3
    assert not rl.allow("c")
    assert rl.allow("a")


def test_a_clock_that_steps_back_changes_nothing() -> None:
    rl, clock = limiter(rate=10, burst=2)
    assert rl.allow("a")
    clock.now -= 5
    assert rl.allow("a")
    assert not rl.allow("a")


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("rate", "burst", "max_buckets"),
    [(0, 1, 10), (-1, 1, 10), (_INF, 1, 10), (_NAN, 1, 10), (1, 0.5, 10), (1, _INF, 10), (1, 1, 0)],
)
def test_settings_that_cannot_work_are_refused(rate: float, burst: float, max_buckets: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimiter(rate, burst, max_buckets=max_buckets)


# --- properties -----------------------------------------------------------------------------
# Rates, bursts and times are dyadic (powers of two, multiples of 1/64 s), so every float below
# is exact: the properties can compare counts without tolerances.

_rates = st.sampled_from([0.5, 1.0, 2.0, 4.0, 16.0, 64.0])
_bursts = st.sampled_from([1.0, 2.0, 4.0, 8.0])
_events = st.lists(
    st.tuples(st.integers(0, 64), st.sampled_from("abcde")),  # (1/64 s steps, key)
    max_size=300,
)


class _NeverForgets:
    """The same buckets with unbounded memory: the reference forgetting must not be seen in."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, at = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        self.buckets[key] = (tokens - 1 if allowed else tokens, now)
        return allowed


@settings(max_examples=300, deadline=None)
@given(_rates, _bursts, _events)
def test_forgetting_idle_buckets_changes_no_decision(
    rate: float, burst: float, events: list[tuple[int, str]]
) -> None:
    rl, clock = limiter(rate, burst)
    reference = _NeverForgets(rate, burst)
    for step, key in events:
        clock.now += step / 64
        assert rl.allow(key) == reference.allow(key, clock.now)


@settings(max_examples=300, deadline=None)
@given(_rates, _bursts, _events)
def test_no_session_gets_more_than_burst_plus_rate_times_time(
    rate: float, burst: float, events: list[tuple[int, str]]
) -> None:
    rl, clock = limiter(rate, burst)
    allowed: dict[str, list[float]] = {}
    for step, key in events:
        clock.now += step / 64
        if rl.allow(key):
            allowed.setdefault(key, []).append(clock.now)
        assert len(rl) <= 5
    for times in allowed.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                assert j - i + 1 <= burst + (times[j] - start) * rate


@settings(max_examples=300, deadline=None)
@given(_rates, _bursts, _events, st.integers(1, 4))
def test_a_session_within_the_rate_is_never_refused_whatever_the_others_do(
    rate: float, burst: float, events: list[tuple[int, str]], max_buckets: int
) -> None:
    rl, clock = limiter(rate, burst, max_buckets=max_buckets)
    gap = 1 / rate  # the honest session sends exactly at the rate
    next_honest = clock.now
    for step, key in events:
        clock.now += step / 64
        while next_honest <= clock.now:  # the honest session's turns that came meanwhile
            saved, clock.now = clock.now, next_honest
            assert rl.allow("honest")
            clock.now = saved
            next_honest += gap
        rl.allow(key)  # the others, as fast as they like
        assert len(rl) <= max_buckets


# --- the settings -----------------------------------------------------------------------------


def test_the_limit_is_configured_in_the_environment() -> None:
    assert (Settings().rate_limit, Settings().rate_burst) == (20.0, 40)
    s = Settings.from_env({"MESSENGER_RATE_LIMIT": "2.5", "MESSENGER_RATE_BURST": "7"})
    assert (s.rate_limit, s.rate_burst) == (2.5, 7)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MESSENGER_RATE_LIMIT": "0"}, "MESSENGER_RATE_LIMIT must be a positive"),
        ({"MESSENGER_RATE_LIMIT": "-1"}, "MESSENGER_RATE_LIMIT must be a positive"),
        ({"MESSENGER_RATE_LIMIT": "inf"}, "MESSENGER_RATE_LIMIT must be a positive"),
        ({"MESSENGER_RATE_LIMIT": "nan"}, "MESSENGER_RATE_LIMIT must be a positive"),
        ({"MESSENGER_RATE_LIMIT": "fast"}, "MESSENGER_RATE_LIMIT: not a valid float"),
        ({"MESSENGER_RATE_BURST": "0"}, "MESSENGER_RATE_BURST must be a positive"),
        ({"MESSENGER_RATE_BURST": "1.5"}, "MESSENGER_RATE_BURST: not a valid int"),
    ],
)
def test_a_limit_that_cannot_work_is_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)
