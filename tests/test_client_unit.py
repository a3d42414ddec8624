"""Client and coordinator together in one event loop on fakeredis, with short timings."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from messenger import local
from messenger.client import Client, UserList, format_message, list_users
from messenger.coordinator import Coordinator
from messenger.errors import (
    ClientFailure,
    ConfigError,
    InvalidInput,
    NoConnection,
    NoResponse,
    Rejected,
)
from messenger.keys import Keys
from messenger.protocol import AliveEvent, MessageEvent, PresenceEvent, Reply, encode_event
from messenger.settings import Settings

FAST = {
    "heartbeat_interval": 0.05,
    "heartbeat_ttl": 0.3,
    "reply_timeout": 1.0,  # past the coordinator grace (0.85 s), as the defaults are
    "lease_ttl": 0.4,
    "sweep_interval": 0.02,
}


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def settings(tmp_path: Path, node: str) -> Settings:
    return Settings(redis_url="redis://fake", node=node, prefix="c", runtime_dir=tmp_path, **FAST)  # type: ignore[arg-type]


def redis_of(server: fakeredis.FakeServer) -> Any:
    return fakeredis.FakeAsyncRedis(server=server, decode_responses=True)


@pytest.fixture
async def coordinator(server: fakeredis.FakeServer, tmp_path: Path) -> AsyncIterator[Coordinator]:
    c = Coordinator(redis_of(server), settings(tmp_path, "server"))
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop))
    await asyncio.wait_for(_until(lambda: c.redis.exists(Keys("c").lease)), 2)
    yield c
    stop.set()
    await asyncio.wait_for(task, 5)
    await c.redis.aclose()


async def _until(check: Any) -> None:
    while not await check():
        await asyncio.sleep(0.01)


class Node:
    def __init__(self, server: fakeredis.FakeServer, tmp_path: Path, name: str, node: str):
        self.lines: list[str] = []
        self.client = Client(
            redis_of(server), settings(tmp_path, node), name, out=self.lines.append
        )
        self.serving: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        await self.client.logon()
        await self.client.start_serving()
        self.serving = asyncio.ensure_future(self.client.finished)

    async def result(self) -> Any:
        assert self.serving is not None
        return await asyncio.wait_for(self.serving, 5)


@pytest.fixture
async def nodes(server: fakeredis.FakeServer, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Node] = []

    def make(name: str, node: str) -> Node:
        n = Node(server, tmp_path, name, node)
        made.append(n)
        return n

    yield make
    for n in made:
        n.client.stop(None)
        with contextlib.suppress(Exception):
            await n.client.close()


def _listed(got: UserList) -> tuple[list[tuple[str, str]], int]:
    return [(u.name, u.node) for u in got.users], got.unreadable


async def test_logon_message_logoff(coordinator: Coordinator, nodes: Any) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    assert await alice.client.send("bob", "hi \x1b[2J") == Reply.SENT
    await asyncio.wait_for(_until(_async(lambda: bool(bob.lines))), 2)
    assert (
        bob.lines == [format_message("alice", "hi \x1b[2J")] == ["Message from alice: hi \\x1b[2J"]
    )
    assert await alice.client.send("carol", "x") == Reply.RECEIVER_NOT_FOUND
    assert _listed(await list_users(coordinator.redis, "c")) == (
        [("alice", "n1"), ("bob", "n2")],
        0,
    )
    assert await bob.client.logoff() == Reply.LOGGED_OFF
    assert await bob.result() is None
    assert _listed(await list_users(coordinator.redis, "c")) == ([("alice", "n1")], 0)


def _async(f: Any) -> Any:
    async def check() -> bool:
        return bool(f())

    return check


async def test_rejected_logons(coordinator: Coordinator, nodes: Any) -> None:
    await nodes("alice", "n1").start()
    with pytest.raises(Rejected, match=Reply.USER_EXISTS):
        await nodes("alice", "n2").client.logon()
    with pytest.raises(Rejected, match=Reply.ALREADY_LOGGED_ON):
        await nodes("bob", "n1").client.logon()


async def test_bad_input_is_refused_before_anything_is_sent(
    coordinator: Coordinator, nodes: Any
) -> None:
    with pytest.raises(InvalidInput):
        nodes("bad name", "n1")
    alice = nodes("alice", "n1")
    await alice.start()
    with pytest.raises(InvalidInput):
        await alice.client.send("bob", "")
    with pytest.raises(InvalidInput):
        await alice.client.send("b*b", "x")


async def test_removed_session_stops_the_client(coordinator: Coordinator, nodes: Any) -> None:
    alice = nodes("alice", "n1")
    await alice.start()
    # What the coordinator's removal does to the client's side: its heartbeat key is gone.
    await coordinator.redis.delete(alice.client.hb_key)
    reason = await alice.result()
    assert isinstance(reason, Rejected)
    assert reason.message == Reply.YOU_ARE_NOT_LOGGED_ON


async def test_no_coordinator_at_logon_is_noconnection(
    server: fakeredis.FakeServer, nodes: Any
) -> None:
    with pytest.raises(NoConnection):
        await nodes("alice", "n1").client.logon()


async def test_silent_coordinator_is_no_response(server: fakeredis.FakeServer, nodes: Any) -> None:
    # A coordinator ticks (it is there) but serves no request: the seed's 5 s wait, here 1 s.
    r = redis_of(server)

    async def tick() -> None:
        while True:
            await r.publish(Keys("c").control, encode_event(AliveEvent("someone", 1000)))
            await asyncio.sleep(0.1)

    ticking = asyncio.create_task(tick())
    alice = nodes("alice", "n1")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(NoResponse):
        await alice.client.logon()
    assert 0.5 <= loop.time() - start < 2.0
    ticking.cancel()
    await r.aclose()


async def test_a_coordinator_that_stops_ticking_is_noconnection(
    server: fakeredis.FakeServer, nodes: Any
) -> None:
    # The lease is held, but clients cannot read it: only ticks tell them someone is there.
    r = redis_of(server)
    await r.set(Keys("c").lease, "someone", px=10_000)
    with pytest.raises(NoConnection, match="noconnection"):
        await nodes("alice", "n1").client.logon()
    await r.aclose()


async def test_coordinator_gone_stops_clients_with_noconnection(
    coordinator: Coordinator, nodes: Any
) -> None:
    alice = nodes("alice", "n1")
    await alice.start()
    # As if it died and another took the lease without ever ticking: no sign of a coordinator.
    await coordinator.redis.set(Keys("c").lease, "someone-silent", px=60_000)
    reason = await alice.result()
    assert isinstance(reason, NoConnection)


async def test_coordinator_stopping_tells_clients_at_once(
    coordinator: Coordinator, nodes: Any
) -> None:
    alice = nodes("alice", "n1")
    await alice.start()
    await coordinator.shutdown()
    reason = await alice.result()
    assert isinstance(reason, NoConnection)
    assert "stopped" in reason.detail


async def test_local_socket_commands(coordinator: Coordinator, nodes: Any, tmp_path: Path) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    s1 = settings(tmp_path, "n1")
    assert await local.client_alive(s1)
    assert await local.call(s1, {"op": "message", "to": "bob", "text": "yo"}, 2) == {
        "reply": "sent"
    }
    answer = await local.call(s1, {"op": "message", "to": "nobody", "text": "yo"}, 2)
    assert answer == {"reply": "receiver-not-found"}
    bad = await local.call(s1, {"op": "message", "to": "bob", "text": ""}, 2)
    assert bad["exit"] == "2"
    with pytest.raises(Rejected, match="not-logged-on"):
        await local.call(settings(tmp_path, "n9"), {"op": "logoff"}, 2)
    assert await local.call(s1, {"op": "logoff"}, 2) == {"reply": "logged-off"}
    assert await alice.result() is None


async def test_stale_socket_file_is_not_a_client(tmp_path: Path) -> None:
    s = settings(tmp_path, "n1")
    path = local.socket_path(s)
    path.write_text("")  # left behind by a kill -9
    assert not await local.client_alive(s)
    assert not path.exists()


def test_runtime_dir_must_be_private(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="private"):
        local.ensure_runtime_dir(settings(shared, "n1"))
    shared.chmod(0o700)
    assert local.ensure_runtime_dir(settings(shared, "n1")) == shared


async def test_a_crafted_event_is_ignored_and_the_next_message_printed(
    coordinator: Coordinator, nodes: Any
) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    inbox = Keys("c").inbox(bob.client.sid)
    for crafted in ("[" * 100_000, '{"t":"msg","from":["x"],"text":{}}', '{"t":"reply"}'):
        await coordinator.redis.publish(inbox, crafted)
    assert await alice.client.send("bob", "after") == Reply.SENT
    await asyncio.wait_for(_until(_async(lambda: bool(bob.lines))), 2)
    assert bob.lines == ["Message from alice: after"]
    assert not bob.client.finished.done()


async def test_a_reader_that_fails_stops_the_client_loudly(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = nodes("bob", "n2")
    await bob.start()

    def broken(data: str) -> None:
        raise RuntimeError("a bug in the reader")

    monkeypatch.setattr(bob.client, "_dispatch", broken)
    await coordinator.redis.publish(Keys("c").inbox(bob.client.sid), "anything")
    reason = await bob.result()
    assert isinstance(reason, ClientFailure)
    assert "event reader" in reason.message
    assert "a bug in the reader" in reason.message


async def test_a_broken_output_stops_the_client(coordinator: Coordinator, nodes: Any) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()

    def closed_terminal(line: str) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    bob.client.out = closed_terminal
    assert await alice.client.send("bob", "hi") == Reply.SENT
    reason = await bob.result()
    assert isinstance(reason, ClientFailure)
    assert "Broken pipe" in reason.message


async def _unretrieved_future_logged(caplog: pytest.LogCaptureFixture) -> bool:
    gc.collect()  # asyncio reports an unretrieved exception when the future is collected
    await asyncio.sleep(0)
    return "never retrieved" in caplog.text


async def test_a_failing_push_is_noconnection_with_the_reason(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = nodes("alice", "n1")
    await alice.start()

    async def failing_push(*args: Any, **kwargs: Any) -> None:
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    monkeypatch.setattr(alice.client.redis, "rpush", failing_push)
    with pytest.raises(NoConnection) as caught:
        await alice.client.send("bob", "hi")
    assert "WRONGTYPE" in caught.value.detail
    assert isinstance(await alice.result(), NoConnection)


async def test_a_stop_while_the_push_is_in_flight_says_why_and_nothing_else(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # After SIGCONT: the heartbeat learns the session is gone and stops the client, whose
    # close() then breaks the connection under a request's RPUSH.
    alice = nodes("alice", "n1")
    await alice.start()

    async def push_cut_by_a_stop(*args: Any, **kwargs: Any) -> None:
        alice.client.stop(Rejected(Reply.YOU_ARE_NOT_LOGGED_ON))
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(alice.client.redis, "rpush", push_cut_by_a_stop)
    with pytest.raises(Rejected, match="you-are-not-logged-on"):
        await alice.client.send("bob", "hi")
    assert not await _unretrieved_future_logged(caplog)


# --- outliving a Redis outage shorter than the heartbeat TTL (FAST: TTL 0.3 s) ----------------


class Outage:
    """Makes one of a client's Redis methods fail with a lost connection until `end()`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, method: str) -> None:
        self.calls = 0
        self.over = False
        real = getattr(owner, method)

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if not self.over:
                raise RedisConnectionError("Connection closed by server.")
            return await real(*args, **kwargs)

        monkeypatch.setattr(owner, method, flaky)

    def end(self) -> None:
        self.over = True


async def test_a_broken_pubsub_connection_is_replaced_and_messages_flow_again(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    broken = bob.client._pubsub
    assert broken is not None
    Outage(monkeypatch, broken, "get_message")  # this connection never works again
    await asyncio.wait_for(_until(_async(lambda: bob.client._pubsub is not broken)), 2)
    await asyncio.wait_for(bob.client._connected.wait(), 2)
    assert await alice.client.send("bob", "again") == Reply.SENT
    await asyncio.wait_for(_until(_async(lambda: bob.lines)), 2)
    assert bob.lines == ["Message from alice: again"]  # once: the old one was closed first
    assert not bob.client.finished.done()
    assert _listed(await list_users(coordinator.redis, "c")) == (
        [("alice", "n1"), ("bob", "n2")],
        0,
    )


async def test_a_heartbeat_that_fails_for_less_than_the_ttl_goes_on(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = nodes("alice", "n1")
    await alice.start()
    outage = Outage(monkeypatch, alice.client.heartbeat_redis, "pexpire")
    await asyncio.wait_for(_until(_async(lambda: outage.calls >= 2)), 2)  # tried again, soon
    outage.end()
    await asyncio.sleep(3 * 0.3)  # three TTLs: the session must have been refreshed meanwhile
    assert not alice.client.finished.done()
    assert _listed(await list_users(coordinator.redis, "c")) == ([("alice", "n1")], 0)


async def test_a_heartbeat_that_fails_past_the_ttl_is_noconnection(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = nodes("alice", "n1")
    await alice.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    Outage(monkeypatch, alice.client.heartbeat_redis, "pexpire")
    reason = await alice.result()
    assert isinstance(reason, NoConnection)
    assert "longer than the heartbeat TTL" in reason.detail
    assert "Connection closed by server" in reason.detail
    assert loop.time() - started < 0.3 + 0.05 + 0.5  # TTL (+ a beat) after the last good one


async def test_back_after_an_outage_without_the_session_is_noconnection(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarted without persistence: everything is gone, the heartbeat key too."""
    alice = nodes("alice", "n1")
    await alice.start()
    outage = Outage(monkeypatch, alice.client.heartbeat_redis, "pexpire")
    await asyncio.wait_for(_until(_async(lambda: outage.calls >= 1)), 2)
    await coordinator.redis.delete(alice.client.hb_key)
    outage.end()
    reason = await alice.result()
    assert isinstance(reason, NoConnection)
    assert "did not survive" in reason.detail


async def test_a_push_that_fails_while_redis_is_away_is_sent_once_it_is_back(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    outage = Outage(monkeypatch, alice.client.redis, "rpush")
    sending = asyncio.ensure_future(alice.client.send("bob", "patient"))
    await asyncio.wait_for(_until(_async(lambda: outage.calls >= 2)), 2)
    assert not sending.done()
    outage.end()
    assert await asyncio.wait_for(sending, 2) == Reply.SENT
    await asyncio.wait_for(_until(_async(lambda: bob.lines)), 2)
    assert bob.lines == ["Message from alice: patient"]


async def test_a_request_in_flight_when_the_client_stops_is_no_response_not_a_servers_word(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It may have been applied: `you-are-not-logged-on` (the reason the client stops) would say
    it was not."""
    alice = nodes("alice", "n1")
    await alice.start()

    async def pushed_but_unanswered(*args: Any, **kwargs: Any) -> int:
        return 1

    monkeypatch.setattr(alice.client.redis, "rpush", pushed_but_unanswered)
    sending = asyncio.ensure_future(alice.client.send("bob", "in flight"))
    await asyncio.wait_for(_until(_async(lambda: alice.client._pending)), 2)
    alice.client.stop(Rejected(Reply.YOU_ARE_NOT_LOGGED_ON))
    with pytest.raises(NoResponse) as caught:
        await sending
    assert "stopped before the reply came: you-are-not-logged-on" in caught.value.detail


async def test_a_message_that_arrives_while_reconnecting_is_not_thrown_away(
    coordinator: Coordinator, nodes: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subscribed again, the client reads Redis's clock; if that fails, the new connection (and
    a message `sent` to it meanwhile) must not be dropped by a retry."""
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    real_time = bob.client.redis.time
    failed: list[bool] = []

    async def time_fails_once_after_a_message(*args: Any) -> Any:
        if not failed:
            failed.append(True)
            assert await alice.client.send("bob", "meanwhile") == Reply.SENT  # it is subscribed
            raise RedisConnectionError("Connection reset by peer")
        return await real_time(*args)

    monkeypatch.setattr(bob.client.redis, "time", time_fails_once_after_a_message)
    broken = bob.client._pubsub
    assert broken is not None
    Outage(monkeypatch, broken, "get_message")
    await asyncio.wait_for(_until(_async(lambda: failed)), 3)
    await asyncio.wait_for(_until(_async(lambda: bob.lines)), 3)
    assert bob.lines == ["Message from alice: meanwhile"]
    assert not bob.client.finished.done()


async def test_a_message_that_comes_with_the_logon_prints_after_logged_on(
    coordinator: Coordinator, server: fakeredis.FakeServer, tmp_path: Path
) -> None:
    """A message may be applied right after the receiver's logon, before the client has read
    its reply: `messenger logon` must still print `logged-on` first."""
    lines: list[str] = []
    bob = Client(redis_of(server), settings(tmp_path, "n2"), "bob", out=lines.append, hold=True)
    alice = Client(redis_of(server), settings(tmp_path, "n1"), "alice", out=lines.append)
    try:
        await alice.logon()
        await bob.logon()
        assert await alice.send("bob", "early") == Reply.SENT
        await asyncio.wait_for(_until(_async(lambda: bob._held)), 2)  # read, and held
        assert lines == []
        lines.append("logged-on")
        bob.release()
        assert lines == ["logged-on", "Message from alice: early"]
        assert await alice.send("bob", "later") == Reply.SENT
        await asyncio.wait_for(_until(_async(lambda: len(lines) == 3)), 2)
        assert lines[-1] == "Message from alice: later"
    finally:
        for c in (alice, bob):
            c.stop(None)
            await c.close()


# --- receipts and presence (docs/protocol.md, "Receipts" and "Presence") ----------------------


class Watcher:
    """A client that keeps what it is given (on_event) instead of printing it."""

    def __init__(self, server: fakeredis.FakeServer, tmp_path: Path, name: str, node: str):
        self.events: list[MessageEvent | PresenceEvent] = []
        self.client = Client(
            redis_of(server),
            settings(tmp_path, node),
            name,
            on_event=self.events.append,
            presence=True,
        )

    async def start(self) -> None:
        await self.client.logon()
        await self.client.start_serving()

    def messages(self) -> list[MessageEvent]:
        return [e for e in self.events if isinstance(e, MessageEvent)]

    def presence(self) -> list[tuple[str, str, str]]:
        return [(e.kind, e.name, e.reason) for e in self.events if isinstance(e, PresenceEvent)]


@pytest.fixture
async def watchers(server: fakeredis.FakeServer, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Watcher] = []

    def make(name: str, node: str) -> Watcher:
        made.append(Watcher(server, tmp_path, name, node))
        return made[-1]

    yield make
    for w in made:
        w.client.stop(None)
        with contextlib.suppress(Exception):
            await w.client.close()


async def test_a_printed_message_is_delivered(coordinator: Coordinator, nodes: Any) -> None:
    alice, bob = nodes("alice", "n1"), nodes("bob", "n2")
    await alice.start()
    await bob.start()
    reply, receipt = await alice.client.send_with_receipt("bob", "hi", receipt_ms=2000)
    assert reply == Reply.SENT
    assert receipt is not None
    assert await asyncio.wait_for(receipt, 3) is True
    assert bob.lines == ["Message from alice: hi"]
    # A message without a receipt carries no id, and makes no receipt key.
    assert await alice.client.send("bob", "plain") == Reply.SENT
    assert await coordinator.redis.keys("c:rcpt:*") == []


async def test_a_message_nobody_showed_is_not_delivered(
    coordinator: Coordinator, nodes: Any, watchers: Any
) -> None:
    alice, bob = nodes("alice", "n1"), watchers("bob", "n2")
    await alice.start()
    await bob.start()  # takes messages and never acknowledges them: nothing was shown
    reply, receipt = await alice.client.send_with_receipt("bob", "hi", receipt_ms=300)
    assert reply == Reply.SENT
    assert receipt is not None
    assert await asyncio.wait_for(receipt, 3) is False
    assert [m.text for m in bob.messages()] == ["hi"]
    assert bob.messages()[0].msg_id  # it could have acknowledged it


async def test_nobody_but_the_receiver_can_make_a_receipt(
    coordinator: Coordinator, nodes: Any, watchers: Any
) -> None:
    alice, bob, mallory = nodes("alice", "n1"), watchers("bob", "n2"), nodes("mallory", "n3")
    await alice.start()
    await bob.start()
    await mallory.start()
    reply, receipt = await alice.client.send_with_receipt("bob", "secret", receipt_ms=3000)
    assert reply == Reply.SENT
    assert receipt is not None
    await asyncio.wait_for(_until(_async(lambda: bool(bob.messages()))), 2)
    msg_id = bob.messages()[0].msg_id
    # Mallory knows the id (the strongest case) and signs a receipt with her own session.
    mallory.client.acknowledge(msg_id)
    await asyncio.wait_for(_until(lambda: _queue_empty(coordinator)), 2)
    # Applied (and refused): a receipt is published in the step that deletes its key.
    assert await coordinator.redis.exists(f"c:rcpt:{msg_id}") == 1  # still bob's to give
    assert not receipt.done()
    bob.client.acknowledge(msg_id)
    assert await asyncio.wait_for(receipt, 2) is True
    assert await coordinator.redis.exists(f"c:rcpt:{msg_id}") == 0  # once only


async def _queue_empty(coordinator: Coordinator) -> bool:
    k = Keys("c")
    return await coordinator.redis.llen(k.requests) + await coordinator.redis.llen(k.inflight) == 0


async def test_presence_says_who_came_and_went_and_why(
    coordinator: Coordinator, nodes: Any, watchers: Any, server: fakeredis.FakeServer
) -> None:
    watcher = watchers("walt", "n0")
    await watcher.start()
    bob, carol = nodes("bob", "n2"), nodes("carol", "n3")
    await bob.start()
    await carol.start()
    assert await bob.client.logoff() == Reply.LOGGED_OFF
    # Carol's client hangs: its heartbeat stops, so the sweep logs her off at her deadline.
    for task in carol.client._tasks:
        task.cancel()
    want = [
        ("logon", "walt", ""),
        ("logon", "bob", ""),
        ("logon", "carol", ""),
        ("logoff", "bob", "logoff"),
        ("logoff", "carol", "timeout"),
    ]
    await asyncio.wait_for(_until(_async(lambda: watcher.presence() == want)), 3)
    # What goes out is public: the user list's name and node, a time and a reason, nothing
    # that names a session (no sid, key or inbox).
    raw = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    pubsub = raw.pubsub()
    await pubsub.subscribe(Keys("c").presence)
    dave = nodes("dave", "n4")
    await dave.start()
    payload = None
    while payload is None:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
        payload = msg and msg["data"]
    fields = json.loads(payload)
    assert set(fields) == {"t", "ev", "name", "node", "at"}
    assert (fields["ev"], fields["name"], fields["node"]) == ("logon", "dave", "n4")
    assert dave.client.sid not in payload
    assert dave.client.inbox not in payload
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await raw.aclose()


async def test_the_last_server_stopping_logs_everyone_off(
    server: fakeredis.FakeServer, tmp_path: Path, nodes: Any, watchers: Any
) -> None:
    c = Coordinator(redis_of(server), settings(tmp_path, "server"))
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(stop))
    await asyncio.wait_for(_until(lambda: c.redis.exists(Keys("c").lease)), 2)
    watcher = watchers("walt", "n0")
    await watcher.start()
    bob = nodes("bob", "n2")
    await bob.start()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert isinstance(await bob.result(), NoConnection)  # told the server stops, not removed
    assert _listed(await list_users(c.redis, "c")) == ([], 0)
    assert await c.redis.hlen(Keys("c").sessions) == 0
    await asyncio.wait_for(
        _until(_async(lambda: ("logoff", "bob", "server") in watcher.presence())), 2
    )
    await c.redis.aclose()
