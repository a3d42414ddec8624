"""The two attackers of tests/test_flood_integration.py, each run as a process of its own, so
that their CPU is not taken from the honest clients whose latency the test measures.

    python -m tests.flood flooder NODE TO SECONDS WORKERS
        logs a session on (a real Client, settings from MESSENGER_*) and sends messages to TO
        from WORKERS concurrent loops, as fast as replies come back, for SECONDS; prints
        `flooding` once logged on, then one JSON line: how many of each reply it got.

    python -m tests.flood signed NODE TO RATE SECONDS
        logs a session on like `flooder`, then RPUSHes requests signed with its key straight to
        the queue at RATE entries/s, never waiting for a reply (what a client that is not ours
        can do); prints `flooding`, then {"pushed": n, "seconds": s, "replies": {...}}.

    python -m tests.flood garbage URL PREFIX RATE SECONDS
        RPUSHes entries that are not valid requests to the request queue at RATE entries/s
        (batches of 100 on a fixed schedule), for SECONDS; prints `pushing`, then one JSON line:
        {"pushed": n, "seconds": s}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
from collections import Counter
from typing import Any

import redis as redis_sync

from messenger import acl
from messenger.client import Client
from messenger.connection import connect
from messenger.errors import MessengerError, ProtocolError
from messenger.keys import Keys
from messenger.protocol import ReplyEvent, Request, decode_event, encode_request
from messenger.settings import Settings

_BATCH = 100


def garbage_entries(count: int) -> list[str]:
    """Entries a client credential can push that are no request: junk, and well-formed requests
    of sessions nobody knows (the costly kind: their key must be looked up), in turn."""
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append("junk " + secrets.token_urlsafe(60))
        elif i % 3 == 1:
            payload = {
                "k": "message-to",
                "req": secrets.token_hex(16),
                "sid": secrets.token_hex(16),
                "t": str(int(time.time() * 1000)),
                "to": "alice",
                "text": "garbage",
            }
            out.append(secrets.token_hex(32) + json.dumps(payload, separators=(",", ":")))
        else:
            out.append(secrets.token_hex(32) + '{"k":"message-to","req":')
    return out


def push_garbage(url: str, prefix: str, rate: float, seconds: float) -> dict[str, float]:
    db = redis_sync.Redis.from_url(url)
    queue = Keys(prefix).requests
    pool = garbage_entries(3 * _BATCH)
    print("pushing", flush=True)
    start = time.monotonic()
    pushed = 0
    try:
        while (now := time.monotonic()) - start < seconds:
            due = start + pushed / rate  # when the next batch is due, on a fixed schedule
            if now < due:
                time.sleep(due - now)
                continue
            offset = pushed % len(pool)
            batch = (pool + pool)[offset : offset + _BATCH]
            db.rpush(queue, *batch)
            pushed += len(batch)
    finally:
        db.close()
    return {"pushed": pushed, "seconds": round(time.monotonic() - start, 3)}


async def logged_on(node: str) -> Client:
    """mallory's session, its heartbeat running."""
    settings = Settings.from_env(node=node)
    url = settings.redis_url or ""
    redis = connect(url, socket_timeout=2.0, tls=None)
    hb_url = acl.heartbeat_url(url)  # a client credential's heartbeat user, as `logon` does
    hb = None if hb_url is None else connect(hb_url, socket_timeout=2.0, tls=None)
    client = Client(redis, settings, "mallory", out=lambda _line: None, heartbeat_redis=hb)
    await client.logon()
    await client.start_serving()  # the heartbeat: the session must stay alive meanwhile
    return client


async def count_replies(client: Client, replies: Counter[str]) -> None:
    """Count every reply on the session's inbox (a listener beside the client's own)."""
    listener = client.redis.pubsub()
    await listener.subscribe(client.inbox)
    try:
        while True:
            msg: Any = await listener.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None and msg["type"] == "message":
                with contextlib.suppress(ProtocolError):
                    event = decode_event(msg["data"])
                    if isinstance(event, ReplyEvent):
                        replies[event.reply] += 1
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]


async def push_signed(node: str, to: str, rate: float, seconds: float) -> dict[str, Any]:
    replies: Counter[str] = Counter()
    client = await logged_on(node)
    counter = asyncio.create_task(count_replies(client, replies))
    try:
        secs, micros = await client.redis.time()  # requests are timed on Redis's clock
        redis_ms, at = secs * 1000 + micros // 1000, time.monotonic()
        wait_ms = client.settings.reply_timeout_ms
        print("flooding", flush=True)
        start, pushed = time.monotonic(), 0
        while (now := time.monotonic()) - start < seconds:
            due = start + pushed / rate
            if now < due:
                await asyncio.sleep(due - now)
                continue
            sent_ms = redis_ms + int((now - at) * 1000)
            batch = [
                encode_request(
                    Request(
                        "message-to", secrets.token_hex(16), client.sid, to=to, text="flood",
                        sent_ms=sent_ms, wait_ms=wait_ms,
                    ),
                    client.key,
                )
                for _ in range(_BATCH)
            ]  # fmt: skip
            await client.redis.rpush(Keys(client.settings.prefix).requests, *batch)
            pushed += len(batch)
        elapsed = time.monotonic() - start
        with contextlib.suppress(MessengerError):  # behind its own flood: it may time out
            await client.logoff()
    finally:
        counter.cancel()
        await client.close()
    return {"pushed": pushed, "seconds": round(elapsed, 3), "replies": replies}


async def flood(node: str, to: str, seconds: float, workers: int) -> Counter[str]:
    replies: Counter[str] = Counter()
    client = await logged_on(node)
    try:
        print("flooding", flush=True)
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds

        async def worker() -> None:
            while loop.time() < until and not client.finished.done():
                try:
                    replies[await client.send(to, "flood")] += 1
                except MessengerError as e:
                    replies[e.message] += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
        with contextlib.suppress(MessengerError):  # behind its own flood: it may time out
            await client.logoff()
    finally:
        await client.close()
    return replies


def main(argv: list[str]) -> None:
    what, *args = argv
    if what == "flooder":
        node, to, seconds, workers = args
        print(json.dumps(asyncio.run(flood(node, to, float(seconds), int(workers)))), flush=True)
    elif what == "signed":
        node, to, rate, seconds = args
        print(json.dumps(asyncio.run(push_signed(node, to, float(rate), float(seconds)))))
    elif what == "garbage":
        url, prefix, rate, seconds = args
        print(json.dumps(push_garbage(url, prefix, float(rate), float(seconds))), flush=True)
    else:
        raise SystemExit(f"unknown command {what!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
