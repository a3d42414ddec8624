"""The floor our design adds to: raw redis-py asyncio pub/sub on per-user channels.

Each pair is a sender client publishing to its receiver's own channel and a receiver reading
that channel on a pub/sub connection of its own, with a callback (a redis-py channel handler),
all in this process, as the messenger's clients are in benchmarks/messenger_path.py. Figures:

- `throughput.{awaited,inflight16}.{1,8,32}pairs.raw`: one-way msgs/s, from the first PUBLISH
  until every receiver's callback has counted its messages.
- `roundtrip.{p50,p99,p999}.raw`: ping-pong, A publishes to B's channel, B's callback
  publishes back to A's, A's callback ends the round trip (µs).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from benchmarks._support import (
    PAYLOAD,
    Counter,
    Shape,
    confirm_subscribed,
    percentile,
    sample_roundtrips,
    send_all,
    shapes,
    sized,
    wait_all,
)
from benchmarks.figures import Env, Figure

SYSTEM = "raw"
PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p999", 99.9))


def expected_keys(env: Env) -> list[str]:
    return [s.key(SYSTEM) for s in shapes(env)] + [
        f"roundtrip.{name}.{SYSTEM}" for name, _ in PERCENTILES
    ]


def _client(env: Env) -> Redis:
    # As the messenger's clients connect (RESP2, hiredis), minus the messenger.
    return Redis.from_url(env.redis_url, decode_responses=True, protocol=2)


async def _reader(pubsub: PubSub) -> None:
    """Keep reading: redis-py calls the channel's handler for each message."""
    while True:
        await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)


def _publisher(sender: Redis, channel: str) -> Callable[[int], Awaitable[object]]:
    async def publish(_i: int) -> object:
        return await sender.publish(channel, PAYLOAD)

    return publish


class _Pairs:
    """`n` sender clients and `n` subscribed receivers, each with a counting callback."""

    def __init__(self, env: Env, n: int) -> None:
        run = secrets.token_hex(4)
        self.channels = [f"bench:raw:{run}:{i}" for i in range(n)]
        self.senders = [_client(env) for _ in range(n)]
        self.receivers = [_client(env) for _ in range(n)]
        self.counters = [Counter() for _ in range(n)]
        self.pubsubs: list[PubSub] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> _Pairs:
        for receiver, channel, counter in zip(
            self.receivers, self.channels, self.counters, strict=True
        ):
            pubsub = receiver.pubsub()
            self.pubsubs.append(pubsub)
            await pubsub.subscribe(**{channel: counter.hit})
            await confirm_subscribed(pubsub, 1)
            self.tasks.append(asyncio.create_task(_reader(pubsub)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for pubsub in self.pubsubs:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        for client in (*self.senders, *self.receivers):
            await client.aclose()

    async def once(self, count: int, inflight: int) -> float:
        for counter in self.counters:
            counter.expect(count)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                send_all(_publisher(sender, channel), count, inflight)
                for sender, channel in zip(self.senders, self.channels, strict=True)
            )
        )
        await wait_all(self.counters, 60.0, "raw pub/sub messages")
        return len(self.senders) * count / (time.perf_counter() - started)


async def throughput(env: Env, shape: Shape) -> Figure:
    async with _Pairs(env, shape.pairs) as pairs:
        count, values = await sized(env, shape, lambda n: pairs.once(n, shape.inflight))
    return Figure(
        shape.key(SYSTEM),
        shape.label("raw redis-py pub/sub"),
        "msgs/s",
        values,
        extra={"messages": count * shape.pairs, "per_sender": count},
    )


async def roundtrip(env: Env) -> list[Figure]:
    run = secrets.token_hex(4)
    a_channel, b_channel = f"bench:raw:{run}:a", f"bench:raw:{run}:b"
    a, b = _client(env), _client(env)
    a_sub, b_sub = a.pubsub(), b.pubsub()
    arrived: list[asyncio.Future[int]] = []

    def back_at_a(_msg: Any) -> None:
        if arrived and not arrived[-1].done():
            arrived[-1].set_result(time.perf_counter_ns())

    async def echo_at_b(msg: Any) -> None:
        await b.publish(a_channel, msg["data"])

    tasks = []
    try:
        await a_sub.subscribe(**{a_channel: back_at_a})
        await b_sub.subscribe(**{b_channel: echo_at_b})
        await confirm_subscribed(a_sub, 1)
        await confirm_subscribed(b_sub, 1)
        tasks = [asyncio.create_task(_reader(s)) for s in (a_sub, b_sub)]
        loop = asyncio.get_running_loop()

        async def one() -> float:
            arrived[:] = [loop.create_future()]
            started = time.perf_counter_ns()
            await a.publish(b_channel, PAYLOAD)
            return (await asyncio.wait_for(arrived[-1], 10.0) - started) / 1000

        reps = await sample_roundtrips(env, one)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in (a_sub, b_sub):
            await sub.aclose()  # type: ignore[no-untyped-call]
        for client in (a, b):
            await client.aclose()
    return [
        Figure(
            f"roundtrip.{name}.{SYSTEM}",
            f"ping-pong round trip {name}: raw redis-py pub/sub",
            "µs",
            tuple(percentile(samples, q) for samples in reps),
            better="lower",
            extra={"roundtrips": len(reps[0])},
        )
        for name, q in PERCENTILES
    ]


async def run(env: Env) -> list[Figure]:
    figures = [await throughput(env, shape) for shape in shapes(env)]
    return figures + await roundtrip(env)
