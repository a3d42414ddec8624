"""Points 1, 2, 3, 6 and 7 of the core issue through the real CLI on a real Redis."""

from __future__ import annotations

import json
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from messenger.keys import Keys
from tests.harness import Proc, Procs, wait_until, who_json

pytestmark = pytest.mark.integration


def names(db: Any, keys: Keys) -> dict[str, str]:
    return dict(db.hgetall(keys.names))


def released_together(
    procs: Procs, db: Any, keys: Keys, server: Proc, starts: list[tuple[str, ...]], **env: str
) -> list[Proc]:
    """Line racers up: the coordinator is stopped while every request is queued, then resumed,
    so all of them arrive at once however slowly the processes start."""
    server.signal(signal.SIGSTOP)
    try:
        racers = [procs.start(*args, **env) for args in starts]

        # A coordinator stopped inside its BLMOVE still has the first request moved into
        # flight by Redis, unapplied: queued all the same.
        def queued() -> bool:
            return int(db.llen(keys.requests)) + int(db.llen(keys.inflight)) >= len(starts)

        wait_until(queued, 30, "all requests queued")
    finally:
        server.signal(signal.SIGCONT)
    return racers


def outcome(proc: Proc, timeout: float = 20) -> str:
    line = proc.wait_line(r"^(logged-on|user-exists-at-other-node|already-logged-on)$", timeout)
    return line


# --- point 1 ----------------------------------------------------------------------------------


def test_twenty_simultaneous_logons_of_one_name_one_wins(procs: Procs, db: Any, keys: Keys) -> None:
    server = procs.server(MESSENGER_LEASE_TTL="60")
    racers = released_together(
        procs,
        db,
        keys,
        server,
        [("logon", "alice", "--node", f"n{i}") for i in range(20)],
        MESSENGER_REPLY_TIMEOUT="30",
        MESSENGER_LEASE_TTL="60",  # no tick while the coordinator is held: do not give up
    )
    results = [outcome(p) for p in racers]
    assert results.count("logged-on") == 1
    assert results.count("user-exists-at-other-node") == 19
    losers = [p for p, r in zip(racers, results, strict=True) if r != "logged-on"]
    assert all(p.wait_exit(10) == 1 for p in losers)
    assert list(names(db, keys)) == ["alice"]


def test_two_machines_claiming_one_node_name(procs: Procs, db: Any, keys: Keys) -> None:
    server = procs.server(MESSENGER_LEASE_TTL="60")
    with tempfile.TemporaryDirectory(prefix="mt-") as other_machine:
        racers = released_together(
            procs,
            db,
            keys,
            server,
            [
                ("logon", "alice", "--node", "n1"),
                ("logon", "bob", "--node", "n1", "--runtime-dir", other_machine),
            ],
            MESSENGER_REPLY_TIMEOUT="30",
            MESSENGER_LEASE_TTL="60",
        )
        results = sorted(outcome(p) for p in racers)
    assert results == ["already-logged-on", "logged-on"]
    assert len(names(db, keys)) == 1


def test_second_user_on_a_node_is_refused_locally(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    code, out, _ = procs.run("logon", "bob", "--node", "n1")
    assert (code, out) == (1, ["already-logged-on"])
    code, out, _ = procs.run("logon", "alice", "--node", "n2")
    assert (code, out) == (1, ["user-exists-at-other-node"])


# --- point 2 ----------------------------------------------------------------------------------


def test_message_replies(procs: Procs) -> None:
    procs.server()
    code, out, _ = procs.run("message", "bob", "hi", "--node", "n1")
    assert (code, out) == (1, ["not-logged-on"])
    procs.logon("alice", "n1")
    code, out, _ = procs.run("message", "bob", "hi", "--node", "n1")
    assert (code, out) == (1, ["receiver-not-found"])


def test_message_to_a_crashed_receiver_is_never_sent(procs: Procs, db: Any, keys: Keys) -> None:
    slow = {"MESSENGER_HEARTBEAT_TTL": "60"}  # bob stays listed long after his client died
    procs.server()
    procs.logon("alice", "n1", **slow)
    bob = procs.logon("bob", "n2", **slow)
    bob.kill()
    assert "bob" in names(db, keys)
    code, out, _ = procs.run("message", "bob", "hi", "--node", "n1")
    assert (code, out) == (1, ["receiver-not-found"])


# --- point 3 ----------------------------------------------------------------------------------


def test_unknown_sender_is_told_and_its_client_stops(procs: Procs, db: Any, keys: Keys) -> None:
    slow = {"MESSENGER_HEARTBEAT_INTERVAL": "20", "MESSENGER_HEARTBEAT_TTL": "60"}
    procs.server()
    alice = procs.logon("alice", "n1", **slow)
    procs.logon("bob", "n2", **slow)
    sid = db.hget(keys.names, "alice")
    db.hdel(keys.sessions, sid)  # the server no longer knows alice's session
    code, out, _ = procs.run("message", "bob", "hi", "--node", "n1")
    assert (code, out) == (1, ["you-are-not-logged-on"])
    assert alice.wait_exit(10) == 1
    assert alice.out[-1] == "you-are-not-logged-on"


# --- point 6 ----------------------------------------------------------------------------------


def test_garbage_never_takes_anything_down(procs: Procs, db: Any, keys: Keys) -> None:
    server = procs.server()
    alice = procs.logon("alice", "n1")
    sid = db.hget(keys.names, "alice")
    record = json.loads(db.hget(keys.sessions, sid))
    payload = json.dumps({"k": "logoff", "req": "a" * 32, "sid": sid, "t": "1"})
    garbage: list[str | bytes] = [
        "not even json",
        "0" * 64 + "{}",
        "0" * 64 + payload,  # alice's session, but not signed with her key
        "f" * 64 + json.dumps({"k": "message-to", "req": "a" * 32, "sid": sid, "to": "alice"}),
        "x" * 2**20,
        b"\xff\xfe" * 100,
        "0" * 64 + "[" * 100_000,
    ]
    db.rpush(keys.requests, *garbage)
    db.publish(record["inbox"], b"\xff not json")
    db.publish(record["inbox"], json.dumps({"t": "reply", "req": "x", "r": "nonsense"}))
    db.publish(keys.control, "{}")
    server.wait_line("dropped malformed request", 10, stderr=True)
    procs.logon("bob", "n2")
    code, out, _ = procs.run("message", "alice", "still", "here", "--node", "n2")
    assert (code, out) == (0, ["sent"])
    alice.wait_line("^Message from bob: still here$")
    assert server.running
    assert alice.running
    assert not [line for line in server.err if "Traceback" in line]


def test_list_changes_are_logged(procs: Procs) -> None:
    server = procs.server()
    procs.logon("alice", "n1")
    server.wait_line(r"list is now: \[alice@n1\]", 10, stderr=True)
    procs.logon("bob", "n2")
    server.wait_line(r"list is now: \[alice@n1, bob@n2\]", 10, stderr=True)
    assert procs.run("logoff", "--node", "n1")[0] == 0
    server.wait_line(r"list is now: \[bob@n2\]", 10, stderr=True)


# --- point 7 ----------------------------------------------------------------------------------


def test_restarted_coordinator_resumes_without_ghosts(procs: Procs, db: Any, keys: Keys) -> None:
    first = procs.server()
    alice = procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    first.kill()
    assert alice.wait_exit(8) != 0
    assert bob.wait_exit(8) != 0
    assert set(names(db, keys)) == {"alice", "bob"}  # what the dead clients left behind
    procs.server()
    # no ghosts: the new coordinator sweeps them within TTL + 1 s of their last heartbeat
    wait_until(lambda: not names(db, keys), 5, "dead sessions swept")
    procs.logon("alice", "n3")
    code, out, _ = procs.run("logon", "alice", "--node", "n4")
    assert (code, out) == (1, ["user-exists-at-other-node"])
    code, out, _ = procs.run("who", "--json")
    assert who_json(out) == [{"name": "alice", "node": "n3"}]


def test_restart_keeps_users_whose_clients_live(procs: Procs, db: Any, keys: Keys) -> None:
    # A coordinator restarted within the lease TTL: clients never saw it gone and stay on.
    first = procs.server(MESSENGER_LEASE_TTL="10")
    alice = procs.logon("alice", "n1")
    first.kill()
    db.delete(keys.lease)  # as if its lease had run out just as the new one starts
    procs.server(MESSENGER_LEASE_TTL="10")
    procs.logon("bob", "n2")
    code, out, _ = procs.run("message", "alice", "welcome back", "--node", "n2")
    assert (code, out) == (0, ["sent"])
    alice.wait_line("^Message from bob: welcome back$")
    assert sorted(names(db, keys)) == ["alice", "bob"]


# --- bad input: a clear error and an exit code, never a traceback ------------------------------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("logon", "bad name", "--node", "n1"), 2, "invalid user name"),
        (("logon", "alice", "--node", "bad node"), 2, "invalid node name"),
        (("message", "bob", ""), 2, "empty"),
        (("message", "b*b", "hi"), 2, "invalid user name"),
        (("logon", "alice", "--heartbeat-ttl", "0"), 2, "must be positive"),
        (("logon", "alice", "--heartbeat-ttl", "x"), 2, "not a valid float"),
        (("message", "bob", "hi", "--reply-timeout", "1e9"), 2, "at most 3600"),
        (("who", "--redis-url", "nonsense://x"), 2, "Redis URL"),
        (("who", "--redis-url", "redis://127.0.0.1:1/0"), 3, "noconnection"),
        (("nosuchcommand",), 2, "No such command"),
        (("logon", "alice", "--runtime-dir", "/proc/version/x"), 1, "Error:"),
        (("logon", "alice", "--runtime-dir", "/"), 2, "private"),
    ],
)
def test_bad_input_gets_a_clear_error(
    procs: Procs, args: tuple[str, ...], code: int, needle: str
) -> None:
    got, out, err = procs.run(*args)
    assert got == code
    assert needle in "\n".join(out) + err
    assert "Traceback" not in err


def test_oversized_message_is_refused(procs: Procs) -> None:
    code, _, err = procs.run("message", "bob", "x" * (64 * 1024 + 1))
    assert code == 2
    assert "limit is 65536" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_a_client_logs_it_off(procs: Procs, db: Any, keys: Keys, sig: int) -> None:
    procs.server()
    alice = procs.logon("alice", "n1")
    alice.signal(sig)
    assert alice.wait_exit(10) == 0
    assert alice.out[-1] == "logged-off"
    assert "alice" not in names(db, keys)
    assert not [line for line in alice.err if "Traceback" in line or "exception" in line]


def test_text_may_start_with_a_dash(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    code, out, _ = procs.run("message", "bob", "-1", "--is", "a", "number", "--node", "n1")
    assert (code, out) == (0, ["sent"])
    bob.wait_line("^Message from alice: -1 --is a number$")


def test_crashed_node_logs_on_again_at_once_but_a_hung_one_does_not(
    procs: Procs, db: Any, keys: Keys
) -> None:
    slow = {"MESSENGER_HEARTBEAT_TTL": "60"}  # so only the crash fast path can free anything
    procs.server()
    alice = procs.logon("alice", "n1", **slow)
    bob = procs.logon("bob", "n2", **slow)
    alice.kill()
    procs.logon("alice", "n1", **slow)  # same node, same name, at once
    bob.signal(signal.SIGSTOP)  # hung: its connection (and subscription) stays open
    code, out, _ = procs.run("logon", "bob", "--node", "n3")
    assert (code, out) == (1, ["user-exists-at-other-node"])
    with tempfile.TemporaryDirectory(prefix="mt-") as other_machine:
        code, out, _ = procs.run("logon", "carol", "--node", "n2", "--runtime-dir", other_machine)
    assert (code, out) == (1, ["already-logged-on"])
    assert sorted(names(db, keys)) == ["alice", "bob"]


def test_a_command_that_gave_up_is_never_applied(procs: Procs) -> None:
    # The client itself would wait 5 s; the command only 1 s. What the command was told holds.
    server = procs.server(MESSENGER_LEASE_TTL="30")
    procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    procs.logon("carol", "n3")
    server.signal(signal.SIGSTOP)
    try:
        code, out, _ = procs.run(
            "message", "bob", "too-late", "--node", "n1", MESSENGER_REPLY_TIMEOUT="1"
        )
    finally:
        server.signal(signal.SIGCONT)
    assert (code, out) == (4, ["No response from server"])
    code, out, _ = procs.run("message", "bob", "in-time", "--node", "n3")
    assert (code, out) == (0, ["sent"])
    bob.wait_line("^Message from carol: in-time$")
    # requests are served in order: the first was decided before the second
    assert not [line for line in bob.out if "too-late" in line]


def test_a_command_whose_client_hung_is_never_applied_after_it_gave_up(procs: Procs) -> None:
    """The client reads the command's request only after it is continued, past the command's
    wait: it must not send it then (the command printed `No response from server`)."""
    procs.server()
    alice = procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    alice.signal(signal.SIGSTOP)
    try:
        code, out, _ = procs.run(
            "message", "bob", "too-late", "--node", "n1", MESSENGER_REPLY_TIMEOUT="1"
        )
        assert (code, out) == (4, ["No response from server"])
    finally:
        alice.signal(signal.SIGCONT)
    # Continued within its heartbeat TTL, alice is still logged on and works.
    code, out, _ = procs.run("message", "bob", "in-time", "--node", "n1")
    assert (code, out) == (0, ["sent"])
    bob.wait_line("^Message from alice: in-time$")
    assert not [line for line in bob.out if "too-late" in line]


def test_one_embedded_server_per_host_and_a_stale_file_is_replaced(
    base_env: dict[str, str],
) -> None:
    local_only = Procs(dict(base_env))  # no Redis URL anywhere: the embedded one is used
    try:
        first = local_only.server()
        code, _, err = local_only.run("server")
        assert code == 2
        assert "already runs on this host" in err
        server_json = Path(base_env["MESSENGER_RUNTIME_DIR"]) / "server.json"
        redis_pid = json.loads(server_json.read_text())["redis_pid"]
        first.kill()  # leaves server.json behind; its Redis dies with it
        wait_until(lambda: not Path(f"/proc/{redis_pid}").exists(), 10, "embedded Redis gone")
        assert server_json.exists()
        local_only.server()  # so a new one may start
        local_only.logon("alice", "n1")
    finally:
        local_only.cleanup()
