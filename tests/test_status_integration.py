"""`--json` on every command, `who --watch`, `message --wait`, `status` and `health`, on real
processes and a real Redis (pipes only: no colour, no spinner; tests/test_output_pty.py has the
terminal's side)."""

from __future__ import annotations

import json
import re
import signal
from typing import Any

from messenger.embedded import EmbeddedRedis
from tests.conftest import procs_on
from tests.harness import Procs, wait_until

ESCAPE = re.compile(r"\x1b")


def json_lines(out: list[str]) -> list[dict[str, Any]]:
    objects = [json.loads(line) for line in out]
    assert all(isinstance(o, dict) for o in objects), out
    return objects


def no_escapes(*texts: str) -> None:
    for text in texts:
        assert not ESCAPE.search(text), repr(text)


# --- --json, command by command -------------------------------------------------------------


def test_every_command_s_json_lines_carry_the_documented_fields(procs: Procs) -> None:
    server = procs.start("server", "--json", **procs.server_env)
    wait_until(lambda: any("is active" in line for line in server.err), 15, "active")
    record = json.loads(next(line for line in server.err if "is active" in line))
    assert set(record) == {"time", "level", "logger", "message"}
    assert record["level"] == "INFO"
    assert record["logger"].startswith("messenger")

    alice = procs.start("logon", "alice", "--node", "n1", "--json")
    alice.wait_line(r'^\{"reply": "logged-on"\}$', 15)
    procs.logon("bob", "n2")

    text = "hi\x1b[2J\x7f\u202e there"
    code, out, err = procs.run("message", "alice", text, "--node", "n2", "--json")
    assert (code, json_lines(out)) == (0, [{"reply": "sent", "exit": 0}])
    alice.wait_line(r'"event": "message"', 10)
    event = json_lines([line for line in alice.out if '"event"' in line])[0]
    assert event == {"event": "message", "from": "bob", "text": text}
    assert all(line.isascii() and "\x7f" not in line for line in alice.out)
    no_escapes(*alice.out)  # JSON escaped it (\u001b): raw to a decoder, inert on a terminal

    code, out, _ = procs.run("message", "carol", "hi", "--node", "n2", "--json")
    assert (code, json_lines(out)) == (1, [{"reply": "receiver-not-found", "exit": 1}])
    code, out, _ = procs.run("message", "bob", "hi", "--node", "n9", "--json")
    assert (code, json_lines(out)) == (1, [{"reply": "not-logged-on", "exit": 1}])
    code, out, err = procs.run("message", "b b", "hi", "--node", "n2", "--json")
    assert code == 2
    assert json_lines(out) == [{"error": err.removeprefix("Error: "), "exit": 2}]

    code, out, _ = procs.run("who", "--json")
    users = json_lines(out)
    assert [(u["name"], u["node"]) for u in users] == [("alice", "n1"), ("bob", "n2")]
    assert all(set(u) == {"name", "node", "since"} and isinstance(u["since"], int) for u in users)

    code, out, _ = procs.run("status", "--json", "--node", "n1")
    assert code == 0
    [state] = json_lines(out)
    assert set(state) == {"redis", "redis_time", "active", "coordinators", "users", "node"}
    assert state["users"] == 2
    assert state["node"] == {"name": "n1", "client": "logged-on", "user": "alice"}
    assert "***" in state["redis"]

    code, out, _ = procs.run("health", "--json")
    assert code == 0
    [health] = json_lines(out)
    assert health["reply"] == "healthy"
    assert health["exit"] == 0
    assert health["coordinator"] == state["active"]

    code, out, _ = procs.run("logoff", "--node", "n1", "--json")
    assert (code, json_lines(out)) == (0, [{"reply": "logged-off", "exit": 0}])
    assert alice.wait_exit() == 0
    assert json.loads(alice.out[-1]) == {"reply": "logged-off", "exit": 0}


def test_json_errors_say_the_word_the_code_and_why(
    redis_server: EmbeddedRedis, procs: Procs
) -> None:
    down = "redis://127.0.0.1:1/0"
    for command in (("who",), ("status",), ("health",), ("logon", "alice", "--node", "n1")):
        code, out, err = procs.run(*command, "--json", MESSENGER_REDIS_URL=down)
        assert code == 3, (command, out, err)
        [outcome] = json_lines(out[-1:])
        assert outcome["reply"] == "noconnection"
        assert outcome["exit"] == 3
        assert "127.0.0.1:1" in outcome["error"]
        assert "127.0.0.1:1" in err  # the details still on stderr


# --- who --watch -----------------------------------------------------------------------------


def test_who_watch_shows_logons_and_logoffs_with_their_reasons(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    watcher = procs.start("who", "--watch")
    watcher.wait_line(r"^alice  n1$", 10)
    bob = procs.logon("bob", "n2")
    watcher.wait_line(r" logon bob n2$", 10)
    assert procs.run("logoff", "--node", "n2")[:2] == (0, ["logged-off"])
    assert bob.wait_exit() == 0
    watcher.wait_line(r" logoff bob n2 \(logoff\)$", 10)
    carol = procs.logon("carol", "n3")
    carol.kill()  # kill -9: its connection closes, the coordinator sees the crash
    watcher.wait_line(r" logoff carol n3 \(crash\)$", 10)
    watcher.signal(signal.SIGTERM)
    assert watcher.wait_exit(10) == 0
    no_escapes(*watcher.out, *watcher.err)


def test_who_watch_json_is_one_object_per_event(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    watcher = procs.start("who", "--watch", "--json")
    watcher.wait_line(r'"name": "alice"', 10)  # the list first: it is watching now
    bob = procs.logon("bob", "n2")
    watcher.wait_line(r'"event": "logon"', 10)
    bob.signal(signal.SIGINT)  # Ctrl-C logs off
    assert bob.wait_exit() == 0
    watcher.wait_line(r'"event": "logoff"', 10)
    first, *events = json_lines(watcher.out)
    assert set(first) == {"name", "node", "since"}
    assert [(e["event"], e["name"], e["node"], e["reason"]) for e in events] == [
        ("logon", "bob", "n2", None),
        ("logoff", "bob", "n2", "logoff"),
    ]
    assert all(set(e) == {"event", "name", "node", "at", "reason"} for e in events)
    assert all(isinstance(e["at"], int) for e in events)
    watcher.signal(signal.SIGINT)
    assert watcher.wait_exit(10) == 0


def test_who_watch_stops_with_noconnection_when_redis_goes(
    own_redis: EmbeddedRedis, base_env: dict[str, str]
) -> None:
    procs = procs_on(own_redis, base_env)
    try:
        procs.server()
        procs.logon("alice", "n1")
        watcher = procs.start("who", "--watch", "--reply-timeout", "2")
        watcher.wait_line(r"^alice  n1$", 10)
        own_redis.stop()
        assert watcher.wait_exit(15) == 3
        assert watcher.out[-1] == "noconnection"
    finally:
        procs.cleanup()


# --- message --wait --------------------------------------------------------------------------


def test_message_wait_says_delivered_or_not_delivered(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    code, out, err = procs.run("message", "bob", "hi", "--node", "n1", "--wait")
    assert (code, out) == (0, ["sent", "delivered"]), err
    assert "Message from alice: hi" in bob.out
    code, out, _ = procs.run("message", "bob", "again", "--node", "n1", "--wait", "--json")
    assert (code, json_lines(out)) == (0, [{"reply": "sent", "receipt": "delivered", "exit": 0}])
    bob.signal(signal.SIGSTOP)  # its subscription lives: `sent`, but nothing is printed
    try:
        code, out, _ = procs.run(
            "message", "bob", "hello?", "--node", "n1", "--wait-timeout", "1", "--json"
        )
        assert (code, json_lines(out)) == (
            1,
            [{"reply": "sent", "receipt": "not-delivered", "exit": 1}],
        )
        code, out, _ = procs.run("message", "bob", "hello?", "--node", "n1", "--wait-timeout", "1")
        assert (code, out) == (1, ["sent", "not-delivered"])
    finally:
        bob.signal(signal.SIGCONT)
    code, out, _ = procs.run("message", "carol", "hi", "--node", "n1", "--wait")
    assert (code, out) == (1, ["receiver-not-found"])


# --- status and health -----------------------------------------------------------------------


def test_status_shows_the_active_coordinator_and_the_standby(procs: Procs) -> None:
    first = procs.server()
    second = procs.start("server", **procs.server_env)
    second.wait_line("standby|stand", 15, stderr=True)
    procs.logon("alice", "n1")
    code, out, err = procs.run("status", "--node", "n1")
    assert code == 0, err
    text = "\n".join(out)
    assert re.search(r"^redis +redis://t\w+-client:\*\*\*@127\.0\.0\.1:\d+/0$", text, re.M), text
    assert re.search(
        rf"^coordinator +\S+ on \S+ \(pid {first.pid}\): active since .* s ago\)$", text, re.M
    ), text
    assert re.search(rf"^standby +\S+ on \S+ \(pid {second.pid}\)$", text, re.M), text
    assert re.search(r"^users +1 logged on$", text, re.M), text
    assert re.search(r"^this node +n1: alice is logged on$", text, re.M), text
    no_escapes(text, err)
    code, out, _ = procs.run("status", "--json", "--node", "n2")
    [state] = json_lines(out)
    coordinators = {c["pid"]: c for c in state["coordinators"]}
    assert coordinators[first.pid]["active"] is True
    assert coordinators[first.pid]["id"] == state["active"]
    assert isinstance(coordinators[first.pid]["since"], int)
    assert coordinators[second.pid]["active"] is False
    assert coordinators[second.pid]["since"] is None
    assert state["node"]["client"] == "not-logged-on"
    assert state["redis"].split("@")[0].endswith(":***")
    # The active one stops: the standby takes over, and status says so.
    first.signal(signal.SIGTERM)
    assert first.wait_exit(10) == 0
    wait_until(
        lambda: (
            json_lines(procs.run("status", "--json")[1])[0]["active"] is not None
            and json_lines(procs.run("status", "--json")[1])[0]["coordinators"][0]["pid"]
            == second.pid
        ),
        10,
        "the standby is active",
    )


def test_status_redacts_a_sentinel_url(procs: Procs) -> None:
    url = "redis+sentinel://messenger-client:s3cret@127.0.0.1:1,127.0.0.1:2/mymaster/0?sentinel_password=t0p"
    code, out, err = procs.run("status", "--reply-timeout", "1", MESSENGER_REDIS_URL=url)
    assert code == 3
    shown = "\n".join(out) + err
    assert "s3cret" not in shown
    assert "t0p" not in shown
    assert out[0].startswith("redis        redis+sentinel://messenger-client:***@127.0.0.1:1,")
    assert out[-1] == "noconnection"


def test_health_needs_redis_and_a_coordinator(
    own_redis: EmbeddedRedis, base_env: dict[str, str]
) -> None:
    procs = procs_on(own_redis, base_env)
    try:
        # No coordinator has run yet: the client user does not exist; Redis's own credential.
        code, out, err = procs.run("health", MESSENGER_REDIS_URL=own_redis.url)
        assert (code, out) == (3, ["noconnection"])
        assert "no coordinator holds the lease" in err
        server = procs.server()
        assert procs.run("health") == (0, ["healthy"], "")
        server.signal(signal.SIGTERM)
        assert server.wait_exit(10) == 0
        code, out, err = procs.run("health", MESSENGER_REDIS_URL=own_redis.url)
        assert (code, out) == (3, ["noconnection"])
        assert "no coordinator holds the lease" in err
        server = procs.server()
        assert procs.run("health")[0] == 0
        server.signal(signal.SIGSTOP)  # hung: its lease runs out (2 s)
        try:
            wait_until(lambda: procs.run("health")[0] == 3, 10, "health to fail")
        finally:
            server.signal(signal.SIGCONT)
        own_redis.stop()
        code, out, err = procs.run("health", "--reply-timeout", "1", timeout=10)
        assert (code, out) == (3, ["noconnection"])
        assert f"127.0.0.1:{own_redis.port}" in err
    finally:
        procs.cleanup()
