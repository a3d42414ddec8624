"""References from Django Channels: channels_redis's two layers on the run's Redis.

`RedisChannelLayer` (channels_redis.core: a list per channel, Lua on every send) and
`RedisPubSubChannelLayer` (channels_redis.pubsub: PUBLISH/SUBSCRIBE), each pair a sender layer
and a receiver layer of their own (as two processes would have), `layer.send(channel, message)`
→ a task looping on `layer.receive(channel)` that counts. Figures, same shapes as
benchmarks/raw.py (ref: the raw figure of the same shape):

- `throughput.{awaited,inflight16}.{1,8}pairs.channels_redis.{core,pubsub}`: msgs/s.
- `roundtrip.{p50,p99,p999}.channels_redis.{core,pubsub}`: A sends to B's channel, B
  receives it and sends it back, A receives (µs).

Needs the `bench` (or `test`) extra; without channels_redis the scenario is reported as not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks._support import (
    INFLIGHT,
    PAYLOAD,
    Counter,
    Shape,
    admin,
    percentile,
    poll_until,
    sample_roundtrips,
    send_all,
    sized,
    wait_all,
)
from benchmarks.figures import Env, Figure, NotRun, Partial
from benchmarks.raw import PERCENTILES

KINDS = ("core", "pubsub")
MESSAGE = {"type": "chat.message", "text": PAYLOAD}
# Ends a receiving loop. Cancelling one instead can hang: RedisChannelLayer's receive() does
# not always give way to a cancellation (seen: for longer than 10 s), and asyncio.run would then
# wait for it forever.
STOP = {"type": "bench.stop"}


def system(kind: str) -> str:
    return f"channels_redis.{kind}"


def channel_shapes() -> list[Shape]:
    return [Shape(n, inflight) for n in (1, 8) for inflight in (1, INFLIGHT)]


def expected_keys(env: Env) -> list[str]:
    return [
        key
        for kind in KINDS
        for key in (
            *(s.key(system(kind)) for s in channel_shapes()),
            *(f"roundtrip.{name}.{system(kind)}" for name, _ in PERCENTILES),
        )
    ]


def _factory(kind: str, url: str) -> Callable[[], Any]:
    try:
        if kind == "core":
            from channels_redis.core import RedisChannelLayer as Layer
        else:
            from channels_redis.pubsub import RedisPubSubChannelLayer as Layer
    except ImportError as e:
        raise NotRun(f"channels_redis is not installed ({e}): pip install -e '.[bench]'") from None
    prefix = "bench" + secrets.token_hex(3)
    if kind == "core":
        # The default capacity (100 per channel) would refuse sends in flight: ChannelFull.
        return lambda: Layer(hosts=[url], prefix=prefix, capacity=1_000_000)
    return lambda: Layer(hosts=[url], prefix=prefix)


async def _close(kind: str, layer: Any) -> None:
    with contextlib.suppress(Exception):
        if kind == "core":
            await layer.close_pools()
        else:
            await layer.flush()  # closes its connections too


class _Setup:
    """Layers, channels and receiving tasks, closed whatever happens."""

    def __init__(self, kind: str, env: Env) -> None:
        self.kind = kind
        self.env = env
        self.make = _factory(kind, env.redis_url)
        self.layers: list[Any] = []
        self.tasks: list[tuple[Any, str, asyncio.Future[None]]] = []

    def layer(self) -> Any:
        layer = self.make()
        self.layers.append(layer)
        return layer

    async def channel(self, layer: Any) -> str:
        name: str = await layer.new_channel()
        if self.kind == "pubsub":
            # It subscribes without waiting for Redis's confirmation; a message published
            # before Redis has the subscription would reach nobody.
            redis = admin(self.env.redis_url)
            try:

                async def subscribed() -> bool:
                    counts: Any = await redis.pubsub_numsub(name)
                    return bool(counts and int(counts[0][1]) > 0)

                await poll_until(subscribed, 10.0, f"{name} to be subscribed")
            finally:
                await redis.aclose()
        return name

    def spawn(self, layer: Any, channel: str, coro: Awaitable[None]) -> None:
        """A task receiving on `channel` of `layer`; it must end at STOP."""
        self.tasks.append((layer, channel, asyncio.ensure_future(coro)))

    async def __aenter__(self) -> _Setup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        async def stop(layer: Any, channel: str) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.send(channel, STOP), 5.0)

        await asyncio.gather(*(stop(layer, channel) for layer, channel, _ in self.tasks))
        tasks = [task for _, _, task in self.tasks]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5.0)
            for task in late:  # a last resort (see STOP)
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed receiver has already failed the figure

        async def close(layer: Any) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_close(self.kind, layer), 5.0)

        await asyncio.gather(*(close(layer) for layer in self.layers))


async def _count(layer: Any, channel: str, counter: Counter) -> None:
    while (await layer.receive(channel)).get("type") != STOP["type"]:
        counter.hit()


def _sender(layer: Any, channel: str) -> Callable[[int], Awaitable[object]]:
    async def send(_i: int) -> object:
        await layer.send(channel, MESSAGE)
        return None

    return send


async def throughput(kind: str, env: Env, shape: Shape) -> Figure:
    async with _Setup(kind, env) as s:
        senders = [s.layer() for _ in range(shape.pairs)]
        receivers = [s.layer() for _ in range(shape.pairs)]
        channels = [await s.channel(r) for r in receivers]
        counters = [Counter() for _ in range(shape.pairs)]
        for r, c, counter in zip(receivers, channels, counters, strict=True):
            s.spawn(r, c, _count(r, c, counter))

        async def once(n: int) -> float:
            for counter in counters:
                counter.expect(n)
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    send_all(_sender(layer, c), n, shape.inflight)
                    for layer, c in zip(senders, channels, strict=True)
                )
            )
            await wait_all(counters, 60.0, f"{system(kind)} messages")
            return shape.pairs * n / (time.perf_counter() - started)

        count, values = await sized(env, shape, once)
    return Figure(
        shape.key(system(kind)),
        shape.label(system(kind)),
        "msgs/s",
        values,
        ref=shape.key("raw"),
        extra={"messages": count * shape.pairs, "per_sender": count},
    )


async def roundtrip(kind: str, env: Env) -> list[Figure]:
    async with _Setup(kind, env) as s:
        a, b = s.layer(), s.layer()
        a_channel, b_channel = await s.channel(a), await s.channel(b)

        async def echo() -> None:
            while (message := await b.receive(b_channel)).get("type") != STOP["type"]:
                await b.send(a_channel, message)

        s.spawn(b, b_channel, echo())

        async def one() -> float:
            started = time.perf_counter_ns()
            await a.send(b_channel, MESSAGE)
            await asyncio.wait_for(a.receive(a_channel), 10.0)
            return (time.perf_counter_ns() - started) / 1000

        reps = await sample_roundtrips(env, one)
    return [
        Figure(
            f"roundtrip.{name}.{system(kind)}",
            f"round trip A→B→A {name}: {system(kind)} (send → receive → send back)",
            "µs",
            tuple(percentile(samples, q) for samples in reps),
            ref=f"roundtrip.{name}.raw",
            better="lower",
            extra={"roundtrips": len(reps[0])},
        )
        for name, q in PERCENTILES
    ]


async def run(env: Env) -> list[Figure]:
    for kind in KINDS:
        _factory(kind, env.redis_url)  # NotRun now, before anything, if it is not installed
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    for kind in KINDS:
        for shape in channel_shapes():
            try:
                figures.append(await throughput(kind, env, shape))
            except Exception as e:
                errors[shape.key(system(kind))] = f"{type(e).__name__}: {e}"
        try:
            figures += await roundtrip(kind, env)
        except Exception as e:
            errors[f"roundtrip.{system(kind)}"] = f"{type(e).__name__}: {e}"
    if errors:
        raise Partial(figures, errors)
    return figures
