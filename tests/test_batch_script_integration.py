"""The batch script (messenger/scripts.py `_BATCH`) on every supported real Redis: its events
are built by hand, not by cjson, and it finds a receiver's inbox without decoding its record,
so these check what fakeredis's Lua emulation cannot: the real cjson's records (which escape
`/`), and events that real clients decode."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from messenger.coordinator import Coordinator
from messenger.embedded import EmbeddedRedis
from messenger.keys import Keys
from messenger.protocol import (
    MessageEvent,
    ReplyEvent,
    Request,
    decode_event,
    encode_request,
    inbox_id,
    new_session_key,
)
from messenger.settings import Settings

TEXTS = ["plain", 'quotes " and \\ backslash', "ünïcödé ✓ and \x01 control", "/slashes/"]


async def _next_event(pubsub: object, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)  # type: ignore[attr-defined]
        if msg is not None:
            return decode_event(msg["data"])
    raise AssertionError("no event within the deadline")


@pytest.fixture
async def redis(any_redis: EmbeddedRedis) -> AsyncIterator[Redis]:
    r = Redis.from_url(any_redis.url, decode_responses=True)
    yield r
    await r.aclose()


# A prefix with a `/`: the real cjson writes it escaped (`\/`) in every record's inbox, so the
# script's quick look for the inbox fails and it decodes the record instead.
@pytest.mark.parametrize("prefix", ["plain", "with/slash"])
async def test_messages_and_replies_arrive_as_clients_decode_them(
    redis: Redis, prefix: str
) -> None:
    prefix = f"{prefix}{secrets.token_hex(3)}"
    coord = Coordinator(redis, Settings(prefix=prefix, node="n0"))
    assert await coord.try_acquire_lease()
    keys = Keys(prefix)
    sessions = {}
    pubsubs = {}
    for name in ("alice", "bob"):
        sid, key = secrets.token_hex(16), new_session_key()
        pubsubs[name] = redis.pubsub()
        await pubsubs[name].subscribe(keys.inbox(inbox_id(key)))
        await pubsubs[name].get_message(timeout=1.0)  # the subscription's confirmation
        sessions[name] = (sid, key)
        logon = Request("logon", secrets.token_hex(16), sid, name=name, node=f"n-{name}", key=key)
        now = int(time.time() * 1000)
        assert (
            await coord.handle(encode_request(Request(**{**logon.__dict__, "sent_ms": now}), key))
            == "logged-on"
        )
        assert await _next_event(pubsubs[name]) == ReplyEvent(logon.req, "logged-on")  # type: ignore[arg-type]
    sid, key = sessions["alice"]
    for text in TEXTS:
        r = Request(
            "message-to",
            secrets.token_hex(16),
            sid,
            to="bob",
            text=text,
            sent_ms=int(time.time() * 1000),
        )
        assert await coord.handle(encode_request(r, key)) == "sent"
        assert await _next_event(pubsubs["bob"]) == MessageEvent("alice", text)
        assert await _next_event(pubsubs["alice"]) == ReplyEvent(r.req, "sent")  # type: ignore[arg-type]
    # The record really is what the quick look reads (or not, with the slash).
    raw = str(await redis.hget(keys.sessions, sessions["bob"][0]))
    assert ('"inbox":"' + keys.inbox(inbox_id(sessions["bob"][1])) + '"' in raw) == (
        "/" not in prefix
    )
    assert json.loads(raw)["inbox"] == keys.inbox(inbox_id(sessions["bob"][1]))
    for p in pubsubs.values():
        await p.aclose()  # type: ignore[no-untyped-call]
