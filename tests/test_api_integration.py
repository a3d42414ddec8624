"""The API for programs (messenger/api.py) and its example, examples/echo_bot.py, against a real
redis-server and a real `messenger server`; and presence as anyone may watch it, with each
reason a session can end for."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

import messenger
from messenger.embedded import EmbeddedRedis
from messenger.errors import NoConnection, Rejected
from messenger.keys import Keys
from messenger.protocol import Reply
from messenger.settings import Settings
from tests.conftest import client_url_of, procs_on
from tests.harness import Procs, wait_until

pytestmark = pytest.mark.integration


def settings_of(procs: Procs, node: str) -> Settings:
    """What a program on a client host is configured with: the client credential."""
    env = procs.env
    return Settings.from_env(env=env, node=node, runtime_dir=Path(env["MESSENGER_RUNTIME_DIR"]))


def test_the_echo_bot_answers_every_message(procs: Procs) -> None:
    procs.server()
    alice = procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    bot = procs.start_module("examples.echo_bot", "echo", "--node", "bot-1")
    bot.wait_line("^echo is logged on at bot-1$", 15)
    for node, text in (("n1", "hello there"), ("n2", "ça va ?")):
        assert procs.run("message", "echo", text, "--node", node)[:2] == (0, ["sent"])
    alice.wait_line("^Message from echo: hello there$", 10)
    bob.wait_line("^Message from echo: ça va \\?$", 10)
    bot.wait_line("^echoed to bob: sent$", 10)
    # Its node socket is served like any client's: `messenger logoff --node bot-1` works too,
    # but a polite kill is what a bot's supervisor sends.
    bot.signal(signal.SIGTERM)
    assert bot.wait_exit(10) == 0
    code, out, _ = procs.run("who")
    assert code == 0
    assert [line.split()[0] for line in out] == ["alice", "bob"]


async def test_sessions_send_receive_confirm_and_watch(procs: Procs) -> None:
    procs.server()
    async with messenger.connect(
        "alice", settings=settings_of(procs, "a1"), presence=True
    ) as alice:
        assert (alice.name, alice.node) == ("alice", "a1")
        watched = alice.presence()
        own = await asyncio.wait_for(anext(watched), 5)  # her own logon comes first
        assert (own.kind, own.name, own.node) == ("logon", "alice", "a1")
        async with messenger.connect("bob", settings=settings_of(procs, "b1")) as bob:
            first = await asyncio.wait_for(anext(watched), 5)
            assert (first.kind, first.name, first.node) == ("logon", "bob", "b1")
            confirm = asyncio.create_task(bob.send_and_confirm("alice", "hi alice", timeout=5))
            got = await asyncio.wait_for(anext(aiter(alice)), 5)
            assert (got.sender, got.text) == ("bob", "hi alice")
            assert await asyncio.wait_for(confirm, 6) is True  # alice took it: delivered
            assert await bob.send("nobody", "x") == Reply.RECEIVER_NOT_FOUND
            users = await bob.who()
            assert [(u.name, u.node) for u in users] == [("alice", "a1"), ("bob", "b1")]
            assert all(isinstance(u.since, int) for u in users)
        left = await asyncio.wait_for(anext(watched), 5)
        assert (left.kind, left.name, left.reason) == ("logoff", "bob", "logoff")
        # A name is one user: a second session for it is refused, with the seed's word.
        with pytest.raises(Rejected, match="user-exists-at-other-node"):
            async with messenger.connect("alice", settings=settings_of(procs, "a2")):
                pass
        await alice.logoff()
        assert [m async for m in alice] == []  # the iteration ends when logged off


async def test_a_session_whose_server_stops_ends_with_noconnection(procs: Procs) -> None:
    server = procs.server()
    async with messenger.connect("alice", settings=settings_of(procs, "a1")) as alice:
        server.signal(signal.SIGTERM)
        with pytest.raises(NoConnection):
            async for _ in alice:
                pass


# --- presence: every reason a session ends for -------------------------------------------------


@pytest.fixture
def watched(redis_server: EmbeddedRedis, base_env: dict[str, str]) -> Iterator[tuple[Procs, Any]]:
    """Processes on the shared Redis, and a watcher holding only the client credential that
    subscribes to presence once `server` (started first) has made the client users."""
    procs = procs_on(redis_server, base_env)
    url = client_url_of(redis_server, base_env["MESSENGER_PREFIX"])
    watcher = redis_sync.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    pubsub = watcher.pubsub()  # type: ignore[no-untyped-call]
    start_server = procs.server

    def server(*args: str, **env: str) -> Any:
        proc = start_server(*args, **env)
        pubsub.subscribe(Keys(base_env["MESSENGER_PREFIX"]).presence)
        return proc

    procs.server = server  # type: ignore[method-assign,assignment]
    try:
        yield procs, pubsub
    finally:
        procs.cleanup()
        pubsub.close()
        watcher.close()


def next_events(pubsub: Any, n: int, timeout: float = 10.0) -> list[tuple[str, str, str]]:
    """The next `n` presence events as (ev, name, reason)."""
    got: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"presence events so far: {got}"
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if msg is not None:
            e = json.loads(msg["data"])
            got.append((e["ev"], e["name"], e.get("reason", "")))
    return got


def test_presence_says_timeout_for_a_hung_client(watched: tuple[Procs, Any]) -> None:
    procs, pubsub = watched
    procs.server()
    carol = procs.logon("carol", "n3")
    assert next_events(pubsub, 1) == [("logon", "carol", "")]
    carol.signal(signal.SIGSTOP)  # its connection stays open: only its deadline removes it
    assert next_events(pubsub, 1) == [("logoff", "carol", "timeout")]


def test_presence_says_replaced_for_a_dead_session_a_logon_takes_over(
    watched: tuple[Procs, Any],
) -> None:
    procs, pubsub = watched
    # No crash check for 60 s: only the new logon can find the old session dead.
    procs.server(MESSENGER_SWEEP_INTERVAL="60")
    dave = procs.logon("dave", "n4")
    dave.kill()
    procs.logon("dave", "n4")
    assert next_events(pubsub, 3) == [
        ("logon", "dave", ""),
        ("logoff", "dave", "replaced"),
        ("logon", "dave", ""),
    ]


def test_presence_says_server_when_the_last_server_stops(watched: tuple[Procs, Any]) -> None:
    procs, pubsub = watched
    server = procs.server()
    erin, frank = procs.logon("erin", "n5"), procs.logon("frank", "n6")
    assert next_events(pubsub, 2) == [("logon", "erin", ""), ("logon", "frank", "")]
    server.signal(signal.SIGTERM)
    assert sorted(next_events(pubsub, 2)) == [
        ("logoff", "erin", "server"),
        ("logoff", "frank", "server"),
    ]
    for client in (erin, frank):
        assert client.wait_exit(10) == 3
        assert client.out[-1] == "noconnection"
    wait_until(lambda: server.popen.poll() is not None, 10, "the server to stop")
    code, out, _ = procs.run("who")
    assert (code, out) == (0, [])  # nobody is left listed
