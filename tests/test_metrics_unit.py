"""The coordinator's Prometheus metrics (messenger/metrics.py) on fakeredis with a fake clock:
each thing the coordinator does shows in the registry's samples as exactly that, the request
path counts once a batch, and the HTTP server serves and stops."""

from __future__ import annotations

import asyncio
import random
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from messenger.coordinator import Coordinator
from messenger.keys import Keys
from messenger.metrics import DURATION_BUCKETS, Metrics, _BatchHistogram
from messenger.protocol import (
    Kind,
    Reply,
    Request,
    encode_request,
    heartbeat_id,
    inbox_id,
    new_session_key,
)
from messenger.settings import Settings
from tests.fakes import FakeClock, redis_ms

K = Keys("u")


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)  # process_* are prometheus-client's, not ours to test


# Each session may send 3 requests at once, then 2 a second (logons are not counted).
STRICT = Settings(redis_url="redis://fake", node="t", prefix="u", rate_limit=2, rate_burst=3)


@pytest.fixture
async def coord(redis: Any, clock: FakeClock, metrics: Metrics) -> Coordinator:
    c = Coordinator(redis, STRICT, clock=clock, metrics=metrics)
    assert await c.try_acquire_lease()
    return c


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """A sample's value; 0 for one that does not exist (yet)."""
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def requests_counted(metrics: Metrics) -> dict[tuple[str, str], float]:
    """Every non-zero messenger_requests_total sample, by (kind, reply)."""
    return {
        (s.labels["kind"], s.labels["reply"]): s.value
        for family in metrics.registry.collect()
        if family.name == "messenger_requests"
        for s in family.samples
        if s.name == "messenger_requests_total" and s.value
    }


class Session:
    """A client's side of one session: its ids, key and (optionally) its inbox subscription."""

    def __init__(self, c: Coordinator, clock: FakeClock, name: str, node: str) -> None:
        self.c, self.clock, self.name, self.node = c, clock, name, node
        self.sid = secrets.token_hex(16)
        self.key = new_session_key()
        self.inbox = K.inbox(inbox_id(self.key))
        self.hb = K.hb(heartbeat_id(self.key))
        self.pubsub: Any = None

    def entry(self, kind: Kind, *, age: float = 0.0, **fields: Any) -> str:
        if kind == "logon":
            fields |= {"name": self.name, "node": self.node, "key": self.key}
        sent = self.clock.now - round(age * 1000)
        request = Request(kind, secrets.token_hex(16), self.sid, sent_ms=sent, **fields)
        return encode_request(request, self.key)

    async def send(self, kind: Kind, *, age: float = 0.0, **fields: Any) -> str | None:
        return await self.c.handle(self.entry(kind, age=age, **fields))

    async def subscribe(self) -> None:
        """As a client does before its logon: a session without a subscriber is a crashed one."""
        self.pubsub = self.c.redis.pubsub()
        await self.pubsub.subscribe(self.inbox)

    async def logon(self, *, age: float = 0.0) -> str | None:
        await self.subscribe()
        return await self.send("logon", age=age)

    async def crash(self) -> None:
        """What Redis does when a client's connection closes: its subscriptions go at once."""
        await self.pubsub.unsubscribe()  # fakeredis keeps a closed pubsub's subscriptions
        await self.pubsub.aclose()
        self.pubsub = None

    async def close(self) -> None:
        if self.pubsub is not None:
            await self.pubsub.aclose()


@pytest.fixture
async def people(coord: Coordinator, clock: FakeClock) -> AsyncIterator[Callable[[str], Session]]:
    made: list[Session] = []

    def make(name: str) -> Session:
        made.append(Session(coord, clock, name, f"node-{name}"))
        return made[-1]

    yield make
    for s in made:
        await s.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float, what: str) -> None:
    """Wait for `check` to hold, at most `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within:g} s: {what}")
        await asyncio.sleep(0.01)


# --- what the coordinator did, as the samples say it -------------------------------------------


async def test_each_thing_the_coordinator_does_is_counted_as_exactly_that(
    coord: Coordinator,
    clock: FakeClock,
    redis: Any,
    metrics: Metrics,
    people: Callable[[str], Session],
) -> None:
    alice, bob, carol = people("alice"), people("bob"), people("carol")
    assert await alice.logon() == Reply.LOGGED_ON
    assert await bob.logon() == Reply.LOGGED_ON
    assert await carol.logon() == Reply.LOGGED_ON
    # a message to a user nobody knows
    assert await alice.send("message-to", to="dave", text="hi") == Reply.RECEIVER_NOT_FOUND
    # alice's burst: 3 at once, and she has used one; the clock stands still, so no refill
    burst = [await alice.send("message-to", to="bob", text=f"m{i}") for i in range(4)]
    assert burst == [Reply.SENT, Reply.SENT, Reply.RATE_LIMITED, Reply.RATE_LIMITED]
    # a request its sender stopped waiting for (the reply timeout is 5 s)
    assert await bob.send("message-to", to="alice", text="late", age=5.001) == Reply.EXPIRED
    # a logoff
    assert await carol.send("logoff") == Reply.LOGGED_OFF
    # a request nobody can verify, and one that does not decode
    stranger = Session(coord, clock, "eve", "node-eve")
    assert await stranger.send("message-to", to="bob", text="x") is None
    assert await coord.handle("not a request") is None
    # bob stops beating: the sweep logs him off at his deadline
    assert await coord.sweep() == []
    await redis.delete(bob.hb)
    clock.advance(STRICT.heartbeat_ttl + 0.001)
    assert [name for _, name, _ in await coord.sweep()] == ["bob"]
    # alice's connection goes: the crash check logs her off
    assert await coord.remove_crashed() == []  # seen subscribed first
    await alice.crash()
    assert [name for _, name, _ in await coord.remove_crashed()] == ["alice"]

    assert requests_counted(metrics) == {
        ("logon", "logged-on"): 3,
        ("message-to", "receiver-not-found"): 1,
        ("message-to", "sent"): 2,
        ("message-to", "rate-limited"): 2,
        ("message-to", "expired"): 1,
        ("logoff", "logged-off"): 1,
    }
    assert value(metrics, "messenger_rate_limited_total") == 2
    assert value(metrics, "messenger_requests_dropped_total", reason="unauthenticated") == 1
    assert value(metrics, "messenger_requests_dropped_total", reason="malformed") == 1
    assert value(metrics, "messenger_requests_dropped_total", reason="oversized") == 0
    assert value(metrics, "messenger_removals_total", reason="logoff") == 1
    assert value(metrics, "messenger_removals_total", reason="timeout") == 1
    assert value(metrics, "messenger_removals_total", reason="crash") == 1
    assert value(metrics, "messenger_sweeps_total") == 2
    # every answered request but the expired one was timed: sent and answered at once here
    duration = "messenger_request_duration_seconds"
    assert value(metrics, f"{duration}_count", kind="message-to") == 5
    assert value(metrics, f"{duration}_bucket", kind="message-to", le="0.0005") == 5
    assert value(metrics, f"{duration}_count", kind="logon") == 3
    assert value(metrics, f"{duration}_count", kind="logoff") == 1
    assert value(metrics, f"{duration}_sum", kind="message-to") == 0
    # one script a request (handle); none for the stranger's request or the garbage
    assert value(metrics, "messenger_batch_size_count") == 10
    assert value(metrics, "messenger_coordinator_info", id=coord.id[:8]) == 1


async def test_a_request_is_timed_from_its_signed_send_time_on_redis_clock(
    coord: Coordinator,
    clock: FakeClock,
    metrics: Metrics,
    people: Callable[[str], Session],
) -> None:
    alice, bob = people("alice"), people("bob")
    assert await alice.logon(age=0.002) == Reply.LOGGED_ON
    assert await bob.logon() == Reply.LOGGED_ON
    assert await alice.send("message-to", to="bob", text="x", age=0.030) == Reply.SENT
    assert await alice.send("message-to", to="bob", text="y", age=0.300) == Reply.SENT
    duration = "messenger_request_duration_seconds"
    assert value(metrics, f"{duration}_sum", kind="logon") == pytest.approx(0.002)
    assert value(metrics, f"{duration}_bucket", kind="logon", le="0.001") == 1  # bob's
    assert value(metrics, f"{duration}_bucket", kind="logon", le="0.0025") == 2
    buckets = {
        le: value(metrics, f"{duration}_bucket", kind="message-to", le=le)
        for le in ("0.025", "0.05", "0.25", "0.5", "+Inf")
    }
    assert buckets == {"0.025": 0, "0.05": 1, "0.25": 1, "0.5": 2, "+Inf": 2}
    assert value(metrics, f"{duration}_sum", kind="message-to") == pytest.approx(0.33)


async def test_a_batch_is_counted_with_one_increment_a_kind_and_reply(
    coord: Coordinator,
    clock: FakeClock,
    redis: Any,
    metrics: Metrics,
    people: Callable[[str], Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path: 62 requests in one batch script make one increment for each distinct
    (kind, reply), not one a request; and the batch's size is observed once."""
    senders = [people(f"u{i}") for i in range(30)]
    for s in senders:
        assert await s.logon() == Reply.LOGGED_ON
    for s in senders:
        await redis.rpush(K.requests, s.entry("message-to", to="u0", text="a", age=0.004))
        await redis.rpush(K.requests, s.entry("message-to", to="nobody", text="b"))
    await redis.rpush(K.requests, senders[1].entry("message-to", to="u0", text="c", age=6))
    carol = people("carol")
    await carol.subscribe()
    await redis.rpush(K.requests, carol.entry("logon", age=0.002))
    increments: list[float] = []
    real_inc = Counter.inc

    def counted(self: Counter, amount: float = 1, *args: Any, **kwargs: Any) -> None:
        increments.append(amount)
        real_inc(self, amount, *args, **kwargs)

    monkeypatch.setattr(Counter, "inc", counted)
    assert await coord.serve_batch()  # takes the batch first, then applies it
    while await coord.serve_batch():
        pass
    monkeypatch.undo()
    # sent, receiver-not-found, expired, logged-on: nothing else
    assert sorted(increments) == [1, 1, 30, 30]
    assert value(metrics, "messenger_batch_size_bucket", le="50.0") == 30  # the logons
    assert value(metrics, "messenger_batch_size_bucket", le="100.0") == 31
    duration = "messenger_request_duration_seconds"
    assert value(metrics, f"{duration}_count", kind="message-to") == 60  # not the expired one
    assert value(metrics, f"{duration}_sum", kind="message-to") == pytest.approx(0.120)
    assert value(metrics, f"{duration}_count", kind="logon") == 31
    assert value(metrics, f"{duration}_sum", kind="logon") == pytest.approx(0.002)


async def test_a_request_that_fails_in_redis_is_counted_as_failed(
    coord: Coordinator,
    redis: Any,
    metrics: Metrics,
    people: Callable[[str], Session],
) -> None:
    alice = people("alice")
    assert await alice.logon() == Reply.LOGGED_ON
    await redis.set(K.users, "not a hash")  # the logoff script's HDEL now fails (WRONGTYPE)
    assert await alice.send("logoff") is None
    assert requests_counted(metrics) == {("logon", "logged-on"): 1, ("logoff", "failed"): 1}
    assert value(metrics, "messenger_removals_total", reason="logoff") == 0


async def test_an_entry_longer_than_any_request_is_counted_oversized(
    coord: Coordinator, redis: Any, metrics: Metrics
) -> None:
    await redis.rpush(K.requests, "x" * (7 * STRICT.max_message_bytes))
    await coord.serve_batch()
    assert value(metrics, "messenger_requests_dropped_total", reason="oversized") == 1
    assert requests_counted(metrics) == {}


async def test_a_new_removal_reason_is_one_call() -> None:
    m = Metrics(process=False)
    assert value(m, "messenger_removals_total", reason="timeout") == 0  # there from the start
    m.removed("replaced")
    m.removed("replaced", 2)
    m.removed("crash", 0)  # a check that removed nobody
    assert value(m, "messenger_removals_total", reason="replaced") == 3
    assert value(m, "messenger_removals_total", reason="crash") == 0


async def test_without_metrics_the_coordinator_counts_nothing(
    redis: Any, clock: FakeClock, metrics: Metrics
) -> None:
    """Nothing reaches a registry that was not given: Coordinator(metrics=None) is the default."""
    c = Coordinator(redis, STRICT, clock=clock)
    assert c.metrics is None
    assert await c.try_acquire_lease()
    s = Session(c, clock, "alice", "n1")
    assert await s.logon() == Reply.LOGGED_ON
    assert await c.sweep() == []
    await s.close()
    assert requests_counted(metrics) == {}


def test_only_the_server_with_a_metrics_port_imports_prometheus_client() -> None:
    """`logon` and `who` load messenger.cli (and the coordinator module): prometheus-client must
    not cost them its import."""
    code = "import sys, messenger.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "False"


# --- serving, standing by, handing over ---------------------------------------------------------


async def test_active_sessions_and_hand_overs_follow_the_lease(redis: Any) -> None:
    fast = Settings(
        redis_url="redis://fake", node="t", prefix="u", lease_ttl=0.2, sweep_interval=0.02
    )
    metrics = Metrics(process=False)
    c = Coordinator(redis, fast, metrics=metrics)
    clock = FakeClock()
    sessions = [Session(c, clock, f"u{i}", f"n{i}") for i in range(2)]
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop))
    try:
        await eventually(lambda: value(metrics, "messenger_active") == 1, 3, "active")
        assert value(metrics, "messenger_activations_total") == 1
        for s in sessions:
            await s.subscribe()
            s.clock.now = await redis_ms(redis)
            await redis.rpush(K.requests, s.entry("logon"))
        await eventually(lambda: value(metrics, "messenger_sessions") == 2, 3, "2 sessions")
        # the timing uses Redis's clock, as reckoned at activation: not the fake one's zero
        count = "messenger_request_duration_seconds_count"
        await eventually(lambda: value(metrics, count, kind="logon") == 2, 3, "timed")
        assert value(metrics, "messenger_request_duration_seconds_sum", kind="logon") < 2
        await redis.set(K.lease, "usurper", px=300)  # another took over while it was paused
        await eventually(lambda: value(metrics, "messenger_active") == 0, 3, "standing by")
        assert value(metrics, "messenger_sessions") == 0  # a standby counts nobody
        await eventually(lambda: value(metrics, "messenger_active") == 1, 3, "active again")
        assert value(metrics, "messenger_activations_total") == 2
        await eventually(lambda: value(metrics, "messenger_sessions") == 2, 3, "2 sessions")
    finally:
        stop.set()
        await asyncio.wait_for(task, 3)
        for s in sessions:
            await s.close()
    assert value(metrics, "messenger_active") == 0


# --- the histogram kept a batch at a time ------------------------------------------------------


@pytest.mark.parametrize("size", [1, 5, 8, 100])
def test_the_batch_histogram_agrees_with_prometheus_clients_own(size: int) -> None:
    """Whichever way a batch is counted (a bucket search each, or sorted and bisected), the
    samples are those of prometheus-client's Histogram fed the same values one by one."""
    rng = random.Random(size)
    bounds_ms = [b * 1000 for b in DURATION_BUCKETS]
    ours = _BatchHistogram("d_seconds", "d", "kind", DURATION_BUCKETS)
    registry = CollectorRegistry()
    registry.register(ours)
    reference = Histogram("r_seconds", "r", ["kind"], buckets=DURATION_BUCKETS, registry=registry)
    for _ in range(20):
        # whole milliseconds, as requests' times are; some exactly on a bound, some past all
        values = [
            float(rng.choice([rng.randrange(0, 12_000), round(rng.choice(bounds_ms))]))
            for _ in range(size)
        ]
        ours.add("logon", list(values))
        for v in values:
            reference.labels("logon").observe(v / 1000)
    for le in [*(repr(b) for b in DURATION_BUCKETS), "+Inf"]:
        labels = {"kind": "logon", "le": le}
        got = registry.get_sample_value("d_seconds_bucket", labels)
        assert got == registry.get_sample_value("r_seconds_bucket", labels), le
    for suffix in ("_count", "_sum"):
        got = registry.get_sample_value("d_seconds" + suffix, {"kind": "logon"})
        want = registry.get_sample_value("r_seconds" + suffix, {"kind": "logon"})
        assert got == pytest.approx(want)


@pytest.mark.parametrize("size", [1, 20])
def test_a_time_below_zero_counts_as_zero(size: int) -> None:
    """Two reckonings of one clock (the client's and the coordinator's) can differ by a round
    trip: a request can seem answered before it was sent."""
    h = _BatchHistogram("d_seconds", "d", "kind", DURATION_BUCKETS)
    h.add("logon", [-3.0] * size + [2.0])
    (family,) = h.collect()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples["d_seconds_bucket", "0.0005"] == size
    assert samples["d_seconds_count", None] == size + 1
    assert samples["d_seconds_sum", None] == pytest.approx(0.002)


# --- the HTTP server ----------------------------------------------------------------------------


def test_the_metrics_are_served_over_http_until_closed() -> None:
    m = Metrics()
    m.removed("timeout", 4)
    server = m.serve("127.0.0.1", 0)
    host, port = server.address
    try:
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        removals = {s.labels["reason"]: s.value for s in families["messenger_removals"].samples}
        assert removals["timeout"] == 4
        assert "process_cpu_seconds" in families  # this process's own, beside ours
        # the port is taken while it serves
        with pytest.raises(OSError, match="in use"):
            Metrics(process=False).serve("127.0.0.1", port)
    finally:
        server.close()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):  # and gone once closed
        probe.connect(("127.0.0.1", port))
    with socket.socket() as probe:  # its port free again (but for the closed connection's
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT)
        probe.bind(("127.0.0.1", port))


async def test_a_dead_session_a_logon_replaces_and_a_stopping_server_are_counted(
    coord: Coordinator, clock: FakeClock, metrics: Metrics, people: Callable[[str], Session]
) -> None:
    dave = people("dave")
    assert await dave.logon() == Reply.LOGGED_ON
    await dave.crash()  # before any crash check saw it: only the next logon finds it dead
    again = Session(coord, clock, "dave", "node-dave")
    assert await again.logon() == Reply.LOGGED_ON
    assert value(metrics, "messenger_removals_total", reason="replaced") == 1
    # The last coordinator stopping logs everyone off (here: the new dave).
    await coord.shutdown()
    assert value(metrics, "messenger_removals_total", reason="server") == 1
    await again.close()
