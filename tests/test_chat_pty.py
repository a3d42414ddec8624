"""`messenger chat` as a person meets it: through a real pseudo-terminal (pexpect), against a
real redis-server and a real `messenger server`; and on pipes, as a script drives it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pexpect
import pyte
import pytest

from tests.harness import Procs

pytestmark = pytest.mark.integration

ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Pty:
    """One `messenger chat` on a pseudo-terminal of 24x100, its screen rendered by a terminal
    emulator (pyte) so tests assert on what a person sees; ended by its own PID."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "messenger", "chat", *args],
            # pexpect answers no cursor position request: prompt_toolkit is told not to ask.
            env={**env, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"},
            dimensions=(24, 100),
            timeout=15,
        )
        self.vt = pyte.Screen(100, 24)
        self.stream = pyte.ByteStream(self.vt)
        self.eof = False

    def _read(self) -> None:
        if self.eof:
            time.sleep(0.02)
            return
        try:
            data = self.child.read_nonblocking(65536, timeout=0.05)
        except pexpect.TIMEOUT:
            return
        except pexpect.EOF:
            self.eof = True
            return
        self.stream.feed(data)

    def screen(self) -> str:
        return "\n".join(line.rstrip() for line in self.vt.display)

    def expect(self, pattern: str, timeout: float = 15) -> str:
        """Wait until the rendered screen matches the regex `pattern`; return the match."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            found = rx.search(self.screen())
            if found:
                return found.group(0)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no {pattern!r} on the screen in {timeout}s:\n{self.screen()}"
                )

    def prompt_line(self) -> str:
        return self.vt.display[self.vt.cursor.y].rstrip()

    def send(self, keys: str) -> None:
        self.child.send(keys)

    def wait_exit(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while not self.eof:
            assert time.monotonic() < deadline, f"still running after {timeout}s:\n{self.screen()}"
            self._read()
        self.child.wait()
        code = self.child.exitstatus
        assert code is not None, f"killed by signal {self.child.signalstatus}"
        return int(code)

    def kill(self) -> None:
        if self.child.isalive():
            os.kill(self.child.pid, signal.SIGKILL)
        self.child.close(force=True)


@pytest.fixture
def ptys(procs: Procs) -> Iterator[list[Pty]]:
    started: list[Pty] = []
    yield started
    for p in started:
        p.kill()


def chat(procs: Procs, ptys: list[Pty], name: str, node: str) -> Pty:
    p = Pty(procs.env, name, "--node", node)
    ptys.append(p)
    p.expect("logged-on")
    p.expect(f"{name}>$")
    return p


def test_typed_text_survives_an_incoming_message_and_the_line_is_marked_delivered(
    procs: Procs, ptys: list[Pty]
) -> None:
    procs.server()
    bob = procs.logon("bob", "n2")
    alice = chat(procs, ptys, "alice", "n1")
    alice.send("@bob hel")  # no Enter
    alice.expect("alice> @bob hel$")
    assert procs.run("message", "alice", "how are you", "--node", "n2")[:2] == (0, ["sent"])
    alice.expect("Message from bob: how are you")
    # Printed above the input line, which still holds what was typed, cursor at its end.
    assert alice.prompt_line() == "alice> @bob hel"
    assert alice.vt.cursor.x == len("alice> @bob hel")
    lines = alice.screen().splitlines()
    assert lines.index("Message from bob: how are you") < lines.index("alice> @bob hel")
    alice.send("lo\r")
    alice.expect(r"→ bob: hello +sent")
    alice.expect(r"✓ delivered bob: hello")
    bob.wait_line("^Message from alice: ", 10)
    assert [x for x in bob.out if x.startswith("Message from alice")] == [
        "Message from alice: hello"
    ]


def test_typing_through_a_burst_of_messages(procs: Procs, ptys: list[Pty]) -> None:
    procs.server()
    bob = procs.logon("bob", "n2")
    alice = chat(procs, ptys, "alice", "n1")
    typed = ""
    for i in range(6):  # a key, a message, a key, ...: each message lands mid-line
        typed += "@bob " if i == 0 else f"w{i} "
        alice.send("@bob " if i == 0 else f"w{i} ")
        alice.expect(f"alice> {re.escape(typed.rstrip())}$")
        assert procs.run("message", "alice", f"m{i}", "--node", "n2")[:2] == (0, ["sent"])
        alice.expect(f"^Message from bob: m{i}$")
        assert alice.prompt_line() == f"alice> {typed}".rstrip()
    alice.send("end\r")
    alice.expect(r"✓ delivered bob: w1 w2 w3 w4 w5 end")
    bob.wait_line("^Message from alice: ", 10)
    assert [x for x in bob.out if x.startswith("Message from alice")] == [
        "Message from alice: w1 w2 w3 w4 w5 end"
    ]


def test_completion_history_who_help_and_presence(procs: Procs, ptys: list[Pty]) -> None:
    procs.server()
    alice = chat(procs, ptys, "alice", "n1")
    bob = procs.logon("bob", "n2")
    alice.expect(r"\* bob is on \(n2\)")
    alice.send("@b\t")
    alice.expect("alice> @bob$")  # and a space after it: "one" follows it below
    alice.send("one\r")
    alice.expect(r"→ bob: one +sent")
    bob.wait_line("^Message from alice: one$", 10)
    alice.send("\x1b[A")  # Up: the last line again
    alice.expect("alice> @bob one$")
    alice.send("\x15")  # Ctrl-U: the line cleared, not sent
    alice.send("/who\r")
    alice.expect(r"alice +n1")
    alice.expect(r"bob +n2")
    alice.send("/help\r")
    alice.expect("/logoff")
    alice.send("/nope\r")
    alice.expect("unknown command /nope")
    assert procs.run("logoff", "--node", "n2")[:2] == (0, ["logged-off"])
    alice.expect(r"\* bob left \(logoff, n2\)")
    bob2 = procs.logon("bob", "n2")
    alice.expect(r"\* bob is on \(n2\)")
    bob2.kill()  # kill -9: the connection goes with it
    alice.expect(r"\* bob left \(crash, n2\)")
    alice.send("/logoff\r")
    alice.expect("logged-off")
    assert alice.wait_exit() == 0
    assert len([x for x in bob.out if x.startswith("Message from alice")]) == 1


def test_query_sends_plain_lines_to_one_person(procs: Procs, ptys: list[Pty]) -> None:
    """IRC's /query: while it is on, a line without @ goes to that person, and the prompt says
    to whom; without it, such a line is refused and nothing is sent."""
    procs.server()
    bob = procs.logon("bob", "n2")
    alice = chat(procs, ptys, "alice", "n1")
    alice.send("just words\r")
    alice.expect("to send, start with @NAME")
    alice.send("/query b\t")
    alice.expect("alice> /query bob$")
    alice.send("\r")
    alice.expect("talking to bob")
    alice.expect("alice→bob>$")
    alice.send("just words\r")
    alice.expect(r"→ bob: just words +sent")
    bob.wait_line("^Message from alice: just words$", 10)
    alice.send("@bob also this\r")  # @ still goes where it says
    bob.wait_line("^Message from alice: also this$", 10)
    alice.send("/query\r")
    alice.expect("no longer talking to anyone")
    alice.expect("alice>$")
    alice.send("more words\r")
    alice.expect(r"to send, start with @NAME(.|\n)*to send, start with @NAME")
    assert [x for x in bob.out if x.startswith("Message from")] == [
        "Message from alice: just words",
        "Message from alice: also this",
    ]


def test_ctrl_c_clears_and_ctrl_d_logs_off(procs: Procs, ptys: list[Pty]) -> None:
    procs.server()
    alice = chat(procs, ptys, "alice", "n1")
    alice.send("@nobody xyz")
    alice.expect("alice> @nobody xyz$")
    alice.child.sendintr()
    alice.expect("alice>$")
    assert alice.child.isalive()
    alice.child.sendeof()
    alice.expect("logged-off")
    assert alice.wait_exit() == 0


def test_other_terminals_of_the_node_still_work(procs: Procs, ptys: list[Pty]) -> None:
    procs.server()
    bob = procs.logon("bob", "n2")
    alice = chat(procs, ptys, "alice", "n1")
    assert procs.run("message", "bob", "hi", "--node", "n1")[:2] == (0, ["sent"])
    bob.wait_line("^Message from alice: hi$", 10)
    assert procs.run("logoff", "--node", "n1")[:2] == (0, ["logged-off"])
    alice.expect("logged-off")
    assert alice.wait_exit() == 0


def test_a_stopped_server_ends_the_chat_with_noconnection(procs: Procs, ptys: list[Pty]) -> None:
    server = procs.server()
    alice = chat(procs, ptys, "alice", "n1")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0
    alice.expect("noconnection")
    assert alice.wait_exit() == 3


def test_line_mode_on_pipes_is_plain(procs: Procs) -> None:
    procs.server()
    bob = procs.logon("bob", "n2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "messenger", "chat", "alice", "--node", "n1"],
        env={**procs.env, "TERM": "xterm"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stdout.readline() == "logged-on\n"
        proc.stdin.write("@bob hello\n/msg carol hi\n/who\n/query bob\nplain\n")
        proc.stdin.flush()
        bob.wait_line("^Message from alice: hello$", 10)
        assert procs.run("message", "alice", "back", "--node", "n2")[:2] == (0, ["sent"])
        seen: list[str] = []

        def got(line: str) -> bool:
            return line in seen

        def read_until(line: str) -> None:
            assert proc.stdout is not None
            while not got(line):
                got_line = proc.stdout.readline()
                assert got_line, f"EOF before {line!r}: {seen}"
                seen.append(got_line.rstrip("\n"))

        bob.wait_line("^Message from alice: plain$", 10)
        read_until("Message from bob: back")
        read_until("receiver-not-found")
        proc.stdin.close()  # EOF: log off
        read_until("logged-off")
        assert proc.wait(15) == 0
        assert "sent" in seen
        assert "delivered bob: hello" in seen
        assert "  bob    n2" in seen
        assert seen[-1] == "logged-off"
        assert not [x for x in seen if "\x1b" in x]
        assert seen.index("sent") < seen.index("receiver-not-found")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_line_mode_json(procs: Procs) -> None:

    procs.server()
    bob = procs.logon("bob", "n2")
    proc = subprocess.run(
        [sys.executable, "-m", "messenger", "chat", "alice", "--node", "n1", "--json"],
        env=procs.env,
        input="@bob hi\n/who\n/query bob\n",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0] == {"reply": "logged-on"}
    assert {"event": "reply", "to": "bob", "text": "hi", "reply": "sent"} in events
    assert {"event": "logon", "name": "alice", "node": "n1", "reason": None} in [
        {k: v for k, v in e.items() if k != "at"} for e in events
    ]
    who = next(e for e in events if e.get("event") == "who")
    assert {"name": "bob", "node": "n2"} in who["users"]
    assert {"event": "query", "to": "bob"} in events
    assert events[-1] == {"reply": "logged-off", "exit": 0}
    bob.wait_line("^Message from alice: hi$", 10)
    assert not ESC.search(proc.stdout)


def test_what_comes_from_redis_cannot_drive_the_terminal(procs: Procs, ptys: list[Pty]) -> None:
    procs.server()
    procs.logon("bob", "n2")
    alice = chat(procs, ptys, "alice", "n1")
    alice.send("@bob typing")
    alice.expect("alice> @bob typing$")
    evil = "\x1b[2J\x1b[H\rgotcha"  # clear the screen, home, carriage return
    assert procs.run("message", "alice", evil, "--node", "n2")[:2] == (0, ["sent"])
    alice.expect(r"Message from bob: \\x1b\[2J\\x1b\[H\\x0dgotcha")
    assert "logged-on" in alice.screen()  # not cleared
    assert alice.prompt_line() == "alice> @bob typing"


def test_a_hung_peer_leaves_with_timeout(procs: Procs, ptys: list[Pty]) -> None:
    procs.server()
    alice = chat(procs, ptys, "alice", "n1")
    bob = procs.logon("bob", "n2")
    alice.expect(r"\* bob is on \(n2\)")
    bob.signal(signal.SIGSTOP)  # hung: its heartbeat stops (cleanup sends SIGCONT, then kills)
    alice.expect(r"\* bob left \(timeout, n2\)", timeout=20)
    assert alice.child.isalive()


def test_a_second_client_on_the_node_is_refused(procs: Procs) -> None:
    procs.server()
    procs.logon("bob", "n1")
    assert procs.run("chat", "alice", "--node", "n1")[:2] == (1, ["already-logged-on"])
    code, out, _ = procs.run("chat", "alice", "--node", "n1", "--json")
    assert (code, [json.loads(x) for x in out]) == (
        1,
        [{"reply": "already-logged-on", "exit": 1}],
    )


def test_a_stopped_server_ends_line_mode_with_noconnection(procs: Procs) -> None:
    server = procs.server()
    proc = subprocess.Popen(
        [sys.executable, "-m", "messenger", "chat", "alice", "--node", "n1", "--json"],
        env=procs.env,
        stdin=subprocess.PIPE,  # kept open: the chat waits for commands
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"reply": "logged-on"}
        server.signal(signal.SIGTERM)
        assert server.wait_exit(15) == 0
        assert proc.wait(15) == 3
        last = json.loads(proc.stdout.read().splitlines()[-1])
        assert (last["reply"], last["exit"]) == ("noconnection", 3)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    code, out, _ = procs.run("chat", "alice", "--node", "n1")
    assert (code, out) == (3, ["noconnection"])
