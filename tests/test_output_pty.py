"""What a person at a terminal sees (pexpect on a pseudo-terminal, TERM=xterm): colour, the
who header, `nobody is logged on`, and a spinner once a command has waited half a second; and
none of it with NO_COLOR, nor on a pipe."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pexpect
import pytest

from messenger.embedded import EmbeddedRedis
from tests.conftest import procs_on
from tests.harness import Procs

pytestmark = pytest.mark.integration

SGR = re.compile(r"\x1b\[[0-9;]*m")
GREEN, RED, BOLD = "\x1b[32m", "\x1b[31m", "\x1b[1m"
SPINNER = re.compile(r"\r[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] waiting for this node's client")
ERASE = "\r\x1b[K"


@pytest.fixture
def terminal(procs: Procs) -> Iterator[object]:
    """Run `messenger ARGS` on a terminal to its end: (exit code, what the terminal got,
    seconds it took). Every child is ended by its own pid, even when a test fails."""
    children: list[pexpect.spawn] = []

    def run(*args: str, timeout: float = 20.0, **env: str) -> tuple[int, str, float]:
        started = time.monotonic()
        child = pexpect.spawn(
            sys.executable,
            ["-m", "messenger", *args],
            env={**procs.env, "TERM": "xterm", **env},
            dimensions=(24, 100),
            encoding="utf-8",
            timeout=timeout,
        )
        children.append(child)
        child.expect(pexpect.EOF)
        took = time.monotonic() - started
        child.close()
        assert child.exitstatus is not None, f"{args}: killed by signal {child.signalstatus}"
        return child.exitstatus, str(child.before), took

    yield run
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def plain(text: str) -> str:
    return SGR.sub("", text).replace("\r\n", "\n")


def test_replies_are_green_and_red_on_a_terminal(procs: Procs, terminal: object) -> None:
    run = terminal
    assert callable(run)
    procs.server()
    procs.logon("alice", "n1")
    procs.logon("bob", "n2")
    code, seen, _ = run("message", "bob", "hi", "--node", "n1")  # the light path
    assert (code, seen) == (0, f"{GREEN}sent\x1b[0m\r\n")
    code, seen, _ = run("message", "carol", "hi", "--node", "n1", "-v")  # through click
    assert (code, seen) == (1, f"{RED}receiver-not-found\x1b[0m\r\n")
    code, seen, _ = run("message", "bob", "hi", "--node", "n9")
    assert (code, seen) == (1, f"{RED}not-logged-on\x1b[0m\r\n")


def test_who_has_a_header_and_says_when_nobody_is_on(procs: Procs, terminal: object) -> None:
    run = terminal
    assert callable(run)
    procs.server()
    code, seen, _ = run("who")
    assert (code, plain(seen)) == (0, "nobody is logged on\n")
    procs.logon("alice", "n1")
    procs.logon("bob-the-builder", "node-2")
    code, seen, _ = run("who")
    assert code == 0
    lines = plain(seen).splitlines()
    assert re.fullmatch(r"NAME +NODE +SINCE", lines[0]), lines
    assert re.fullmatch(r"alice +n1 +\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", lines[1]), lines
    assert lines[2].startswith("bob-the-builder  node-2  ")
    assert f"{BOLD}NAME" in seen  # the header is bold


def test_a_message_s_sender_is_bold_and_its_text_escaped(procs: Procs, terminal: object) -> None:
    procs.server()
    procs.logon("alice", "n1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "messenger", "logon", "bob", "--node", "n2"],
        env={**procs.env, "TERM": "xterm"},
        dimensions=(24, 100),
        encoding="utf-8",
        timeout=15,
    )
    try:
        child.expect_exact(f"{GREEN}logged-on\x1b[0m")
        text = "[bold]x[/bold] \x1b[2J\x07 done"
        assert procs.run("message", "bob", text, "--node", "n1")[:2] == (0, ["sent"])
        child.expect_exact("done")
        line = str(child.before) + "done"
        assert f"Message from {BOLD}alice\x1b[0m: " in line
        assert "[bold]x[/bold] \\x1b[2J\\x07 done" in plain(line)  # no markup, escaped
        assert "\x1b[2J" not in line
        assert "\x07" not in line
    finally:
        child.terminate(force=True)


@pytest.mark.parametrize("value", ["1", ""])
def test_no_color_means_no_colour_whatever_its_value(
    procs: Procs, terminal: object, value: str
) -> None:
    run = terminal
    assert callable(run)
    procs.server()
    procs.logon("alice", "n1")
    procs.logon("bob", "n2")
    for args in (
        ("message", "bob", "hi", "--node", "n1"),
        ("message", "carol", "hi", "--node", "n1", "--json"),
        ("who",),
        ("status", "--node", "n1"),
        ("health",),
    ):
        code, seen, _ = run(*args, NO_COLOR=value)
        assert "\x1b" not in seen, (args, seen)
        assert code in (0, 1)


def test_a_pipe_gets_no_colour(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    procs.logon("bob", "n2")
    for args in (("message", "bob", "hi", "--node", "n1"), ("who",), ("status",), ("health",)):
        code, out, err = procs.run(*args, TERM="xterm", FORCE_COLOR="1")
        assert code == 0, err
        assert "\x1b" not in "\n".join(out) + err, (args, out, err)


def test_a_spinner_shows_once_a_command_has_waited_half_a_second(
    procs: Procs, terminal: object
) -> None:
    run = terminal
    assert callable(run)
    procs.server()
    alice = procs.logon("alice", "n1")
    procs.logon("bob", "n2")
    code, seen, _ = run("message", "bob", "hi", "--node", "n1")
    assert code == 0
    assert not SPINNER.search(seen)  # answered at once: no spinner
    alice.signal(signal.SIGSTOP)  # its socket still takes the connection; nothing answers
    try:
        for args in (("message", "bob", "hi"), ("logoff",), ("message", "bob", "hi", "--json")):
            code, seen, took = run(*args, "--node", "n1", "--reply-timeout", "1.5")
            assert code == 4, seen
            assert took > 1.5
            spun = SPINNER.search(seen)
            assert spun, seen
            # erased before the reply, which is alone on its line
            tail = seen[spun.end() :]
            assert ERASE in tail
            reply = tail[tail.rindex(ERASE) + len(ERASE) :]
            assert plain(reply).strip().endswith(("No response from server", '"exit": 4}'))
        # And on a pipe: the same wait, no spinner.
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "messenger", "message", "bob", "hi", "--node", "n1"],
            env={**procs.env, "MESSENGER_REPLY_TIMEOUT": "1.5"},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert time.monotonic() - started > 1.5
        assert (proc.returncode, proc.stdout, proc.stderr) == (4, "No response from server\n", "")
    finally:
        alice.signal(signal.SIGCONT)


def test_logon_spins_while_it_waits_for_the_server(procs: Procs, terminal: object) -> None:
    run = terminal
    assert callable(run)
    server = procs.server()
    server.signal(signal.SIGSTOP)  # no coordinator answers: the logon waits its reply timeout
    try:
        code, seen, _ = run("logon", "alice", "--node", "n1", "--reply-timeout", "1.5")
    finally:
        server.signal(signal.SIGCONT)
    assert code in (3, 4), seen
    assert re.search(r"\r[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] logging on", seen), seen
    assert ERASE in seen


def test_who_status_and_health_spin_while_redis_does_not_answer(
    own_redis: EmbeddedRedis, base_env: dict[str, str]
) -> None:
    procs = procs_on(own_redis, base_env)
    children: list[pexpect.spawn] = []
    try:
        procs.server()
        procs.logon("alice", "n1")
        os.kill(own_redis.pid, signal.SIGSTOP)  # connections are taken; nothing answers
        try:
            for args in (("who",), ("status",), ("health",)):
                child = pexpect.spawn(
                    sys.executable,
                    ["-m", "messenger", *args, "--reply-timeout", "1.5"],
                    env={**procs.env, "TERM": "xterm"},
                    dimensions=(24, 100),
                    encoding="utf-8",
                    timeout=20,
                )
                children.append(child)
                child.expect(pexpect.EOF)
                child.close()
                seen = str(child.before)
                assert child.exitstatus == 3, (args, seen)
                spun = re.search(r"\r[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] asking Redis", seen)
                assert spun, (args, seen)
                tail = seen[spun.end() :]
                assert ERASE in tail  # erased before `noconnection` is printed
                assert plain(tail[tail.rindex(ERASE) + len(ERASE) :]).startswith("noconnection")
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
    finally:
        for child in children:
            if child.isalive():
                child.terminate(force=True)
        procs.cleanup()
