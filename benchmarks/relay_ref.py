"""The floor of any design with a relay in the path: a process of its own between every sender
and its receiver (benchmarks/relay.py), doing only what that structure needs.

The messenger puts its coordinator in every message's path: a sender RPUSHes a request, the
coordinator takes it and PUBLISHes the message to the receiver's channel and a reply to the
sender's, and the sender awaits the reply. That is four hops a message where raw pub/sub has two
(and a second process); the relay makes them with no signature, check or Lua beyond the take. So
the relay against raw pub/sub is what the structure costs, and the messenger against the relay
what the messenger's own code costs on top of it.

Senders and receivers are in this process, as in benchmarks/raw.py (redis-py asyncio, hiredis,
RESP2): a sender RPUSHes an entry and awaits its reply on its own channel's subscription; a
receiver's callback counts. Figures (ref: the raw figure of the same shape):

- `throughput.{awaited,inflight16}.{1,8,32}pairs.relay`: msgs/s, from the first RPUSH until
  every reply and every message arrived; `extra.relay_cpu_us_per_msg`, the relay's CPU a message.
- `roundtrip.{p50,p99,p999}.relay`: A sends to B, B's callback sends it back, A's callback ends
  it (µs), as the messenger's round trip.
- `capacity.coordinator.relay` and `capacity.{coordinator_cpu,redis_cpu}.relay`: as the
  messenger's `capacity.*` (benchmarks/messenger_path.py), the relay in the coordinator's place:
  entries queued while it is SIGSTOPped, drained; and the CPU each cost the relay and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from benchmarks import relay
from benchmarks._support import (
    PAYLOAD,
    Counter,
    Process,
    Shape,
    admin,
    confirm_subscribed,
    percentile,
    poll_until,
    process_cpu_seconds,
    process_state,
    redis_cpu_seconds,
    sample_roundtrips,
    send_all,
    shapes,
    sized,
    wait_all,
)
from benchmarks.figures import Env, Figure, Partial
from benchmarks.raw import PERCENTILES

SYSTEM = "relay"
ROOT = Path(__file__).resolve().parent.parent
REPLY_TIMEOUT_S = 10.0
NOTE = (
    "relay: BLPOP, then one hiredis-packed pipeline a batch (its PUBLISHes, then LPOP 100 for "
    "the next); no signature, check or Lua"
)


def expected_keys(env: Env) -> list[str]:
    return [
        *(s.key(SYSTEM) for s in shapes(env)),
        *(f"roundtrip.{name}.{SYSTEM}" for name, _ in PERCENTILES),
        "capacity.coordinator.relay",
        "capacity.coordinator_cpu.relay",
        "capacity.redis_cpu.relay",
    ]


def _client(env: Env) -> Redis:
    # As benchmarks/raw.py's clients connect (RESP2, hiredis).
    return Redis.from_url(env.redis_url, decode_responses=True, protocol=2)


async def _reader(pubsub: PubSub) -> None:
    """Keep reading: redis-py calls the channel's handler for each message."""
    while True:
        await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)


def _ignore(_data: str) -> None:
    pass


class Peer:
    """One user of the relay: a client that RPUSHes entries, and a subscription to its own
    channel whose callback resolves the replies and hands every message to `out`."""

    def __init__(self, env: Env, queue: str, channel: str, out: Callable[[str], object]) -> None:
        self.redis = _client(env)
        self.queue = queue
        self.channel = channel
        self.out = out
        self.pending: dict[str, asyncio.Future[None]] = {}
        self._numbers = itertools.count()
        self._pubsub = self.redis.pubsub()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._pubsub.subscribe(**{self.channel: self._event})
        await confirm_subscribed(self._pubsub, 1)
        self._reader = asyncio.create_task(_reader(self._pubsub))

    def _event(self, msg: Any) -> None:
        data: str = msg["data"]
        if data.startswith("r "):
            fut = self.pending.pop(data[2:], None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        else:
            self.out(data)

    def entry(self, to: str, text: str) -> str:
        """A request for the relay (see benchmarks/relay.py), with a number of its own."""
        return f"{next(self._numbers)} {self.channel} {to} {text}"

    async def send(self, to: str, text: str) -> None:
        """Push an entry for channel `to` and wait for the relay's reply."""
        entry = self.entry(to, text)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req = entry.partition(" ")[0]
        self.pending[req] = fut
        try:
            await self.redis.rpush(self.queue, entry)
            await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
        except BaseException:
            self.pending.pop(req, None)
            raise

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()


class Relay:
    """A relay process of this run's own (its own queue and channel names) and its peers."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.prefix = f"bench:relay:{secrets.token_hex(4)}"
        self.queue = f"{self.prefix}:queue"
        self.admin = admin(env.redis_url)
        self.process: Process | None = None

    async def __aenter__(self) -> Relay:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        child = {**os.environ, "BENCH_RELAY_URL": self.env.redis_url, "PYTHONPATH": path}
        self.process = await Process.python(["-m", "benchmarks.relay", self.queue], child, "relay")
        try:
            await self.process.wait_line("ready", 30.0)
        except BaseException:
            await self.process.stop()
            await self.admin.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            await self.process.stop()
        await self.admin.aclose()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def peers(self, names: list[str], outs: list[Callable[[str], object]]) -> list[Peer]:
        peers = [
            Peer(self.env, self.queue, f"{self.prefix}:{name}", out)
            for name, out in zip(names, outs, strict=True)
        ]
        try:
            for peer in peers:
                await peer.start()
        except BaseException:
            await close(peers)
            raise
        return peers

    async def blocked(self) -> bool:
        """Whether the relay waits in BLPOP: all it took was published."""
        clients: Any = await self.admin.client_list()
        return any(c.get("name") == relay.NAME and "b" in c.get("flags", "") for c in clients)


async def close(peers: list[Peer]) -> None:
    await asyncio.gather(*(p.close() for p in peers))


def _sender(peer: Peer, to: str) -> Callable[[int], Awaitable[object]]:
    async def send(_i: int) -> object:
        await peer.send(to, PAYLOAD)
        return None

    return send


async def throughput(r: Relay, shape: Shape) -> Figure:
    n = shape.pairs
    tag = f"t{n}x{shape.inflight}"
    counters = [Counter() for _ in range(n)]
    peers = await r.peers(
        [f"{tag}s{i}" for i in range(n)] + [f"{tag}r{i}" for i in range(n)],
        [_ignore] * n + [c.hit for c in counters],
    )
    senders, receivers = peers[:n], peers[n:]
    cpu: list[float] = []  # the relay's CPU per message of each run (µs)

    async def once(count: int) -> float:
        for counter in counters:
            counter.expect(count)
        before = process_cpu_seconds(r.pid)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                send_all(_sender(s, rcv.channel), count, shape.inflight)
                for s, rcv in zip(senders, receivers, strict=True)
            )
        )
        await wait_all(counters, 60.0, "relayed messages")
        rate = n * count / (time.perf_counter() - started)
        cpu.append((process_cpu_seconds(r.pid) - before) / (n * count) * 1e6)
        return rate

    try:
        count, values = await sized(r.env, shape, once)
    finally:
        await close(peers)
    timed = cpu[-len(values) :]  # the timed repetitions' (sized() runs a few before them)
    return Figure(
        shape.key(SYSTEM),
        shape.label("relay (floor of a relay design)"),
        "msgs/s",
        values,
        ref=shape.key("raw"),
        notes=NOTE,
        extra={
            "messages": count * n,
            "per_sender": count,
            "relay_cpu_us_per_msg": [round(v, 1) for v in timed],
            "relay_cpu_us_per_msg_median": round(statistics.median(timed), 1),
        },
    )


async def roundtrip(r: Relay) -> list[Figure]:
    arrived: list[asyncio.Future[int]] = []
    echoes: set[asyncio.Task[None]] = set()
    b_peer: list[Peer] = []
    a_channel = f"{r.prefix}:rta"

    def back_at_a(_data: str) -> None:
        if arrived and not arrived[-1].done():
            arrived[-1].set_result(time.perf_counter_ns())

    def echo_at_b(_data: str) -> None:
        task = asyncio.get_running_loop().create_task(b_peer[0].send(a_channel, PAYLOAD))
        echoes.add(task)
        task.add_done_callback(echoes.discard)

    a, b = await r.peers(["rta", "rtb"], [back_at_a, echo_at_b])
    assert a.channel == a_channel
    b_peer.append(b)
    loop = asyncio.get_running_loop()

    async def one() -> float:
        arrived[:] = [loop.create_future()]
        started = time.perf_counter_ns()
        await a.send(b.channel, PAYLOAD)
        return (await asyncio.wait_for(arrived[-1], 10.0) - started) / 1000

    try:
        reps = await sample_roundtrips(r.env, one)
        await asyncio.gather(*echoes)
    finally:
        await close([a, b])
    return [
        Figure(
            f"roundtrip.{name}.{SYSTEM}",
            f"round trip A→B→A {name}: relay (send → callback → send back)",
            "µs",
            tuple(percentile(samples, q) for samples in reps),
            ref=f"roundtrip.{name}.raw",
            better="lower",
            notes=NOTE,
            extra={"roundtrips": len(reps[0])},
        )
        for name, q in PERCENTILES
    ]


async def capacity(r: Relay) -> list[Figure]:
    """Entries already queued, drained as fast as the relay can, and what that cost the relay
    and Redis in CPU per entry: as the messenger's coordinator capacity."""
    env = r.env
    assert r.process is not None
    process = r.process
    sessions = 8
    total = (400 if env.smoke else 4000 if env.quick else 20_000) // sessions * sessions
    counters = [Counter() for _ in range(sessions)]
    peers = await r.peers([f"cap{i}" for i in range(sessions)], [c.hit for c in counters])

    async def once() -> tuple[float, float, float]:
        for counter in counters:
            counter.expect(total // sessions)
        # Their replies find nobody waiting: the peers' callbacks drop them.
        entries = [
            peers[j % sessions].entry(peers[(j + 1) % sessions].channel, PAYLOAD)
            for j in range(total)
        ]
        process.signal(signal.SIGSTOP)
        try:
            await poll_until(lambda: process_state(process.pid) == "T", 5.0, "the relay to stop")
            async with r.admin.pipeline(transaction=False) as pipe:
                for i in range(0, total, 500):
                    pipe.rpush(r.queue, *entries[i : i + 500])
                await pipe.execute()
            cpu, redis_cpu = process_cpu_seconds(process.pid), await redis_cpu_seconds(r.admin)
        finally:
            process.signal(signal.SIGCONT)
        started = time.perf_counter()

        async def drained() -> bool:
            # The queue empty and the relay back in BLPOP: its last batch is published. (The
            # messenger's drain ends at its queue and in-flight list empty: the same moment.)
            return await r.admin.llen(r.queue) == 0 and await r.blocked()

        await poll_until(drained, 120.0, "the relay to drain its queue")
        rate = total / (time.perf_counter() - started)
        cpu = process_cpu_seconds(process.pid) - cpu
        redis_cpu = await redis_cpu_seconds(r.admin) - redis_cpu  # the polls included: little
        await wait_all(counters, 30.0, "queued relayed messages")  # all relayed, none lost
        return rate, cpu / total * 1e6, redis_cpu / total * 1e6

    try:
        reps = [await once() for _ in range(env.repeat)]
    finally:
        await close(peers)
    extra = {"messages": total, "sessions": sessions}
    return [
        Figure(
            "capacity.coordinator.relay",
            f"relay capacity: {total:,} queued entries drained "
            "(beside raw pub/sub's rate on this Redis)",
            "req/s",
            tuple(v[0] for v in reps),
            ref="throughput.inflight16.8pairs.raw",
            notes=NOTE,
            extra=extra,
        ),
        Figure(
            "capacity.coordinator_cpu.relay",
            "relay CPU per queued entry drained",
            "µs",
            tuple(v[1] for v in reps),
            better="lower",
            notes=NOTE,
            extra=extra,
        ),
        Figure(
            "capacity.redis_cpu.relay",
            "Redis CPU per queued entry drained by the relay (user + system, from INFO)",
            "µs",
            tuple(v[2] for v in reps),
            better="lower",
            notes=NOTE,
            extra=extra,
        ),
    ]


async def run(env: Env) -> list[Figure]:
    figures: list[Figure] = []
    errors: dict[str, str] = {}

    async def part(name: str, measure: Callable[[], Awaitable[Figure | list[Figure]]]) -> None:
        # One part failing (a timeout, a crash) must not cost the others their figures.
        try:
            got = await measure()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"
            return
        figures.extend(got if isinstance(got, list) else [got])

    async with Relay(env) as r:
        for shape in shapes(env):
            await part(shape.key(SYSTEM), lambda s=shape: throughput(r, s))  # type: ignore[misc]
        await part("roundtrip", lambda: roundtrip(r))
        await part("capacity", lambda: capacity(r))
    if errors:
        raise Partial(figures, errors)
    return figures
