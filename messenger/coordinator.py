"""The coordinator: the seed's `server`, with Redis holding the user list.

It is the only process that changes the user list. It serves signed requests from the request
queue in bounded batches, sweeps the heartbeat deadline index, and holds a lease in Redis so that
clients (and a future standby) can tell that a coordinator is alive. All of its state is in Redis:
a restarted coordinator resumes from what Redis holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from redis.asyncio import Redis
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from messenger import acl, wire
from messenger.connection import (
    PrimaryMoved,
    close_clients_on,
    describe,
    explain,
    primary_moved,
)
from messenger.crashes import CrashWatch
from messenger.errors import LeaseLost, ProtocolError
from messenger.keys import USERS_PLACEHOLDER, Keys
from messenger.protocol import (
    AliveEvent,
    Reply,
    ReplyEvent,
    Request,
    SignedRequest,
    StoppingEvent,
    decode_request,
    decode_user,
    encode_event,
    inbox_id,
    max_entry_bytes,
)
from messenger.ratelimit import RateLimiter
from messenger.scripts import Job, Scripts
from messenger.settings import Settings

if TYPE_CHECKING:  # only `messenger server --metrics-port` imports prometheus-client
    from messenger.metrics import Metrics

log = logging.getLogger("messenger.coordinator")

Clock = Callable[[], int]
"""Milliseconds on Redis's time line. None means: let Redis read its own clock (production)."""

_LIST_LOG_LIMIT = 50
_GRANT_CHUNK = 1000  # heartbeat keys per script after an outage
# Due sessions per sweep script (about 6 µs of Redis each: under a millisecond a script), and
# scripts per sweep at most, so that a backlog never keeps the crash check waiting for long.
_SWEEP_CHUNK = 100
_CLEAR_SECONDS = 5.0  # at most this long logging off every session when the last one stops
_SWEEP_SCRIPTS = 100
# Suspects per crash script: a removal costs some tens of µs of Redis.
_CRASHED_CHUNK = 20
# A batch: at most this many requests, and this many bytes of them (or one request's worth).
_BATCH = 100
_BATCH_BYTES = 1 << 20
# How far in the future a request's time may be: the client reckons Redis's clock from TIME.
_MAX_SKEW_MS = 1000
_KNOWN_LIMIT = 100_000
_REPLY_MARGIN_MS = 250
# Seconds between attempts while Redis stays unusable (the last one repeats).
_RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0)
# How long a lease refresh waits for the sentinels' answer (Coordinator.follow_primary): they
# answer within a millisecond or so on a LAN.
_SENTINEL_WAIT = 0.05
# Seconds between two rounds of putting the client users on the replicas (Sentinel only): a
# replica that joined or restarted since (and lost them) has them again within this.
_REPLICAS_EVERY = 10.0


@dataclass(frozen=True)
class _Credentials:
    """What the coordinator knows of a session to verify its requests and answer them."""

    key: str
    inbox: str
    # The session's user name (a gone session's entry has none): what its messages say they
    # are from. The batch script takes it from here rather than decode the record again.
    name: str = ""

    @classmethod
    def parse(cls, raw: str | None) -> _Credentials | None:
        """From a session record or a gone-session entry; None if absent or unusable."""
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
            key, inbox, name = obj["key"], obj["inbox"], obj.get("name", "")
        except (ValueError, TypeError, KeyError, RecursionError, AttributeError):
            return None
        if isinstance(key, str) and isinstance(inbox, str):
            return cls(key, inbox, name if isinstance(name, str) else "")
        return None


class DropCounter:
    """Dropped requests, logged as one line per reason and period: a flood of garbage must not
    become a flood of log lines."""

    # Reasons quote bits of what was sent, so garbage can make as many as it likes: past this
    # many in one period, the rest are counted together (one more line).
    REASONS = 20
    OTHERS = "other reasons"

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self.total = 0
        self._counts: dict[str, int] = {}
        self._since = time.monotonic()
        self._reported_once = False

    def note(self, reason: str) -> None:
        self.total += 1
        if reason not in self._counts and len(self._counts) >= self.REASONS:
            reason = self.OTHERS
        self._counts[reason] = self._counts.get(reason, 0) + 1
        if not self._reported_once:  # the first one at once: it may be a misconfiguration
            self._reported_once = True
            self.report(force=True)

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self._counts or (not force and now - self._since < self.period):
            return
        for reason, count in sorted(self._counts.items()):
            log.warning("dropped malformed request x%d: %s", count, reason)
        self._counts.clear()
        self._since = now


class LimitedCounter:
    """Requests refused for their session's rate, logged as at most one line per period: a
    flooder must not become a flood of log lines."""

    _SESSIONS = 1000  # sessions counted by name in one period; the rest only in the total

    def __init__(self, clock: Callable[[], float], period: float = 10.0) -> None:
        self.period = period
        self.total = 0
        self._clock = clock
        self._counts: dict[str, int] = {}  # sid -> refused since the last line
        self._others = 0  # refused since the last line, of sessions past _SESSIONS
        self._last: float | None = None  # when the last line was logged

    def note(self, sid: str) -> None:
        self.total += 1
        if sid in self._counts or len(self._counts) < self._SESSIONS:
            self._counts[sid] = self._counts.get(sid, 0) + 1
        else:
            self._others += 1
        self.report()  # the first one at once: whoever configured the limit wants to know

    def report(self) -> None:
        now = self._clock()
        if not self._counts or (self._last is not None and now - self._last < self.period):
            return
        worst, count = max(self._counts.items(), key=lambda item: item[1])
        refused = sum(self._counts.values()) + self._others
        log.warning(
            "rate-limited %d requests of %d%s sessions (most: session %s x%d)",
            refused,
            len(self._counts),
            "+" if self._others else "",
            worst[:8],
            count,
        )
        self._counts.clear()
        self._others = 0
        self._last = now


def _sessions(n: int) -> str:
    return "1 session" if n == 1 else f"{n} sessions"


class Coordinator:
    """Serves requests over an injected redis client.

    Args:
        redis: a client with decode_responses=True.
        settings: timings and the key prefix.
        clock: a fake clock for deterministic tests; None uses Redis's clock.
        coordinator_id: the lease value and consumer name; random by default.
        metrics: where to count what it does (messenger/metrics.py); None: nothing is counted.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        clock: Clock | None = None,
        coordinator_id: str | None = None,
        client_password: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.scripts = Scripts(redis, self.keys)
        self.clock = clock
        self.id = coordinator_id or secrets.token_hex(16)
        # The password of the Redis users it makes for clients (acl); None: it makes none.
        self.client_password = client_password
        self._said_no_password = False
        self._known: dict[str, _Credentials] = {}  # sid -> credentials, a cache of Redis
        self._refusals: list[tuple[str, str]] = []  # (inbox, rate-limited reply) to publish
        # The entries in flight, as the last batch script left them; None: not known (read them).
        self._taken: list[str] | None = None
        self.dropped = DropCounter()
        # The limiter's time is the fake clock's in tests, else this host's monotonic one:
        # a refusal depends only on how fast this coordinator sees a session's requests.
        seconds = time.monotonic if clock is None else (lambda: clock() / 1000)
        self.limiter = RateLimiter(
            settings.rate_limit, settings.rate_burst, clock=seconds, max_buckets=_KNOWN_LIMIT
        )
        self.limited = LimitedCounter(seconds)
        self.crashes = CrashWatch()
        self.active = False  # holds the lease, as far as it knows
        self._reached_redis = False  # Redis answered since the last failure (see run)
        self._outage_began: float | None = None  # when Redis went away, until given back
        self._primary_check: asyncio.Task[PrimaryMoved | None] | None = None
        self._replicas_task: asyncio.Task[None] | None = None
        self._replicas_next = 0.0  # monotonic time of the next round on the replicas
        self._started = time.time()
        self.metrics = metrics
        if metrics is not None:
            metrics.identify(self.id)

    def _now(self) -> int | None:
        return None if self.clock is None else self.clock()

    # --- lease ------------------------------------------------------------------------------

    @functools.cached_property
    def _alive_event(self) -> str:
        """The tick that tells clients a coordinator is there, and how long they may wait for
        the next sign of one: the next tick comes within a poll, and if this coordinator dies a
        standby takes over within the lease TTL plus a poll (Settings.coordinator_grace).
        Encoded once: every batch carries it (the script ticks if someone logged on)."""
        return encode_event(AliveEvent(self.id, int(self.settings.coordinator_grace * 1000)))

    @functools.cached_property
    def _about(self) -> str:
        """What this coordinator says of itself in the public servers hash (`messenger
        status`): no secret, only where it runs and since when."""
        started = int(self._started * 1000)
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})

    async def try_acquire_lease(self) -> bool:
        held = await self.scripts.lease_hold(
            self.id, self.settings.lease_ttl_ms, self._alive_event, self._about
        )
        self._reached_redis = True  # see run(): Redis answered, so a failure now is an outage
        return held

    async def acquire_lease(self, stop: asyncio.Event) -> bool:
        """Wait (as a standby) until this coordinator holds the lease; False if told to stop."""
        announced = False
        while not stop.is_set():
            if await self.try_acquire_lease():
                return True
            self._outage_began = None  # another one serves: the time back is its to give
            if not announced:
                log.warning("another coordinator holds the lease; waiting as standby")
                announced = True
            await _wait(stop, self.settings.lease_poll)
        return False

    async def refresh_lease(self) -> None:
        if not await self.try_acquire_lease():
            raise LeaseLost("lease lost")

    # --- Sentinel ---------------------------------------------------------------------------

    async def follow_primary(self) -> None:
        """Leave a primary the sentinels no longer name (nothing to do without Sentinel).

        After a failover the old primary keeps taking writes until Sentinel demotes it, some
        10 s later, and loses them when it resyncs: a logoff applied there comes back as a
        ghost, and fresh connections reach the new primary, where no coordinator serves. So
        once the sentinels name another primary, this closes the clients' connections on the
        old one (what Sentinel does when it demotes it, only sooner), and raises ConnectionError:
        run() connects again through the sentinels and becomes active on the new primary,
        re-creating the client users there; the clients reconnect through the sentinels too.

        Only the active coordinator checks, at each lease refresh: one round trip to a sentinel.
        The check is a task beside the loop, waited for only briefly: sentinels that are slow or
        gone never hold up serving or the lease, and an answer that comes late is read at the
        next refresh."""
        if not isinstance(self.redis.connection_pool, SentinelConnectionPool):
            return
        self._provision_replicas()
        if self._primary_check is None:
            self._primary_check = asyncio.create_task(primary_moved(self.redis))
            await asyncio.wait({self._primary_check}, timeout=_SENTINEL_WAIT)
        check = self._primary_check
        if not check.done():
            return
        self._primary_check = None
        moved = check.result()
        if moved is None:
            return
        # primary_moved gives an old address only once most sentinels name another, so this
        # never closes connections on a primary the sentinels still name. Bounded: an old
        # primary that does not answer is one Sentinel will deal with.
        try:
            closing = close_clients_on(self.redis, moved.old)
            closed = await asyncio.wait_for(closing, self.settings.lease_poll)
            done = f"closed {closed} client connections there"
        except (RedisError, TimeoutError) as e:
            said = explain(e) if isinstance(e, RedisError) else "no answer in time"
            done = f"could not close the client connections there ({said})"
        await self.redis.connection_pool.disconnect()
        raise RedisConnectionError(f"{moved}; {done}")

    def _stop_following(self) -> None:
        """No check outlives an activation: a standby must not act on one."""
        if self._primary_check is not None:
            self._primary_check.cancel()
            self._primary_check = None
        if self._replicas_task is not None:
            self._replicas_task.cancel()
            self._replicas_task = None
        self._replicas_next = 0.0  # at once on the next activation

    def _provision_replicas(self) -> None:
        """The client users on every replica too (acl.provision_replicas), at activation and
        every _REPLICAS_EVERY seconds after: ACL users are not replicated, and without them
        every client would be refused by a newly promoted primary until a coordinator has
        served there, by which time their heartbeat keys may have expired. A task beside the
        loop, like the primary check: a slow replica never holds up serving."""
        password = self.client_password
        if password is None or time.monotonic() < self._replicas_next:
            return
        if self._replicas_task is not None and not self._replicas_task.done():
            return
        self._replicas_next = time.monotonic() + _REPLICAS_EVERY
        timeout = self.settings.lease_poll

        async def provision() -> None:
            for (host, port), why in await acl.provision_replicas(
                self.redis, self.keys, password, timeout
            ):
                if why:
                    log.warning(
                        "could not make the client users on replica %s:%s: %s", host, port, why
                    )
                else:
                    log.debug("client users in place on replica %s:%s", host, port)

        self._replicas_task = asyncio.create_task(provision(), name="client users on replicas")

    # --- requests ---------------------------------------------------------------------------

    async def _look_up(self, requests: list[Request]) -> dict[str, _Credentials]:
        """The credentials of every session of a batch: the key that must have signed its
        requests, and the inbox their replies go to. A logon brings its new session's key; any
        other request needs a session this coordinator knows of, live or recently removed
        (whose client is still owed a `you-are-not-logged-on`); anything else cannot be
        verified, so it is not answered.

        What is not in the cache is read with one HMGET, then one MGET of the gone entries of
        those not found: two round trips a batch, not two a request, so requests of sessions
        nobody knows (garbage) cost nothing else, and one flooder cannot slow the coordinator
        down to its round trips."""
        found: dict[str, _Credentials] = {}
        wanted = []
        for sid in {r.sid for r in requests if r.kind != "logon"}:
            known = self._known.get(sid)
            if known is None:
                wanted.append(sid)
            else:
                found[sid] = known
        if not wanted:
            return found
        records = cast(list[str | None], await self.redis.hmget(self.keys.sessions, wanted))
        missing = []
        for sid, raw in zip(wanted, records, strict=True):
            if raw is None:
                missing.append(sid)
            else:
                self._found(found, sid, raw)  # a corrupt record verifies nothing
        if missing:
            gone = cast(list[str | None], await self.redis.mget(map(self.keys.gone, missing)))
            for sid, raw in zip(missing, gone, strict=True):
                self._found(found, sid, raw)
        return found

    def _found(self, found: dict[str, _Credentials], sid: str, raw: str | None) -> None:
        credentials = _Credentials.parse(raw)
        if credentials is not None:
            self._remember(sid, credentials)
            found[sid] = credentials

    def _remember(self, sid: str, credentials: _Credentials) -> None:
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.clear()  # a cache: what it forgets is read from Redis again
        self._known[sid] = credentials

    async def handle(self, entry: str) -> str | None:
        """Apply one request entry; return the reply word, or None if it was dropped.

        Anything wrong with a request is counted and the request dropped: a malformed or
        forged request must never take the coordinator down, nor be answered.
        """
        signed = self._decode(entry)
        if signed is None:
            return None
        return (await self._apply_batch([signed]))[0]

    def _decode(self, entry: str) -> SignedRequest | None:
        try:
            return decode_request(entry, self.settings.max_message_bytes)
        except ProtocolError as e:
            self.dropped.note(f"malformed: {e.message}")
        except Exception:
            # A bug, for the decoder turns every input into ProtocolError; the entry is dropped
            # all the same, or it would break every retry of its batch.
            log.exception("dropped a request its decoder failed on")
        if self.metrics is not None:
            self.metrics.dropped("malformed")
        return None

    async def _apply_batch(
        self, batch: list[SignedRequest], *, trim: int = 0, take: bool = False
    ) -> list[str | None]:
        """Verify, limit and apply a batch of decoded requests, in order; the reply word of
        each, or None for one that was dropped. With `trim`, the first `trim` entries in flight
        (the ones the batch came from) are forgotten in the same step; with `take`, the next
        batch is taken too (into self._taken).

        The whole batch is one script, one round trip (Scripts.batch), not one awaited script
        a request: that round trip, not Redis, is what a coordinator's rate is made of."""
        credentials = await self._look_up([signed.request for signed in batch])
        replies: list[str | None] = [None] * len(batch)
        jobs: list[tuple[int, Request, _Credentials]] = []
        for i, signed in enumerate(batch):
            known: _Credentials | None
            r = signed.request
            if r.kind == "logon":
                # A logon brings its own key. A later request of this session in the same batch
                # verifies with it too (the script says `you-are-not-logged-on` if the logon
                # does not succeed), unless the session is known already: a logon must never
                # replace a live session's key, not even for the rest of a batch.
                known = _Credentials(r.key, self.keys.inbox(inbox_id(r.key)), r.name)
                credentials.setdefault(r.sid, known)
            else:
                known = credentials.get(r.sid)
            if known is None or not signed.verify(known.key):
                # No session id in the reason: garbage with a new one each time would make a
                # new reason (a log line) each time.
                self.dropped.note(f"unauthenticated {r.kind}: unknown session or bad signature")
                if self.metrics is not None:
                    self.metrics.dropped("unauthenticated")
                continue
            if self._over_limit(r):
                # Refused before any script runs, and nothing is applied, so there is no `done`
                # key to keep either. The reply goes out with the batch's others: one round
                # trip for a batch, so a session that pushes signed requests without waiting
                # for replies cannot outrun the coordinator.
                refused = encode_event(ReplyEvent(r.req, Reply.RATE_LIMITED))
                self._refusals.append((known.inbox, refused))
                self.limited.note(r.sid)
                replies[i] = Reply.RATE_LIMITED
                continue
            jobs.append((i, r, known))
        refusals, self._refusals = self._refusals, []
        if not (jobs or refusals or trim or take):
            return replies
        longest = max_entry_bytes(self.settings.max_message_bytes)
        done = await self.scripts.batch(
            self.id,
            [self._job(r, known) for _, r, known in jobs],
            refusals=refusals,
            trim=trim,
            most=_BATCH if take else 0,
            budget=max(_BATCH_BYTES, longest),
            longest=longest,
            alive=self._alive_event,
            now=self._now(),
        )
        if take:
            self._taken = done.entries
            for _ in range(done.dropped):
                self.dropped.note("longer than any request")
            if done.dropped and self.metrics is not None:
                self.metrics.dropped("oversized", done.dropped)
        if done.replaced and self.metrics is not None:
            self.metrics.removed("replaced", done.replaced)
        for (i, r, known), result in zip(jobs, done.replies, strict=True):
            replies[i] = self._applied(r, known, result)
        if self.metrics is not None:  # once a batch, never once a request
            self.metrics.answered(batch, replies, self._now())
        changed = [r for (i, r, _) in jobs if replies[i] in (Reply.LOGGED_ON, Reply.LOGGED_OFF)]
        if changed:
            await self._after_changes(changed)
        return replies

    def _job(self, r: Request, known: _Credentials) -> Job:
        s = self.settings
        wait = r.wait_ms or s.reply_timeout_ms  # the sender's own wait is what counts
        # Apply only while the reply can still reach a sender that is waiting for it.
        timeout = wait - min(_REPLY_MARGIN_MS, wait // 5)
        ttl = r.ttl_ms or s.heartbeat_ttl_ms
        return Job(r, known.inbox, timeout, _MAX_SKEW_MS, ttl, sender=known.name)

    def _applied(self, r: Request, known: _Credentials, result: str | ResponseError) -> str | None:
        """What the script of one request did, noted here; its reply word (None: it failed)."""
        if isinstance(result, ResponseError):
            log.error("request %s (%s) failed in Redis: %s", r.req[:8], r.kind, result)
            if self.metrics is not None:
                self.metrics.failed(r.kind)
            return None
        if result == "not-yours":
            # A receipt signed by a session the message did not go to: a forgery, or a bug.
            self.dropped.note("receipt for a message that went to another session")
        elif result == Reply.EXPIRED:
            log.info(
                "request %s (%s) arrived after its sender gave up; not applied", r.req[:8], r.kind
            )
        elif result == Reply.LOGGED_ON:
            self._remember(r.sid, known)
            self.crashes.add(r.sid, known.inbox)
        elif result == Reply.LOGGED_OFF:
            self.crashes.discard(r.sid)
        return result

    async def _after_changes(self, changed: list[Request]) -> None:
        """After a batch's logons and logoffs, the seed's `list is now` once for the batch (the
        batch script has ticked already if someone logged on, so that new clients learn at once
        how long they may go without a tick)."""
        why = [
            f"logon {r.name}@{r.node}" if r.kind == "logon" else f"logoff {r.sid[:8]}"
            for r in changed
        ]
        if len(why) > 3:
            why = [*why[:3], f"+{len(why) - 3} more"]
        await self.log_list(", ".join(why))

    def _over_limit(self, r: Request) -> bool:
        """Whether a verified request's session has sent faster than the limit; counted only
        after the signature is checked, so nobody can use up another session's allowance.

        A logon is not counted: it makes a new session (a new sid each time), so a limit per
        session cannot hold it; a limit on logons would be one more key space here (per node,
        or one bucket for every logon)."""
        if r.kind in ("logon", "delivered"):
            # A receipt is not counted either: a session gets one per message it is sent, so
            # anyone could make it spend its allowance on them by messaging it.
            return False
        return not self.limiter.allow(r.sid)

    async def sweep(self) -> list[tuple[str, str, str]]:
        """Log off every session whose heartbeat key has expired (the seed's EXIT).

        In scripts of a few due sessions each, until none is due (or a pass's worth is done):
        Redis serves nobody else while a script runs, and between two of these it serves the
        requests."""
        removed = []
        for _ in range(_SWEEP_SCRIPTS):
            due, gone = await self.scripts.sweep(self.id, limit=_SWEEP_CHUNK, now=self._now())
            for sid, name, node in gone:
                self.crashes.discard(sid)
                log.info("%s@%s missed its heartbeat deadline: logged off", name, node)
            removed += gone
            if due < _SWEEP_CHUNK:
                break
        if self.metrics is not None:
            self.metrics.swept()
            self.metrics.removed("timeout", len(removed))
        if removed:
            await self.log_list("expiry")
        return removed

    async def remove_crashed(self) -> list[tuple[str, str, str]]:
        """Log off every session whose client's connection is gone (messenger/crashes.py): the
        fast path beside the heartbeat deadline. The suspects go in scripts of a few each (a
        removal costs some tens of µs of Redis), each refusing to judge if the canary is gone."""
        suspects = await self.crashes.suspects(self.redis)
        removed = []
        for i in range(0, len(suspects), _CRASHED_CHUNK):
            chunk = suspects[i : i + _CRASHED_CHUNK]
            canary = self.crashes.canary_channel
            for sid, what, name, node in await self.scripts.crashed(self.id, chunk, canary):
                if what != "alive":  # subscribed again meanwhile: looked at again next time
                    self.crashes.discard(sid)
                if what == "crashed":
                    removed.append((sid, name, node))
                    log.info("%s@%s lost its connection (a crash): logged off", name, node)
        if self.metrics is not None:
            self.metrics.removed("crash", len(removed))
        if removed:
            await self.log_list("crash")
        return removed

    async def housekeep(self, stop: asyncio.Event) -> None:
        """The sweep and the crash check, every sweep interval until `stop` is set: serve()
        runs this beside the requests, so that a request never waits behind either. Both act
        only through scripts fenced by the lease, and both tell the crash watch whom they
        removed, as the requests do. Raises LeaseLost or RedisError."""
        interval = self.settings.sweep_interval
        while not stop.is_set():
            started = time.monotonic()
            await self.sweep()
            await self.remove_crashed()
            if self.metrics is not None:
                await self.metrics.sample(self.redis, self.keys)
            await _wait(stop, started + interval - time.monotonic())

    async def log_list(self, why: str) -> None:
        """The seed's `list is now: ...`, one line per change of the user list."""
        # Past the limit only the count is logged, so only the count is read (HLEN, not a
        # HGETALL of every user for each batch of logons).
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hlen(self.keys.users)
            pipe.hexists(self.keys.users, USERS_PLACEHOLDER)
            entries, placeholder = await pipe.execute()
        count = int(entries) - int(bool(placeholder))
        if count > _LIST_LOG_LIMIT:
            log.info("list is now: %d users (after %s)", count, why)
            return
        users = cast(dict[str, str], await self.redis.hgetall(self.keys.users))
        users.pop(USERS_PLACEHOLDER, None)
        listed = []
        for name, raw in sorted(users.items()):
            try:
                listed.append(f"{name}@{decode_user(name, raw).node}")
            except ProtocolError:
                listed.append(f"{name}@?")
        log.info("list is now: [%s] (after %s)", ", ".join(listed), why)

    async def serve_batch(self) -> bool:
        """Apply the next batch of requests; False if there was nothing to do.

        The batch stays in flight (in Redis) until it is applied: the script that applies it
        forgets it in the same step, and takes the next one, so a busy coordinator needs one
        round trip a batch, and one that dies halfway leaves its batch to the next (`done` keys
        make a replay a no-op). What is in flight is known here (self._taken) only while this
        coordinator serves without a failure; otherwise it is read from Redis first.
        """
        if self._taken is None:
            await self._apply_batch([], take=True)
        entries = self._taken
        assert entries is not None  # taken just now, or known
        if not entries:
            return False
        # Garbage is dropped here, before any round trip; the rest is one script for the batch
        # (and one look-up of the sessions this coordinator does not know yet, if any).
        batch = [signed for signed in map(self._decode, entries) if signed is not None]
        self._taken = None  # unknown until the script below says what is in flight
        try:
            await self._apply_batch(batch, trim=len(entries), take=True)
        except (LeaseLost, RedisError):
            raise
        except Exception:
            # Done with all the same: a batch that breaks the coordinator once would break it
            # again on every retry.
            log.exception("dropped a batch of requests after an unexpected error")
            await self.scripts.finish(self.id, len(entries))
        self.dropped.report()
        self.limited.report()
        return True

    # --- the loop ---------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set. Raises LeaseLost or RedisError."""
        self._taken = None  # another coordinator may have served meanwhile
        if not await self.acquire_lease(stop):
            return
        self.active = True
        if self.metrics is not None:
            await self.metrics.activated(self.redis)
        await self._provision()
        await self._give_outage_back()
        # Redis may have restarted since the last activation: no inbox counts as seen.
        await self.crashes.load(self.redis, self.keys, self.keys.canary(self.id))
        await self.sweep()
        log.info("coordinator %s is active", self.id[:8])  # and ready: clients can log on
        await self.log_list("start")
        s = self.settings
        next_lease = time.monotonic()
        block = max(0.001, min(s.sweep_interval, s.lease_poll))
        # The sweep and the crash check run beside the requests, so that a request never waits
        # behind them. If either side fails, the group cancels the other and waits for it, and
        # serve() raises that failure. Each side also looks at the other, since a cancellation
        # can be lost (Python 3.11's wait_for drops one that comes as its wait ends).
        requests_ended = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as group:
                housekeeping = group.create_task(self.housekeep(requests_ended))
                try:
                    while not stop.is_set() and not housekeeping.done():
                        now = time.monotonic()
                        if now >= next_lease:
                            await self.refresh_lease()
                            await self.follow_primary()
                            next_lease = now + s.lease_poll
                        if not await self.serve_batch():
                            await self._wait_for_requests(block)
                finally:
                    requests_ended.set()
                    housekeeping.cancel()  # at a stop too: no need to finish a sweep first
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None  # run() tells LeaseLost from RedisError
        finally:
            self._stop_following()

    async def _give_outage_back(self) -> None:
        """Back after Redis was away (restarted, failed over, cut off): no client could refresh
        its heartbeat key meanwhile, so every key still alive gets the time of the outage back,
        and a session that Redis kept is not lost to the seconds it took everyone to return.
        Keys that expired during the outage stay gone (their sessions are swept)."""
        began, self._outage_began = self._outage_began, None
        if began is None:
            return
        canary = self.crashes.canary_channel
        if canary and int((await self.redis.pubsub_numsub(canary))[0][1]) > 0:
            return  # Redis kept our subscription: it was this coordinator that was cut off
        # At most a heartbeat TTL: a session is never kept longer than that on our account.
        away_ms = min(int((time.monotonic() - began) * 1000), self.settings.heartbeat_ttl_ms)
        members = cast(list[str], await self.redis.zrange(self.keys.deadlines, 0, -1))
        hb_keys = [self.keys.hb(m.split(":", 1)[1]) for m in members if ":" in m]
        given = 0
        for i in range(0, len(hb_keys), _GRANT_CHUNK):
            given += await self.scripts.grant(self.id, hb_keys[i : i + _GRANT_CHUNK], away_ms)
        if given:
            log.info(
                "Redis was away %.1f s: %s got that time back", away_ms / 1000, _sessions(given)
            )

    async def _provision(self) -> None:
        """Put the client users in place (docs/security.md); without a client password, clients
        must be given this coordinator's own credential, which is said once."""
        if self.client_password is None:
            if not self._said_no_password:
                self._said_no_password = True
                log.warning(
                    "no client password (MESSENGER_CLIENT_PASSWORD): no client users are made, "
                    "so clients need this coordinator's own Redis credential"
                )
            return
        if await acl.provision(self.redis, self.keys, self.client_password):
            log.info("client users %s and %s are in place", *acl.users_of(self.keys.prefix))

    async def _wait_for_requests(self, block: float) -> None:
        """Nothing queued: wait up to `block` seconds for a request, moved straight into flight
        (the next batch starts with it)."""
        started = time.monotonic()
        # Packed by hiredis (messenger/wire.py): the coordinator's one command per wake-up.
        command = ["BLMOVE", self.keys.requests, self.keys.inflight, "LEFT", "RIGHT", str(block)]
        (moved,) = await wire.pipeline(self.redis, [command])
        if isinstance(moved, ResponseError):
            raise moved
        waited = time.monotonic() - started
        longest = max_entry_bytes(self.settings.max_message_bytes)
        if moved is not None and self._taken == [] and len(moved) <= longest:
            # Now in flight alone (nothing else was): the next batch starts with it, without a
            # round trip to take it. (One too long is left to the batch script to drop.)
            self._taken = [cast(str, moved)]
        elif moved is not None:
            self._taken = None  # read from Redis again
        if moved is None and waited < block / 2:
            # A Redis (or a stand-in: fakeredis, a proxy) that does not block must not make
            # this loop spin.
            await asyncio.sleep(block - waited)

    async def shutdown(self) -> None:
        """Stopping on purpose: leave the coordinators' list and give the lease up.

        If a standby is alive it takes over at its next poll, and the clients never notice;
        only when none is left are the clients told at once that the service stops. A standby
        that stops (or one that never reached Redis) says nothing to the clients either."""
        await self.crashes.close()
        try:
            standbys = await self.scripts.lease_release(
                self.id, encode_event(StoppingEvent(self.id))
            )
        except RedisError as e:
            if self.active:
                log.warning("could not tell clients that the server stops: %s", e)
            return
        if standbys > 0:
            log.info("lease given up; a standby takes over (%d alive)", standbys)
        elif standbys == 0:
            log.info("no standby is left: told every client that the server stops")
            await self._clear()

    async def _clear(self) -> None:
        """The last coordinator stopped and its clients with it: log their sessions off
        (presence says `server`), in scripts of a few, for a few seconds at most."""
        deadline = time.monotonic() + _CLEAR_SECONDS
        removed = 0
        try:
            while time.monotonic() < deadline:
                n = await self.scripts.clear(_SWEEP_CHUNK)
                removed += max(n, 0)
                if n < _SWEEP_CHUNK:
                    break
        except RedisError as e:
            log.warning("could not log off the sessions of the stopped server: %s", e)
        if removed:
            log.info("logged off %s: the server stopped", _sessions(removed))
            if self.metrics is not None:
                self.metrics.removed("server", removed)

    async def run(self, stop: asyncio.Event) -> None:
        """serve() until stopped; a lost Redis or lease is logged and retried, never fatal.

        Each failed attempt is one log line that says what was tried and what went wrong. For a
        heartbeat TTL after Redis was lost (a restart, a failover), attempts come every 0.25 s:
        the sessions live that long, and their clients are coming back too, needing the client
        users this coordinator makes again on a Redis that lost them. After that, and when Redis
        never worked at all (a wrong address), the retries back off up to a few seconds.
        """
        failures = 0
        outage_since: float | None = None
        while not stop.is_set():
            self._reached_redis = False
            try:
                try:
                    await self.serve(stop)
                finally:
                    if self.metrics is not None:  # whatever ended serve(), it serves no more
                        self.metrics.deactivated()
            except RedisError as e:
                now = time.monotonic()
                if self._reached_redis:  # it worked a moment ago: an outage starts now
                    outage_since, failures = now, 0
                    self._outage_began = now
                if outage_since is not None and now - outage_since < self.settings.heartbeat_ttl:
                    delay = _RETRY_DELAYS[0]
                else:
                    failures += 1
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
