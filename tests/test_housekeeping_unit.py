"""The sweep and the crash check beside the requests (Coordinator.housekeep), on fakeredis:
requests are served while they run, they go in small scripts, and a failure in them ends serve()
as a failure of the requests does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from messenger import crashes, wire
from messenger.coordinator import Coordinator
from messenger.crashes import CrashWatch, RedisRestarted
from messenger.errors import LeaseLost
from messenger.keys import Keys
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
from tests.fakes import redis_ms

K = Keys("u")


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url="redis://fake", node="t", prefix="u", sweep_interval=0.02)


class Session:
    """A client's side of one session: its sid, key and inbox subscription."""

    def __init__(self, redis: Any, name: str, node: str) -> None:
        self.redis, self.name, self.node = redis, name, node
        self.sid = secrets.token_hex(16)
        self.key = new_session_key()
        self.inbox = K.inbox(inbox_id(self.key))
        self.hb = K.hb(heartbeat_id(self.key))
        self.pubsub: Any = None
        self.owns_pubsub = False

    async def subscribe(self) -> None:
        self.owns_pubsub = True
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe(self.inbox)
        await self.pubsub.get_message(timeout=1.0)  # the confirmation

    def entry(self, kind: Kind, now_ms: int, **fields: Any) -> str:
        if kind == "logon":
            fields |= {"name": self.name, "node": self.node, "key": self.key}
        request = Request(kind, secrets.token_hex(16), self.sid, sent_ms=now_ms, **fields)
        return encode_request(request, self.key)

    async def reply(self, timeout: float = 2.0) -> str:
        """The next reply on its inbox."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await self.pubsub.get_message(timeout=0.05)
            if msg is not None and msg["type"] == "message":
                event = json.loads(msg["data"])
                if event["t"] == "reply":
                    return str(event["r"])
        raise TimeoutError(f"no reply for {self.name} in {timeout:g} s")

    async def close(self) -> None:
        if self.owns_pubsub:
            await self.pubsub.aclose()


@pytest.fixture
async def sessions(redis: Any) -> AsyncIterator[list[Session]]:
    made: list[Session] = []
    yield made
    for s in made:
        await s.close()


async def log_on(c: Coordinator, redis: Any, sessions: list[Session], n: int) -> list[Session]:
    """`n` sessions logged on through the coordinator's own request path (no serve loop), their
    inboxes subscribed on one connection of theirs."""
    new = [Session(redis, f"u{len(sessions) + i}", f"n{len(sessions) + i}") for i in range(n)]
    listener = redis.pubsub()
    await listener.subscribe(*(s.inbox for s in new))
    for s in new:
        s.pubsub = listener
        assert await c.handle(s.entry("logon", await redis_ms(redis))) == Reply.LOGGED_ON
    new[0].owns_pubsub = True
    sessions += new
    return new


async def serving(c: Coordinator, stop: asyncio.Event) -> asyncio.Task[None]:
    """serve() in a task, once the coordinator is active."""
    task = asyncio.create_task(c.serve(stop))
    for _ in range(200):
        if c.active or task.done():
            break
        await asyncio.sleep(0.01)
    assert c.active
    return task


async def ends_by_itself(task: asyncio.Task[None], stop: asyncio.Event, within: float) -> None:
    """Wait up to `within` seconds for serve() to end on its own (wait_for would cancel it,
    which is not the point); if it does not, stop it and fail."""
    await asyncio.wait({task}, timeout=within)
    if not task.done():
        stop.set()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        pytest.fail(f"serve() went on for {within:g} s after the failure")


def no_tasks_but(*mine: asyncio.Task[Any] | None) -> list[asyncio.Task[Any]]:
    """Tasks still running, besides this test's own: serve() must leave none behind."""
    return [t for t in asyncio.all_tasks() if t not in mine and not t.done()]


# --- the sweep, in small scripts -------------------------------------------------------------


async def test_a_sweep_goes_in_scripts_of_a_hundred_due_sessions(
    redis: Any, settings: Settings, sessions: list[Session]
) -> None:
    """Redis runs nothing else while a script runs: 250 sessions due make three scripts, each
    looking at 100 at most, and one sweep() sees to them all."""
    c = Coordinator(redis, settings)
    assert await c.try_acquire_lease()
    group = await log_on(c, redis, sessions, 250)
    for s in group[:10]:
        await redis.delete(s.hb)  # these missed their heartbeats
    looked_at: list[int] = []
    real_sweep = c.scripts.sweep

    async def counted(*args: Any, **kwargs: Any) -> Any:
        due, removed = await real_sweep(*args, **kwargs)
        looked_at.append(due)
        return due, removed

    c.scripts.sweep = counted  # type: ignore[method-assign]
    due_at = await redis_ms(redis) + settings.heartbeat_ttl_ms + 1
    c.clock = lambda: due_at  # everyone is due (their keys, but those ten, still live)
    removed = await c.sweep()
    assert sorted(name for _, name, _ in removed) == sorted(s.name for s in group[:10])
    assert looked_at == [100, 100, 50]
    assert int(await redis.zcount(K.deadlines, "-inf", due_at)) == 0  # nobody left due
    assert await redis.hlen(K.names) == 240


async def test_a_backlog_is_swept_a_bounded_pass_at_a_time(
    redis: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, sessions: list[Session]
) -> None:
    """However many are due, one sweep() ends after a bounded number of scripts, so the crash
    check still gets its turn every interval; the next sweep goes on where it left off."""
    from messenger import coordinator

    monkeypatch.setattr(coordinator, "_SWEEP_CHUNK", 5)
    monkeypatch.setattr(coordinator, "_SWEEP_SCRIPTS", 3)
    c = Coordinator(redis, settings)
    assert await c.try_acquire_lease()
    group = await log_on(c, redis, sessions, 20)
    for s in group:
        await redis.delete(s.hb)
    due_at = await redis_ms(redis) + settings.heartbeat_ttl_ms + 1
    c.clock = lambda: due_at
    assert len(await c.sweep()) == 15
    assert len(await c.sweep()) == 5
    assert await c.sweep() == []


# --- the crash check, in chunks --------------------------------------------------------------


async def test_a_crash_check_goes_in_chunks_each_with_the_canary(
    redis: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, sessions: list[Session]
) -> None:
    monkeypatch.setattr(crashes, "_CHUNK", 4)
    c = Coordinator(redis, settings)
    assert await c.try_acquire_lease()
    await c.crashes.load(redis, K, K.canary(c.id))
    await log_on(c, redis, sessions, 10)
    writes: list[list[list[str]]] = []
    real_pipeline = wire.pipeline

    async def recorded(r: Any, commands: Any) -> Any:
        writes.append([list(cmd) for cmd in commands])
        return await real_pipeline(r, commands)

    monkeypatch.setattr(wire, "pipeline", recorded)
    assert await c.remove_crashed() == []
    assert [len(w[1]) - 2 for w in writes] == [4, 4, 2]  # NUMSUB of 4, 4 and 2 inboxes
    assert all(w[0] == ["PUBSUB", "NUMSUB", K.canary(c.id)] for w in writes)
    await c.crashes.close()


async def test_a_restart_between_two_chunks_judges_nobody(
    redis: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch, sessions: list[Session]
) -> None:
    """redis-py may reconnect a pooled connection quietly between two chunks of a check: on a
    Redis that restarted every inbox is empty, and so is the canary, read in the same write."""
    monkeypatch.setattr(crashes, "_CHUNK", 4)
    c = Coordinator(redis, settings)
    assert await c.try_acquire_lease()
    await c.crashes.load(redis, K, K.canary(c.id))
    await log_on(c, redis, sessions, 10)
    real_pipeline = wire.pipeline
    chunks = 0

    async def restart_after_the_first(r: Any, commands: Any) -> Any:
        nonlocal chunks
        chunks += 1
        if chunks == 2:  # Redis restarted: every subscription is gone
            await sessions[0].pubsub.unsubscribe()
            assert c.crashes._canary is not None
            await c.crashes._canary.unsubscribe()
        return await real_pipeline(r, commands)

    monkeypatch.setattr(wire, "pipeline", restart_after_the_first)
    with pytest.raises(RedisRestarted):
        await c.remove_crashed()
    assert await redis.hlen(K.names) == 10
    await c.crashes.close()


async def test_the_crash_script_judges_nobody_once_the_canary_is_gone(
    redis: Any, settings: Settings, sessions: list[Session]
) -> None:
    """Suspects found, then Redis restarts before the script that removes them: it finds every
    inbox empty, but the canary too, and removes nobody."""
    c = Coordinator(redis, settings)
    assert await c.try_acquire_lease()
    await c.crashes.load(redis, K, K.canary(c.id))
    (alice,) = await log_on(c, redis, sessions, 1)
    (bob,) = await log_on(c, redis, sessions, 1)
    assert await c.remove_crashed() == []  # both seen subscribed
    await alice.pubsub.unsubscribe()  # alice crashed
    suspects = await c.crashes.suspects(redis)
    assert suspects == [(alice.sid, alice.inbox)]
    await bob.pubsub.unsubscribe()
    assert c.crashes._canary is not None
    await c.crashes._canary.unsubscribe()  # ... and then Redis restarted
    with pytest.raises(RedisRestarted):
        await c.scripts.crashed(c.id, [*suspects, (bob.sid, bob.inbox)], K.canary(c.id))
    assert await redis.hlen(K.names) == 2
    await c.crashes.close()


async def test_many_suspects_go_in_small_scripts(
    redis: Any, settings: Settings, sessions: list[Session]
) -> None:
    c = Coordinator(redis, settings)
    assert await c.try_acquire_lease()
    group = await log_on(c, redis, sessions, 45)
    assert await c.remove_crashed() == []
    await group[0].pubsub.unsubscribe()  # a host with 45 clients went down
    sizes: list[int] = []
    real_crashed = c.scripts.crashed

    async def counted(coordinator: str, suspects: Any, canary: str = "") -> Any:
        sizes.append(len(suspects))
        return await real_crashed(coordinator, suspects, canary)

    c.scripts.crashed = counted  # type: ignore[method-assign]
    assert len(await c.remove_crashed()) == 45
    assert sizes == [20, 20, 5]
    assert await redis.hlen(K.names) == 0


async def test_a_logoff_while_a_check_waits_for_redis_is_not_judged(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requests are served while a check waits for its counts: a session logged off (or
    removed) meanwhile is neither a suspect nor remembered as seen."""
    watch = CrashWatch()
    watch.add("gone", "u:inbox:gone")  # seen at its logon
    watch.add("stays", "u:inbox:stays")
    listener = redis.pubsub()
    await listener.subscribe("u:inbox:gone")  # its client has not closed its connection yet
    real_pipeline = wire.pipeline

    async def logoff_meanwhile(r: Any, commands: Any) -> Any:
        watch.discard("gone")  # the batch path applied its logoff while the check waited
        return await real_pipeline(r, commands)

    monkeypatch.setattr(wire, "pipeline", logoff_meanwhile)
    assert await watch.suspects(redis) == [("stays", "u:inbox:stays")]  # that one crashed
    assert "gone" not in watch._seen  # forgotten for good, not seen again by a late count
    assert len(watch) == 1
    await listener.aclose()


async def test_a_session_replaced_while_a_check_waits_is_judged_by_its_new_inbox(
    redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = CrashWatch()
    watch.add("s", "u:inbox:old")
    listener = redis.pubsub()
    await listener.subscribe("u:inbox:new")
    real_pipeline = wire.pipeline

    async def replaced(r: Any, commands: Any) -> Any:
        watch.discard("s")
        watch.add("s", "u:inbox:new")  # logged off, and on again under the same sid
        return await real_pipeline(r, commands)

    monkeypatch.setattr(wire, "pipeline", replaced)
    assert await watch.suspects(redis) == []  # the old inbox's empty count is not about it
    monkeypatch.setattr(wire, "pipeline", real_pipeline)
    assert await watch.suspects(redis) == []  # the new one has its subscriber
    await listener.aclose()


# --- beside the requests ---------------------------------------------------------------------


async def test_a_request_is_served_while_a_sweep_is_in_progress(
    redis: Any, settings: Settings, sessions: list[Session]
) -> None:
    c = Coordinator(redis, settings)
    sweeping, release = asyncio.Event(), asyncio.Event()
    real_sweep = c.scripts.sweep
    calls = 0

    async def long_sweep(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:  # the first is the activation's, before serving starts
            sweeping.set()
            await release.wait()  # Redis busy with a long script, as far as this task knows
        return await real_sweep(*args, **kwargs)

    c.scripts.sweep = long_sweep  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = await serving(c, stop)
    await asyncio.wait_for(sweeping.wait(), 2.0)
    (alice,) = [Session(redis, "alice", "n1")]
    sessions.append(alice)
    await alice.subscribe()
    await redis.rpush(K.requests, alice.entry("logon", await redis_ms(redis)))
    assert await alice.reply() == Reply.LOGGED_ON
    assert not release.is_set()
    assert not task.done()
    release.set()
    stop.set()
    await asyncio.wait_for(task, 2.0)
    assert no_tasks_but(asyncio.current_task()) == []


async def test_a_leaselost_in_the_housekeeping_ends_serve_at_once(
    redis: Any, settings: Settings
) -> None:
    """As when the requests find it: serve() raises it, and leaves no task behind, even while
    the request side is waiting for work."""
    c = Coordinator(redis, settings)
    stop = asyncio.Event()
    waiting = asyncio.Event()

    async def idle() -> bool:  # the request side, waiting: nothing comes
        waiting.set()
        await asyncio.sleep(3600)
        return False

    c.serve_batch = idle  # type: ignore[method-assign]
    task = await serving(c, stop)
    await asyncio.wait_for(waiting.wait(), 2.0)
    await redis.set(K.lease, "usurper", px=60_000)  # another took over
    await ends_by_itself(task, stop, 0.2)  # well before the next lease refresh (0.5 s)
    with pytest.raises(LeaseLost):
        await task
    assert no_tasks_but(asyncio.current_task()) == []


async def test_a_redis_error_in_the_housekeeping_ends_serve_and_run_serves_afresh(
    redis: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted (the crash check's canary is gone): serve() raises it, as it did when
    the check ran in its loop, and run() logs it and serves again: active once more."""
    caplog.set_level(logging.INFO, "messenger.coordinator")
    c = Coordinator(redis, settings)
    stop = asyncio.Event()
    runner = asyncio.create_task(c.run(stop))
    try:
        for _ in range(200):
            if c.crashes.canary_channel and c.active:
                break
            await asyncio.sleep(0.01)
        canary = c.crashes._canary
        assert canary is not None
        await canary.unsubscribe()  # what a restart does to it
        for _ in range(300):
            if "retrying in" in caplog.text and caplog.text.count("is active") >= 2:
                break
            await asyncio.sleep(0.01)
        assert "lost this coordinator's subscription" in caplog.text
        assert caplog.text.count("is active") >= 2
    finally:
        stop.set()
        await asyncio.wait_for(runner, 3.0)
    assert no_tasks_but(asyncio.current_task()) == []


async def test_a_failure_of_the_requests_ends_the_housekeeping(
    redis: Any, settings: Settings
) -> None:
    c = Coordinator(redis, settings)
    stop = asyncio.Event()
    in_sweep = asyncio.Event()
    real_sweep = c.scripts.sweep

    async def slow_sweep(*args: Any, **kwargs: Any) -> Any:
        in_sweep.set()
        await asyncio.sleep(0.05)
        return await real_sweep(*args, **kwargs)

    c.scripts.sweep = slow_sweep  # type: ignore[method-assign]
    task = await serving(c, stop)
    await asyncio.wait_for(in_sweep.wait(), 2.0)

    async def broken() -> bool:
        raise LeaseLost("found by the requests")

    c.serve_batch = broken  # type: ignore[method-assign]
    # Housekeeping that were awaited rather than cancelled would sweep on every 0.02 s until
    # `stop`: any bound shows it; 1 s is one a loaded CI machine keeps (0.2 s once was not).
    await ends_by_itself(task, stop, 1.0)
    with pytest.raises(LeaseLost, match="found by the requests"):
        await task
    assert no_tasks_but(asyncio.current_task()) == []


async def test_a_cancellation_lost_by_the_requests_side_still_ends_serve(
    redis: Any, settings: Settings
) -> None:
    """Python 3.11's wait_for drops a cancellation that comes as its wait ends (fakeredis and
    redis-py wait with it): the request side sees for itself that the housekeeping failed."""
    c = Coordinator(redis, settings)
    stop = asyncio.Event()
    waiting, fail = asyncio.Event(), asyncio.Event()

    async def deaf() -> bool:
        if waiting.is_set():  # deaf once only, so that a failure here cannot hang the tests
            await asyncio.sleep(3600)
        waiting.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        return False

    real_sweep = c.scripts.sweep

    async def failing_sweep(*args: Any, **kwargs: Any) -> Any:
        if fail.is_set():
            raise RedisConnectionError("found by the housekeeping")
        return await real_sweep(*args, **kwargs)

    c.serve_batch = deaf  # type: ignore[method-assign]
    c.scripts.sweep = failing_sweep  # type: ignore[method-assign]
    task = await serving(c, stop)
    await asyncio.wait_for(waiting.wait(), 2.0)
    fail.set()
    await ends_by_itself(task, stop, 1.0)
    with pytest.raises(RedisConnectionError, match="found by the housekeeping"):
        await task
    assert no_tasks_but(asyncio.current_task()) == []


async def test_a_cancellation_lost_by_the_housekeeping_still_ends_serve(
    redis: Any, settings: Settings
) -> None:
    c = Coordinator(redis, settings)
    stop = asyncio.Event()
    sweeping = asyncio.Event()
    real_sweep = c.scripts.sweep
    calls = 0

    async def deaf_sweep(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the housekeeping's first: it does not hear its cancellation
            sweeping.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)
        return await real_sweep(*args, **kwargs)

    c.scripts.sweep = deaf_sweep  # type: ignore[method-assign]
    task = await serving(c, stop)
    await asyncio.wait_for(sweeping.wait(), 2.0)

    async def broken() -> bool:
        raise RedisConnectionError("found by the requests")

    c.serve_batch = broken  # type: ignore[method-assign]
    await ends_by_itself(task, stop, 1.0)
    with pytest.raises(RedisConnectionError, match="found by the requests"):
        await task
    assert no_tasks_but(asyncio.current_task()) == []


async def test_stop_ends_serve_without_waiting_for_a_sweep(redis: Any, settings: Settings) -> None:
    c = Coordinator(redis, settings)
    stop = asyncio.Event()
    sweeping = asyncio.Event()
    real_sweep = c.scripts.sweep
    calls = 0

    async def hung_sweep(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            sweeping.set()
            await asyncio.sleep(3600)
        return await real_sweep(*args, **kwargs)

    c.scripts.sweep = hung_sweep  # type: ignore[method-assign]
    task = await serving(c, stop)
    await asyncio.wait_for(sweeping.wait(), 2.0)
    stop.set()
    await asyncio.wait_for(task, 1.0)  # the request side ends at its next wait, and ends it
    assert no_tasks_but(asyncio.current_task()) == []
