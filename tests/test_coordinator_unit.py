"""The coordinator's rules on fakeredis with a fake clock: deterministic, milliseconds each."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from messenger import wire
from messenger.coordinator import Coordinator
from messenger.crashes import RedisRestarted
from messenger.errors import LeaseLost
from messenger.keys import Keys
from messenger.protocol import (
    AliveEvent,
    Reply,
    ReplyEvent,
    Request,
    decode_event,
    encode_request,
    heartbeat_id,
    inbox_id,
    new_session_key,
)
from messenger.ratelimit import RateLimiter
from messenger.settings import Settings
from tests.fakes import T0, FakeClock


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url="redis://fake", node="test", prefix="u")


@pytest.fixture
async def coord(redis: Any, settings: Settings, clock: FakeClock) -> Coordinator:
    c = Coordinator(redis, settings, clock=clock)
    assert await c.try_acquire_lease()
    return c


def sid() -> str:
    return secrets.token_hex(16)


# sid -> the session's secret key, as its client holds it (a new one for every test).
KEY_OF: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _fresh_keys() -> None:
    KEY_OF.clear()


def inbox_of(session: str) -> str:
    return Keys("u").inbox(inbox_id(KEY_OF[session]))


def hb_of(session: str) -> str:
    return Keys("u").hb(heartbeat_id(KEY_OF[session]))


def deadline_of(session: str) -> str:
    """The session's member of the deadlines ZSET."""
    return Keys.deadline_member(session, heartbeat_id(KEY_OF[session]))


def entry(r: Request, sent_ms: int) -> str:
    """The queue entry a client would push: signed with its session's key."""
    if r.kind == "logon" and not r.key:
        r = replace(r, key=KEY_OF.setdefault(r.sid, new_session_key()))
    key = KEY_OF.get(r.sid) or new_session_key()  # an unknown session signs with anything
    return encode_request(replace(r, sent_ms=sent_ms), key)


async def handle(c: Coordinator, clock: FakeClock, r: Request, sent_ms: int | None = None) -> Any:
    return await c.handle(entry(r, clock.now if sent_ms is None else sent_ms))


async def expire(redis: Any, session: str) -> None:
    """What a heartbeat TTL running out does (fakeredis's TTLs follow the real clock)."""
    await redis.delete(hb_of(session))


_LISTENING: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_inboxes() -> AsyncIterator[None]:
    yield
    while _LISTENING:
        await _LISTENING.pop().aclose()


async def logon(
    c: Coordinator, clock: FakeClock, name: str, node: str, *, alive: bool = True
) -> tuple[str, Any]:
    """Log on like a client does: subscribed to its inbox first, unless it is to be dead."""
    s = sid()
    KEY_OF[s] = new_session_key()
    if alive:
        inbox = c.redis.pubsub()
        await inbox.subscribe(inbox_of(s))
        _LISTENING.append(inbox)
    return s, await handle(c, clock, Request("logon", sid(), s, name=name, node=node))


async def users(redis: Any) -> dict[str, str]:
    """The public user list, checked against the private indexes it must agree with."""
    k = Keys("u")
    public: dict[str, str] = await redis.hgetall(k.users)
    names: dict[str, str] = await redis.hgetall(k.names)
    sessions: dict[str, str] = await redis.hgetall(k.sessions)
    private = {name: json.loads(sessions[s])["node"] for name, s in names.items()}
    assert {name: json.loads(v)["node"] for name, v in public.items()} == private
    return private


# --- point 1: logon rules -------------------------------------------------------------------


async def test_logon_and_the_two_rejections(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    _, reply = await logon(coord, clock, "alice", "n1")
    assert reply == Reply.LOGGED_ON
    _, reply = await logon(coord, clock, "alice", "n2")
    assert reply == Reply.USER_EXISTS
    _, reply = await logon(coord, clock, "bob", "n1")
    assert reply == Reply.ALREADY_LOGGED_ON
    assert await users(redis) == {"alice": "n1"}


async def test_same_node_name_from_two_machines_only_one_wins(
    coord: Coordinator, clock: FakeClock
) -> None:
    replies = [(await logon(coord, clock, name, "shared"))[1] for name in ("alice", "bob")]
    assert replies == [Reply.LOGGED_ON, Reply.ALREADY_LOGGED_ON]


async def test_twenty_logons_of_one_name_give_one_logged_on(
    coord: Coordinator, clock: FakeClock
) -> None:
    results = await asyncio.gather(*(logon(coord, clock, "alice", f"n{i}") for i in range(20)))
    replies = [reply for _, reply in results]
    assert replies.count(Reply.LOGGED_ON) == 1
    assert replies.count(Reply.USER_EXISTS) == 19


async def test_a_crashed_clients_name_and_node_are_free_at_once(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    # Its connection is gone, so is its subscription: no need to wait for the deadline.
    await logon(coord, clock, "alice", "n1", alive=False)
    await logon(coord, clock, "bob", "n2", alive=False)
    assert (await logon(coord, clock, "carol", "n1"))[1] == Reply.LOGGED_ON
    assert (await logon(coord, clock, "bob", "n3"))[1] == Reply.LOGGED_ON
    assert await users(redis) == {"carol": "n1", "bob": "n3"}
    assert await redis.zcard(Keys("u").deadlines) == 2


async def test_two_coordinators_racing_on_one_redis_still_one_winner(
    redis: Any, settings: Settings, clock: FakeClock
) -> None:
    # Even a stale coordinator that still thinks it leads cannot break the rule: the check
    # and the write are one script, and a script without the lease does nothing.
    a = Coordinator(redis, settings, clock=clock)
    b = Coordinator(redis, settings, clock=clock)
    assert await a.try_acquire_lease()
    assert not await b.try_acquire_lease()
    assert (await logon(a, clock, "alice", "n1"))[1] == Reply.LOGGED_ON
    with pytest.raises(LeaseLost):
        await logon(b, clock, "alice", "n2")
    assert await users(redis) == {"alice": "n1"}


# --- point 2: messages ----------------------------------------------------------------------


async def test_message_sent_only_when_someone_listens(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2", alive=False)
    # bob's client is not subscribed (crashed): nobody got it, so it is not `sent`
    assert (
        await handle(coord, clock, Request("message-to", sid(), a, to="bob", text="x"))
        == Reply.RECEIVER_NOT_FOUND
    )
    inbox = redis.pubsub()
    await inbox.subscribe(inbox_of(b))
    assert (
        await handle(coord, clock, Request("message-to", sid(), a, to="bob", text="hi"))
        == Reply.SENT
    )
    assert (
        await handle(coord, clock, Request("message-to", sid(), a, to="carol", text="x"))
        == Reply.RECEIVER_NOT_FOUND
    )
    got = [m async for m in _drain(inbox)]
    assert [json.loads(m) for m in got] == [{"t": "msg", "from": "alice", "text": "hi"}]
    await inbox.aclose()


async def _drain(pubsub: Any) -> AsyncIterator[str]:
    # Subscribe confirmations come back as messages too; skip them, stop at the first silence.
    while True:
        msg = await pubsub.get_message(timeout=0.05)
        if msg is None:
            return
        if msg["type"] == "message":
            yield msg["data"]


async def test_reply_is_published_to_the_senders_inbox(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    session = sid()
    KEY_OF[session] = new_session_key()
    inbox = redis.pubsub()
    await inbox.subscribe(inbox_of(session))
    req = Request("logon", sid(), session, name="alice", node="n1")
    await handle(coord, clock, req)
    got = [json.loads(m) async for m in _drain(inbox)]
    assert got == [{"t": "reply", "req": req.req, "r": "logged-on"}]
    await inbox.aclose()


# --- point 3: unknown senders and fencing ---------------------------------------------------


async def test_a_request_of_a_session_nobody_knows_is_dropped_unanswered(
    coord: Coordinator, clock: FakeClock
) -> None:
    await logon(coord, clock, "bob", "n2")
    # Nothing can verify it, and there is no inbox to answer to.
    assert (
        await handle(coord, clock, Request("message-to", sid(), sid(), to="bob", text="x")) is None
    )


async def test_a_removed_sessions_late_request_is_told_it_is_not_logged_on(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    await logon(coord, clock, "bob", "n2")
    await expire(redis, a)
    clock.advance(10)
    assert [n for _, n, _ in await coord.sweep()] == ["alice"]
    fresh = Coordinator(redis, coord.settings, clock=clock, coordinator_id=coord.id)
    for c in (coord, fresh):  # whether it remembers alice or reads what Redis keeps of her
        late = Request("message-to", sid(), a, to="bob", text="x")
        assert await handle(c, clock, late) == Reply.YOU_ARE_NOT_LOGGED_ON


async def test_stale_session_cannot_revive_refresh_or_log_off_the_new_owner(
    coord: Coordinator, clock: FakeClock, redis: Any, settings: Settings
) -> None:
    old, _ = await logon(coord, clock, "alice", "n1")
    clock.advance(settings.heartbeat_ttl + 0.001)
    await expire(redis, old)
    assert [n for _, n, _ in await coord.sweep()] == ["alice"]
    new, reply = await logon(coord, clock, "alice", "n2")
    assert reply == Reply.LOGGED_ON
    deadline_before = await redis.zscore(Keys("u").deadlines, deadline_of(new))
    # the old client's heartbeat cannot bring its key back, and touches nothing else
    assert not await redis.pexpire(hb_of(old), settings.heartbeat_ttl_ms)
    assert not await redis.exists(hb_of(old))
    assert await redis.zscore(Keys("u").deadlines, deadline_of(new)) == deadline_before
    assert await redis.zscore(Keys("u").deadlines, deadline_of(old)) is None
    # the old client's logoff and messages are refused; the new owner stays
    assert await handle(coord, clock, Request("logoff", sid(), old)) == Reply.NOT_LOGGED_ON
    assert (
        await handle(coord, clock, Request("message-to", sid(), old, to="alice", text="x"))
        == Reply.YOU_ARE_NOT_LOGGED_ON
    )
    assert await users(redis) == {"alice": "n2"}


async def test_old_node_entry_is_not_removed_by_a_stale_session(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    old, _ = await logon(coord, clock, "alice", "n1")
    assert await handle(coord, clock, Request("logoff", sid(), old)) == Reply.LOGGED_OFF
    _new, _ = await logon(coord, clock, "bob", "n1")
    assert await handle(coord, clock, Request("logoff", sid(), old)) == Reply.NOT_LOGGED_ON
    assert await users(redis) == {"bob": "n1"}


# --- point 4: heartbeats and the sweep ------------------------------------------------------


async def test_sweep_logs_off_exactly_the_sessions_whose_heartbeat_key_expired(
    coord: Coordinator, clock: FakeClock, redis: Any, settings: Settings
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2")
    k = Keys("u")
    clock.advance(settings.heartbeat_ttl - 0.001)
    assert await coord.sweep() == []  # nobody is due yet: nothing looked at
    clock.advance(0.002)
    assert await redis.pexpire(hb_of(a), settings.heartbeat_ttl_ms)  # alice keeps beating
    await expire(redis, b)  # bob has stopped
    assert await coord.sweep() == [(b, "bob", "n2")]
    assert await users(redis) == {"alice": "n1"}
    assert not await redis.exists(hb_of(b))
    # alice is due again when her key would run out, not before
    due = await redis.zscore(k.deadlines, deadline_of(a))
    assert (
        clock.now + settings.heartbeat_ttl_ms - 100 < due <= clock.now + settings.heartbeat_ttl_ms
    )


async def test_sweep_before_deadline_removes_nothing(
    coord: Coordinator, clock: FakeClock, settings: Settings
) -> None:
    await logon(coord, clock, "alice", "n1")
    clock.advance(settings.heartbeat_ttl - 0.001)
    assert await coord.sweep() == []


async def test_clean_logoff_removes_at_once(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    assert await handle(coord, clock, Request("logoff", sid(), a)) == Reply.LOGGED_OFF
    assert await users(redis) == {}
    assert await redis.zcard(Keys("u").deadlines) == 0
    assert (await logon(coord, clock, "alice", "n2"))[1] == Reply.LOGGED_ON


async def test_the_lease_refresh_ticks_on_the_control_channel(
    coord: Coordinator, redis: Any
) -> None:
    control = redis.pubsub()
    await control.subscribe(Keys("u").control)
    await coord.refresh_lease()
    ticks = [decode_event(m) async for m in _drain(control)]
    assert ticks == [AliveEvent(coord.id, 2000 + 2 * 500 + 250)]  # lease TTL + two polls + margin
    await redis.set(Keys("u").lease, "another", px=5000)
    with pytest.raises(LeaseLost):
        await coord.refresh_lease()
    assert [m async for m in _drain(control)] == []  # and one without the lease is silent
    await control.aclose()


# --- point 5 / requests that outlive their sender -------------------------------------------


async def test_request_older_than_the_reply_timeout_is_not_applied(
    coord: Coordinator, clock: FakeClock, redis: Any, settings: Settings
) -> None:
    sent = clock.now
    clock.advance(settings.reply_timeout + 0.001)
    reply = await handle(
        coord, clock, Request("logon", sid(), sid(), name="alice", node="n1"), sent_ms=sent
    )
    assert reply == Reply.EXPIRED
    assert await users(redis) == {}


@pytest.mark.parametrize(
    ("wait_ms", "age_ms", "applied"),
    [
        (1000, 700, True),  # the reply still has time to reach the sender
        (1000, 900, False),  # too close to the sender's deadline: its reply could arrive too late
        (1000, 1500, False),  # the sender has given up
        (20000, 10000, True),  # a sender that waits longer than the coordinator's own timeout
    ],
)
async def test_the_senders_own_wait_bounds_when_a_request_applies(
    coord: Coordinator, clock: FakeClock, redis: Any, wait_ms: int, age_ms: int, applied: bool
) -> None:
    sent = clock.now
    clock.advance(age_ms / 1000)
    req = Request("logon", sid(), sid(), name="alice", node="n1", wait_ms=wait_ms)
    reply = await handle(coord, clock, req, sent_ms=sent)
    assert reply == (Reply.LOGGED_ON if applied else Reply.EXPIRED)
    assert (await users(redis) == {"alice": "n1"}) is applied


async def test_a_request_is_applied_at_most_once(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2")
    inbox = redis.pubsub()
    await inbox.subscribe(inbox_of(b))
    req = Request("message-to", sid(), a, to="bob", text="once")
    raw = entry(req, clock.now)
    assert await coord.handle(raw) == Reply.SENT
    assert await coord.handle(raw) == Reply.SENT  # replayed (e.g. taken over): same reply
    got = [json.loads(m)["text"] async for m in _drain(inbox)]
    assert got == ["once"]
    await inbox.aclose()


# --- point 6: malformed requests and logging ------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "garbage",
        "0" * 64 + json.dumps({"garbage": "yes"}),
        "0" * 64 + json.dumps({"k": "logon", "req": "x", "sid": "y", "t": "1"}),
        "0" * 64 + json.dumps({"k": "message-to", "req": "a" * 32, "sid": "b" * 32, "t": "1"}),
        "0" * 64 + "[" * 100_000,
    ],
)
async def test_malformed_request_is_logged_and_dropped(
    coord: Coordinator, clock: FakeClock, raw: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "messenger.coordinator")
    assert await coord.handle(raw) is None
    assert "dropped malformed request" in caplog.text
    assert (await logon(coord, clock, "alice", "n1"))[1] == Reply.LOGGED_ON


async def test_a_request_signed_with_another_key_is_dropped(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    forged = encode_request(Request("logoff", sid(), a, sent_ms=clock.now), new_session_key())
    assert await coord.handle(forged) is None
    assert await users(redis) == {"alice": "n1"}


async def test_each_change_of_the_list_is_logged(
    coord: Coordinator, clock: FakeClock, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "messenger.coordinator")
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2")
    await handle(coord, clock, Request("logoff", sid(), a))
    clock.advance(settings.heartbeat_ttl + 1)
    await expire(coord.redis, b)
    await coord.sweep()
    lines = [r.getMessage() for r in caplog.records if "list is now" in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == [
        "list is now: [alice@n1]",
        "list is now: [alice@n1, bob@n2]",
        "list is now: [bob@n2]",
        "list is now: []",
    ]


# --- point 7: Redis is the source of truth --------------------------------------------------


async def test_a_new_coordinator_resumes_from_redis(
    redis: Any, settings: Settings, clock: FakeClock
) -> None:
    first = Coordinator(redis, settings, clock=clock)
    assert await first.try_acquire_lease()
    a, _ = await logon(first, clock, "alice", "n1")
    b, _ = await logon(first, clock, "bob", "n2")
    await redis.delete(Keys("u").lease)  # the first one died; its lease expired
    second = Coordinator(redis, settings, clock=clock)
    assert await second.try_acquire_lease()
    assert (await logon(second, clock, "alice", "n3"))[1] == Reply.USER_EXISTS
    # bob's client died with the first coordinator: swept, not a ghost; alice kept beating
    clock.advance(settings.heartbeat_ttl + 0.001)
    assert await redis.pexpire(hb_of(a), settings.heartbeat_ttl_ms)
    await expire(redis, b)
    assert [n for _, n, _ in await second.sweep()] == ["bob"]
    assert await users(redis) == {"alice": "n1"}
    # and the first can no longer act
    with pytest.raises(LeaseLost):
        await first.sweep()


async def test_a_coordinator_that_lost_its_lease_stands_by_and_returns(
    redis: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "messenger.coordinator")
    fast = Settings(
        redis_url="redis://fake", node="t", prefix="u", lease_ttl=0.2, sweep_interval=0.02
    )
    c = Coordinator(redis, fast)
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop))
    k = Keys("u")

    async def holder() -> str | None:
        value: str | None = await redis.get(k.lease)
        return value

    async def until(predicate: Any) -> None:
        while not await predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(until(lambda: _eq(holder(), c.id)), 2)
    await asyncio.wait_for(until(_async(lambda: c.active)), 2)
    await redis.set(k.lease, "usurper", px=300)  # another took over while this one was paused
    await asyncio.wait_for(until(lambda: _eq(holder(), c.id)), 3)  # and came back after it
    assert "lost the lease; standing by" in caplog.text
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 2)


def _async(f: Any) -> Any:
    async def check() -> bool:
        return bool(f())

    return check


async def _eq(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def test_the_first_deadline_uses_the_clients_own_ttl(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    session = sid()
    req = Request("logon", sid(), session, name="alice", node="n1", ttl_ms=10_000)
    assert await handle(coord, clock, req) == Reply.LOGGED_ON
    assert await redis.zscore(Keys("u").deadlines, deadline_of(session)) == T0 + 10_000
    _, reply = await logon(coord, clock, "bob", "n2")  # no ttl said: the coordinator's own
    assert reply == Reply.LOGGED_ON
    bob = await redis.hget(Keys("u").names, "bob")
    assert await redis.zscore(Keys("u").deadlines, deadline_of(bob)) == T0 + 3_000


async def test_requests_a_dead_coordinator_left_in_flight_are_served_once(
    redis: Any, settings: Settings, clock: FakeClock
) -> None:
    k = Keys("u")
    first = Coordinator(redis, settings, clock=clock)
    assert await first.try_acquire_lease()
    a, _ = await logon(first, clock, "alice", "n1")
    b, _ = await logon(first, clock, "bob", "n2")
    inbox = redis.pubsub()
    await inbox.subscribe(inbox_of(b))
    # Two requests reach the first coordinator; it applies one, then dies before finishing.
    for text in ("applied", "unread"):
        message = Request("message-to", sid(), a, to="bob", text=text)
        await redis.rpush(k.requests, entry(message, clock.now))
    _, batch = await first.scripts.take(first.id, most=10, budget=1 << 20, longest=1 << 20)
    assert len(batch) == 2
    assert await first.handle(batch[0]) == Reply.SENT
    await redis.delete(k.lease)  # its lease runs out

    second = Coordinator(redis, settings, clock=clock)
    assert await second.try_acquire_lease()
    assert await second.serve_batch()
    got = [json.loads(m)["text"] async for m in _drain(inbox)]
    assert got == ["applied", "unread"]  # each exactly once
    assert await redis.llen(k.requests) == 0
    assert await redis.llen(k.inflight) == 0
    assert not await second.serve_batch()  # nothing left
    await inbox.aclose()


async def test_a_batch_is_bounded_and_oversized_entries_are_dropped_unread(
    coord: Coordinator, redis: Any
) -> None:
    k = Keys("u")
    await redis.rpush(k.requests, "x" * 5000, *[f"e{i}" for i in range(10)])
    dropped, batch = await coord.scripts.take(coord.id, most=4, budget=1 << 20, longest=1000)
    assert (dropped, batch) == (1, ["e0", "e1", "e2", "e3"])
    await coord.scripts.finish(coord.id, 4)
    dropped, batch = await coord.scripts.take(coord.id, most=100, budget=8, longest=1000)
    assert (dropped, batch) == (0, ["e4", "e5", "e6", "e7"])  # stops once it has 8 bytes
    assert await redis.llen(k.requests) == 2


@pytest.mark.parametrize("garbage", ["not json", "[]", '{"name": 5}', "{}"])
async def test_a_corrupt_session_entry_does_not_stop_the_sweep(
    coord: Coordinator, clock: FakeClock, redis: Any, settings: Settings, garbage: str
) -> None:
    k = Keys("u")
    bad, _ = await logon(coord, clock, "mallory", "n9")
    await redis.hset(k.sessions, bad, garbage)
    a, _ = await logon(coord, clock, "alice", "n1")
    await expire(redis, bad)  # its deadline names its key, so the sweep needs no record
    await expire(redis, a)
    clock.advance(settings.heartbeat_ttl + 0.001)
    removed = await coord.sweep()
    assert sorted(n for _, n, _ in removed) == ["?", "alice"]
    assert await redis.hlen(k.sessions) == 0
    assert await redis.zcard(k.deadlines) == 0
    assert (await logon(coord, clock, "mallory", "n9"))[1] == Reply.LOGGED_ON


async def test_a_name_pointing_at_a_removed_session_is_not_a_receiver(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    k = Keys("u")
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2")  # bob's client listens...
    await redis.hdel(k.sessions, b)  # ...but his session is gone; the index is stale
    req = Request("message-to", sid(), a, to="bob", text="x")
    assert await handle(coord, clock, req) == Reply.RECEIVER_NOT_FOUND


async def test_a_standby_that_stops_does_not_stop_the_clients(
    redis: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "messenger.coordinator")
    k = Keys("u")
    await redis.set(k.lease, "the-active-one", px=60_000)
    control = redis.pubsub()
    await control.subscribe(k.control)
    await control.get_message(timeout=1)  # the subscribe confirmation
    standby = Coordinator(redis, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(standby.run(stop))
    while "waiting as standby" not in caplog.text:  # it tried the lease and stands by
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert not standby.active
    assert await control.get_message(timeout=0.2) is None  # no `stopping` for anyone
    assert await redis.get(k.lease) == "the-active-one"
    await control.aclose()


async def test_the_active_one_that_stops_tells_the_clients(redis: Any, settings: Settings) -> None:
    k = Keys("u")
    control = redis.pubsub()
    await control.subscribe(k.control)
    await control.get_message(timeout=1)
    active = Coordinator(redis, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(active.run(stop))
    while not await redis.exists(k.lease):
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 2)
    events = [json.loads(m)["t"] async for m in _drain(control)]
    assert events[-1] == "stopping"  # after the alive ticks of a coordinator that was serving
    assert not await redis.exists(k.lease)
    await control.aclose()


async def test_the_active_one_that_stops_with_a_standby_hands_over_silently(
    redis: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERMed coordinator with a standby alive tells the clients nothing: the standby takes
    the lease at its next poll, and the clients only see its alive ticks."""
    caplog.set_level(logging.INFO, "messenger.coordinator")
    k = Keys("u")
    control = redis.pubsub()
    await control.subscribe(k.control)
    await control.get_message(timeout=1)
    active, standby = Coordinator(redis, settings), Coordinator(redis, settings)
    stop_active, stop_standby = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(active.run(stop_active))
    while await redis.get(k.lease) != active.id:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(standby.run(stop_standby))
    while "waiting as standby" not in caplog.text:
        await asyncio.sleep(0.01)
    assert await redis.zscore(k.coordinators, standby.id) is not None  # it says it is there
    stop_active.set()
    await asyncio.wait_for(first, 2)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.lease_poll + 2
    while await redis.get(k.lease) != standby.id:
        assert loop.time() < deadline, "the standby did not take over within a poll"
        await asyncio.sleep(0.01)
    events = [json.loads(m) async for m in _drain(control)]
    assert "stopping" not in [e["t"] for e in events], events
    assert events[-1] == {"t": "alive", "coordinator": standby.id, "within": "3250"}
    assert "a standby takes over" in caplog.text
    stop_standby.set()
    await asyncio.wait_for(second, 2)
    # Now the last one stops, with nobody left: the clients are told.
    assert [json.loads(m)["t"] async for m in _drain(control)][-1] == "stopping"
    assert await redis.zcard(k.coordinators) == 0
    await control.aclose()


async def _retry_delays(
    coord: Coordinator, caplog: pytest.LogCaptureFixture, answers: list[bool], seconds: float
) -> list[str]:
    """Run `coord` for `seconds` while its lease script answers `answers`, then fails with a
    lost connection; return the delays its log lines announce."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def lease_hold(*args: Any) -> bool:
        if answers:
            return answers.pop(0)
        raise RedisConnectionError("Connection refused")

    coord.scripts.lease_hold = lease_hold  # type: ignore[method-assign,assignment]
    stop = asyncio.Event()
    task = asyncio.create_task(coord.run(stop))
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(task, 5)
    return [
        r.message.rsplit("retrying in ", 1)[1] for r in caplog.records if "retrying" in r.message
    ]


async def test_after_an_outage_the_coordinator_retries_fast_for_a_heartbeat_ttl(
    redis: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answered (here: the lease is another's), then went away: the sessions live for a
    heartbeat TTL, so the coordinator comes back at once rather than backing off."""
    delays = await _retry_delays(Coordinator(redis, settings), caplog, [False], 1.6)
    assert len(delays) >= 4, delays
    assert set(delays) == {"0.25 s"}, delays


async def test_a_redis_that_never_answered_is_retried_with_back_off(
    redis: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    delays = await _retry_delays(Coordinator(redis, settings), caplog, [], 2.0)
    assert delays[:3] == ["0.25 s", "0.5 s", "1 s"], delays


async def test_the_sweep_reads_no_record_of_a_live_session(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """Every live session is due about every TTL - interval: the sweep looks at its heartbeat
    key, named in its deadline, without reading (and decoding) its record. Here the records
    name no heartbeat key at all, and the live sessions stay all the same."""
    k = Keys("u")
    sessions = [(await logon(coord, clock, f"u{i}", f"n{i}"))[0] for i in range(20)]
    for s in sessions:
        record = json.loads(await redis.hget(k.sessions, s))
        del record["hb"]
        await redis.hset(k.sessions, s, json.dumps(record))
    clock.advance(coord.settings.heartbeat_ttl + 0.001)  # all due; their keys live (real TTLs)
    assert await coord.sweep() == []
    for s in sessions:  # each due again when its key would expire
        assert await redis.zscore(k.deadlines, deadline_of(s)) > clock.now
    assert len(await users(redis)) == 20


async def test_a_deadline_of_an_older_version_is_still_swept(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """Deadlines written before they named the heartbeat key (member = the sid) still work."""
    k = Keys("u")
    a, _ = await logon(coord, clock, "alice", "n1")
    score = await redis.zscore(k.deadlines, deadline_of(a))
    await redis.zrem(k.deadlines, deadline_of(a))
    await redis.zadd(k.deadlines, {a: score})
    clock.advance(coord.settings.heartbeat_ttl + 0.001)
    assert await coord.sweep() == []  # its key lives: looked at through its record
    assert await redis.zscore(k.deadlines, a) > clock.now
    await expire(redis, a)
    clock.advance(coord.settings.heartbeat_ttl + 0.001)
    assert [name for _, name, _ in await coord.sweep()] == ["alice"]
    assert await redis.zcard(k.deadlines) == 0


# --- the crash fast path (messenger/crashes.py) ---------------------------------------------


async def crash(inbox: Any) -> None:
    """What Redis does when a client's connection closes: its subscriptions go at once."""
    _LISTENING.remove(inbox)
    await inbox.unsubscribe()  # fakeredis keeps a closed pubsub's subscriptions
    await inbox.aclose()


async def test_a_client_whose_connection_is_gone_is_logged_off_at_once(
    coord: Coordinator, clock: FakeClock, redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "messenger.coordinator")
    a, _ = await logon(coord, clock, "alice", "n1")
    alice = _LISTENING[-1]
    b, _ = await logon(coord, clock, "bob", "n2")
    assert await coord.remove_crashed() == []  # both seen with their subscriber
    await crash(alice)
    assert await coord.remove_crashed() == [(a, "alice", "n1")]
    assert await users(redis) == {"bob": "n2"}  # well before any heartbeat deadline
    assert await redis.get(Keys("u").gone(a)) is not None  # late requests still get an answer
    assert "alice@n1 lost its connection (a crash): logged off" in caplog.text
    assert (await logon(coord, clock, "alice", "n1"))[1] == Reply.LOGGED_ON  # at once, again
    assert b in await redis.hkeys(Keys("u").sessions)


async def test_a_hung_client_keeps_its_subscription_and_its_session(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """Hung, slow or cut off, a client's connection is still open on Redis's side: only its
    heartbeat deadline removes it, never the fast path."""
    a, _ = await logon(coord, clock, "alice", "n1")
    for _ in range(3):
        clock.advance(1.0)
        assert await coord.remove_crashed() == []
    assert await users(redis) == {"alice": "n1"}
    await expire(redis, a)
    clock.advance(coord.settings.heartbeat_ttl + 0.001)
    assert [name for _, name, _ in await coord.sweep()] == ["alice"]


async def test_an_inbox_never_seen_subscribed_is_left_to_the_deadline(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """After Redis restarts, every inbox is empty until its client subscribes again: a session
    counts as crashed only once its subscriber was seen since the coordinator (re)connected."""
    a, _ = await logon(coord, clock, "alice", "n1")
    await coord.crashes.load(redis, Keys("u"), "u:canary:test")  # what a (re)activation does
    await crash(_LISTENING[-1])  # the subscriber is gone before this coordinator saw it
    assert await coord.remove_crashed() == []
    assert await users(redis) == {"alice": "n1"}
    await expire(redis, a)
    clock.advance(coord.settings.heartbeat_ttl + 0.001)
    assert [name for _, name, _ in await coord.sweep()] == ["alice"]


async def test_when_redis_lost_its_connections_nobody_is_judged_crashed(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """Redis restarted and redis-py reconnected quietly: every inbox is empty, and so is the
    coordinator's own canary. The check says so (a ConnectionError: serve afresh) instead of
    logging everyone off."""
    await coord.crashes.load(redis, Keys("u"), Keys("u").canary(coord.id))
    await logon(coord, clock, "alice", "n1")
    assert await coord.remove_crashed() == []  # seen subscribed
    await crash(_LISTENING[-1])
    canary = coord.crashes._canary
    assert canary is not None
    await canary.unsubscribe()  # what a restart does to it
    with pytest.raises(RedisRestarted):
        await coord.remove_crashed()
    assert await users(redis) == {"alice": "n1"}
    await coord.crashes.close()


async def test_after_redis_was_away_the_sessions_get_that_time_back(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """Nobody could refresh a heartbeat key while Redis was away: each key still alive gets the
    time of the outage back, none is made, and none when only this coordinator was cut off."""
    k = Keys("u")
    await coord.crashes.load(redis, k, k.canary(coord.id))
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2")
    await expire(redis, b)  # bob's key expired during the outage: it stays gone
    await redis.pexpire(hb_of(a), 1000)

    coord._outage_began = time.monotonic() - 60  # only this coordinator was cut off
    await coord._give_outage_back()
    assert await redis.pttl(hb_of(a)) <= 1000

    canary = coord.crashes._canary
    assert canary is not None
    await canary.unsubscribe()  # Redis restarted: it lost every connection, ours too
    coord._outage_began = time.monotonic() - 1.5
    await coord._give_outage_back()
    assert 2000 < await redis.pttl(hb_of(a)) <= 2500
    assert not await redis.exists(hb_of(b))
    coord._outage_began = time.monotonic() - 60  # a long one: at most a heartbeat TTL back
    await coord._give_outage_back()
    assert await redis.pttl(hb_of(a)) <= 2500 + coord.settings.heartbeat_ttl_ms
    await coord.crashes.close()


async def test_a_session_that_subscribed_again_or_left_is_not_removed_twice(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    await coord.remove_crashed()
    suspects = [(a, inbox_of(a))]
    # The script checks again: the subscriber is there, so nothing happens.
    assert await coord.scripts.crashed(coord.id, suspects) == [(a, "alive", "", "")]
    await handle(coord, clock, Request("logoff", sid(), a))
    assert await coord.scripts.crashed(coord.id, suspects) == [(a, "gone", "", "")]
    assert await coord.remove_crashed() == []


async def test_only_the_lease_holder_removes_crashed_sessions(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(coord, clock, "alice", "n1")
    await redis.set(Keys("u").lease, "another", px=60_000)
    with pytest.raises(LeaseLost):
        await coord.scripts.crashed(coord.id, [(a, inbox_of(a))])


# --- floods: a limit per session ------------------------------------------------------------


@pytest.fixture
async def strict(redis: Any, clock: FakeClock) -> Coordinator:
    """A coordinator that allows each session 3 requests at once and then 2 per second."""
    limited = Settings(redis_url="redis://fake", node="t", prefix="u", rate_limit=2, rate_burst=3)
    c = Coordinator(redis, limited, clock=clock)
    assert await c.try_acquire_lease()
    return c


async def test_a_session_past_its_limit_is_told_and_nothing_is_applied(
    strict: Coordinator, clock: FakeClock, redis: Any
) -> None:
    a, _ = await logon(strict, clock, "alice", "n1")  # a logon does not count...
    b, _ = await logon(strict, clock, "bob", "n2")
    alice, bob = redis.pubsub(), redis.pubsub()
    await alice.subscribe(inbox_of(a))
    await bob.subscribe(inbox_of(b))
    requests = [Request("message-to", sid(), a, to="bob", text=f"m{i}") for i in range(5)]
    replies = [await handle(strict, clock, r) for r in requests]
    # ...so alice's whole burst is hers
    assert replies == [Reply.SENT] * 3 + [Reply.RATE_LIMITED] * 2
    told = [decode_event(m) async for m in _drain(alice)]
    assert told == [ReplyEvent(r.req, reply) for r, reply in zip(requests, replies, strict=True)]
    assert [json.loads(m)["text"] async for m in _drain(bob)] == ["m0", "m1", "m2"]
    assert not await redis.exists(Keys("u").done(requests[3].req))  # not applied: no done key
    assert strict.limited.total == 2
    # bob has his own allowance, and alice gets hers back at the rate
    assert await handle(strict, clock, Request("message-to", sid(), b, to="alice", text="x")) == (
        Reply.SENT
    )
    clock.advance(0.5)
    assert await handle(strict, clock, Request("message-to", sid(), a, to="bob", text="again")) == (
        Reply.SENT
    )
    assert await handle(strict, clock, Request("logoff", sid(), a)) == Reply.RATE_LIMITED
    await alice.aclose()
    await bob.aclose()


async def test_forged_requests_do_not_use_up_a_sessions_allowance(
    strict: Coordinator, clock: FakeClock
) -> None:
    a, _ = await logon(strict, clock, "alice", "n1")
    await logon(strict, clock, "bob", "n2")
    for _ in range(10):  # alice's sid, signed with another key: dropped before any counting
        forged = Request("message-to", sid(), a, to="bob", text="x", sent_ms=clock.now)
        assert await strict.handle(encode_request(forged, new_session_key())) is None
    req = Request("message-to", sid(), a, to="bob", text="mine")
    assert await handle(strict, clock, req) == Reply.SENT
    assert strict.limited.total == 0


async def test_rate_limited_sessions_make_one_log_line_per_period(
    strict: Coordinator, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "messenger.coordinator")
    a, _ = await logon(strict, clock, "alice", "n1")
    b, _ = await logon(strict, clock, "bob", "n2")

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("rate-")]

    for _ in range(50):
        await handle(strict, clock, Request("message-to", sid(), a, to="bob", text="x"))
    for _ in range(5):
        await handle(strict, clock, Request("logoff", sid(), b))  # bob's 3 free, then 2 refused
    assert lines() == [f"rate-limited 1 requests of 1 sessions (most: session {a[:8]} x1)"]
    assert strict.limited.total == 47 + 2
    clock.advance(strict.limited.period - 0.001)
    strict.limited.report()
    assert len(lines()) == 1  # still within the period
    clock.advance(0.001)
    strict.limited.report()
    assert lines()[1:] == [f"rate-limited 48 requests of 2 sessions (most: session {a[:8]} x46)"]
    strict.limited.report()
    assert len(lines()) == 2  # nothing new: nothing said


async def test_garbage_of_every_kind_makes_a_bounded_number_of_log_lines(
    coord: Coordinator, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "messenger.coordinator")
    for i in range(200):  # each with its own session, kind or time: each a reason of its own
        await coord.handle(entry(Request("logoff", sid(), sid()), clock.now))
        await coord.handle("0" * 64 + json.dumps({"k": f"kind{i}", "req": "a", "sid": "b"}))
        await coord.handle("0" * 64 + json.dumps({"k": "logoff", "req": sid(), "sid": sid()}))
    assert coord.dropped.total == 600
    coord.dropped.report(force=True)
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) <= 1 + coord.dropped.REASONS + 1, lines  # the first one, then a period's
    assert sum(int(line.split(" x")[1].split(":")[0]) for line in lines) == 600


async def test_a_batch_reads_its_sessions_keys_in_two_round_trips(
    coord: Coordinator, clock: FakeClock, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    k = Keys("u")
    a, _ = await logon(coord, clock, "alice", "n1")
    await logon(coord, clock, "bob", "n2")
    gone, _ = await logon(coord, clock, "carol", "n3")
    await handle(coord, clock, Request("logoff", sid(), gone))
    fresh = Coordinator(redis, coord.settings, clock=clock, coordinator_id=coord.id)  # no cache
    listening = {s: redis.pubsub() for s in (a, gone)}
    for s, inbox in listening.items():
        await inbox.subscribe(inbox_of(s))
    dave = sid()
    KEY_OF[dave] = new_session_key()
    batch = [entry(Request("message-to", sid(), a, to="bob", text="hi"), clock.now)]
    batch += [entry(Request("logoff", sid(), sid()), clock.now) for _ in range(90)]  # unknown
    batch += [
        entry(Request("message-to", sid(), gone, to="bob", text="late"), clock.now),
        entry(Request("logon", sid(), dave, name="dave", node="n4"), clock.now),
        entry(Request("logoff", sid(), dave), clock.now),  # a session this batch made
    ]
    await redis.rpush(k.requests, *batch)
    commands: Counter[str] = Counter()
    run = redis.execute_command

    async def counted(*args: Any, **kwargs: Any) -> Any:
        commands[str(args[0]).upper()] += 1
        return await run(*args, **kwargs)

    monkeypatch.setattr(redis, "execute_command", counted)
    assert await fresh.serve_batch()
    assert (commands["HGET"], commands["GET"], commands["HMGET"], commands["MGET"]) == (0, 0, 1, 1)
    assert fresh.dropped.total == 90
    assert [json.loads(m)["r"] async for m in _drain(listening[a])] == ["sent"]
    late = [json.loads(m)["r"] async for m in _drain(listening[gone])]
    assert late == ["you-are-not-logged-on"]
    assert await users(redis) == {"alice": "n1", "bob": "n2"}  # dave came and went
    for inbox in listening.values():
        await inbox.aclose()


async def test_the_refusals_of_a_batch_go_out_in_one_round_trip(
    strict: Coordinator, clock: FakeClock, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = await logon(strict, clock, "alice", "n1")
    await logon(strict, clock, "bob", "n2")
    inbox = redis.pubsub()
    await inbox.subscribe(inbox_of(a))
    requests = [Request("message-to", sid(), a, to="bob", text="x") for _ in range(50)]
    await redis.rpush(Keys("u").requests, *(entry(r, clock.now) for r in requests))

    async def one_by_one(*_args: Any) -> None:
        raise AssertionError("a PUBLISH round trip per refusal")

    monkeypatch.setattr(redis, "publish", one_by_one)
    assert await strict.serve_batch()
    replies = [json.loads(m) async for m in _drain(inbox)]
    assert [r["r"] for r in replies] == ["sent"] * 3 + ["rate-limited"] * 47
    assert {r["req"] for r in replies} == {r.req for r in requests}
    await inbox.aclose()


async def test_a_batch_is_applied_in_one_round_trip_in_order(
    coord: Coordinator, clock: FakeClock, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts of a batch go as one pipeline, not one awaited EVALSHA a request; their
    effects are those of applying the requests one after the other."""
    a, _ = await logon(coord, clock, "alice", "n1")
    b, _ = await logon(coord, clock, "bob", "n2")
    c, _ = await logon(coord, clock, "carol", "n3")
    bob = redis.pubsub()
    await bob.subscribe(inbox_of(b))
    # Every script used once already, so none has to be loaded during the batch.
    assert await handle(coord, clock, Request("message-to", sid(), c, to="bob", text="w")) == "sent"
    assert await handle(coord, clock, Request("logoff", sid(), c)) == "logged-off"
    texts = [f"t{i}" for i in range(30)]  # within alice's burst: none is rate-limited
    requests = [Request("message-to", sid(), a, to="bob", text=t) for t in texts]
    requests.append(Request("logoff", sid(), a))
    requests.append(Request("message-to", sid(), a, to="bob", text="after logoff"))
    await redis.rpush(Keys("u").requests, *(entry(r, clock.now) for r in requests))
    alone, pipelines = Counter[str](), [0]
    run, pipeline = redis.execute_command, wire.pipeline

    async def counted(*args: Any, **kwargs: Any) -> Any:
        alone[str(args[0]).upper()] += 1
        return await run(*args, **kwargs)

    def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipelines[0] += 1
        return pipeline(*args, **kwargs)

    monkeypatch.setattr(redis, "execute_command", counted)
    monkeypatch.setattr(wire, "pipeline", counted_pipeline)
    assert await coord.serve_batch()
    # Nothing known in flight yet: one script takes the batch, one applies it (and forgets it,
    # and takes the next) — not one script a request (32), nor a take and a finish beside.
    assert alone["EVALSHA"] == 0, alone
    assert pipelines[0] == 2
    got = [json.loads(m) async for m in _drain(bob)]
    assert [m["text"] for m in got if m["t"] == "msg"] == ["w", *texts]  # in order, not the last
    assert await users(redis) == {"bob": "n2"}
    assert await redis.llen(Keys("u").inflight) == 0
    # Idle, it knows that nothing is in flight: a request is waited for (BLMOVE, which moves it
    # into flight and returns it), then applied in one round trip.
    await redis.rpush(Keys("u").requests, entry(Request("logoff", sid(), b), clock.now))
    assert await coord.serve_batch() is False
    await coord._wait_for_requests(0.01)
    pipelines[0] = 0
    assert await coord.serve_batch()
    assert pipelines[0] == 1
    assert await users(redis) == {}
    assert await redis.llen(Keys("u").inflight) == 0
    await bob.aclose()


async def test_a_logon_in_a_batch_never_replaces_a_live_sessions_key(
    coord: Coordinator, clock: FakeClock, redis: Any
) -> None:
    """A forged logon that reuses alice's session id with a key of its own, in the same batch
    as alice's next message: alice's message still verifies with her key and is sent."""
    a, _ = await logon(coord, clock, "alice", "n1")
    await logon(coord, clock, "bob", "n2")
    alice = redis.pubsub()
    await alice.subscribe(inbox_of(a))
    forged_key = new_session_key()
    forged = Request("logon", sid(), a, name="mallory", node="n9", key=forged_key)
    real = Request("message-to", sid(), a, to="bob", text="still me")
    await redis.rpush(
        Keys("u").requests,
        encode_request(replace(forged, sent_ms=clock.now), forged_key),
        entry(real, clock.now),
    )
    assert await coord.serve_batch()
    replies = {m["req"]: m["r"] for m in [json.loads(x) async for x in _drain(alice)]}
    assert replies[real.req] == "sent"
    assert await users(redis) == {"alice": "n1", "bob": "n2"}
    await alice.aclose()


async def test_a_busy_coordinator_needs_one_round_trip_a_batch(
    coord: Coordinator, clock: FakeClock, redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script that applies a batch takes the next one: 250 queued requests (three batches)
    cost four scripts from a cold start (the first take, then one a batch), every reply once."""
    a, _ = await logon(coord, clock, "alice", "n1")
    await logon(coord, clock, "bob", "n2")
    coord.limiter = RateLimiter(1e9, 1e9)  # a queue of one sender's requests, none refused
    alice = redis.pubsub()
    await alice.subscribe(inbox_of(a))
    requests = [Request("message-to", sid(), a, to="bob", text=f"t{i}") for i in range(250)]
    await redis.rpush(Keys("u").requests, *(entry(r, clock.now) for r in requests))
    calls, pipeline = [0], wire.pipeline

    def counted_pipeline(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return pipeline(*args, **kwargs)

    monkeypatch.setattr(wire, "pipeline", counted_pipeline)
    while await coord.serve_batch():
        pass
    assert calls[0] == 4
    replies = [json.loads(m) async for m in _drain(alice)]
    assert sorted(r["req"] for r in replies) == sorted(r.req for r in requests)
    assert {r["r"] for r in replies} == {"sent"}
    assert await redis.llen(Keys("u").requests) == await redis.llen(Keys("u").inflight) == 0
    await alice.aclose()


async def test_a_request_that_fails_in_redis_leaves_the_rest_of_its_batch(
    coord: Coordinator, clock: FakeClock, redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """One request of a batch failing inside the script (here bob's logon meets a node index of
    the wrong type) is logged and left unanswered; the batch's other requests still apply."""
    a, _ = await logon(coord, clock, "alice", "n1")
    await logon(coord, clock, "carol", "n3")
    alice = redis.pubsub()
    await alice.subscribe(inbox_of(a))
    await redis.delete(Keys("u").nodes)
    await redis.set(Keys("u").nodes, "not a hash")
    bob_key = new_session_key()
    bob = Request("logon", sid(), sid(), name="bob", node="n2", key=bob_key)
    message = Request("message-to", sid(), a, to="carol", text="hi")
    await redis.rpush(
        Keys("u").requests,
        encode_request(replace(bob, sent_ms=clock.now), bob_key),
        entry(message, clock.now),
    )
    with caplog.at_level(logging.ERROR):
        assert await coord.serve_batch()
    assert f"request {bob.req[:8]} (logon) failed in Redis: WRONGTYPE" in caplog.text
    replies = {m["req"]: m["r"] for m in [json.loads(x) async for x in _drain(alice)]}
    assert replies == {message.req: "sent"}
    assert await redis.llen(Keys("u").inflight) == 0  # done with, the failed one too
    await alice.aclose()
