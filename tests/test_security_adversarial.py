"""A hostile client host (docs/security.md): it holds the client credential and talks to Redis
with any client it likes. Each test is one attack, made with a raw redis-py connection holding
exactly what such a host holds, and shows it failing; on every supported Redis version.

The coordinator's host and the Redis host are trusted; tests use the admin credential only to
look (or to play a worst case: an attacker that somehow learned a session id).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from redis.exceptions import NoPermissionError, ResponseError

from messenger import acl, local
from messenger.embedded import EmbeddedRedis
from messenger.keys import Keys
from messenger.protocol import Request, encode_request, inbox_id, new_session_key
from messenger.settings import Settings
from tests.conftest import client_url_of, procs_on
from tests.harness import Proc, Procs, wait_until

pytestmark = pytest.mark.integration


@dataclass
class World:
    """A coordinator, alice at n1 and bob at n2, and what an attacker holds."""

    procs: Procs
    keys: Keys
    admin: Any  # the trusted side's view, for checks only
    attacker: Any  # the client credential
    attacker_hb: Any  # the heartbeat user that comes with it
    server: Proc
    alice: Proc
    bob: Proc
    listening: list[Any]  # the attacker's subscriptions, closed by the fixture

    def users(self) -> dict[str, str]:
        names: dict[str, str] = self.admin.hgetall(self.keys.names)
        return names

    def record(self, name: str) -> dict[str, str]:
        sid = self.admin.hget(self.keys.names, name)
        record: dict[str, str] = json.loads(self.admin.hget(self.keys.sessions, sid))
        return {**record, "sid": sid}

    def wait_listed(self, name: str) -> None:
        """Wait until `name` is logged on; on a timeout, say what the coordinator said."""
        try:
            wait_until(lambda: name in self.users(), 10, f"{name} logged on")
        except AssertionError as e:
            raise AssertionError(f"{e}; coordinator: {self.server.err[-10:]}") from None

    def mallory_logs_on(self, key: str, sid: str, rid: str) -> None:
        """The attacker's own session, logged on by hand: like a real client she subscribes to
        its inbox first, or the crash check rightly logs her off at once (an inbox with no
        subscriber is a client whose connection is gone, messenger/crashes.py)."""
        inbox = self.attacker.pubsub()
        self.listening.append(inbox)
        inbox.subscribe(self.keys.inbox(inbox_id(key)))
        wait_until(lambda: inbox.get_message(timeout=0.1) is not None, 5, "her subscription")
        now = int(self.admin.time()[0]) * 1000
        logon = Request("logon", rid, sid, name="mallory", node="evil", key=key, sent_ms=now)
        self.attacker.rpush(self.keys.requests, encode_request(logon, key))
        self.wait_listed("mallory")

    def bob_still_gets_alice(self) -> None:
        """The honest path still works, and only what alice sent reaches bob."""
        code, out, _ = self.procs.run("message", "bob", "honest", "--node", "n1")
        assert (code, out) == (0, ["sent"])
        self.bob.wait_line("^Message from alice: honest$", 5)
        assert all(line.startswith(("logged-on", "Message from alice: ")) for line in self.bob.out)


@pytest.fixture
def world(any_redis: EmbeddedRedis, base_env: dict[str, str]) -> Iterator[World]:
    procs = procs_on(any_redis, base_env)
    prefix = base_env["MESSENGER_PREFIX"]
    client_url = client_url_of(any_redis, prefix)
    hb_url = acl.heartbeat_url(client_url)
    assert hb_url is not None
    admin, attacker, attacker_hb = connections = [
        redis_sync.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        for url in (any_redis.url, client_url, hb_url)
    ]
    listening: list[Any] = []
    try:
        server = procs.server()
        alice = procs.logon("alice", "n1")
        bob = procs.logon("bob", "n2")
        yield World(
            procs, Keys(prefix), admin, attacker, attacker_hb, server, alice, bob, listening
        )
    finally:
        procs.cleanup()
        for pubsub in listening:
            pubsub.close()
        for c in connections:
            c.close()


def refused(call: Any, *args: Any) -> str:
    """Run one Redis command that must be refused; return Redis's words for the refusal."""
    with pytest.raises((NoPermissionError, ResponseError)) as caught:
        call(*args)
    # redis-py turns "-NOPERM ..." into NoPermissionError and drops the word: put it back.
    prefix = "NOPERM " if isinstance(caught.value, NoPermissionError) else ""
    return prefix + str(caught.value)


# --- 1. credentials ------------------------------------------------------------------------------


def _refuses_anonymous(port: int) -> None:
    anonymous = redis_sync.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        with pytest.raises(redis_sync.AuthenticationError):
            anonymous.ping()
    finally:
        anonymous.close()


@pytest.mark.parametrize(
    "command",
    [
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("RANDOMKEY",),
        ("PUBSUB", "CHANNELS"),
        ("PUBSUB", "NUMSUB", "x"),
        ("MONITOR",),
        ("CLIENT", "LIST"),
        ("CLIENT", "KILL", "TYPE", "normal"),
        ("CONFIG", "GET", "requirepass"),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "evil", "on", ">x", "+@all", "~*"),
        ("INFO",),
        ("FLUSHALL",),
        ("EVAL", "return redis.call('KEYS', '*')", "0"),
        ("FUNCTION", "LIST"),
        ("DEBUG", "SLEEP", "0"),
        ("SHUTDOWN",),
        ("XADD", "x", "*", "a", "b"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_the_client_credential_can_list_and_run_nothing_beyond_a_clients_needs(
    world: World, command: tuple[str, ...]
) -> None:
    words = refused(world.attacker.execute_command, *command)
    assert "NOPERM" in words or "not allowed" in words or "unknown command" in words.lower()


def test_the_client_credential_cannot_psubscribe(world: World) -> None:
    words = refused(world.attacker.execute_command, "PSUBSCRIBE", f"{world.keys.prefix}:*")
    assert "NOPERM" in words


@pytest.mark.parametrize("which", ["sessions", "names", "nodes", "deadlines", "lease", "inflight"])
def test_the_coordinators_keys_are_out_of_reach(world: World, which: str) -> None:
    key = getattr(world.keys, which)
    for command in (("TYPE", key), ("HGETALL", key), ("DEL", key), ("SET", key, "x")):
        assert "NOPERM" in refused(world.attacker.execute_command, *command)


def test_the_heartbeat_user_can_refresh_heartbeat_keys_and_nothing_else(world: World) -> None:
    hb = world.attacker_hb
    k = world.keys
    for command in (
        ("RPUSH", k.requests, "x"),
        ("HGETALL", k.users),
        ("GET", k.lease),
        ("SET", k.hb("0" * 32), "1"),
        ("DEL", k.hb("0" * 32)),
        ("PUBLISH", k.control, "{}"),
    ):
        assert "NOPERM" in refused(hb.execute_command, *command)
    assert hb.pexpire(k.hb("0" * 32), 1000) is False  # it creates nothing either


def test_the_server_file_holds_only_client_credentials(base_env: dict[str, str]) -> None:
    local_only = Procs(dict(base_env))
    try:
        local_only.server()
        runtime = Path(base_env["MESSENGER_RUNTIME_DIR"])
        url = json.loads((runtime / "server.json").read_text())["url"]
        _refuses_anonymous(int(url.rsplit(":", 1)[1].split("/")[0]))  # never open
        assert url.startswith(f"redis://{base_env['MESSENGER_PREFIX']}-client:")
        r = redis_sync.Redis.from_url(url, decode_responses=True, socket_timeout=5)
        try:
            assert r.ping()
            for command in (("ACL", "WHOAMI"), ("CONFIG", "GET", "requirepass"), ("ACL", "LIST")):
                assert "NOPERM" in refused(r.execute_command, *command)
        finally:
            r.close()
        # Nothing in the runtime directory holds more than that.
        for path in runtime.iterdir():
            if path.is_file():
                assert "default" not in path.read_text()
        local_only.logon("alice", "n1")  # and it is all a client needs
    finally:
        local_only.cleanup()


# --- 3. no forgery, no eavesdropping, no hijack ---------------------------------------------


def test_no_forged_message_on_a_receivers_terminal(world: World) -> None:
    inbox = world.record("bob")["inbox"]  # worst case: the attacker learned bob's inbox
    forged = json.dumps({"t": "msg", "from": "alice", "text": "forged"})
    assert "NOPERM" in refused(world.attacker.publish, inbox, forged)
    world.bob_still_gets_alice()
    assert not [line for line in world.bob.out if "forged" in line]


def test_no_forged_reply_and_no_forged_stopping(world: World) -> None:
    inbox = world.record("alice")["inbox"]
    reply = json.dumps({"t": "reply", "req": "0" * 32, "r": "you-are-not-logged-on"})
    assert "NOPERM" in refused(world.attacker.publish, inbox, reply)
    stopping = json.dumps({"t": "stopping", "coordinator": "x"})
    assert "NOPERM" in refused(world.attacker.publish, world.keys.control, stopping)
    world.bob_still_gets_alice()
    assert world.alice.running


def test_nobody_else_reads_a_sessions_messages_or_requests(world: World) -> None:
    # Without the inbox id (derived from a key it never sees) there is nothing to subscribe to,
    # and no way to list channels; the queue can be pushed to, not read.
    assert "NOPERM" in refused(world.attacker.lrange, world.keys.requests, 0, -1)
    assert "NOPERM" in refused(world.attacker.lpop, world.keys.requests)
    listening = world.attacker.pubsub()
    listening.subscribe(world.keys.inbox("0" * 32), world.keys.control)
    world.bob_still_gets_alice()
    seen = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        msg = listening.get_message(timeout=0.1)
        if msg is not None and msg["type"] == "message":
            seen.append(json.loads(msg["data"]))
    listening.close()
    assert all(event["t"] == "alive" for event in seen)  # the control channel: no secrets


def _forged(world: World, request: Request) -> str:
    """A request for someone else's session, signed with a key the attacker made up."""
    return encode_request(request, new_session_key())


def test_no_logoff_and_no_message_as_someone_else(world: World) -> None:
    alice = world.record("alice")["sid"]  # worst case: the attacker learned alice's session id
    now = int(world.admin.time()[0]) * 1000
    world.attacker.rpush(
        world.keys.requests,
        _forged(world, Request("logoff", "1" * 32, alice, sent_ms=now)),
        _forged(world, Request("message-to", "2" * 32, alice, to="bob", text="fake", sent_ms=now)),
    )
    world.server.wait_line("unauthenticated", 10, stderr=True)
    assert set(world.users()) == {"alice", "bob"}
    world.bob_still_gets_alice()
    assert not [line for line in world.bob.out if "fake" in line]


def test_no_taking_a_name_that_is_logged_on(world: World) -> None:
    code, out, _ = world.procs.run("logon", "alice", "--node", "n9")
    assert (code, out) == (1, ["user-exists-at-other-node"])
    assert world.record("alice")["node"] == "n1"


def test_a_dead_user_cannot_be_kept_listed(world: World) -> None:
    world.bob.kill()
    # The attacker cannot find bob's heartbeat key (no KEYS, no SCAN), and a guess refreshes
    # nothing; bob is removed at once (his inbox lost its subscriber) or at his deadline.
    guesses = [world.keys.hb(f"{i:032x}") for i in range(50)]
    started = time.monotonic()
    while "bob" in world.users():
        assert not any(world.attacker_hb.pexpire(g, 60_000) for g in guesses)
        assert time.monotonic() - started < 5.0, "bob is still listed"
        time.sleep(0.05)


def test_no_replay_later_and_no_request_from_the_future(world: World) -> None:
    # The attacker's own session, with its own key: its requests verify, but time is signed.
    key, sid = new_session_key(), "3" * 32
    world.mallory_logs_on(key, sid, "4" * 32)
    now = int(world.admin.time()[0]) * 1000
    late = Request("message-to", "5" * 32, sid, to="bob", text="replayed", sent_ms=now - 60_000)
    future = Request("message-to", "6" * 32, sid, to="bob", text="future", sent_ms=now + 60_000)
    world.attacker.rpush(
        world.keys.requests, encode_request(late, key), encode_request(future, key)
    )
    world.server.wait_line(r"request 6{8} \(message-to\) arrived after", 10, stderr=True)
    world.bob_still_gets_alice()
    assert not [line for line in world.bob.out if "replayed" in line or "future" in line]


# --- 4. no one write stops the service ------------------------------------------------------


def test_the_user_list_cannot_be_turned_into_another_type(world: World) -> None:
    assert "WRONGTYPE" in refused(world.attacker.rpush, world.keys.users, "x")
    assert world.procs.run("logoff", "--node", "n1")[0] == 0
    assert world.procs.run("logoff", "--node", "n2")[0] == 0
    assert "WRONGTYPE" in refused(world.attacker.rpush, world.keys.users, "x")
    world.procs.logon("carol", "n3")
    assert set(world.users()) == {"carol"}


def test_huge_entries_are_dropped_unread_and_service_goes_on(world: World) -> None:
    big = "x" * (8 * 2**20)
    for _ in range(5):
        world.attacker.rpush(world.keys.requests, big)
    world.server.wait_line("longer than any request", 10, stderr=True)
    world.bob_still_gets_alice()
    assert world.admin.llen(world.keys.requests) == 0


# --- 2. what others may see carries no secret -----------------------------------------------


def test_what_a_client_can_read_holds_no_secret(world: World) -> None:
    public = world.attacker.hgetall(world.keys.users)
    assert set(public) == {"", "alice", "bob"}  # names, and the placeholder that keeps it a hash
    text = json.dumps(public)
    for name in ("alice", "bob"):
        record = world.record(name)
        for secret in (record["key"], record["sid"], record["inbox"], record["hb"]):
            assert secret not in text
            assert secret.rsplit(":", 1)[-1] not in text


# --- 5. presence, receipts and the servers list (issue 14) ----------------------------------


def test_presence_cannot_be_forged_and_holds_no_secret(world: World) -> None:
    k = world.keys
    forged = json.dumps({"t": "presence", "ev": "logoff", "name": "alice", "node": "n1"})
    assert "NOPERM" in refused(world.attacker.publish, k.presence, forged + "x")
    pubsub = world.attacker.pubsub()
    try:
        pubsub.subscribe(k.presence)  # allowed: presence is public
        carol = world.procs.logon("carol", "n3")
        events = _presence_events(pubsub, 2, lambda: carol.kill())
    finally:
        pubsub.close()
    assert [(e["ev"], e["name"], e.get("reason")) for e in events] == [
        ("logon", "carol", None),
        ("logoff", "carol", "crash"),
    ]
    for e in events:
        assert set(e) <= {"t", "ev", "name", "node", "at", "reason"}
    text = json.dumps(events)
    for record in (world.record("alice"), world.record("bob")):
        for secret in (record["key"], record["sid"], record["inbox"], record["hb"]):
            assert secret.rsplit(":", 1)[-1] not in text


def _presence_events(pubsub: Any, n: int, then: Any) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    deadline = time.monotonic() + 10
    acted = False
    while len(events) < n:
        assert time.monotonic() < deadline, f"presence events so far: {events}"
        msg = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if msg is not None:
            events.append(json.loads(msg["data"]))
            if not acted:
                acted = True
                then()
    return events


def test_no_receipt_for_a_message_one_did_not_receive(world: World) -> None:
    """Mallory has a session of her own and (worst case) the message's id; alice's message to
    bob, whose client is stopped and so shows nothing, stays `not-delivered`."""
    k = world.keys
    key, sid = new_session_key(), "7" * 32
    world.mallory_logs_on(key, sid, "8" * 32)
    world.bob.signal(19)  # SIGSTOP: bob's connection lives (so `sent`), but he prints nothing
    try:
        settings = Settings.from_env(
            env=world.procs.env,
            node="n1",
            runtime_dir=Path(world.procs.env["MESSENGER_RUNTIME_DIR"]),
        )
        request = {"op": "message", "to": "bob", "text": "for bob only", "receipt_ms": "3000"}
        answers: list[dict[str, Any]] = []
        asker = threading.Thread(target=lambda: answers.append(local.ask(settings, request, 10)))
        asker.start()
        wait_until(lambda: bool(world.admin.keys(k.receipt("*"))), 5, "the receipt key")
        msg_id = world.admin.keys(k.receipt("*"))[0].rsplit(":", 1)[1]
        # She cannot publish one, nor read or delete what the coordinator keeps for it...
        receipt = json.dumps({"t": "receipt", "msg": msg_id})
        assert "NOPERM" in refused(world.attacker.publish, world.record("alice")["inbox"], receipt)
        for command in (("GET", k.receipt(msg_id)), ("DEL", k.receipt(msg_id))):
            assert "NOPERM" in refused(world.attacker.execute_command, *command)
        # ...and a receipt signed by her own session is not bob's.
        now = int(world.admin.time()[0]) * 1000
        forged = Request("delivered", "9" * 32, sid, msg=msg_id, sent_ms=now)
        world.attacker.rpush(k.requests, encode_request(forged, key))
        asker.join(15)
        assert answers == [{"reply": "sent", "receipt": "not-delivered"}]
    finally:
        world.bob.signal(18)  # SIGCONT


def test_the_servers_list_is_read_only_for_clients(world: World) -> None:
    k = world.keys
    listed = world.attacker.hgetall(k.servers)
    entries = {cid: json.loads(raw) for cid, raw in listed.items() if cid}
    assert [e["active"] for e in entries.values()] == [True]
    assert world.admin.get(k.lease) in entries  # the active one is the lease holder
    for command in (
        ("HSET", k.servers, "x", "{}"),
        ("HDEL", k.servers, *entries),
        ("DEL", k.servers),
    ):
        assert "NOPERM" in refused(world.attacker.execute_command, *command)
    assert "WRONGTYPE" in refused(world.attacker.rpush, k.servers, "x")
