"""The relay of benchmarks/relay_ref.py: what a design with a process in every message's path
must do, and nothing else.

    BENCH_RELAY_URL=redis://... python -m benchmarks.relay QUEUE

Blocks on QUEUE (BLPOP) for an entry `REQ SENDER-CHANNEL RECEIVER-CHANNEL TEXT`; for each entry
of a batch PUBLISHes `m SENDER-CHANNEL TEXT` to the receiver's channel and `r REQ` (the reply) to
the sender's. A batch goes as one pipeline packed by hiredis (messenger/wire.py, the code the
coordinator sends its batches with) whose last command, `LPOP QUEUE 100`, takes the next batch in
the same round trip, as the coordinator's batch script takes its next one. No signature, no
check, no Lua, no in-flight list. Says `ready` on stdout once connected; SIGTERM ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import cast

from redis.asyncio import Redis

from messenger.wire import pipeline

BATCH = 100  # as the coordinator's batches
BLOCK_S = 1.0
NAME = "bench-relay"  # its connection's name (CLIENT LIST), so a scenario can see it blocked


async def relay(redis: Redis, queue: str) -> None:
    take = ("LPOP", queue, str(BATCH))
    batch: list[str] = []
    while True:
        if not batch:
            got = cast("list[str] | None", await redis.blpop([queue], timeout=BLOCK_S))
            if got is None:
                continue
            batch = [got[1]]
        commands = []
        for entry in batch:
            req, back, to, text = entry.split(" ", 3)
            commands.append(("PUBLISH", to, f"m {back} {text}"))
            commands.append(("PUBLISH", back, f"r {req}"))
        commands.append(take)
        replies = await pipeline(redis, commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        batch = cast(list[str], replies[-1] or [])


async def main(queue: str) -> None:
    # As the coordinator connects (RESP2, hiredis, decoded), minus its timeouts and retries.
    redis = Redis.from_url(
        os.environ["BENCH_RELAY_URL"], decode_responses=True, protocol=2, client_name=NAME
    )
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await redis.ping()
        print("ready", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await relay(redis, queue)
    finally:
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
