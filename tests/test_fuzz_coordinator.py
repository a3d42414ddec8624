"""The coordinator's request handling under arbitrary input (issue 11, point 8), on fakeredis:
every entry yields a reply word or None (dropped), never another exception, and no entry that
is not signed with a session's own key changes the user list."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

import fakeredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from messenger.coordinator import Coordinator
from messenger.keys import Keys
from messenger.protocol import Request, encode_request, new_session_key, sign
from messenger.settings import Settings

PREFIX = "f"
ALICE_KEY = new_session_key()
ALICE = "a" * 32
NOW = 1_000_000_000_000


def _coordinator() -> tuple[Coordinator, Any]:
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    c = Coordinator(
        redis, Settings(redis_url="redis://fake", node="t", prefix=PREFIX), clock=lambda: NOW
    )
    return c, redis


async def _with_alice(c: Coordinator) -> None:
    assert await c.try_acquire_lease()
    logon = Request(
        "logon", secrets.token_hex(16), ALICE, name="alice", node="n1", key=ALICE_KEY, sent_ms=NOW
    )
    assert await c.handle(encode_request(logon, ALICE_KEY)) == "logged-on"


async def _state(redis: Any) -> dict[str, Any]:
    k = Keys(PREFIX)
    return {key: await redis.hgetall(key) for key in (k.sessions, k.names, k.nodes, k.users)}


fields = st.fixed_dictionaries(
    {"k": st.sampled_from(["logon", "message-to", "logoff"]) | st.text(max_size=4)},
    optional={
        "req": st.sampled_from(["b" * 32]) | st.text(max_size=33),
        "sid": st.sampled_from([ALICE, "c" * 32]) | st.text(max_size=33),
        "t": st.sampled_from([str(NOW)]) | st.text(max_size=16),
        "wait": st.sampled_from(["1000"]) | st.text(max_size=8),
        "name": st.sampled_from(["alice", "bob"]) | st.text(max_size=10),
        "node": st.sampled_from(["n1", "n2"]) | st.text(max_size=10),
        "to": st.sampled_from(["alice", "bob"]) | st.text(max_size=10),
        "text": st.text(max_size=20),
        "key": st.sampled_from([ALICE_KEY]) | st.text(max_size=64),
    },
)
# Entries that are not signed by the session they name: random bytes, payloads under a made-up
# or absent signature, and payloads signed with a key that is not the session's.
# And well-formed requests of alice's own session (logoff, a message), signed wrongly: the
# closest an attacker can come.
as_alice = st.builds(
    lambda kind, req: {
        "k": kind,
        "req": req,
        "sid": ALICE,
        "t": str(NOW),
        "to": "alice",
        "text": "x",
    },
    st.sampled_from(["logoff", "message-to"]),
    st.text("0123456789abcdef", min_size=32, max_size=32),
)
unsigned = (
    st.text(max_size=200)
    | fields.map(lambda f: "0" * 64 + json.dumps(f))
    | fields.map(lambda f: (lambda p: sign(p, new_session_key()) + p)(json.dumps(f)))
    | as_alice.map(lambda f: "0" * 64 + json.dumps(f))
    | as_alice.map(lambda f: (lambda p: sign(p, new_session_key()) + p)(json.dumps(f)))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(unsigned, min_size=1, max_size=5))
def test_no_unauthenticated_entry_changes_the_user_list(entries: list[str]) -> None:
    async def scenario() -> None:
        c, redis = _coordinator()
        await _with_alice(c)
        before = await _state(redis)
        for raw in entries:
            reply = await c.handle(raw)
            if reply is not None:
                # Only a logon that brings its own key verifies: it may add a user, never
                # touch alice.
                payload = json.loads(raw[64:])
                assert payload["k"] == "logon"
        after = await _state(redis)
        k = Keys(PREFIX)
        assert after[k.sessions].get(ALICE) == before[k.sessions][ALICE]
        assert after[k.names]["alice"] == ALICE
        await redis.aclose()

    asyncio.run(scenario())


def _signing_key(payload: dict[str, Any]) -> str:
    """A logon is signed with the key it brings (when it is one); anything else as alice."""
    key = payload.get("key")
    if payload.get("k") == "logon" and isinstance(key, str) and re.fullmatch("[0-9a-f]{64}", key):
        return key
    return ALICE_KEY


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(fields, min_size=1, max_size=5))
def test_any_signed_entry_gives_a_reply_or_is_dropped(payloads: list[dict[str, Any]]) -> None:
    async def scenario() -> None:
        c, redis = _coordinator()
        await _with_alice(c)
        for payload in payloads:
            text = json.dumps(payload)
            raw = sign(text, _signing_key(payload)) + text
            reply = await c.handle(raw)
            assert reply is None or isinstance(reply, str)
        await redis.aclose()

    asyncio.run(scenario())
