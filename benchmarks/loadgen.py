"""A lean load generator: thousands of logged-on messenger sessions in one process.

A messenger.client.Client per session would hold three connections and a few asyncio tasks each:
at 100k sessions, 300k connections on one Redis and one Python process. So this speaks the
protocol itself (docs/protocol.md), with the client credentials as deployed: the client user
pushes the signed logon requests (RPUSH) and subscribes, the heartbeat user refreshes the
heartbeat keys (PEXPIRE). Each session has a key of its own (so its own inbox and heartbeat key),
a node and a name of its own; its inbox is subscribed on a shared pub/sub connection (thousands
of channels each), confirmed before its logon is sent, as the protocol requires.

The heartbeats run in a child process of their own (`python -m benchmarks.loadgen`): 10,000
PEXPIREs a second cost some 15 % of a core in Python, in slices that held this process's event
loop for 5-30 ms at a time, and the scale scenario's two latency clients run on that loop. Real
clients each beat on their own; a message must not be timed behind the generator's own work.

What it does not reproduce is what a client costs per connection: Redis's client structures
and buffers, and the `control` channel's fan-out (one write per client per alive tick). The scale
scenario says so next to its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from benchmarks.procs import cpu_seconds
from messenger import wire
from messenger.acl import heartbeat_url
from messenger.connection import connect
from messenger.keys import Keys
from messenger.protocol import Request, encode_request, heartbeat_id, inbox_id, new_session_key

# Channels per SUBSCRIBE command: a few tens of KiB per command.
_SUBSCRIBE_CHUNK = 1000
# How long a wave of logons should take: long enough that the coordinator always has a full
# batch queued, short enough that a wave is answered well within its requests' wait.
_WAVE_SECONDS = 0.5
_WAVE_MIN, _WAVE_MAX = 20, 2000
# Heartbeats go out in slices every tick, so that a round is spread over the interval (as
# independent clients' beats are) instead of arriving as one burst.
_TICK = 0.1


@dataclass(frozen=True)
class Session:
    sid: str
    key: str
    name: str
    node: str
    inbox: str  # the channel
    hb: str  # the heartbeat key


def new_session(keys: Keys, name: str, node: str) -> Session:
    key = new_session_key()
    return Session(
        secrets.token_hex(16),
        key,
        name,
        node,
        keys.inbox(inbox_id(key)),
        keys.hb(heartbeat_id(key)),
    )


@dataclass
class LogonResult:
    logged_on: int
    seconds: float
    replies: Counter[str]
    unanswered: int  # no reply within the wait (expired in the queue, or lost)
    # (seconds since the start, sessions logged on): how the rate changes as sessions grow
    progress: list[tuple[float, int]] = field(default_factory=list)
    done_sample: list[str] = field(default_factory=list)  # request ids of the last waves

    @property
    def rate(self) -> float:
        return self.logged_on / max(self.seconds, 1e-9)


class LoadGenerator:
    """Many sessions of one messenger (one key prefix), over a handful of connections."""

    def __init__(
        self,
        client_url: str,
        keys: Keys,
        *,
        heartbeat_interval: float,
        heartbeat_ttl: float,
        wait_ms: int = 5000,
        per_connection: int = 5000,
    ) -> None:
        self.keys = keys
        self.interval = heartbeat_interval
        self.ttl_ms = int(heartbeat_ttl * 1000)
        self.wait_ms = wait_ms
        self.per_connection = per_connection
        self.redis = connect(client_url, socket_timeout=30.0, name="bench-loadgen")
        self._hb_url = heartbeat_url(client_url) or client_url
        self._beater: asyncio.subprocess.Process | None = None
        # No read timeout: a subscriber waits for as long as nothing is published.
        self._sub_redis = connect(client_url, socket_timeout=None, name="bench-loadgen-sub")
        self._pubsubs: list[PubSub] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._confirmed = 0
        self._confirm_wanted = 0
        self._confirm_event = asyncio.Event()
        self._pending: dict[str, Session] = {}  # req -> session, of the wave in flight
        self._wave_done = asyncio.Event()
        self._replies: Counter[str] = Counter()
        self._clock_offset_ms = 0.0
        self.live: list[Session] = []
        self.lost: set[str] = set()  # sids whose heartbeat key was gone (PEXPIRE answered 0)
        self.heartbeats = 0
        self.heartbeat_late_max = 0.0  # seconds a slice went out after its beat, at worst
        self.ticks = 0  # alive ticks heard on `control`
        self.events = 0  # anything else heard on an inbox (messages, stray replies)

    # --- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, sessions: Sequence[Session], timeout: float = 60.0) -> None:
        """Subscribe every session's inbox (and `control` once per connection), and wait until
        Redis has confirmed them all."""
        for start in range(0, len(sessions), self.per_connection):
            part = sessions[start : start + self.per_connection]
            pubsub = self._sub_redis.pubsub()
            self._pubsubs.append(pubsub)
            await pubsub.subscribe(self.keys.control)
            self._confirm_wanted += 1
            for i in range(0, len(part), _SUBSCRIBE_CHUNK):
                await pubsub.subscribe(*(s.inbox for s in part[i : i + _SUBSCRIBE_CHUNK]))
            self._confirm_wanted += len(part)
            # Only now read: no command is sent on this connection while its reader runs.
            self._tasks.append(asyncio.create_task(self._read(pubsub)))
        await self._until(self._confirm_event, timeout, "subscriptions confirmed")

    async def _until(self, event: asyncio.Event, timeout: float, what: str) -> None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            self._raise_failed()
            raise RuntimeError(f"load generator: {what}: not within {timeout:g} s") from None

    def _raise_failed(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError("a load generator task failed") from task.exception()

    async def _read(self, pubsub: PubSub) -> None:
        msg: Any
        async for msg in pubsub.listen():
            kind = msg["type"]
            if kind == "message":
                self._dispatch(msg["channel"], msg["data"])
            elif kind == "subscribe":
                self._confirmed += 1
                if self._confirmed >= self._confirm_wanted:
                    self._confirm_event.set()

    def _dispatch(self, channel: str, data: str) -> None:
        if channel == self.keys.control:
            self.ticks += 1
            return
        event = json.loads(data)
        session = self._pending.pop(event.get("req", ""), None) if event["t"] == "reply" else None
        if session is None:
            self.events += 1
            return
        word = event["r"]
        self._replies[word] += 1
        if word == "logged-on":
            self.live.append(session)
            if self._beater is not None and self._beater.stdin is not None:
                self._beater.stdin.write(f"{session.sid} {session.hb}\n".encode())
        if not self._pending:
            self._wave_done.set()

    # --- logons -----------------------------------------------------------------------------

    async def _read_clock(self) -> None:
        """Redis's clock, which every request's time is on (as messenger.client does)."""
        before = time.monotonic()
        secs, micros = await self.redis.time()
        after = time.monotonic()
        self._clock_offset_ms = secs * 1000 + micros / 1000 - (before + after) / 2 * 1000

    def _redis_now(self) -> int:
        return int(time.monotonic() * 1000 + self._clock_offset_ms)

    async def logon(self, sessions: Sequence[Session], *, budget: float) -> LogonResult:
        """Log every session on, in waves: a wave is pushed (pipelined RPUSHes), and the next
        goes once every reply of this one arrived (or its wait ran out), so the queue never
        holds more than the coordinator drains within a request's wait. The wave grows or
        shrinks to take about half a second. Gives up (the rest unsent) after `budget` s."""
        await self._read_clock()
        result = LogonResult(0, 0.0, self._replies, 0)
        started = time.monotonic()
        wave, index = 100, 0
        while index < len(sessions) and time.monotonic() - started < budget:
            batch = sessions[index : index + wave]
            index += len(batch)
            self._pending = {}
            self._wave_done.clear()
            entries = []
            for s in batch:
                request = Request(
                    "logon",
                    secrets.token_hex(16),
                    s.sid,
                    name=s.name,
                    node=s.node,
                    sent_ms=self._redis_now(),
                    wait_ms=self.wait_ms,
                    ttl_ms=self.ttl_ms,
                    key=s.key,
                )
                self._pending[request.req] = s
                entries.append(encode_request(request, s.key))
            # The latest waves' done keys are the ones still alive when the phase ends.
            result.done_sample = [*result.done_sample, *list(self._pending)[:50]][-200:]
            sent = time.monotonic()
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.rpush(self.keys.requests, entry)
                await pipe.execute()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wave_done.wait(), self.wait_ms / 1000 + 0.5)
            self._raise_failed()
            result.unanswered += len(self._pending)
            self._pending = {}
            took = time.monotonic() - sent
            wave = max(_WAVE_MIN, min(_WAVE_MAX, int(len(batch) / took * _WAVE_SECONDS)))
            result.progress.append((time.monotonic() - started, len(self.live)))
        result.seconds = time.monotonic() - started
        result.logged_on = len(self.live)
        return result

    # --- heartbeats ---------------------------------------------------------------------

    async def start_heartbeats(self) -> None:
        """Start the heartbeat process: from now on every session that logs on is handed to
        it, and it beats for it until close()."""
        env = dict(os.environ, BENCH_HB_URL=self._hb_url)
        self._beater = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            str(self.interval),
            str(self.ttl_ms),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for s in self.live:
            assert self._beater.stdin is not None
            self._beater.stdin.write(f"{s.sid} {s.hb}\n".encode())
        self._tasks.append(asyncio.create_task(self._hear_beater(self._beater)))

    async def _hear_beater(self, beater: asyncio.subprocess.Process) -> None:
        """What the heartbeat process says: `beats N LATE_S` now and then, `lost SID` for a
        session whose key was gone (removed by the coordinator: counted, never revived)."""
        assert beater.stdout is not None
        while line := await beater.stdout.readline():
            word, *rest = line.decode().split()
            if word == "beats":
                self.heartbeats = int(rest[0])
                self.heartbeat_late_max = float(rest[1])
            elif word == "lost":
                self.lost.add(rest[0])
        raise RuntimeError(f"the heartbeat process ended (exit {await beater.wait()})")

    def cpu_seconds(self) -> float:
        """CPU time of this process and of its heartbeat process so far."""
        own = time.process_time()
        if self._beater is not None and self._beater.returncode is None:
            with contextlib.suppress(OSError):
                own += cpu_seconds(self._beater.pid)
        return own

    def check(self) -> None:
        """Raise if a background task (a reader, the heartbeat) has failed."""
        self._raise_failed()
        for task in self._tasks:
            if task.done() and not task.cancelled():
                raise RuntimeError("a load generator task ended")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        beater, self._beater = self._beater, None
        if beater is not None and beater.returncode is None:
            beater.terminate()  # ours, by its pid
            try:
                await asyncio.wait_for(beater.wait(), 5.0)
            except TimeoutError:
                beater.kill()
                await beater.wait()
        for pubsub in self._pubsubs:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        for redis in (self.redis, self._sub_redis):
            with contextlib.suppress(Exception):
                await redis.aclose()


async def used_memory(admin: Redis) -> int:
    return int((await admin.info("memory"))["used_memory"])


# --- the heartbeat process ------------------------------------------------------------------


async def _beat(url: str, interval: float, ttl_ms: int) -> None:
    """PEXPIRE every session's heartbeat key once per interval, in slices every tick on a fixed
    beat (round trips do not stretch the period). Sessions come on stdin, `SID KEY` a line, and
    join the next round; a key found gone is said on stdout (`lost SID`) and dropped."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sessions: dict[str, str] = {}  # sid -> heartbeat key

    async def read() -> None:
        while line := await reader.readline():
            sid, hb = line.decode().split()
            sessions[sid] = hb

    redis = connect(url, socket_timeout=30.0, name="bench-loadgen-hb")
    reading = asyncio.create_task(read())
    tick = min(_TICK, interval / 10)
    slices = max(1, round(interval / tick))
    beat = loop.time()
    round_of: list[tuple[str, str]] = []
    beats, late_max, k = 0, 0.0, 0
    while not reading.done():  # until the parent is gone
        if k % slices == 0:  # a new round: whoever logged on meanwhile joins it
            round_of = list(sessions.items())
        n, i = len(round_of), k % slices
        part = round_of[i * n // slices : (i + 1) * n // slices]
        if part:
            # Packed by hiredis: half the CPU of redis-py's own pipeline.
            alive = await wire.pipeline(redis, [["PEXPIRE", hb, str(ttl_ms)] for _, hb in part])
            beats += len(part)
            for (sid, _), ok in zip(part, alive, strict=True):
                if isinstance(ok, Exception):
                    raise ok
                if not ok and sessions.pop(sid, None) is not None:
                    print(f"lost {sid}")
        print(f"beats {beats} {late_max:.4f}", flush=True)
        k += 1
        beat += tick
        late = loop.time() - beat
        late_max = max(late_max, late)
        await asyncio.sleep(max(0.0, -late))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_beat(os.environ["BENCH_HB_URL"], float(sys.argv[1]), int(sys.argv[2])))
