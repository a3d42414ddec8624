"""The messenger's own path, every control on, against the raw references of the same shape.

A real coordinator runs as its own process (`python -m messenger server`, with the run's admin
URL and a client password, so it makes the client users and its CPU is its own); the clients are
`messenger.client.Client` objects in this process, built as `messenger logon` builds them (the
client credential, the heartbeat on its own Redis user, heartbeats and the node socket on), each
with a callback as its printer. The only setting changed is the per-session rate limit
(MESSENGER_RATE_LIMIT / MESSENGER_RATE_BURST, 20/s after 40 by default), set far out of reach:
a benchmark sender is a loop, which the limit exists to stop. Figures:

- `throughput.{awaited,inflight16}.{1,8,32}pairs.messenger`: `client.send(to, text)` → the
  receiver's callback, msgs/s (ref: the raw figure of the same shape).
- `roundtrip.{p50,p99,p999}.messenger`: A sends to B, B's callback sends back, A's callback
  ends it (µs; ref: raw ping-pong).
- `capacity.coordinator.messenger`: requests/s the coordinator drains, with the requests
  already queued (signed message requests pushed while it is SIGSTOPped); and
  `capacity.{coordinator_cpu,redis_cpu}.messenger`, the CPU (µs) each request cost the
  coordinator and Redis meanwhile: steadier than rates on a shared machine.
- `logon.rate.messenger`: logons/s of fresh sessions logging on at once.
- `cli.message.messenger`: wall time of `python -m messenger message bob hi --node n1`
  (ref: `cli.message.floor`, benchmarks/floor_message.py, the same JSON line to the same
  socket from a ten-line script).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks._support import (
    PAYLOAD,
    Counter,
    Process,
    Shape,
    admin,
    percentile,
    poll_until,
    process_cpu_seconds,
    process_state,
    redis_cpu_seconds,
    redis_ms,
    sample_roundtrips,
    send_all,
    shapes,
    sized,
    wait_all,
)
from benchmarks.figures import Env, Figure, Partial
from benchmarks.raw import PERCENTILES
from messenger import acl, local, private
from messenger.client import Client
from messenger.connection import connect
from messenger.errors import MessengerError
from messenger.keys import Keys
from messenger.protocol import Reply, Request, encode_request
from messenger.settings import Settings

SYSTEM = "messenger"
# Far above anything a benchmark sends: the limit is for floods (docs/security.md).
UNLIMITED = {"MESSENGER_RATE_LIMIT": "1000000000", "MESSENGER_RATE_BURST": "1000000000"}
NOTE = "coordinator rate limit lifted (MESSENGER_RATE_LIMIT/BURST=1e9); every other control on"
FLOOR_SCRIPT = Path(__file__).with_name("floor_message.py")


def expected_keys(env: Env) -> list[str]:
    return [
        *(s.key(SYSTEM) for s in shapes(env)),
        *(f"roundtrip.{name}.{SYSTEM}" for name, _ in PERCENTILES),
        "capacity.coordinator.messenger",
        "capacity.coordinator_cpu.messenger",
        "capacity.redis_cpu.messenger",
        "logon.rate.messenger",
        "cli.message.messenger",
        "cli.message.floor",
    ]


class Messenger:
    """A coordinator process of this run's own (its own key prefix) and its clients."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.prefix = "bench" + secrets.token_hex(3)
        self.keys = Keys(self.prefix)
        parts = urlsplit(env.redis_url)
        assert parts.hostname is not None
        assert parts.port is not None
        password = secrets.token_hex(16)
        self.client_url = acl.client_url(parts.hostname, parts.port, self.prefix, password)
        self.runtime_dir = Path(env.work_dir) / f"rt-{self.prefix}"
        private.ensure_dir(self.runtime_dir)
        self.process_env = {
            **os.environ,
            "MESSENGER_PREFIX": self.prefix,
            "MESSENGER_RUNTIME_DIR": str(self.runtime_dir),
            **UNLIMITED,
        }
        self.server_env = {
            **self.process_env,
            "MESSENGER_REDIS_URL": env.redis_url,
            "MESSENGER_CLIENT_PASSWORD": password,
        }
        self.coordinator: Process | None = None
        self.admin = admin(env.redis_url)

    async def __aenter__(self) -> Messenger:
        self.coordinator = await Process.python(
            ["-m", "messenger", "server"], self.server_env, "coordinator"
        )
        try:
            await self.coordinator.wait_line("is active", 30.0, stream="stderr")
        except BaseException:
            await self.coordinator.stop()
            await self.admin.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.coordinator is not None:
            await self.coordinator.stop()
        await self.admin.aclose()

    def settings(self, node: str) -> Settings:
        return Settings(
            redis_url=self.client_url,
            node=node,
            prefix=self.prefix,
            runtime_dir=self.runtime_dir,
        )

    def client(self, name: str, out: Callable[[str], None]) -> Client:
        """A client as messenger/cli.py `_logon` builds it (not logged on yet)."""
        settings = self.settings(f"node-{name}")
        timeout = min(2.0, settings.reply_timeout)
        redis = connect(self.client_url, socket_timeout=timeout)
        hb_url = acl.heartbeat_url(self.client_url)
        assert hb_url is not None  # a client URL names the client user
        return Client(
            redis,
            settings,
            name,
            out=out,
            heartbeat_redis=connect(hb_url, socket_timeout=timeout),
        )

    async def logon(self, names: list[str], outs: list[Callable[[str], None]]) -> list[Client]:
        clients = [self.client(n, out) for n, out in zip(names, outs, strict=True)]
        try:
            await asyncio.gather(*(c.logon() for c in clients))
            for c in clients:
                await c.start_serving()  # heartbeats, and the node socket
        except BaseException:
            await close(clients)
            raise
        return clients


async def close(clients: list[Client]) -> None:
    """Log every client off (a clean end, as Ctrl-C does) and close it."""

    async def one(client: Client) -> None:
        with contextlib.suppress(MessengerError):
            await client.logoff()
        await client.close()

    await asyncio.gather(*(one(c) for c in clients))


def _sender(client: Client, to: str) -> Callable[[int], Awaitable[object]]:
    async def send(_i: int) -> object:
        reply = await client.send(to, PAYLOAD)
        if reply != Reply.SENT:  # e.g. rate-limited: the figure would be meaningless
            raise RuntimeError(f"{client.name} → {to}: {reply}")
        return reply

    return send


async def throughput(m: Messenger, shape: Shape) -> Figure:
    env = m.env
    tag = f"t{shape.pairs}x{shape.inflight}"
    counters = [Counter() for _ in range(shape.pairs)]
    senders = await m.logon(
        [f"{tag}s{i}" for i in range(shape.pairs)], [lambda _line: None] * shape.pairs
    )
    try:
        receivers = await m.logon(
            [f"{tag}r{i}" for i in range(shape.pairs)], [c.hit for c in counters]
        )
    except BaseException:
        await close(senders)
        raise

    assert m.coordinator is not None
    pid = m.coordinator.pid
    cpu: list[float] = []  # the coordinator's CPU per message of each run (µs)

    async def once(n: int) -> float:
        for counter in counters:
            counter.expect(n)
        before = process_cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                send_all(_sender(s, r.name), n, shape.inflight)
                for s, r in zip(senders, receivers, strict=True)
            )
        )
        await wait_all(counters, 60.0, "messages")
        rate = shape.pairs * n / (time.perf_counter() - started)
        cpu.append((process_cpu_seconds(pid) - before) / (shape.pairs * n) * 1e6)
        return rate

    try:
        count, values = await sized(env, shape, once)
    finally:
        await close(senders + receivers)
    timed = cpu[-len(values) :]  # the timed repetitions' (sized() runs a few before them)
    return Figure(
        shape.key(SYSTEM),
        shape.label("messenger"),
        "msgs/s",
        values,
        ref=shape.key("raw"),
        notes=NOTE,
        extra={
            "messages": count * shape.pairs,
            "per_sender": count,
            # Steadier than the rate on a shared machine: what the coordinator spent a message.
            "coordinator_cpu_us_per_msg": [round(v, 1) for v in timed],
            "coordinator_cpu_us_per_msg_median": round(statistics.median(timed), 1),
        },
    )


async def roundtrip(m: Messenger) -> list[Figure]:
    env = m.env
    arrived: list[asyncio.Future[int]] = []
    echoes: set[asyncio.Task[Reply]] = set()
    b_client: list[Client] = []

    def back_at_a(_line: str) -> None:
        if arrived and not arrived[-1].done():
            arrived[-1].set_result(time.perf_counter_ns())

    def echo_at_b(_line: str) -> None:
        task = asyncio.get_running_loop().create_task(b_client[0].send("rta", PAYLOAD))
        echoes.add(task)
        task.add_done_callback(echoes.discard)

    a, b = await m.logon(["rta", "rtb"], [back_at_a, echo_at_b])
    b_client.append(b)
    loop = asyncio.get_running_loop()

    async def one() -> float:
        arrived[:] = [loop.create_future()]
        started = time.perf_counter_ns()
        reply = await a.send("rtb", PAYLOAD)
        if reply != Reply.SENT:
            raise RuntimeError(f"rta → rtb: {reply}")
        return (await asyncio.wait_for(arrived[-1], 10.0) - started) / 1000

    try:
        reps = await sample_roundtrips(env, one)
        await asyncio.gather(*echoes)
    finally:
        await close([a, b])
    return [
        Figure(
            f"roundtrip.{name}.{SYSTEM}",
            f"round trip A→B→A {name}: messenger (send → callback → send back)",
            "µs",
            tuple(percentile(samples, q) for samples in reps),
            ref=f"roundtrip.{name}.raw",
            better="lower",
            notes=NOTE,
            extra={"roundtrips": len(reps[0])},
        )
        for name, q in PERCENTILES
    ]


async def capacity(m: Messenger) -> list[Figure]:
    """Requests already queued, drained as fast as the coordinator can; and what the drain cost
    the coordinator and Redis in CPU per request (steadier than rates on a shared machine)."""
    env = m.env
    assert m.coordinator is not None
    sessions = 8
    total = (400 if env.smoke else 4000 if env.quick else 20_000) // sessions * sessions
    counters = [Counter() for _ in range(sessions)]
    names = [f"cap{i}" for i in range(sessions)]
    clients = await m.logon(names, [c.hit for c in counters])

    async def once() -> tuple[float, float, float]:
        for counter in counters:
            counter.expect(total // sessions)
        now = await redis_ms(m.admin)
        # Signed as the clients sign them (a long wait: none expires while queued).
        entries = [
            encode_request(
                Request(
                    "message-to",
                    secrets.token_hex(16),
                    clients[j % sessions].sid,
                    to=names[(j + 1) % sessions],
                    text=PAYLOAD,
                    sent_ms=now,
                    wait_ms=60_000,
                ),
                clients[j % sessions].key,
            )
            for j in range(total)
        ]
        coordinator = m.coordinator
        assert coordinator is not None
        coordinator.signal(signal.SIGSTOP)
        try:
            await poll_until(
                lambda: process_state(coordinator.pid) == "T", 5.0, "the coordinator to stop"
            )
            async with m.admin.pipeline(transaction=False) as pipe:
                for i in range(0, total, 500):
                    pipe.rpush(m.keys.requests, *entries[i : i + 500])
                await pipe.execute()
            cpu, redis_cpu = process_cpu_seconds(coordinator.pid), await redis_cpu_seconds(m.admin)
        finally:
            coordinator.signal(signal.SIGCONT)
        started = time.perf_counter()

        async def drained() -> bool:
            async with m.admin.pipeline(transaction=False) as pipe:
                pipe.llen(m.keys.requests)
                pipe.llen(m.keys.inflight)
                queued, inflight = await pipe.execute()
            return bool(queued == 0 and inflight == 0)

        await poll_until(drained, 120.0, "the request queue to drain")
        rate = total / (time.perf_counter() - started)
        cpu = process_cpu_seconds(coordinator.pid) - cpu
        # Includes the drained() polls (a few hundred LLENs): small beside the scripts.
        redis_cpu = await redis_cpu_seconds(m.admin) - redis_cpu
        await wait_all(counters, 30.0, "queued messages")  # all applied, none lost
        return rate, cpu / total * 1e6, redis_cpu / total * 1e6

    try:
        reps = [await once() for _ in range(env.repeat)]
    finally:
        await close(clients)
    extra = {"messages": total, "sessions": sessions}
    return [
        Figure(
            "capacity.coordinator.messenger",
            f"coordinator capacity: {total:,} queued message requests drained "
            "(beside raw pub/sub's rate on this Redis)",
            "req/s",
            tuple(r[0] for r in reps),
            ref="throughput.inflight16.8pairs.raw",
            notes=NOTE,
            extra=extra,
        ),
        Figure(
            "capacity.coordinator_cpu.messenger",
            "coordinator CPU per queued request drained",
            "µs",
            tuple(r[1] for r in reps),
            better="lower",
            notes=NOTE,
            extra=extra,
        ),
        Figure(
            "capacity.redis_cpu.messenger",
            "Redis CPU per queued request drained (user + system, from INFO)",
            "µs",
            tuple(r[2] for r in reps),
            better="lower",
            notes=NOTE,
            extra=extra,
        ),
    ]


async def logon_rate(m: Messenger) -> Figure:
    env = m.env
    batch = 8 if env.smoke else 16 if env.quick else 64
    values = []
    for rep in range(env.repeat):
        names = [f"lo{rep}x{i}" for i in range(batch)]
        clients = [m.client(n, lambda _line: None) for n in names]
        try:
            started = time.perf_counter()
            await asyncio.gather(*(c.logon() for c in clients))
            values.append(batch / (time.perf_counter() - started))
            for c in clients:
                await c.start_serving()
        finally:
            await close(clients)
    return Figure(
        "logon.rate.messenger",
        f"logons/s, {batch} fresh sessions logging on at once",
        "logons/s",
        tuple(values),
        notes=NOTE,
        extra={"messages": batch},
    )


async def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"{argv[1:]} did not end within 30 s") from None
    elapsed = (time.perf_counter() - started) * 1000
    if proc.returncode != 0 or out.decode().strip() != Reply.SENT:
        raise RuntimeError(f"{argv[1:]} exited {proc.returncode}: {out!r} {err[-300:]!r}")
    return elapsed


async def cli_latency(m: Messenger) -> list[Figure]:
    env = m.env
    runs = env.repeat if env.quick else max(env.repeat, 15)
    client_env = {**m.process_env, "MESSENGER_REDIS_URL": m.client_url}
    logons = []
    try:
        for name, node in (("alice", "n1"), ("bob", "n2")):
            proc = await Process.python(
                ["-m", "messenger", "logon", name, "--node", node], client_env, f"logon {name}"
            )
            logons.append(proc)
            await proc.wait_line("logged-on", 30.0)
        socket = str(local.socket_path(m.settings("n1")))
        command = [sys.executable, "-m", "messenger", "message", "bob", "hi", "--node", "n1"]
        floor = [sys.executable, str(FLOOR_SCRIPT), socket, "bob", "hi"]
        await _wall_ms(command, client_env)  # warm-up: the OS's file cache
        await _wall_ms(floor, client_env)
        ours, floors = [], []
        for _ in range(runs):  # interleaved, so drift hits both alike
            ours.append(await _wall_ms(command, client_env))
            floors.append(await _wall_ms(floor, client_env))
        await logons[1].wait_line("Message from alice: hi", 10.0)
    finally:
        for proc in logons:
            await proc.stop()
    return [
        Figure(
            "cli.message.messenger",
            "`python -m messenger message bob hi --node n1` wall time",
            "ms",
            tuple(ours),
            ref="cli.message.floor",
            better="lower",
            extra={"messages": runs},
        ),
        Figure(
            "cli.message.floor",
            "the same request to the node socket from a ten-line script (floor_message.py)",
            "ms",
            tuple(floors),
            better="lower",
            extra={"messages": runs},
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

    async with Messenger(env) as m:
        for shape in shapes(env):
            await part(shape.key(SYSTEM), lambda s=shape: throughput(m, s))  # type: ignore[misc]
        await part("roundtrip", lambda: roundtrip(m))
        await part("capacity", lambda: capacity(m))
        await part("logon", lambda: logon_rate(m))
        await part("cli", lambda: cli_latency(m))
    if errors:
        raise Partial(figures, errors)
    return figures
