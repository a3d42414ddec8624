"""Crashed clients, found in well under a second: the fast path beside the heartbeat TTL.

A client subscribes to its session's inbox before it logs on and never unsubscribes while it
runs, and Redis drops a closed connection's subscriptions the moment it sees the close. So an
inbox with no subscriber left belongs to a client whose connection is gone (killed, crashed, its
host rebooted and said so), and its session can go at once. A client that is merely slow, hung
(SIGSTOP) or cut off keeps its connection open on Redis's side, so its subscription stays and only
its heartbeat deadline removes it: the fast path never takes a live client early.

One exception: after Redis itself restarts (or fails over), every inbox is empty until its client
has reconnected and subscribed again. So a session counts as crashed only if this coordinator saw
its inbox subscribed since it last (re)connected and became active (`load`), or logged it on
itself since then, and then saw it empty. A session never seen subscribed is left to its
heartbeat deadline. To know that Redis did not restart in between, the coordinator keeps a
subscription of its own, the canary, on a connection it never reads (so redis-py never
reconnects it quietly), and every check counts its subscribers too: none means Redis lost its
connections, and the check raises RedisRestarted (a ConnectionError: the coordinator serves
afresh, making the client users again on a Redis that lost them) instead of judging anyone.

Cost: `PUBSUB NUMSUB` of live sessions' inboxes every sweep interval (0.25 s by default), in
chunks of a few hundred, each its own round trip with the canary's count beside it: cheap
dictionary lookups in Redis, and under 1 µs of Python per inbox in the coordinator (packed by
hiredis, messenger/wire.py), so neither Redis nor the coordinator's loop is held up by a check
for more than a fraction of a millisecond at a time. At most `most` inboxes are
looked at per check, round-robin: up to 5,000 sessions every check sees them all; at 10,000 a
round takes two checks (0.5 s), at 100,000 twenty (5 s) — the cost per check stays bounded, the
detection time grows. `python -m benchmarks.crash_watch` measures it (figures in
docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from messenger import wire
from messenger.keys import Keys

# Channels per NUMSUB command, each command one round trip: about 0.2 ms of Redis and of the
# coordinator's Python each (docs/scaling.md), so that a request never waits long behind one.
_CHUNK = 500
_SCAN = 1000


def _inbox_of(raw: str) -> str | None:
    """The inbox channel of a session record; None if the record is unusable."""
    try:
        inbox = json.loads(raw).get("inbox")
    except (ValueError, AttributeError, RecursionError):
        return None
    return inbox if isinstance(inbox, str) else None


class RedisRestarted(RedisConnectionError):
    """The canary subscription is gone: Redis restarted, failed over, or dropped us."""


class CrashWatch:
    """The live sessions' inboxes (a cache of Redis, kept by the active coordinator), and which
    of them have been seen with a subscriber."""

    def __init__(self, most: int = 5000) -> None:
        self.most = most
        self._canary: PubSub | None = None
        self._canary_channel = ""
        self._inboxes: dict[str, str] = {}  # sid -> inbox channel, of live sessions
        self._seen: set[str] = set()  # sids whose inbox had a subscriber since reset()
        self._round: list[str] = []  # sids still to look at in this round

    @property
    def canary_channel(self) -> str:
        """The canary's channel since the last load ("" before the first)."""
        return self._canary_channel

    def __len__(self) -> int:
        return len(self._inboxes)

    def reset(self) -> None:
        """Forget everything: after a (re)connection, when Redis may have restarted."""
        self._inboxes.clear()
        self._seen.clear()
        self._round.clear()

    async def load(self, redis: Redis, keys: Keys, canary: str) -> None:
        """Subscribe the canary again, then read every live session's inbox (once per
        activation: HSCAN, not one HGETALL)."""
        self.reset()
        await self.close()
        self._canary = redis.pubsub()
        await self._canary.subscribe(canary)
        # Confirmed before any check counts on it (the first reply is the subscription's).
        for _ in range(5):
            if await self._canary.get_message(timeout=1.0) is not None:
                break
        else:
            raise RedisConnectionError("the canary subscription was not confirmed in 5 s")
        self._canary_channel = canary
        async for sid, raw in redis.hscan_iter(keys.sessions, count=_SCAN):
            inbox = _inbox_of(cast(str, raw))
            if inbox is not None:
                self._inboxes[cast(str, sid)] = inbox

    def add(self, sid: str, inbox: str) -> None:
        """A session this coordinator has just logged on: seen at once, since its client
        confirmed its subscription before it sent the logon (or it could not hear the reply),
        so a client killed right after its logon is caught by the next check too."""
        self._inboxes[sid] = inbox
        self._seen.add(sid)

    def discard(self, sid: str) -> None:
        self._inboxes.pop(sid, None)
        self._seen.discard(sid)

    def _next_slice(self) -> list[tuple[str, str]]:
        if not self._round:
            self._round = list(self._inboxes)
        picked, self._round = self._round[: self.most], self._round[self.most :]
        return [(sid, self._inboxes[sid]) for sid in picked if sid in self._inboxes]

    async def close(self) -> None:
        canary, self._canary = self._canary, None
        if canary is not None:
            with contextlib.suppress(RedisError, OSError):
                await canary.aclose()  # type: ignore[no-untyped-call]

    async def suspects(self, redis: Redis) -> list[tuple[str, str]]:
        """(sid, inbox) of the sessions looked at whose inbox had a subscriber before and has
        none now; the caller removes them with a script that checks again, atomically.
        Raises RedisRestarted if the canary's subscription is gone.

        Sessions log on and off while a check waits for Redis (the coordinator serves requests
        meanwhile): a session no longer live with that inbox is left out of what it found."""
        picked = self._next_slice()
        found = []
        # At least one round trip, for the canary's sake, even with nobody to look at.
        for i in range(0, max(1, len(picked)), _CHUNK):
            chunk = picked[i : i + _CHUNK]
            counts = await self._counts(redis, [inbox for _, inbox in chunk])
            for (sid, inbox), count in zip(chunk, counts, strict=True):
                if self._inboxes.get(sid) != inbox:
                    continue  # logged off (or removed) meanwhile
                if count > 0:
                    self._seen.add(sid)
                elif sid in self._seen:
                    found.append((sid, inbox))
        return found

    async def _counts(self, redis: Redis, inboxes: list[str]) -> list[int]:
        """The subscriber count of each inbox, read in one round trip after the canary's: a
        pooled connection that redis-py reconnected quietly (Redis restarted) since the last
        chunk shows in the canary's count of the same write."""
        commands = [["PUBSUB", "NUMSUB", self._canary_channel]]
        if inboxes:
            commands.append(["PUBSUB", "NUMSUB", *inboxes])
        # Packed by hiredis (messenger/wire.py): packing was most of what a check cost.
        canary, *replies = await wire.pipeline(redis, commands)
        for reply in (canary, *replies):
            if isinstance(reply, Exception):
                raise reply
        if self._canary_channel and int(canary[1]) == 0:
            raise RedisRestarted(
                "Redis lost this coordinator's subscription (it restarted or failed over)"
            )
        # Each reply is flat: channel, count, channel, count, ...
        return [int(count) for reply in replies for count in reply[1::2]]
