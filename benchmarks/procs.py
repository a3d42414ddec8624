"""Real `python -m messenger ...` processes for benchmarks, read line by line as they run.

Each process is started here and ended by its own PID (`stop`, also after SIGSTOP), never by
name. Lines are timestamped when read, so a scenario can time "from the fault to this line".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# A coordinator logs a line per logon; a 100k run must not keep them all.
_KEPT_LINES = 5000


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc/<pid>/stat (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def messenger_env(**settings: str) -> dict[str, str]:
    """This process's environment without any MESSENGER_* of the caller's, plus `settings`
    (MESSENGER_<NAME>=value): what a benchmark's process sees is only what it was given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_")}
    env |= {f"MESSENGER_{name.upper()}": value for name, value in settings.items()}
    return env


@dataclass
class Line:
    at: float  # time.monotonic() when it was read
    text: str


class Stream:
    """The lines of one output stream, the latest `_KEPT_LINES` of them, numbered from 0."""

    def __init__(self) -> None:
        self.lines: deque[Line] = deque(maxlen=_KEPT_LINES)
        self.count = 0  # lines read so far: a mark for "lines after now"
        self.changed = asyncio.Condition()

    async def pump(self, reader: asyncio.StreamReader) -> None:
        while raw := await reader.readline():
            async with self.changed:
                self.lines.append(Line(time.monotonic(), raw.decode(errors="replace").rstrip()))
                self.count += 1
                self.changed.notify_all()
        async with self.changed:  # EOF: wake waiters, who then see the process has ended
            self.changed.notify_all()

    def find(self, rx: re.Pattern[str], since: int) -> Line | None:
        first = self.count - len(self.lines)  # the number of the oldest line kept
        for i, line in enumerate(self.lines, start=first):
            if i >= since and rx.search(line.text):
                return line
        return None

    def tail(self, n: int = 10) -> str:
        return "\n".join(line.text for line in list(self.lines)[-n:])


class Proc:
    """One `python -m messenger ARGS` child (or another module's)."""

    def __init__(self, proc: asyncio.subprocess.Process, args: tuple[str, ...]) -> None:
        self.proc = proc
        self.args = args
        self.out, self.err = Stream(), Stream()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self.out.pump(proc.stdout)),
            asyncio.create_task(self.err.pump(proc.stderr)),
        ]

    @classmethod
    async def start(cls, *args: str, env: dict[str, str], module: str = "messenger") -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            *args,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc, args)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            os.kill(self.pid, sig)

    async def wait_line(
        self, pattern: str, timeout: float, *, stderr: bool = True, since: int = 0
    ) -> Line:
        """The first line (numbered `since` or later) matching `pattern`; fails at the deadline
        or when the process ends without one, saying what it printed last."""
        stream = self.err if stderr else self.out
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        async with stream.changed:
            while True:
                found = stream.find(rx, since)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._ended():
                    raise RuntimeError(
                        f"`messenger {' '.join(self.args)}` (pid {self.pid}): no line matching "
                        f"{pattern!r} in {timeout:g} s; its last lines:\n{self.err.tail()}\n"
                        f"{self.out.tail()}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stream.changed.wait(), min(left, 0.5))

    def _ended(self) -> bool:
        return all(pump.done() for pump in self._pumps)

    async def wait(self, timeout: float) -> int | None:
        """Its exit code, or None if it is still running at the deadline."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.proc.wait(), timeout)
        return None

    async def stop(self, timeout: float = 5.0) -> None:
        """End it by its PID: SIGCONT (it may be stopped) and SIGTERM, then SIGKILL at the
        deadline. Safe to call on a process that has ended."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            if await self.wait(timeout) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                await self.proc.wait()
        await asyncio.wait(self._pumps, timeout=1.0)
        for pump in self._pumps:
            pump.cancel()


async def stop_all(procs: list[Proc]) -> None:
    """End every process (each by its PID), even if one of them fails to stop."""
    await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
