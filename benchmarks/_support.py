"""What the scenarios share: percentiles, Redis's clock, and processes ended by their own PID."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import math
import os
import signal
import statistics
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from benchmarks.figures import Env
from messenger.connection import connect

PAYLOAD = "hello, this is a benchmark message of about sixty bytes..."


def admin(url: str) -> Redis:
    """A plain client of the run's Redis with the coordinator's own credential."""
    return connect(url, socket_timeout=10.0, name="messenger-bench")


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method: an observed value, never an
    interpolation between two (p999 of 300 samples is then the largest, which is honest)."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def redis_ms(redis: Redis) -> int:
    """Now on Redis's clock (what requests' `sent_ms` are on), in ms."""
    secs, micros = await redis.time()
    return int(secs) * 1000 + int(micros) // 1000


class Counter:
    """Counts calls and wakes a waiter once `target` arrived: a receiver's callback."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.reached = asyncio.Event()

    def expect(self, target: int) -> None:
        self.count, self.target = 0, target
        self.reached.clear()
        if target <= 0:
            self.reached.set()

    def hit(self, *_: object) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()


async def wait_all(counters: Sequence[Counter], timeout: float, what: str) -> None:
    """Every counter reached its target, or TimeoutError saying how far they got."""
    try:
        await asyncio.wait_for(asyncio.gather(*(c.reached.wait() for c in counters)), timeout)
    except TimeoutError:
        got = sum(c.count for c in counters)
        want = sum(c.target for c in counters)
        raise TimeoutError(f"{what}: {got} of {want} arrived within {timeout} s") from None


async def poll_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Wait for a condition that nothing signals (a queue's length in Redis), with a deadline.
    `check` is a coroutine function returning truthy when done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM this child when the benchmark dies, even by SIGKILL (a test's
    timeout): no coordinator or `logon` is left behind. (As messenger/embedded.py does.)"""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class Process:
    """A child process (`python -m ...` or any argv) whose output lines are collected, so a
    scenario can wait for a line; `stop()` ends it by its own PID, even if it is SIGSTOPped."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc = proc
        self.what = what
        self.lines: dict[str, deque[str]] = {
            "stdout": deque(maxlen=1000),
            "stderr": deque(maxlen=1000),
        }
        self._changed = asyncio.Condition()
        self._readers = [
            asyncio.create_task(self._pump(stream, name))
            for stream, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
            if stream is not None
        ]

    @classmethod
    async def start(cls, argv: Sequence[str], env: dict[str, str], what: str) -> Process:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        return cls(proc, what)

    @classmethod
    async def python(cls, args: Sequence[str], env: dict[str, str], what: str) -> Process:
        return await cls.start([sys.executable, *args], env, what)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        # Always read, so a chatty child never blocks on a full pipe.
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            async with self._changed:
                self.lines[name].append(text)
                self._changed.notify_all()

    def tail(self) -> str:
        return (
            f"stdout={list(self.lines['stdout'])[-10:]} stderr={list(self.lines['stderr'])[-10:]}"
        )

    async def wait_line(self, needle: str, timeout: float, *, stream: str = "stdout") -> str:
        """Wait for a line containing `needle` (or the process's end: an error saying so)."""

        def found() -> str | None:
            return next((line for line in self.lines[stream] if needle in line), None)

        async def wait() -> str:
            async with self._changed:
                while (line := found()) is None:
                    if self.proc.returncode is not None:
                        raise RuntimeError(
                            f"{self.what} exited ({self.proc.returncode}) before saying "
                            f"{needle!r}: {self.tail()}"
                        )
                    # Woken by every new line; the timeout lets it notice an exit.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), 0.2)
                return line

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"{self.what}: no line with {needle!r} within {timeout} s: {self.tail()}"
            ) from None

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (a clean stop: a coordinator gives its lease up, a client logs off), then
        SIGKILL if it does not end in time."""
        self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        for reader in self._readers:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(reader, 1.0)
        return self.proc.returncode


def process_state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a process so far: from the scheduler (ns) where the kernel says, else user
    + system clock ticks (10 ms: coarse beside a drain of a few hundred ms)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def redis_cpu_seconds(redis: Redis) -> float:
    """Redis's CPU time so far (INFO cpu: user + system)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass(frozen=True)
class Shape:
    """One throughput shape: `pairs` sender→receiver pairs, each sender keeping `inflight`
    sends outstanding (1: each send awaited before the next)."""

    pairs: int
    inflight: int

    @property
    def mode(self) -> str:
        return "awaited" if self.inflight == 1 else f"inflight{self.inflight}"

    def key(self, system: str) -> str:
        return f"throughput.{self.mode}.{self.pairs}pairs.{system}"

    def label(self, system: str) -> str:
        how = "each send awaited" if self.inflight == 1 else f"{self.inflight} sends in flight"
        return f"one-way msgs/s, {self.pairs} pair{'s' if self.pairs > 1 else ''}, {how}: {system}"


INFLIGHT = 16


def shapes(env: Env | None = None) -> list[Shape]:
    """1, 8 and 32 pairs, awaited and 16 in flight (every one, given no env); smoke mode
    leaves 32 pairs out (64 messenger clients to log on and off would double its time)."""
    pairs = (1, 8) if env is not None and env.smoke else (1, 8, 32)
    return [Shape(n, inflight) for n in pairs for inflight in (1, INFLIGHT)]


def rep_seconds(env: Env) -> float:
    """About how long one repetition of a rate or a latency figure takes."""
    return 0.1 if env.smoke else 0.25 if env.quick else 2.0


async def sized(
    env: Env, shape: Shape, once: Callable[[int], Awaitable[float]]
) -> tuple[int, tuple[float, ...]]:
    """Run `once(n)` (n messages per sender; returns msgs/s) `env.repeat` times with n such
    that a repetition takes about rep_seconds: systems differ by 20x, so a fixed count would be
    too few for one or far too long for another. A small first run warms every connection up
    (its rate says little: it pays for making them); then runs four times longer each, until
    one takes a quarter of rep_seconds, give the rate that sizes the others. Returns (n, the
    rates)."""
    probe = max(shape.inflight, 10)  # one send per slot in flight: every connection made
    most = 200_000 // shape.pairs
    await once(probe)
    count = probe
    while True:
        started = time.perf_counter()
        rate = await once(count)
        if time.perf_counter() - started >= rep_seconds(env) / 4 or count >= most:
            break
        count *= 4
    # At least two sends per slot in flight, so that the slots overlap.
    count = max(2 * probe, min(int(rate * rep_seconds(env) / shape.pairs), most))
    return count, tuple([await once(count) for _ in range(env.repeat)])


async def sample_roundtrips(env: Env, one: Callable[[], Awaitable[float]]) -> list[list[float]]:
    """`env.repeat` lists of round trips (µs), each about rep_seconds long (at least 100, so that
    p99 is not the largest), after 20 of warm-up that size them."""
    warm = [await one() for _ in range(20)]
    most = 300 if env.smoke else 1000 if env.quick else 10_000
    # Full mode: three times as long, for tails worth their name.
    seconds = rep_seconds(env) * (1 if env.quick else 3)
    count = max(100, min(most, int(seconds * 1e6 / statistics.mean(warm))))
    return [[await one() for _ in range(count)] for _ in range(env.repeat)]


async def send_all(send: Callable[[int], Awaitable[object]], count: int, inflight: int) -> None:
    """`count` sends numbered 0..count-1, `inflight` of them outstanding at any time."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:  # shared: each number is taken by exactly one worker
            await send(i)

    await asyncio.gather(*(worker() for _ in range(min(inflight, count))))


async def confirm_subscribed(pubsub: PubSub, count: int, timeout: float = 10.0) -> None:
    """Wait until Redis confirmed `count` subscriptions: a message published before that would
    reach nobody."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while count > 0:
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError("Redis did not confirm the subscriptions")
        msg: Any = await pubsub.get_message(timeout=left)
        if msg is not None and msg["type"] == "subscribe":
            count -= 1
