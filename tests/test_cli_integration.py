"""The CLI as a user meets it: what `who` prints from untrusted Redis contents, log lines that
cannot be forged, options in any place, and errors that say what is wrong."""

from __future__ import annotations

import http.server
import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messenger.keys import Keys
from tests.harness import Procs, wait_until

pytestmark = pytest.mark.integration


def plant_user(db: Any, keys: Keys, name: str, raw: str) -> None:
    """An entry of the public user list written by something other than the coordinator."""
    db.hset(keys.users, name, raw)


def run_on_a_terminal(procs: Procs, *args: str) -> tuple[int, str, str]:
    """Run a command whose stdout is a pseudo-terminal: (exit code, stdout, stderr)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "messenger", *args],
            env=procs.env,
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
            text=True,
            timeout=15,
            check=False,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        return proc.returncode, b"".join(chunks).decode(), proc.stderr
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)


# --- who ----------------------------------------------------------------------------------------


def test_who_skips_what_does_not_decode_and_escapes_what_it_prints(
    procs: Procs, db: Any, keys: Keys
) -> None:
    procs.server()
    procs.logon("alice", "n1")
    plant_user(db, keys, "carol", "{not json")
    plant_user(db, keys, "dave", json.dumps({"node": ["x"]}))
    plant_user(db, keys, "\x1b[2J\rmallory", json.dumps({"node": "n\nx y"}))
    code, out, err = procs.run("who")
    assert code == 0, err
    assert out == ["\\x1b[2J\\x0dmallory  n\\x0ax y", "alice               n1"]
    assert "skipped 2 session entries that do not decode" in err
    assert "Traceback" not in err
    code, out, err = procs.run("who", "--json")
    assert code == 0
    # One object per line (docs/cli-json.md); `since` is what the entry says, null if nothing.
    users = [json.loads(line) for line in out]
    assert [{k: u[k] for k in ("name", "node")} for u in users] == [
        {"name": "\x1b[2J\rmallory", "node": "n\nx y"},
        {"name": "alice", "node": "n1"},
    ]
    assert users[0]["since"] is None
    assert isinstance(users[1]["since"], int)
    assert all("\x1b" not in line for line in out)  # JSON escapes it: still safe on a terminal


def test_who_with_nobody_on_a_terminal_says_so(procs: Procs) -> None:
    procs.server()
    code, out, err = run_on_a_terminal(procs, "who")
    assert (code, out) == (0, "")
    assert "nobody is logged on" in err


def test_who_with_nobody_on_a_pipe_prints_nothing(procs: Procs) -> None:
    procs.server()
    assert procs.run("who") == (0, [], "")


def test_coordinator_log_lines_cannot_be_forged(procs: Procs, db: Any, keys: Keys) -> None:
    server = procs.server()
    db.hset(keys.users, "evil\n2026-01-01 00:00:00 INFO forged line", json.dumps({"node": "x"}))
    procs.logon("alice", "n1")
    line = server.wait_line("list is now: .*alice@n1", 10, stderr=True)
    assert "evil\\x0a2026-01-01 00:00:00 INFO forged line" in line
    assert not [x for x in server.err if x.startswith("2026-01-01 00:00:00 INFO forged")]


# --- errors that say what is wrong --------------------------------------------------------------


@pytest.fixture
def not_redis() -> Iterator[int]:
    """A port where an HTTP server, not Redis, answers."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield int(httpd.server_address[1])
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_a_server_pointed_at_something_that_is_not_redis_says_so_and_backs_off(
    procs: Procs, not_redis: int
) -> None:
    server = procs.start("server", MESSENGER_REDIS_URL=f"redis://:secret@127.0.0.1:{not_redis}/0")
    server.wait_line(r"retrying in 2 s", 15, stderr=True)
    retries = [line for line in server.err if "retrying in" in line]
    assert [line.rsplit("retrying in ", 1)[1] for line in retries[:4]] == [
        "0.25 s",
        "0.5 s",
        "1 s",
        "2 s",
    ]
    assert all(f"127.0.0.1:{not_redis}/0" in line for line in retries)
    assert all("not a Redis server" in line for line in retries)
    assert "Traceback" not in "\n".join(server.err)
    assert "secret" not in "\n".join(server.err)
    assert len(server.err) == len(retries)  # one line per attempt, nothing else


def test_a_server_with_an_unreachable_redis_says_what_it_tried(procs: Procs) -> None:
    server = procs.start("server", MESSENGER_REDIS_URL="redis://127.0.0.1:1/0")
    line = server.wait_line(r"retrying in", 15, stderr=True)
    assert "Redis at 127.0.0.1:1/0" in line
    assert "Error 111" in line or "refused" in line


@pytest.mark.parametrize("command", [("who",), ("server",), ("logon", "alice")])
@pytest.mark.parametrize("path", ["/xyz", "/0/1", "/-1"])
def test_a_database_that_is_not_a_number_is_refused(
    procs: Procs, command: tuple[str, ...], path: str
) -> None:
    code, out, err = procs.run(*command, MESSENGER_REDIS_URL=f"redis://127.0.0.1:6379{path}")
    assert (code, out) == (2, [])
    assert "only /<database number>" in err
    assert "Traceback" not in err


def test_after_a_killed_embedded_server_commands_say_it_is_gone(base_env: dict[str, str]) -> None:
    local_only = Procs(dict(base_env))  # no Redis URL: the embedded server's file is used
    try:
        server = local_only.server()
        server_json = json.loads(
            (Path(base_env["MESSENGER_RUNTIME_DIR"]) / "server.json").read_text()
        )
        server.kill()
        wait_until(lambda: not Path(f"/proc/{server_json['redis_pid']}").exists(), 10, "Redis gone")
        for command in (("who",), ("logon", "alice", "--node", "n1")):
            code, out, err = local_only.run(*command)
            assert (code, out) == (3, ["noconnection"])
            assert "server recorded in" in err
            assert "is gone" in err
            assert "start one with `messenger server`" in err
    finally:
        local_only.cleanup()


# --- options in any place -----------------------------------------------------------------------


def test_options_before_the_command_are_accepted(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    procs.logon("bob", "n2")
    assert procs.run("--node", "n1", "message", "bob", "hi") == (0, ["sent"], "")
    code, out, _ = procs.run("--node", "n1", "--reply-timeout", "3", "who")
    assert (code, out) == (0, ["alice  n1", "bob    n2"])
    # An option typed before the command wins over the environment...
    assert procs.run("--node", "n1", "message", "bob", "hi", MESSENGER_NODE="n7")[:2] == (
        0,
        ["sent"],
    )
    # ...and one typed after it wins over both.
    assert procs.run("--node", "n7", "message", "bob", "hi", "--node", "n1")[:2] == (0, ["sent"])
    assert procs.run("--node", "n7", "message", "bob", "hi")[:2] == (1, ["not-logged-on"])
    assert procs.run("--node", "n2", "logoff")[:2] == (0, ["logged-off"])


def test_a_bad_option_before_the_command_is_a_clear_error(procs: Procs) -> None:
    code, out, err = procs.run("--heartbeat-ttl", "soon", "who")
    assert (code, out) == (2, [])
    assert "'soon' is not a valid float" in err
    code, _, err = procs.run("--no-such-option", "who")
    assert code == 2
    assert "No such option" in err


# --- a user sees the reply word and a one-line detail, nothing else ------------------------------


def test_a_failing_xadd_shows_the_word_and_one_line(procs: Procs, db: Any, keys: Keys) -> None:
    procs.server()
    alice = procs.logon("alice", "n1")
    db.delete(keys.requests)
    db.set(keys.requests, "not a stream")  # every XADD now fails with WRONGTYPE
    code, out, _ = procs.run("message", "bob", "hi", "--node", "n1")
    assert (code, out) == (3, ["noconnection"])
    assert alice.wait_exit(10) == 3
    assert alice.out[-1] == "noconnection"
    assert len(alice.err) == 1, alice.err
    assert "WRONGTYPE" in alice.err[0]
