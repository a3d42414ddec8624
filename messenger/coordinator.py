"""The coordinator: the seed's `server`, with Redis holding the user list.

It is the only process that changes the user list. It serves requests from the request stream
through a consumer group, sweeps the heartbeat deadline index, and holds a lease in Redis so that
clients (and a future standby) can tell that a coordinator is alive. All of its state is in Redis:
a restarted coordinator resumes from what Redis holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from messenger.connection import describe, explain
from messenger.errors import LeaseLost, ProtocolError
from messenger.keys import GROUP, Keys
from messenger.protocol import Reply, Request, StoppingEvent, decode_request, encode_event
from messenger.scripts import Scripts
from messenger.settings import Settings

log = logging.getLogger("messenger.coordinator")

Clock = Callable[[], int]
"""Milliseconds on Redis's time line. None means: let Redis read its own clock (production)."""

_LIST_LOG_LIMIT = 50
_BATCH = 100
_REPLY_MARGIN_MS = 250
# Seconds between attempts while Redis stays unusable (the last one repeats).
_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)


class Coordinator:
    """Serves requests over an injected redis client.

    Args:
        redis: a client with decode_responses=True.
        settings: timings and the key prefix.
        clock: a fake clock for deterministic tests; None uses Redis's clock.
        coordinator_id: the lease value and consumer name; random by default.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        clock: Clock | None = None,
        coordinator_id: str | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.scripts = Scripts(redis, self.keys)
        self.clock = clock
        self.id = coordinator_id or secrets.token_hex(16)
        self.active = False  # holds the lease, as far as it knows
        self.activations = 0  # how many times it became the active coordinator

    def _now(self) -> int | None:
        return None if self.clock is None else self.clock()

    # --- lease ------------------------------------------------------------------------------

    async def try_acquire_lease(self) -> bool:
        got = await self.redis.set(self.keys.lease, self.id, nx=True, px=self.settings.lease_ttl_ms)
        return bool(got) or await self.scripts.lease_refresh(self.id, self.settings.lease_ttl_ms)

    async def acquire_lease(self, stop: asyncio.Event) -> bool:
        """Wait (as a standby) until this coordinator holds the lease; False if told to stop."""
        announced = False
        while not stop.is_set():
            if await self.try_acquire_lease():
                log.info("coordinator %s is active", self.id[:8])
                return True
            if not announced:
                log.warning("another coordinator holds the lease; waiting as standby")
                announced = True
            await _wait(stop, self.settings.lease_ttl / 4)
        return False

    async def refresh_lease(self) -> None:
        if not await self.scripts.lease_refresh(self.id, self.settings.lease_ttl_ms):
            raise LeaseLost("lease lost")

    # --- requests ---------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.requests, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def handle(self, entry_id: str, fields: dict[str, str]) -> str | None:
        """Apply one request; return the reply word, or None if it was dropped.

        Anything wrong with a request is logged and the request dropped: a malformed request must
        never take the coordinator down.
        """
        try:
            request = decode_request(entry_id, fields, self.settings.max_message_bytes)
        except ProtocolError as e:
            log.warning("dropped malformed request %s: %s", entry_id, e.message)
            return None
        try:
            reply = await self.apply(request)
        except ResponseError as e:
            log.error("request %s (%s) failed in Redis: %s", entry_id, request.kind, e)
            return None
        if reply == Reply.EXPIRED:
            log.info(
                "request %s (%s) arrived after its sender gave up; not applied",
                entry_id,
                request.kind,
            )
        elif reply in (Reply.LOGGED_ON, Reply.LOGGED_OFF):
            who = f"{request.name}@{request.node}" if request.kind == "logon" else request.sid[:8]
            await self.log_list(f"{request.kind} {who}")
        return reply

    async def apply(self, r: Request) -> str:
        s, now = self.settings, self._now()
        wait = r.wait_ms or s.reply_timeout_ms  # the sender's own wait is what counts
        # Apply only while the reply can still reach a sender that is waiting for it.
        timeout = wait - min(_REPLY_MARGIN_MS, wait // 5)
        return await self.scripts.request(
            self.id, r, timeout_ms=timeout, ttl_ms=r.ttl_ms or s.heartbeat_ttl_ms, now=now
        )

    async def sweep(self) -> list[tuple[str, str, str]]:
        """Log off every session whose heartbeat deadline has passed (the seed's EXIT)."""
        removed = await self.scripts.sweep(self.id, now=self._now())
        for _sid, name, node in removed:
            log.info("%s@%s missed its heartbeat deadline: logged off", name, node)
        if removed:
            await self.log_list("expiry")
        return removed

    async def log_list(self, why: str) -> None:
        """The seed's `list is now: ...`, one line per change of the user list."""
        count = int(await self.redis.hlen(self.keys.names))
        if count > _LIST_LOG_LIMIT:
            log.info("list is now: %d users (after %s)", count, why)
            return
        names = cast(dict[str, str], await self.redis.hgetall(self.keys.names))
        nodes = cast(dict[str, str], await self.redis.hgetall(self.keys.nodes))
        node_of = {sid: node for node, sid in nodes.items()}
        users = sorted(f"{name}@{node_of.get(sid, '?')}" for name, sid in names.items())
        log.info("list is now: [%s] (after %s)", ", ".join(users), why)

    async def _process(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        for entry_id, fields in entries:
            try:
                await self.handle(entry_id, fields)
            except (LeaseLost, RedisConnectionError, RedisTimeoutError):
                raise
            except Exception:
                # Acknowledged below all the same: a request that breaks the coordinator once
                # would break it again on every reclaim.
                log.exception("dropped request %s after an unexpected error", entry_id)
        if entries:
            ids = [entry_id for entry_id, _ in entries]
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.keys.requests, GROUP, *ids)
                pipe.xdel(self.keys.requests, *ids)
                await pipe.execute()

    async def take_over_pending(self) -> None:
        """Requests read by an earlier coordinator that died before acknowledging them."""
        start = "0-0"
        while True:
            result: Any = await self.redis.xautoclaim(
                self.keys.requests, GROUP, self.id, 0, start_id=start, count=_BATCH
            )
            # Entries deleted while pending come back empty (Redis 6.2); skip them.
            start, claimed = result[0], [e for e in result[1] if e and e[1] is not None]
            await self._process(claimed)
            if start == "0-0":  # the cursor has gone round the whole pending list
                return

    # --- the loop ---------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set. Raises LeaseLost or RedisError."""
        if not await self.acquire_lease(stop):
            return
        self.active = True
        self.activations += 1
        await self.ensure_group()
        await self.take_over_pending()
        await self.sweep()
        await self.log_list("start")
        s = self.settings
        next_lease = next_sweep = time.monotonic()
        block_ms = max(1, int(min(s.sweep_interval, s.lease_ttl / 4) * 1000))
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_lease:
                await self.refresh_lease()
                next_lease = now + s.lease_ttl / 4
            if now >= next_sweep:
                await self.sweep()
                next_sweep = now + s.sweep_interval
            response: Any = await self.redis.xreadgroup(
                GROUP, self.id, {self.keys.requests: ">"}, count=_BATCH, block=block_ms
            )
            for _stream, entries in response or []:
                await self._process(entries)

    async def shutdown(self) -> None:
        """Stopping on purpose: tell every client at once, then give the lease up.

        Only the active coordinator speaks for the service: a standby that stops (or one that
        never reached Redis) must not stop the clients of the one that serves them."""
        if not self.active:
            return
        try:
            await self.redis.publish(self.keys.control, encode_event(StoppingEvent(self.id)))
            await self.scripts.lease_release(self.id)
        except RedisError as e:
            log.warning("could not tell clients that the server stops: %s", e)

    async def run(self, stop: asyncio.Event) -> None:
        """serve() until stopped; a lost Redis or lease is logged and retried, never fatal.

        Each failed attempt is one log line that says what was tried and what went wrong, and
        the retries back off (up to a few seconds) while Redis stays unusable.
        """
        failures = 0
        while not stop.is_set():
            activations = self.activations
            try:
                await self.serve(stop)
            except RedisError as e:
                # Back off while Redis stays unusable; start afresh once it has worked again.
                failures = 1 if self.activations != activations else failures + 1
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS)) - 1]
                log.error(
                    "Redis at %s: %s; retrying in %.2g s", describe(self.redis), explain(e), delay
                )
                await _wait(stop, delay)
            except LeaseLost:
                self.active = False
                # Paused past its lease (or cut off): another may be active now. The scripts are
                # fenced, so nothing was done without the lease; go back to waiting as a standby.
                log.warning("lost the lease; standing by")
            except Exception:
                # A bug must not take the messenger down with it: log it, start serving again.
                log.exception("unexpected error; serving again in 1 s")
                await _wait(stop, 1.0)
        await self.shutdown()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
