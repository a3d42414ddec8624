"""`messenger message` and `messenger logoff` start light (messenger/entry.py): no click, redis
or asyncio for their plain forms, and what they print and exit with is what the click CLI
(messenger.cli) prints and exits with for the same command line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from messenger import cli, entry, local, options
from messenger.settings import Settings
from tests.harness import Procs, wait_until

# Neither path may need these for a plain `message` or `logoff`; the last three cost it about
# 30 ms of start-up (docs/performance.md), the first three some 200.
# rich (colour) and the spinner are the click path's; the light path loads its own spinner only
# once an answer has taken half a second (tests/test_output_pty.py).
HEAVY = (
    "click",
    "redis",
    "asyncio",
    "messenger.cli",
    "messenger.protocol",
    "dataclasses",
    "rich",
    "messenger.spinner",
    "threading",
)

# The click CLI itself, without the light path in front of it.
CLICK_MAIN = "import sys; from messenger.cli import main; main(sys.argv[1:])"

Result = tuple[int, list[str], list[str]]  # exit code, stdout lines, stderr lines


def run(env: dict[str, str], args: tuple[str, ...], *, light: bool) -> tuple[Result, set[str]]:
    """Run a command line through the entry point (`light`) or the click CLI: its result, and
    the top-level modules and messenger modules it imported (from -X importtime)."""
    how = ["-m", "messenger"] if light else ["-c", CLICK_MAIN]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *how, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    err, imported = [], set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[1].strip()
            imported.add(name if name.startswith("messenger.") else name.split(".")[0])
        else:
            err.append(line)
    return (proc.returncode, proc.stdout.splitlines(), err), imported


def both(env: dict[str, str], *args: str) -> Result:
    """The result of a command line, the same through the light path and through click; and
    the light path imported nothing heavy while click's did import click."""
    light, light_imports = run(env, args, light=True)
    full, full_imports = run(env, args, light=False)
    assert light == full, f"{args}: light path {light}, click {full}"
    assert not light_imports & set(HEAVY), f"{args}: imported {light_imports & set(HEAVY)}"
    assert "click" in full_imports
    return light


class FakeClient:
    """Something listening on a node's socket that answers every request with `answer`, or
    never (None): a client that hangs, or one that speaks nonsense."""

    def __init__(self, path: Path, answer: bytes | None) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(16)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            with conn.makefile("rb") as lines:
                self.requests.append(lines.readline())
            if self.answer is None:
                self.held.append(conn)  # never answered, closed at the end
                continue
            with conn:
                conn.sendall(self.answer)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()
        self.thread.join(5)


@pytest.fixture
def fake_client(base_env: dict[str, str]) -> Iterator[Any]:
    """Start a FakeClient on node n1's socket; closed after the test."""
    started: list[FakeClient] = []

    def start(answer: bytes | None) -> FakeClient:
        settings = Settings(node="n1", runtime_dir=Path(base_env["MESSENGER_RUNTIME_DIR"]))
        local.ensure_runtime_dir(settings)
        fake = FakeClient(local.socket_path(settings), answer)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


# --- what it imports ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("message", "bob", "hi", "--node", "n1"),
        ("--node", "n1", "--reply-timeout=2", "message", "bob", "hello", "there"),
        ("logoff", "--node", "n1"),
        ("--runtime-dir", "{runtime}", "logoff"),
    ],
)
def test_the_plain_forms_import_nothing_heavy(
    base_env: dict[str, str], args: tuple[str, ...]
) -> None:
    args = tuple(a.format(runtime=base_env["MESSENGER_RUNTIME_DIR"]) for a in args)
    (code, out, err), imported = run(base_env, args, light=True)
    assert (code, out, err) == (1, ["not-logged-on"], [])
    assert not imported & set(HEAVY), imported & set(HEAVY)
    assert "messenger.entry" in imported


def test_the_console_script_is_the_light_entry_point(base_env: dict[str, str]) -> None:
    script = Path(sys.executable).with_name("messenger")
    if not script.exists():
        pytest.skip("no console script next to this python (not installed with pip)")
    proc = subprocess.run(
        [str(script), "logoff", "--node", "n1"],
        env={**base_env, "PYTHONPROFILEIMPORTTIME": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (1, "not-logged-on\n")
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()}
    assert "messenger.entry" in imported
    assert not imported & set(HEAVY)


@pytest.mark.parametrize(
    "args",
    [
        ("message", "bob", "hi", "-v"),  # a flag of click's
        ("logoff", "--help"),
        ("message", "bob", "-x"),  # a word that looks like an option: click decides
        ("message", "bob", "hi", "--reply-timeout", "soon"),  # click says what is wrong
        ("message", "bob"),
        ("who",),
    ],
)
def test_anything_else_goes_to_click(base_env: dict[str, str], args: tuple[str, ...]) -> None:
    assert entry.parse(args) is None
    _, imported = run({**base_env, "MESSENGER_REDIS_URL": "redis://127.0.0.1:1"}, args, light=True)
    assert "click" in imported


# --- the same words and exit codes as click's ---------------------------------------------------


def test_a_send_and_a_logoff_are_the_same_either_way(procs: Procs) -> None:
    procs.server()
    procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    assert both(procs.env, "message", "bob", "hi", "--node", "n1") == (0, ["sent"], [])
    wait_until(lambda: bob.out.count("Message from alice: hi") == 2, 10, "both messages")
    assert both(procs.env, "--node", "n1", "message", "carol", "hi") == (
        1,
        ["receiver-not-found"],
        [],
    )
    assert both(procs.env, "message", "bob", "hi", "--node", "n9") == (1, ["not-logged-on"], [])
    assert both(procs.env, "logoff", "--node", "n9") == (1, ["not-logged-on"], [])
    # A logoff ends the session: once through each path.
    for light in (True, False):
        assert run(procs.env, ("logoff", "--node", "n2"), light=light)[0] == (0, ["logged-off"], [])
        assert bob.wait_exit() == 0
        assert bob.out[-1] == "logged-off"
        bob = procs.logon("bob", "n2")


def test_bad_input_is_the_same_either_way(base_env: dict[str, str]) -> None:
    code, out, err = both(base_env, "message", "b b", "hi", "--node", "n1")
    assert (code, out) == (2, [])
    assert err == [
        "Error: invalid user name 'b b': 1-32 characters: letters, digits, '_', '.', '-', "
        "starting with a letter or digit"
    ]
    assert both(base_env, "message", "bob", "x" * 70_000) == (
        2,
        [],
        ["Error: message text is 70000 bytes; the limit is 65536"],
    )
    env = {**base_env, "MESSENGER_MAX_MESSAGE_BYTES": "4"}
    assert both(env, "message", "bob", "hello") == (
        2,
        [],
        ["Error: message text is 5 bytes; the limit is 4"],
    )
    assert both(base_env, "message", "bob", "hi", "--reply-timeout", "0") == (
        2,
        [],
        ["Error: reply_timeout must be positive and at most 3600.0 s"],
    )
    # Settings read the environment's value even where an option overrides it.
    env = {**base_env, "MESSENGER_REPLY_TIMEOUT": "soon"}
    assert both(env, "message", "bob", "hi", "--reply-timeout", "2") == (
        2,
        [],
        ["Error: MESSENGER_REPLY_TIMEOUT: not a valid float: 'soon'"],
    )


def test_a_client_that_does_not_answer_is_no_response_either_way(
    base_env: dict[str, str], fake_client: Any
) -> None:
    fake = fake_client(None)
    env = base_env
    result = both(env, "message", "bob", "hi", "--node", "n1", "--reply-timeout", "0.2")
    assert result == (4, ["No response from server"], [])
    assert both(env, "logoff", "--node", "n1", "--reply-timeout=0.2") == result
    assert len(fake.requests) == 4  # every call reached it, with the command's deadline
    assert all(b'"wait_ms": "200"' in r and b'"until_ms": ' in r for r in fake.requests)


GARBLED: Result = (1, [], ["Error: garbled answer from this node's client"])
HUNG_UP = "messenger: this node's client closed the connection without answering"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"not json\n", GARBLED),
        (b'{"reply": 7}\n', GARBLED),
        (b'{"reply": "sent", "exit": "x"}\n', GARBLED),
        (b"", (4, ["No response from server"], [HUNG_UP])),
        (b'{"reply": "\\u001b[2Jsent"}\n', (1, ["\\x1b[2Jsent"], [])),  # escaped
        (b'{"reply": "text too long", "exit": "2"}\n', (2, ["text too long"], [])),
        (b'{"reply": "sent"}', (0, ["sent"], [])),  # no end of line, then the end of the stream
    ],
)
def test_what_a_client_answers_is_read_the_same_either_way(
    base_env: dict[str, str], fake_client: Any, answer: bytes, expected: Result
) -> None:
    fake_client(answer)
    assert both(base_env, "message", "bob", "hi", "--node", "n1") == expected
    assert both(base_env, "logoff", "--node", "n1") == expected


# --- one reading of a command line ----------------------------------------------------------------

# (command line, environment): each a plain form, which the light path runs itself.
PLAIN = [
    (("message", "bob", "hi"), {}),
    (("message", "bob", "hi", "there", "--node", "n1"), {}),
    (("message", "--node=n1", "bob", "a=b", "--prefix", "p"), {}),
    (("--node", "n1", "message", "bob", "hi"), {"MESSENGER_NODE": "n7"}),
    (("--node=n1", "message", "--node", "n2", "bob", "hi"), {}),  # after wins over before
    (("--reply-timeout", "2", "message", "bob", "hi"), {"MESSENGER_REPLY_TIMEOUT": "3"}),
    (("message", "bob", "hi"), {"MESSENGER_REPLY_TIMEOUT": "3", "MESSENGER_NODE": "x"}),
    (("message", "bob", "hi"), {"MESSENGER_REPLY_TIMEOUT": "", "MESSENGER_MAX_MESSAGE_BYTES": "9"}),
    (("logoff",), {}),
    (("logoff", "--node", "n1", "--heartbeat-ttl=4", "--heartbeat-interval", "2"), {}),
    (("--runtime-dir", "{tmp}/rt", "logoff", "--tls-ca-file", "{tmp}/ca.pem"), {}),
]


@pytest.mark.parametrize(("args", "env"), PLAIN)
def test_the_light_path_reads_a_command_line_as_click_does(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: tuple[str, ...],
    env: dict[str, str],
) -> None:
    for name in list(os.environ):
        if name.startswith("MESSENGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MESSENGER_RUNTIME_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "ca.pem").write_text("not checked before connecting to Redis\n")
    args = tuple(a.format(tmp=tmp_path) for a in args)
    plain = entry.parse(args)
    assert plain is not None
    settings = options.resolve(plain.before, plain.after)
    light = (settings, entry.request(settings, plain.command, plain.words))

    called: list[tuple[Settings, dict[str, str]]] = []

    def call_client(settings: Settings, request: dict[str, str]) -> int:
        called.append((settings, request))
        return 0

    monkeypatch.setattr(entry, "call_client", call_client)
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)
    with pytest.raises(SystemExit) as exited:
        cli.main(list(args))
    assert exited.value.code == 0
    assert called == [light]
