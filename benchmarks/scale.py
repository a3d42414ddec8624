"""scale: 1k, 10k and 100k logged-on sessions against one coordinator and one Redis.

    python -m benchmarks.scale [--sessions 1000,10000] [--quick] [--repeat 3]
                               [--heartbeat-interval S --heartbeat-ttl S]

Per size, on a fresh key prefix: a real coordinator (`python -m messenger server`, the admin URL
and a client password, as deployed) and a load generator in this process (benchmarks/loadgen.py)
that subscribes every session's inbox, logs them all on through the request queue with the
client credential, and keeps their heartbeats (from a child process of its own, so that the
latency clients below do not share an event loop with 10,000 PEXPIREs a second). Then, with
only heartbeats, sweeps and crash checks going:

- coordinator CPU % (its /proc/<pid>/stat utime+stime) and Redis CPU % (INFO cpu,
  used_cpu_sys+used_cpu_user) over quiet windows of 10 s (quick: 3 s), one value per window;
- the sweep and the crash check: the Redis time of each of the coordinator's own sweep scripts
  and crash-check NUMSUBs (what a request may wait behind in Redis), from SLOWLOG over a short
  window with every command logged (SLOWLOG times execution only, not the socket I/O), with the
  due sessions each sweep script looked at and those that come due per sweep interval;
- Redis memory: per session overall ((used_memory after - before) / sessions: subscriptions,
  keys, done keys still alive); the inbox subscriptions alone (measured after subscribing,
  before any logon); the keys alone (MEMORY USAGE of sessions/names/nodes/users/deadlines, all
  entries, and of a sample of heartbeat keys, plus each heartbeat key's entry in the expires
  dict, which MEMORY USAGE leaves out);
- message latency: two real messenger.client.Client sessions sending each other 200 messages,
  one at a time: from `send` to the receiver's `Message from` (one way), p50 and p99.

Sizes past 10k use a 10 s heartbeat with a 30 s TTL unless told otherwise (one Redis's share of
heartbeats stays at 10k/s). Quick mode: 1k only, one window of each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from redis.asyncio import Redis

from benchmarks.figures import Env, Figure
from benchmarks.loadgen import LoadGenerator, new_session, used_memory
from benchmarks.procs import Proc, cpu_seconds, messenger_env
from benchmarks.standalone import run_alone, table
from messenger import acl
from messenger.client import Client
from messenger.connection import connect
from messenger.keys import Keys
from messenger.scripts import Scripts
from messenger.settings import Settings

SIZES_QUICK = (1000,)
SIZES_FULL = (1000, 10_000, 100_000)
# A 100k run needs some 1.5 GB between Redis, the coordinator and this process.
_MEMORY_NEEDED_MB = {100_000: 3000}
_MESSAGES = 200
_LOGON_BUDGET_S = 600.0  # a size whose logons take longer is reported as such, not measured
# Expires-dict entry of a key with a TTL (a dictEntry, 24 B, in jemalloc's 32 B class): not in
# MEMORY USAGE.
_EXPIRES_ENTRY = 32
_SAMPLE = 200


def label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def timings(n: int) -> tuple[float, float]:
    """(heartbeat interval, TTL) for a size: the defaults up to 10k, then 10 s / 30 s."""
    return (1.0, 3.0) if n <= 10_000 else (10.0, 30.0)


def _available_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


async def _redis_cpu(admin: Redis) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def _commandstats(admin: Redis) -> dict[str, float]:
    """µs spent so far per command (Redis 7 counts a script's own calls under theirs too)."""
    stats = cast(dict[str, dict[str, Any]], await admin.info("commandstats"))
    return {name.removeprefix("cmdstat_"): float(v["usec"]) for name, v in stats.items()}


async def _redis_ms(admin: Redis) -> int:
    secs, micros = await admin.time()
    return int(secs) * 1000 + int(micros) // 1000


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _Run:
    """One size: the coordinator, the generator, two latency clients, and what was measured."""

    def __init__(self, env: Env, n: int, interval: float, ttl: float) -> None:
        self.env, self.n, self.interval, self.ttl = env, n, interval, ttl
        self.tag = label(n)
        self.keys = Keys("scale" + secrets.token_hex(3))
        self.password = secrets.token_hex(16)
        url = urlsplit(env.redis_url)
        db = int(url.path.strip("/") or 0)
        self.client_url = acl.client_url(
            url.hostname or "127.0.0.1", url.port or 6379, self.keys.prefix, self.password, db=db
        )
        self.admin = connect(env.redis_url, socket_timeout=60.0, name="bench-admin")
        self.runtime = Path(env.work_dir) / f"{self.keys.prefix}-rt"
        self.figures: list[Figure] = []
        self.coordinator: Proc | None = None
        self.gen: LoadGenerator | None = None
        self.clients: list[Client] = []

    def fig(self, what: str, label_: str, unit: str, values: list[float], **kw: Any) -> None:
        self.figures.append(
            Figure(
                f"scale.{self.tag}.{what}",
                f"{label_}, {self.tag} sessions",
                unit,
                tuple(values),
                better=kw.pop("better", "lower"),
                **kw,
            )
        )

    async def start_coordinator(self) -> None:
        env = messenger_env(
            redis_url=self.env.redis_url,
            client_password=self.password,
            prefix=self.keys.prefix,
            runtime_dir=str(self.runtime),
            heartbeat_interval=str(self.interval),
            heartbeat_ttl=str(self.ttl),
            # The latency pair sends 200 messages in a few seconds; the default limit (20/s per
            # session) would answer rate-limited. Logons are not counted anyway.
            rate_limit="100000",
            rate_burst="100000",
        )
        self.coordinator = await Proc.start("server", env=env)
        await self.coordinator.wait_line(r"coordinator \w+ is active", 30.0)

    async def run(self) -> list[Figure]:
        try:
            await self.start_coordinator()
            await self.measure()
        finally:
            await self.cleanup()
        return self.figures

    async def measure(self) -> None:
        quick, admin, n = self.env.quick, self.admin, self.n
        windows = 1 if quick else max(1, self.env.repeat)
        window = 3.0 if quick else 10.0
        mem0, db0 = await used_memory(admin), int(await admin.dbsize())
        users0 = int(await admin.memory_usage(self.keys.users, samples=0) or 0)
        sessions = [new_session(self.keys, f"u{i}", f"n{i}") for i in range(n)]
        gen = self.gen = LoadGenerator(
            self.client_url, self.keys, heartbeat_interval=self.interval, heartbeat_ttl=self.ttl
        )
        started = time.monotonic()
        await gen.subscribe(sessions, timeout=60.0 + n / 1000)
        subscribe_s = time.monotonic() - started
        mem1 = await used_memory(admin)
        await gen.start_heartbeats()
        logons = await gen.logon(sessions, budget=_LOGON_BUDGET_S)
        gen.check()
        print(
            f"scale {self.tag}: subscribed in {subscribe_s:.1f} s; {logons.logged_on} logged on "
            f"in {logons.seconds:.1f} s ({logons.rate:.0f}/s); replies {dict(logons.replies)}, "
            f"{logons.unanswered} unanswered",
            file=sys.stderr,
        )
        progress = self._rate_by_tenth(logons.progress)
        self.fig(
            "logon_rate",
            "logons/s through the request queue, waves of pipelined RPUSHes",
            "logons/s",
            [logons.rate],
            better="higher",
            notes=f"first tenth {progress[0]:.0f}/s, last tenth {progress[-1]:.0f}/s",
            extra={"rate_by_tenth": progress, "unanswered": logons.unanswered},
        )
        if logons.logged_on < n:
            raise RuntimeError(
                f"scale {self.tag}: only {logons.logged_on} of {n} sessions logged on within "
                f"{_LOGON_BUDGET_S:g} s ({logons.rate:.0f}/s; replies {dict(logons.replies)}, "
                f"{logons.unanswered} unanswered)"
            )
        live = len(gen.live)
        # Measured now: a logon's done key lives 2 x its wait + 1 s (about 11 s).
        done = [int(await admin.memory_usage(self.keys.done(r)) or 0) for r in logons.done_sample]
        done_each = statistics.mean([d for d in done if d] or [0]) + _EXPIRES_ENTRY
        # The logon phase's tail (the coordinator's log lines, the last deadlines set) is over
        # within a second; the windows measure the steady state.
        await asyncio.sleep(1.0)
        await self.cpu_windows(windows, window)
        await self.sweep_window(2.0 if quick else 5.0)
        await self.memory(mem0, mem1, db0, users0, live, done_each)
        await self.latency(1 if quick else max(1, self.env.repeat))
        gen.check()
        if gen.lost:
            print(f"scale {self.tag}: {len(gen.lost)} sessions LOST", file=sys.stderr)

    @staticmethod
    def _rate_by_tenth(progress: list[tuple[float, int]]) -> list[float]:
        """Logons/s over each tenth of the sessions: flat if a logon's cost does not grow."""
        if not progress:
            return [0.0]
        total = progress[-1][1]
        rates, last_t, last_n = [], 0.0, 0
        for t, done in progress:
            if done - last_n >= total / 10 or done == total:
                rates.append((done - last_n) / max(t - last_t, 1e-9))
                last_t, last_n = t, done
        return rates

    async def cpu_windows(self, windows: int, window: float) -> None:
        assert self.coordinator is not None
        assert self.gen is not None
        coordinator, redis_, own, beats = [], [], [], []
        usec: defaultdict[str, float] = defaultdict(float)
        total_wall = 0.0
        for _ in range(windows):
            s0 = await _commandstats(self.admin)
            c0, r0 = cpu_seconds(self.coordinator.pid), await _redis_cpu(self.admin)
            g0, h0, t0 = self.gen.cpu_seconds(), self.gen.heartbeats, time.monotonic()
            await asyncio.sleep(window)
            wall = time.monotonic() - t0
            coordinator.append((cpu_seconds(self.coordinator.pid) - c0) / wall * 100)
            redis_.append((await _redis_cpu(self.admin) - r0) / wall * 100)
            own.append((self.gen.cpu_seconds() - g0) / wall * 100)
            beats.append((self.gen.heartbeats - h0) / wall)
            for name, spent in (await _commandstats(self.admin)).items():
                usec[name] += spent - s0.get(name, 0.0)
            total_wall += wall
        busiest = sorted(usec.items(), key=lambda kv: -kv[1])[:8]
        # µs per second of wall time / 10^4 = % of a core
        breakdown = {name: round(us / total_wall / 10_000, 2) for name, us in busiest}
        print(f"scale {self.tag}: Redis command time, % of a core: {breakdown}", file=sys.stderr)
        quiet = f"quiet {window:g} s windows: {statistics.median(beats):,.0f} heartbeats/s"
        hb = f"heartbeat {self.interval:g} s, TTL {self.ttl:g} s"
        self.fig(
            "coordinator_cpu_pct",
            "coordinator CPU, % of one core",
            "%",
            coordinator,
            notes=f"{quiet}, sweeps and crash checks; {hb}",
        )
        self.fig(
            "redis_cpu_pct",
            "Redis CPU, % of one core",
            "%",
            redis_,
            notes=f"{quiet}; command time (INFO commandstats; the rest is socket I/O): "
            + ", ".join(f"{name} {pct:g}" for name, pct in list(breakdown.items())[:4]),
            extra={"command_pct_by_command": breakdown},
        )
        self.fig(
            "generator_cpu_pct",
            "the load generator's own CPU (this process and its heartbeat process), % of one core",
            "%",
            own,
            notes=f"heartbeat slices late by {self.gen.heartbeat_late_max * 1000:.0f} ms at worst",
        )

    async def sweep_window(self, seconds: float) -> None:
        """The Redis time of each of the coordinator's sweep scripts and crash-check NUMSUBs
        for `seconds`, and how many due sessions each sweep script looked at, from SLOWLOG with
        every command logged: a script's own calls are logged too (by its client, which has no
        socket: `?:0`), just before the script itself, and each due session costs one `PTTL` of
        its heartbeat key. Logging each call adds about a microsecond to the script: the times
        are upper bounds. What blocks Redis longest is what a message may wait behind."""
        admin = self.admin
        names = {
            script.sha: name.lstrip("_")
            for name, script in vars(Scripts(admin, self.keys)).items()
            if hasattr(script, "sha")
        }
        await self._until_sessions_come_due()
        old = cast(dict[str, str], await admin.config_get("slowlog-*"))
        try:
            await admin.config_set("slowlog-max-len", 1_000_000)
            await admin.config_set("slowlog-log-slower-than", 0)
            await admin.slowlog_reset()
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            await admin.config_set("slowlog-log-slower-than", -1)
            wall = time.monotonic() - t0
            # Raw: [id, time, duration µs, [command, args...], address, name] each.
            entries = cast(list[list[Any]], await admin.execute_command("SLOWLOG", "GET", -1))  # type: ignore[no-untyped-call]
        finally:
            for key, value in old.items():
                await admin.config_set(key, value)
            await admin.slowlog_reset()
        sweeps, looked_at, numsubs, inner = [], [], [], 0
        hb_prefix = self.keys.hb_prefix
        for _id, _at, duration, words, address, *_ in reversed(entries):  # oldest first
            command = str(words[0]).upper()
            if address in ("", "?:0"):  # a script's own call (its client has no socket)
                inner += command == "PTTL" and str(words[1]).startswith(hb_prefix)
                continue
            if command == "EVALSHA" and names.get(str(words[1])) == "sweep":
                sweeps.append(int(duration) / 1000)
                looked_at.append(inner)
            elif command == "PUBSUB" and len(words) > 3:  # a crash check's chunk of inboxes
                numsubs.append(int(duration) / 1000)
            inner = 0
        now = await _redis_ms(admin)
        sweep_every = 0.25  # the coordinator's default MESSENGER_SWEEP_INTERVAL
        due_next = int(
            await admin.zcount(self.keys.deadlines, now, now + int(10 * sweep_every * 1000))
        )
        # Due for longer than two sweep intervals: what the sweeps did not keep up with.
        backlog = int(await admin.zcount(self.keys.deadlines, "-inf", now - 2 * 250))
        due = sum(looked_at)
        per_due = sum(sweeps) * 1000 / due if due else 0.0
        self.fig(
            "sweep_ms",
            "Redis time of one coordinator sweep script (SLOWLOG, every command logged)",
            "ms",
            sweeps or [0.0],
            notes=(
                f"{len(sweeps)} sweep scripts in {wall:.1f} s looked at {due} due sessions "
                f"(at most {max(looked_at, default=0)} in one): {per_due:.1f} µs each, "
                f"{sum(sweeps) / wall:.1f} ms of Redis a second; {due_next / 10:.0f} come due "
                f"per sweep interval ({sweep_every:g} s); {backlog} overdue by over 0.5 s at "
                "the end"
            ),
            extra={
                "looked_at": looked_at,
                "us_per_due_session": per_due,
                "sweep_ms_per_s": sum(sweeps) / wall,
                "due_per_sweep": due_next / 10,
                "overdue": backlog,
                "longest_ms": max(sweeps, default=0.0),
            },
        )
        self.fig(
            "numsub_ms",
            "Redis time of one crash-check PUBSUB NUMSUB (SLOWLOG, every command logged)",
            "ms",
            numsubs or [0.0],
            notes=(
                f"{len(numsubs)} in {wall:.1f} s, {sum(numsubs) / wall:.1f} ms of Redis a "
                f"second; the longest {max(numsubs, default=0.0):.2f} ms"
            ),
            extra={"longest_ms": max(numsubs, default=0.0)},
        )

    async def _until_sessions_come_due(self) -> None:
        """Wait (at most a TTL) until sessions come due within the next second. After the
        logons' burst they come due in waves at first, some 20-30 s apart with a 30 s TTL: a
        short window may fall between two, and time sweeps that had nothing to do."""
        wanted, until = max(1, min(100, self.n // 100)), time.monotonic() + self.ttl
        while time.monotonic() < until:
            now = await _redis_ms(self.admin)
            if int(await self.admin.zcount(self.keys.deadlines, now, now + 1000)) >= wanted:
                return
            await asyncio.sleep(0.25)

    async def memory(
        self, mem0: int, mem1: int, db0: int, users0: int, live: int, done_each: float
    ) -> None:
        admin, k = self.admin, self.keys
        mem2, db2 = await used_memory(admin), int(await admin.dbsize())
        each: dict[str, float] = {}
        for key in (k.sessions, k.names, k.nodes, k.users, k.deadlines):
            used = int(await admin.memory_usage(key, samples=0) or 0)
            each[key.rpartition(":")[2]] = (used - (users0 if key == k.users else 0)) / live
        structures = sum(each.values()) * live
        assert self.gen is not None
        sample = self.gen.live[:: max(1, live // _SAMPLE)][:_SAMPLE]
        hb = [int(await admin.memory_usage(s.hb) or 0) for s in sample]
        hb_each = statistics.mean(hb) + _EXPIRES_ENTRY
        done_alive = max(0, db2 - db0 - live)  # the keys besides the heartbeat keys: done keys
        keys_each = (structures + hb_each * live) / live
        channels_each = (mem1 - mem0) / self.n
        overall = (mem2 - mem0) / live
        parts = {
            "per_session_by_key": {name: round(b) for name, b in each.items()},
            "structures_per_session": structures / live,
            "hb_key_per_session": hb_each,
            "done_keys_alive": done_alive,
            "done_key_bytes": done_each,
        }
        self.fig(
            "mem_per_session_bytes",
            "Redis used_memory per logged-on session, overall",
            "B",
            [overall],
            notes=(
                f"subscriptions + keys + {done_alive} logon done keys still alive "
                f"(~{done_each:.0f} B each)"
            ),
            extra=parts,
        )
        self.fig(
            "keys_bytes_per_session",
            "Redis memory per session: keys only (MEMORY USAGE)",
            "B",
            [keys_each],
            notes=(
                ", ".join(f"{name} {b:.0f} B" for name, b in each.items())
                + f", heartbeat key {hb_each:.0f} B"
            ),
            extra=parts,
        )
        self.fig(
            "channels_bytes_per_session",
            "Redis memory per session: its inbox subscription (on a shared connection)",
            "B",
            [channels_each],
        )

    async def latency(self, rounds: int) -> None:
        """Two real clients, each with its own three connections, send each other messages one
        at a time: from `send` to the receiver's output line (one way), and to `sent`."""
        arrived: dict[str, float] = {}
        waiting: dict[str, asyncio.Future[None]] = {}

        def out(who: str) -> Any:
            def seen(line: str) -> None:
                text = line.rpartition(": ")[2]
                arrived[text] = time.perf_counter()
                fut = waiting.pop(text, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

            return seen

        tag = secrets.token_hex(2)
        names = (f"lat{tag}a", f"lat{tag}b")
        for name in names:
            settings = Settings(
                redis_url=self.client_url,
                node=f"{name}-node",
                prefix=self.keys.prefix,
                heartbeat_interval=self.interval,
                heartbeat_ttl=self.ttl,
                runtime_dir=self.runtime,
            )
            redis = connect(self.client_url, socket_timeout=2.0)
            hb_url = acl.heartbeat_url(self.client_url)
            hb = None if hb_url is None else connect(hb_url, socket_timeout=2.0)
            client = Client(redis, settings, name, out=out(name), heartbeat_redis=hb)
            self.clients.append(client)
            await client.logon()
            await client.start_serving()
        loop = asyncio.get_running_loop()
        p50s, p99s, sent_p99 = [], [], []
        for r in range(rounds):
            one_way, to_sent = [], []
            for i in range(_MESSAGES):
                sender, receiver = (
                    (self.clients[0], names[1]) if i % 2 else (self.clients[1], names[0])
                )
                text = f"m{r}-{i}"
                fut = waiting[text] = loop.create_future()
                t0 = time.perf_counter()
                reply = await sender.send(receiver, text)
                t1 = time.perf_counter()
                if reply != "sent":
                    raise RuntimeError(f"latency message {text}: {reply}")
                await asyncio.wait_for(fut, 5.0)
                one_way.append((arrived[text] - t0) * 1000)
                to_sent.append((t1 - t0) * 1000)
                # Spread over a few seconds, so that the messages meet sweeps, crash checks
                # and heartbeat slices at every phase (pacing, not waiting for readiness).
                await asyncio.sleep(0.01)
            p50s.append(statistics.median(one_way))
            p99s.append(_percentile(one_way, 0.99))
            sent_p99.append(_percentile(to_sent, 0.99))
        how = f"{_MESSAGES} messages per round, one at a time, between two messenger.client.Client"
        self.fig("msg_p50_ms", "message latency p50, send to receiver", "ms", p50s, notes=how)
        self.fig(
            "msg_p99_ms",
            "message latency p99, send to receiver",
            "ms",
            p99s,
            notes=f"{how}; send to `sent` p99 {statistics.median(sent_p99):.2f} ms",
            extra={"sent_reply_p99_ms": sent_p99},
        )

    async def cleanup(self) -> None:
        """Stop the coordinator first (else it would log every generator session off as
        crashed when the generator's connections close), then everything else; delete the
        prefix's keys and client users."""
        for client in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.logoff(), 5.0)
            await client.close()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.gen is not None:
            await self.gen.close()
        k, admin = self.keys, self.admin
        with contextlib.suppress(Exception):
            fixed = [k.sessions, k.names, k.nodes, k.users, k.deadlines, k.requests, k.inflight]
            await admin.unlink(*fixed, k.lease, k.coordinators, k.acl)
            batch: list[str] = []
            async for key in admin.scan_iter(match=k.hb_prefix + "*", count=1000):
                batch.append(cast(str, key))
                if len(batch) >= 1000:
                    await admin.unlink(*batch)
                    batch = []
            if batch:
                await admin.unlink(*batch)
            for user in acl.users_of(k.prefix):
                await admin.acl_deluser(user)
        await admin.aclose()


async def measure(env: Env, n: int, interval: float, ttl: float) -> list[Figure]:
    return await _Run(env, n, interval, ttl).run()


async def run(env: Env, sizes: tuple[int, ...] | None = None) -> list[Figure]:
    """The runner's entry point: 1k in quick mode; 1k, 10k and (memory allowing) 100k."""
    figures: list[Figure] = []
    for n in sizes or (SIZES_QUICK if env.quick else SIZES_FULL):
        needed = _MEMORY_NEEDED_MB.get(n, 0)
        if needed and _available_mb() < needed:
            print(f"scale: {label(n)} skipped: needs {needed} MB available", file=sys.stderr)
            continue
        figures += await measure(env, n, *timings(n))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", default="1000,10000", help="comma-separated counts")
    parser.add_argument("--quick", action="store_true", help="one short window of each")
    parser.add_argument("--repeat", type=int, default=3, help="windows and latency rounds")
    parser.add_argument("--heartbeat-interval", type=float, help="default: by size")
    parser.add_argument("--heartbeat-ttl", type=float, help="default: by size")
    args = parser.parse_args()
    counts = [int(c) for c in args.sessions.split(",")]

    async def scenario(env: Env) -> list[Figure]:
        figures: list[Figure] = []
        for n in counts:
            interval, ttl = timings(n)
            figures += await measure(
                env, n, args.heartbeat_interval or interval, args.heartbeat_ttl or ttl
            )
        return figures

    print(table(run_alone(scenario, quick=args.quick, repeat=args.repeat)))


if __name__ == "__main__":
    main()
