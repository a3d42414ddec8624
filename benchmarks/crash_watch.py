"""What the crash fast path (messenger/crashes.py) costs per check, at 1k, 10k and 100k sessions.

    python -m benchmarks.crash_watch [--sessions 1000,10000] [--repeat 20]

It starts its own redis-server, writes N session records, subscribes to their N inboxes (on a few
connections: NUMSUB counts per channel, whatever the connection), and times what the active
coordinator does every sweep interval: one `CrashWatch.suspects` (PUBSUB NUMSUB of every inbox,
chunked, in one pipeline) — wall time, coordinator CPU time, and Redis CPU time (from INFO
commandstats) — then `load` (once per activation) and one `crashed` script with 100 suspects.
Prints a markdown table; figures are medians (min-max) of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from messenger.crashes import CrashWatch
from messenger.embedded import EmbeddedRedis
from messenger.keys import Keys
from messenger.scripts import Scripts

_PER_CONNECTION = 5000  # channels per subscriber connection


async def _numsub_usec(redis: Redis) -> float:
    stats = await redis.info("commandstats")
    for name in ("cmdstat_pubsub|numsub", "cmdstat_pubsub"):
        if name in stats:
            return float(stats[name]["usec"])
    return 0.0


def _figure(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


async def _timed(repeat: int, step: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await step()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def measure(url: str, sessions: int, repeat: int) -> dict[str, str]:
    keys = Keys("bench" + secrets.token_hex(3))
    redis = Redis.from_url(url, decode_responses=True, protocol=2)
    subscribers = []
    try:
        inboxes = {
            secrets.token_hex(16): keys.inbox(secrets.token_hex(16)) for _ in range(sessions)
        }
        async with redis.pipeline(transaction=False) as pipe:
            for sid, inbox in inboxes.items():
                pipe.hset(keys.sessions, sid, json.dumps({"name": sid[:8], "inbox": inbox}))
            await pipe.execute()
        channels = list(inboxes.values())
        for i in range(0, len(channels), _PER_CONNECTION):
            pubsub = redis.pubsub()
            await pubsub.subscribe(*channels[i : i + _PER_CONNECTION])
            subscribers.append(pubsub)
        for pubsub in subscribers:  # every subscription is in place once confirmed
            for _ in range(min(_PER_CONNECTION, sessions)):
                while await pubsub.get_message(timeout=1.0) is None:
                    pass
        watch = CrashWatch()
        load = await _timed(3, lambda: watch.load(redis, keys, keys.canary("bench")))
        await watch.suspects(redis)  # every inbox seen once
        cpu, redis_usec = [], []
        wall = []
        for _ in range(repeat):
            before_usec, before_cpu = await _numsub_usec(redis), time.process_time()
            started = time.perf_counter()
            assert await watch.suspects(redis) == []
            wall.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - before_cpu) * 1000)
            # INFO itself is not a NUMSUB: the difference is the check's own Redis time.
            redis_usec.append((await _numsub_usec(redis) - before_usec) / 1000)
        scripts = Scripts(redis, keys)
        await redis.set(keys.lease, "bench", px=600_000)
        suspects = list(inboxes.items())[:100]
        crashed = await _timed(3, lambda: scripts.crashed("bench", suspects))
        checked = min(sessions, watch.most)
        await watch.close()
        return {
            "sessions": f"{sessions:,}",
            "inboxes per check": f"{checked:,}",
            "check wall ms": _figure(wall),
            "check coordinator CPU ms": _figure(cpu),
            "check Redis CPU ms": _figure(redis_usec),
            "at 4 checks/s: coordinator CPU %": f"{statistics.median(cpu) * 4 / 10:.1f}",
            "at 4 checks/s: Redis CPU %": f"{statistics.median(redis_usec) * 4 / 10:.1f}",
            "load (per activation) ms": _figure(load),
            "crashed script, 100 suspects, ms": _figure(crashed),
        }
    finally:
        for pubsub in subscribers:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.delete(keys.sessions, keys.lease)
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1000,10000", help="comma-separated counts")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    counts = [int(n) for n in args.sessions.split(",")]
    with EmbeddedRedis() as server:
        rows = [asyncio.run(measure(server.url, n, args.repeat)) for n in counts]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
