"""Real `messenger` processes for integration tests: started, read line by line, always cleaned up.

Every process is started by this module and ended by its own PID; nothing else is touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> float:
    """Poll `predicate` until it holds; return the seconds it took. Fails at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Proc:
    """One `python -m messenger ...` process with its output collected by reader threads."""

    args: tuple[str, ...]
    env: dict[str, str]
    module: str = "messenger"  # what `python -m` runs (a test's own helper, e.g.)
    # An argv prefix, e.g. `ip netns exec NS` (tests/netns.py): it execs the command in place,
    # so `pid` is still the python process's own and signals reach it.
    wrap: tuple[str, ...] = ()
    popen: subprocess.Popen[str] = field(init=False)
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.popen = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", self.module, *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stream, sink in ((self.popen.stdout, self.out), (self.popen.stderr, self.err)):
            reader = threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _pump(self, stream: object, sink: list[str]) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, pattern: str, timeout: float = 10.0, *, stderr: bool = False) -> str:
        """Wait for an output line matching the regex `pattern`; return it."""
        rx = re.compile(pattern)
        sink = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in sink:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.args}: no line matching {pattern!r} within {timeout}s; "
                        f"stdout={self.out} stderr={self.err[-15:]}"
                    )
                self._cond.wait(min(left, 0.1))

    def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.args} still running after {timeout}s; "
                f"stdout={self.out} stderr={self.err[-15:]}"
            ) from None
        for reader in self._readers:  # all output is read once the pipes reach EOF
            reader.join(5.0)
        return code

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a stopped process must be able to die
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    @property
    def running(self) -> bool:
        return self.popen.poll() is None


class Procs:
    """Factory for processes of one test; `cleanup()` ends every one still running."""

    def __init__(self, env: dict[str, str], server_env: dict[str, str] | None = None) -> None:
        """`env` is every process's; `server_env` adds what only a `server` gets (its own
        Redis credential and the client password, while clients get a client credential)."""
        self.env = env
        self.server_env = server_env or {}
        self.started: list[Proc] = []

    def start(self, *args: str, wrap: Sequence[str] = (), **env: str) -> Proc:
        return self.start_module("messenger", *args, wrap=wrap, **env)

    def start_module(self, module: str, *args: str, wrap: Sequence[str] = (), **env: str) -> Proc:
        """`python -m module args...`, ended by cleanup() like the others; `wrap` is an argv
        prefix (a host's `ip netns exec NS`)."""
        proc = Proc(args, {**self.env, **env}, module, tuple(wrap))
        self.started.append(proc)
        return proc

    def run(
        self, *args: str, timeout: float = 15.0, wrap: Sequence[str] = (), **env: str
    ) -> tuple[int, list[str], str]:
        """Run a short command to its end: (exit code, stdout lines, stderr text)."""
        proc = self.start(*args, wrap=wrap, **env)
        code = proc.wait_exit(timeout)
        return code, list(proc.out), "\n".join(proc.err)

    def server(self, *args: str, wrap: Sequence[str] = (), **env: str) -> Proc:
        proc = self.start("server", *args, wrap=wrap, **{**self.server_env, **env})
        proc.wait_line("is active", 15.0, stderr=True)
        return proc

    def logon(self, name: str, node: str, *args: str, wrap: Sequence[str] = (), **env: str) -> Proc:
        proc = self.start("logon", name, "--node", node, *args, wrap=wrap, **env)
        proc.wait_line("^logged-on$", 15.0)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            proc.kill()
            for stream in (proc.popen.stdout, proc.popen.stderr):
                if stream is not None:
                    stream.close()


def who_json(out: list[str]) -> list[dict[str, str]]:
    """`who --json`'s stdout (one object per user, docs/cli-json.md) as [{"name", "node"}]."""
    users = [json.loads(line) for line in out]
    return [{"name": u["name"], "node": u["node"]} for u in users]
