"""What anyone with a client credential can learn of a messenger from Redis: the users (with
when each logged on), the coordinators (`{p}:servers`: who serves, who stands by), and each
logon and logoff as it happens (`{p}:presence`). For `who`, `who --watch`, `status`, `health`.

Nothing here is a secret: the client user may HGETALL `{p}:users` and `{p}:servers`, run TIME
and SUBSCRIBE to `{p}:presence` (acl.client_rules). What Redis holds is not trusted all the
same: an entry that does not decode is skipped and counted, never a crash; callers escape what
they print.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from messenger.client import list_users
from messenger.connection import describe, explain
from messenger.errors import NoConnection, ProtocolError
from messenger.keys import USERS_PLACEHOLDER, Keys
from messenger.protocol import PresenceEvent, User, decode_event


class Server(NamedTuple):
    """One coordinator's entry in `{p}:servers` (written by scripts._LEASE_HOLD)."""

    id: str
    until: int  # alive until (ms, Redis's clock)
    active: bool
    since: int | None  # when it became the active one (ms, Redis's clock); None: a standby
    host: str
    pid: int | None
    started: int | None  # ms since the epoch (its host's clock)


def _ms(value: object) -> int | None:
    """A time in ms as Redis entries hold it (a string of digits, or a number); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16:
        return int(value)
    return None


def decode_server(coordinator: str, raw: str) -> Server | None:
    try:
        obj: Any = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    until, active = _ms(obj.get("until")), obj.get("active")
    if until is None or not isinstance(active, bool):
        return None
    host, pid = obj.get("host"), obj.get("pid")
    return Server(
        coordinator,
        until,
        active,
        _ms(obj.get("since")) if active else None,
        host if isinstance(host, str) else "?",
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        _ms(obj.get("started")),
    )


async def redis_now(redis: Redis) -> int:
    """Redis's clock, in ms: what `until` and `since` are on."""
    secs, micros = await redis.time()
    return int(secs) * 1000 + int(micros) // 1000


async def read_servers(redis: Redis, prefix: str) -> tuple[list[Server], int]:
    """The coordinators that say they are alive (active first), and the unreadable entries."""
    entries = cast(dict[str, str], await redis.hgetall(Keys(prefix).servers))
    entries.pop(USERS_PLACEHOLDER, None)  # the placeholder that keeps the hash a hash
    servers, unreadable = [], 0
    for coordinator, raw in entries.items():
        server = decode_server(coordinator, raw)
        if server is None:
            unreadable += 1
        else:
            servers.append(server)
    servers.sort(key=lambda s: (not s.active, -(s.since or 0), s.id))
    return servers, unreadable


def lease_holder(servers: list[Server], now: int) -> Server | None:
    """The coordinator that holds the lease: active, and alive past Redis's `now`. (The lease
    and the entry are written in one script, so this is what the lease says.)"""
    for server in servers:
        if server.active and server.until > now:
            return server
    return None


def noconnection(redis: Redis, error: RedisError) -> NoConnection:
    return NoConnection(f"Redis at {describe(redis)}: {explain(error)}")


# --- who --watch ----------------------------------------------------------------------------

# Seconds between the watcher's PINGs: an answer (or an event) must come within
# _PING_EVERY * 2 + the reply timeout, else the connection counts as lost (a half-open socket).
_PING_EVERY = 2.0


async def watch(
    redis: Redis,
    prefix: str,
    *,
    on_users: Callable[[list[User], int], None],
    on_event: Callable[[PresenceEvent], None],
    stop: asyncio.Event,
    reply_timeout: float,
) -> None:
    """The users now (`on_users`), then every logon and logoff (`on_event`) until `stop` is
    set. Subscribed before the list is read, so nothing between the two is missed (a logon in
    that moment may show twice). Redis lost: NoConnection."""
    keys = Keys(prefix)
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(keys.presence)
        deadline = time.monotonic() + reply_timeout
        while True:  # the subscription is confirmed before the list is read
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoConnection(f"Redis at {describe(redis)} did not confirm the subscription")
            msg: Any = await pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] == "subscribe":
                break
        on_users(*await list_users(redis, prefix))
        last_seen = next_ping = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + _PING_EVERY
            if now - last_seen > 2 * _PING_EVERY + reply_timeout:
                raise NoConnection(f"Redis at {describe(redis)} stopped answering")
            got = asyncio.ensure_future(pubsub.get_message(timeout=0.5))
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({got, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if got not in done:
                got.cancel()
                break
            msg = got.result()
            if msg is None:
                continue
            last_seen = time.monotonic()
            if msg["type"] != "message":
                continue
            try:
                event = decode_event(msg["data"])
            except ProtocolError:
                continue  # not ours to print; someone with PUBLISH wrote it
            if isinstance(event, PresenceEvent):
                on_event(event)
    except RedisError as e:
        raise noconnection(redis, e) from None
    except OSError as e:
        raise NoConnection(f"Redis at {describe(redis)}: {e}") from None
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
