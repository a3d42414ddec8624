"""The per-node client: the seed's `client` process.

It logs one user on, keeps the session's heartbeat, prints incoming messages, and forwards the
commands of its node (`message`, `logoff`, arriving on the local socket) to the coordinator. It
stops, like the seed's client, on a stop reply (`user-exists-at-other-node`,
`you-are-not-logged-on`, ...), when no reply comes within the reply timeout, and with
`noconnection` when Redis or the coordinator is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, NamedTuple, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from messenger import acl, local
from messenger.connection import connect, describe, explain, resolve_url
from messenger.errors import (
    ClientFailure,
    MessengerError,
    NoConnection,
    NoResponse,
    ProtocolError,
    Rejected,
)
from messenger.keys import USERS_PLACEHOLDER, Keys
from messenger.protocol import (
    STOP_REPLIES,
    AliveEvent,
    Kind,
    MessageEvent,
    PresenceEvent,
    ReceiptEvent,
    Reply,
    ReplyEvent,
    Request,
    StoppingEvent,
    User,
    decode_event,
    decode_local_request,
    decode_user,
    encode_local,
    encode_request,
    heartbeat_id,
    inbox_id,
    new_session_key,
    printable,
    validate_name,
    validate_node,
    validate_text,
)
from messenger.settings import Settings

log = logging.getLogger("messenger.client")

# Seconds between attempts while Redis is away (the session has what is left of its TTL).
_RETRY_S = 0.2
# What may pass: a lost connection or a timeout (a restart, a failover, a partition that heals;
# redis-py's AuthenticationError is one too: a new primary may not have the client users yet).
# Any other error is a refusal that trying again will not change.
_PASSING = (RedisConnectionError, RedisTimeoutError)
# A command's request that has less than this left of its command's wait is not sent at all.
_LOCAL_MARGIN_MS = 100


def format_message(sender: str, text: str) -> str:
    """The seed's `Message from NAME: TEXT`, escaped so it cannot drive the terminal."""
    return f"Message from {printable(sender)}: {printable(text)}"


class Client:
    """One node's client for one user.

    Args:
        redis: a client with decode_responses=True, no retries (see `connection`).
        settings: node, timings, prefix.
        name: the user to log on.
        out: where lines for the user go (the seed's io:format).
        clock: a fake clock for tests; None uses Redis's clock.
        on_event: where incoming messages (and, with `presence`, presence events) go instead
            of `out`, for programs (messenger.api) and the chat; whoever takes a message calls
            acknowledge() once it has shown it, which is the sender's `delivered`.
        presence: also listen to the public presence channel (logons and logoffs).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        name: str,
        *,
        out: Callable[[str], None] = print,
        clock: Callable[[], int] | None = None,
        heartbeat_redis: Redis | None = None,
        hold: bool = False,
        on_event: Callable[[MessageEvent | PresenceEvent], None] | None = None,
        presence: bool = False,
    ) -> None:
        self.redis = redis
        # The heartbeat may go through a Redis user of its own (one that can refresh
        # heartbeat keys and nothing else; see docs/security.md).
        self.heartbeat_redis = heartbeat_redis or redis
        self.settings = settings
        self.name = validate_name(name)
        self.node = validate_node(settings.node)
        self.keys = Keys(settings.prefix)
        self.out = out
        self.on_event = on_event
        # With `hold`, messages and presence events wait here until whoever shows `logged-on`
        # has shown it (a message may be applied right after the logon, before its reply is
        # even read), then release() hands them on in order.
        self._held: list[MessageEvent | PresenceEvent] | None = [] if hold else None
        self.clock = clock
        self.sid = secrets.token_hex(16)  # names the session in requests; no secret
        # The session's secret: it signs every request and names the inbox and heartbeat key,
        # so nobody else can speak as this session, listen to it or keep it alive.
        self.key = new_session_key()
        self.inbox = self.keys.inbox(inbox_id(self.key))
        self.hb_key = self.keys.hb(heartbeat_id(self.key))
        self._channels = [self.inbox, self.keys.control]
        if presence:
            self._channels.append(self.keys.presence)
        # msg id -> resolved True when its receiver's receipt comes, False when its wait ends.
        self._receipts: dict[str, asyncio.Future[bool]] = {}
        self._acks: set[asyncio.Task[None]] = set()  # receipts on their way to the coordinator
        self._clock_offset_ms = 0.0  # Redis's clock minus our monotonic one, from TIME
        # Until when a coordinator is known to be there (monotonic): its alive ticks and its
        # replies push this on; clients cannot read the lease itself.
        self._coordinator_until = time.monotonic() + settings.coordinator_grace
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._finished: asyncio.Future[MessengerError | None] | None = None
        self._pubsub: PubSub | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None
        self._last_pong = time.monotonic()
        self._entries: dict[str, str] = {}  # req -> the signed entry of each pending request
        # After logon the client outlives a Redis outage shorter than its heartbeat TTL
        # (a restart with persistence, a failover, a short partition): see _pubsub_lost.
        self._serving = False
        self._connected = asyncio.Event()  # the pub/sub connection is up and subscribed
        self._alive_since = time.monotonic()  # when the last heartbeat that worked was sent
        self._trouble: str | None = None  # what went wrong with Redis since the last good beat
        self._lost_at = 0.0  # when the pub/sub connection was last lost
        self._leaving = False  # a logoff is on its way

    @classmethod
    def for_settings(cls, settings: Settings, name: str, **kwargs: Any) -> Client:
        """A node's client as every front end makes it (`logon`, `chat`, messenger.connect):
        Redis from the settings (or this host's embedded server), with short socket timeouts
        (a client must notice a lost Redis within its heartbeat TTL), and the heartbeat on its
        own Redis user when the URL names a client user (acl). `kwargs` go to the client."""
        url = resolve_url(settings)
        timeout = min(2.0, settings.reply_timeout)
        redis = connect(url, socket_timeout=timeout, tls=settings.tls)
        hb_url = acl.heartbeat_url(url)
        hb = None if hb_url is None else connect(hb_url, socket_timeout=timeout, tls=settings.tls)
        return cls(redis, settings, name, heartbeat_redis=hb, **kwargs)

    # --- life cycle -------------------------------------------------------------------------

    @property
    def finished(self) -> asyncio.Future[MessengerError | None]:
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_future()
        return self._finished

    def stop(self, reason: MessengerError | None) -> None:
        """End the client: None for a clean logoff, else the error it ends with."""
        if not self.finished.done():
            self.finished.set_result(reason)
        # A request still waiting for its reply may have been applied: its command must not be
        # told a server's word that says it was not (`you-are-not-logged-on`), only that no
        # reply came, or that the connection is gone.
        unanswered: MessengerError = (
            reason
            if isinstance(reason, NoConnection | NoResponse)
            else NoResponse(
                "this client stopped before the reply came: "
                + (reason.message if reason is not None else "logged off")
            )
        )
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(unanswered)

    async def logon(self) -> None:
        """Log the user on; raises Rejected, NoConnection or NoResponse if that fails."""
        try:
            self._pubsub = self.redis.pubsub()
            await self._pubsub.subscribe(*self._channels)
            await self._confirm_subscriptions(len(self._channels))
            await self._read_clock()
        except RedisError as e:
            raise NoConnection(f"Redis at {describe(self.redis)}: {explain(e)}") from None
        self._connected.set()
        self._coordinator_until = time.monotonic() + self.settings.coordinator_grace
        self._spawn(self._read_events(), "event reader")
        logon = self._new("logon", name=self.name, node=self.node)
        reply = await self.request(
            replace(logon, ttl_ms=self.settings.heartbeat_ttl_ms, key=self.key)
        )
        if reply != Reply.LOGGED_ON:
            raise Rejected(reply)

    async def _read_clock(self) -> None:
        """Reckon Redis's clock, which every request's time is on (hosts' clocks may differ)."""
        before = time.monotonic()
        secs, micros = await self.redis.time()
        after = time.monotonic()
        redis_ms = secs * 1000 + micros / 1000
        self._clock_offset_ms = redis_ms - (before + after) / 2 * 1000

    def _redis_now(self) -> int:
        if self.clock is not None:
            return self.clock()
        return int(time.monotonic() * 1000 + self._clock_offset_ms)

    async def _confirm_subscriptions(self, count: int) -> None:
        """Wait until Redis has the subscriptions, before any request can be answered.

        The reply to `logon` must not be published before we listen, and a live session must
        always have a subscriber: the logon script takes a session without one for dead.
        """
        assert self._pubsub is not None
        deadline = asyncio.get_running_loop().time() + self.settings.reply_timeout
        while count > 0:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise NoResponse()
            msg: Any = await self._pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] == "subscribe":
                count -= 1

    async def start_serving(self) -> None:
        """After logon: start the heartbeat and take this node's commands.

        Then await `finished` for the reason the client stopped (None: logged off).
        """
        self._server = await asyncio.start_unix_server(
            self._serve_local, self._bind_socket_path(), limit=local.line_limit(self.settings)
        )
        self._last_pong = time.monotonic()  # a slow logon must not count as a silent socket
        self._alive_since = time.monotonic()  # the logon made the heartbeat key
        self._serving = True
        self._spawn(self._heartbeat(), "heartbeat")

    def release(self) -> None:
        """Hand on what was held (hold=True), and everything from now on as it comes."""
        held, self._held = self._held, None
        for event in held or ():
            self._hand_on(event)

    def _hand_on(self, event: MessageEvent | PresenceEvent) -> None:
        """To on_event (which acknowledges a message once it has shown it), or else a message
        printed through `out` and acknowledged: the sender's `delivered` comes after the
        receiver showed it, never before."""
        if self.on_event is not None:
            self.on_event(event)
        elif isinstance(event, MessageEvent):
            self.out(format_message(event.sender, event.text))
            self.acknowledge(event.msg_id)

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str, *, forever: bool = True) -> None:
        """Run a background task whose end, unless the client is stopping, stops the client:
        a client must never stay logged on with no reader or no heartbeat. A task that is not
        `forever` may end, but not fail."""
        task = asyncio.create_task(coro, name=f"messenger client {what}")
        task.add_done_callback(functools.partial(self._task_ended, what, forever))
        self._tasks.append(task)

    def _task_ended(self, what: str, forever: bool, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.debug("the client's %s failed", what, exc_info=error)
        elif not forever:
            return
        if not self.finished.done():
            why = f"{type(error).__name__}: {error}" if error is not None else "it returned"
            self.stop(ClientFailure(f"this client's {what} stopped ({why}); logged off"))

    def _bind_socket_path(self) -> str:
        local.ensure_runtime_dir(self.settings)
        path = local.socket_path(self.settings)
        # Redis has just made us this node's only session, so a file left here is stale.
        path.unlink(missing_ok=True)
        return str(path)

    async def close(self) -> None:
        for task in [*self._tasks, *self._acks]:
            task.cancel()
        for fut in self._receipts.values():
            if not fut.done():
                fut.set_result(False)
        if self._tasks:
            # Bounded: a task stuck in a Redis read that ignores cancellation (seen with
            # fakeredis's pub/sub) must not keep the client from closing; its connection is
            # closed below, which ends the read.
            await asyncio.wait(self._tasks, timeout=1.0)
        if self._server is not None:
            self._server.close()
            local.socket_path(self.settings).unlink(missing_ok=True)
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        for redis in {self.redis, self.heartbeat_redis}:
            with contextlib.suppress(RedisError, OSError):
                await redis.aclose()

    # --- requests ---------------------------------------------------------------------------

    def _new(
        self,
        kind: Kind,
        *,
        name: str = "",
        node: str = "",
        to: str = "",
        text: str = "",
        wait_ms: int = 0,
    ) -> Request:
        """A request that waits the reply timeout, or less if whoever asked waits less."""
        own = self.settings.reply_timeout_ms
        return Request(
            kind,
            secrets.token_hex(16),
            self.sid,
            name=name,
            node=node,
            to=to,
            text=text,
            wait_ms=min(own, wait_ms) if wait_ms > 0 else own,
        )

    async def request(self, request: Request) -> Reply:
        """Send a request and wait at most the reply timeout for its reply.

        A stop reply stops this client too (the seed's `#(messenger stop Why)`), and so does a
        timeout (the seed's `exit(timeout)`).
        """
        if self.finished.done():
            raise self.finished.result() or Rejected(Reply.NOT_LOGGED_ON)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.wait_ms / 1000
        fut: asyncio.Future[Reply] = loop.create_future()
        self._pending[request.req] = fut
        request = replace(request, sent_ms=self._redis_now())
        entry = encode_request(request, self.key)
        self._entries[request.req] = entry  # pushed again after a reconnection
        try:
            await self._push(entry, fut, deadline)
            reply = await self._reply(fut, deadline)
        except (NoConnection, NoResponse) as e:
            self.stop(e)
            raise
        finally:
            self._pending.pop(request.req, None)
            self._entries.pop(request.req, None)
            # stop() fails every pending future, this one too when it runs while the push is
            # in flight (or from the except above); nobody awaits it then, so mark it retrieved
            # rather than let asyncio print "Future exception was never retrieved".
            if fut.done() and not fut.cancelled():
                fut.exception()
        if reply in STOP_REPLIES:
            self.stop(Rejected(reply))
        return reply

    async def _push(self, entry: str, fut: asyncio.Future[Reply], deadline: float) -> None:
        """Push a request. Once logged on, a failed push is tried again until the request's
        deadline, since the client may be reconnecting (a request pushed twice is applied
        once: the coordinator keeps each one's reply)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.redis.rpush(self.keys.requests, entry)
                return
            except RedisError as e:
                if self.finished.done():  # stopped (and closed) meanwhile: say why, not this
                    raise self.finished.result() or Rejected(Reply.NOT_LOGGED_ON) from None
                why = f"Redis at {describe(self.redis)}: {explain(e)}"
                # Only a lost connection may come back; a refusal (WRONGTYPE, NOPERM) stays.
                if not self._serving or not isinstance(e, _PASSING):
                    raise NoConnection(why) from None
                self._trouble = why
            if loop.time() + _RETRY_S >= deadline:
                raise NoResponse(why)
            # The client may stop meanwhile (its futures then fail with the reason).
            await asyncio.wait({fut}, timeout=_RETRY_S)
            if fut.done():
                fut.result()  # a reply (an earlier push did arrive) or the stop's reason
                return

    async def _reply(self, fut: asyncio.Future[Reply], deadline: float) -> Reply:
        """The reply, by `deadline` (else No response from server), unless no coordinator
        shows a sign of life meanwhile: that is the seed's `noconnection`. While the client
        reconnects to Redis, silence says nothing (the grace starts again once it is back)."""
        loop = asyncio.get_running_loop()
        while True:
            left = deadline - loop.time()
            if self._connected.is_set():
                silent = self._coordinator_until - time.monotonic()
                if silent <= 0:  # first: it says more than a timeout would
                    raise NoConnection("no coordinator is running (no sign of one)")
            else:
                silent = _RETRY_S
            if left <= 0:
                raise NoResponse()
            done, _ = await asyncio.wait({fut}, timeout=min(left, silent))
            if done:
                return fut.result()

    async def send(self, to: str, text: str, *, wait_ms: int = 0) -> Reply:
        """`message TO TEXT`: sent, receiver-not-found, or you-are-not-logged-on."""
        validate_name(to)
        validate_text(text, self.settings.max_message_bytes)
        return await self.request(self._new("message-to", to=to, text=text, wait_ms=wait_ms))

    async def send_with_receipt(
        self, to: str, text: str, *, receipt_ms: int, wait_ms: int = 0
    ) -> tuple[Reply, asyncio.Future[bool] | None]:
        """`message --wait`: send, and if `sent`, a future that becomes True when the
        receiver's client has shown the message (its receipt came) or False when `receipt_ms`
        pass first. No receipt is invented: only the receiver's own session can make one
        (docs/protocol.md, "Receipts")."""
        validate_name(to)
        validate_text(text, self.settings.max_message_bytes)
        request = self._new("message-to", to=to, text=text, wait_ms=wait_ms)
        request = replace(request, receipt_ms=max(1, receipt_ms))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._receipts[request.req] = fut  # before the push: the receipt may come at once
        timer = loop.call_later(receipt_ms / 1000, _settle, fut, False)

        def settled(_: asyncio.Future[bool]) -> None:
            timer.cancel()
            self._receipts.pop(request.req, None)

        fut.add_done_callback(settled)
        try:
            reply = await self.request(request)
        except BaseException:
            _settle(fut, False)
            raise
        if reply != Reply.SENT:
            _settle(fut, False)
            return reply, None
        return reply, fut

    def acknowledge(self, msg_id: str) -> None:
        """The message `msg_id` has been shown: tell its sender (a `delivered` request, sent
        without waiting for anything back; the coordinator answers receipts with nothing)."""
        if not msg_id or self.finished.done():
            return
        request = replace(self._new("delivered"), msg=msg_id, sent_ms=self._redis_now())
        task = asyncio.get_running_loop().create_task(self._push_receipt(request))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _push_receipt(self, request: Request) -> None:
        try:
            await self.redis.rpush(self.keys.requests, encode_request(request, self.key))
        except RedisError as e:  # its sender then hears `not-delivered`; nothing else is lost
            log.warning("could not send a receipt: %s", explain(e))

    async def logoff(self, *, wait_ms: int = 0) -> Reply:
        """Log off; the client stops cleanly whatever the server answers."""
        self._leaving = True
        try:
            reply = await self.request(self._new("logoff", wait_ms=wait_ms))
        except Rejected as e:
            reply = Reply(e.message)
        self.stop(None)
        return reply

    async def leave(self) -> None:
        """Log off on Ctrl-C or SIGTERM; a failure has already stopped the client with a reason."""
        with contextlib.suppress(MessengerError):
            await self.logoff()

    # --- background tasks -------------------------------------------------------------------

    async def _read_events(self) -> None:
        while True:
            await self._connected.wait()
            pubsub = self._pubsub
            assert pubsub is not None
            try:
                msg: Any = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as e:
                if pubsub is self._pubsub:  # not an old one, closed by a reconnection
                    self._pubsub_lost(f"lost the pub/sub connection: {e}")
                continue
            if msg is None:
                continue
            # Anything that arrives shows the connection works (our PINGs' answers, ticks).
            self._last_pong = time.monotonic()
            if msg["type"] == "message":
                self._dispatch(msg["data"])

    # --- outliving a Redis outage -----------------------------------------------------------
    #
    # A logged-on client whose connection to Redis breaks does not give up at once: Redis may be
    # restarting (with persistence), failing over (Sentinel), or a partition may heal. Its
    # session lives as long as its heartbeat key, so the client keeps trying until the heartbeat
    # TTL has run out since the last heartbeat that worked. Then, or if the key turns out to be
    # gone once Redis is back, it stops with `noconnection`. While it is away it prints nothing
    # it was not sent, and once back it pushes its pending requests again, whose replies may
    # have been published while nobody listened.

    def _pubsub_lost(self, why: str) -> None:
        """The pub/sub connection broke: subscribe again on a new one (before the logon is
        through, there is nothing to save: stop)."""
        if self.finished.done():
            return
        self._trouble = why
        if not self._serving:
            self._connected.clear()
            self.stop(NoConnection(why))
        elif self._connected.is_set():
            self._connected.clear()
            self._lost_at = time.monotonic()
            log.warning("%s; reconnecting", why)
            self._spawn(self._resubscribe(), "reconnection", forever=False)

    def _session_left(self) -> float:
        """Seconds until the heartbeat key expires, counted from the last beat that worked."""
        return self._alive_since + self.settings.heartbeat_ttl - time.monotonic()

    def _outlived(self) -> NoConnection:
        return NoConnection(
            f"Redis was unreachable for longer than the heartbeat TTL ({self._trouble})"
        )

    async def _resubscribe(self) -> None:
        delay = 0.05
        while not self.finished.done():
            left = self._session_left()
            if left <= 0:
                self.stop(self._outlived())
                return
            try:
                await asyncio.wait_for(self._subscribe_again(), left)
                log.warning("reconnected to Redis at %s", describe(self.redis))
                return
            except (RedisError, OSError, TimeoutError, NoResponse) as e:
                said = explain(e) if isinstance(e, RedisError) else str(e) or type(e).__name__
                self._trouble = f"Redis at {describe(self.redis)}: {said}"
            await asyncio.sleep(max(0.0, min(delay, self._session_left())))
            delay = min(2 * delay, 0.5)

    async def _subscribe_again(self) -> None:
        old, self._pubsub = self._pubsub, self.redis.pubsub()
        if old is not None:
            # Closed first, so that no message can arrive twice (on the old and the new one).
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(old.aclose(), 0.5)  # type: ignore[no-untyped-call]
        await self._pubsub.subscribe(*self._channels)
        await self._confirm_subscriptions(len(self._channels))
        # Subscribed: from now on a message may be `sent` to this connection, so it is the one
        # the reader reads, whatever fails next (a failed step below must not make a retry
        # throw it away with what it holds).
        self._last_pong = time.monotonic()
        # No tick could arrive while it was away: the silence of the outage does not count.
        self._coordinator_until += time.monotonic() - self._lost_at
        self._connected.set()
        try:
            await self._read_clock()  # a failover may have moved us to a host with another clock
            if self._entries:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for entry in self._entries.values():
                        pipe.rpush(self.keys.requests, entry)
                    await pipe.execute()
        except (RedisError, OSError) as e:
            # Their replies may then not come: those requests end as `No response from server`.
            log.warning("back on Redis, but could not push the pending requests again: %s", e)

    def _dispatch(self, data: str) -> None:
        try:
            event = decode_event(data)
        except ProtocolError as e:
            log.warning("ignored an undecodable event: %s", e.message)
            return
        if isinstance(event, AliveEvent):
            self._coordinator_until = time.monotonic() + event.within_ms / 1000
        elif isinstance(event, ReplyEvent):
            self._coordinator_until = max(
                self._coordinator_until, time.monotonic() + self.settings.coordinator_grace
            )
            fut = self._pending.get(event.req)
            if fut is not None and not fut.done():
                fut.set_result(event.reply)
        elif isinstance(event, MessageEvent | PresenceEvent):
            if self._held is None:
                self._hand_on(event)
            else:
                self._held.append(event)
        elif isinstance(event, ReceiptEvent):
            receipt = self._receipts.get(event.msg)
            if receipt is not None:
                _settle(receipt, True)
        elif isinstance(event, StoppingEvent):
            self.stop(NoConnection("the server stopped"))

    async def _heartbeat(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        beat = loop.time()
        failed = False
        while not self.finished.done():
            # On a fixed beat: the round trips below must not stretch the period. After a
            # failure, sooner: the session has only what is left of its TTL.
            beat = (
                loop.time() + min(_RETRY_S, s.heartbeat_interval)
                if failed
                else max(beat + s.heartbeat_interval, loop.time())
            )
            await asyncio.sleep(beat - loop.time())
            # Past its TTL while Redis was away, the session is gone. (A client that merely
            # hung that long asks all the same: Redis says whether it was removed.)
            left = self._session_left() if self._trouble is not None else None
            if left is not None and left <= 0:
                self.stop(self._outlived())
                return
            sent = time.monotonic()
            try:
                # Only refreshes the key's TTL, never creates it: a session the coordinator
                # removed (or whose key expired while this client hung) stays dead.
                alive = await asyncio.wait_for(
                    self.heartbeat_redis.pexpire(self.hb_key, s.heartbeat_ttl_ms), left
                )
            except (RedisError, OSError, TimeoutError) as e:
                said = explain(e) if isinstance(e, RedisError) else str(e) or type(e).__name__
                if isinstance(e, RedisError) and not isinstance(e, _PASSING):
                    self.stop(NoConnection(f"Redis at {describe(self.heartbeat_redis)}: {said}"))
                    return
                if not failed:
                    log.warning("heartbeat failed (%s); trying again", said)
                self._trouble, failed = f"Redis at {describe(self.heartbeat_redis)}: {said}", True
                continue
            failed = False
            if not alive and self._leaving:
                # The logoff script deletes the key and publishes its reply in one step: a beat
                # that sees the key gone first must not make the logoff a `you-are-not-logged-on`.
                # The reply decides (or the request's timeout does).
                continue
            if not alive:
                # Removed: for a reason the coordinator had (it hung past its deadline), or
                # with everything else when Redis lost its data.
                trouble = self._trouble
                self.stop(
                    Rejected(Reply.YOU_ARE_NOT_LOGGED_ON)
                    if trouble is None
                    else NoConnection(f"back on Redis, but the session did not survive: {trouble}")
                )
                return
            self._alive_since = sent
            if not self._connected.is_set():
                continue  # subscribing again: the pub/sub checks wait for it
            self._trouble = None
            try:
                assert self._pubsub is not None
                # A half-open pub/sub socket is only noticed if a PING's answer is awaited.
                await self._pubsub.ping()
            except (RedisError, OSError) as e:
                self._pubsub_lost(f"lost the pub/sub connection: {e}")
                continue
            if time.monotonic() > self._coordinator_until:
                self.stop(NoConnection("no coordinator is running (no sign of one)"))
            elif time.monotonic() - self._last_pong > s.heartbeat_ttl + s.heartbeat_interval:
                self._pubsub_lost("the pub/sub connection stopped answering")

    async def _serve_local(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), self.settings.reply_timeout)
            except ValueError:  # a line past the limit: no text the rules allow is that long
                answer = {"reply": "request too large for this node's client", "exit": "2"}
            else:
                answer = await self._answer_local(line)
            writer.write(encode_local(answer))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass  # the command gave up or went away; it has its own deadline and message
        finally:
            writer.close()

    async def _answer_local(self, line: bytes) -> dict[str, str]:
        try:
            req = decode_local_request(line)
            if req.op == "ping":
                return {"reply": "pong", "name": self.name}
            wait_ms = req.wait_ms
            if req.until_ms:
                left = req.until_ms - int(time.time() * 1000)
                if left <= _LOCAL_MARGIN_MS:  # read too late (this client hung): never sent
                    error = NoResponse("the command had given up before this client read it")
                    return {"reply": error.message, "exit": str(error.exit_code)}
                wait_ms = min(wait_ms, left) if wait_ms else left
            if req.op == "logoff":
                reply = await self.logoff(wait_ms=wait_ms)
            elif req.receipt_ms:
                reply, receipt = await self.send_with_receipt(
                    req.to, req.text, receipt_ms=req.receipt_ms, wait_ms=wait_ms
                )
                if receipt is not None:
                    delivered = await receipt
                    return {"reply": reply.value, "receipt": _receipt_word(delivered)}
            else:
                reply = await self.send(req.to, req.text, wait_ms=wait_ms)
            return {"reply": reply.value}
        except MessengerError as e:
            return {"reply": e.message, "exit": str(e.exit_code)}
        except Exception as e:  # a bug: the command gets an answer, and this client goes on
            log.error("a command from this node failed: %s: %s", type(e).__name__, e)
            log.debug("the failure", exc_info=True)
            return {"reply": f"this node's client failed: {type(e).__name__}", "exit": "1"}


def _settle(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def _receipt_word(delivered: bool) -> str:
    return "delivered" if delivered else "not-delivered"


class UserList(NamedTuple):
    users: list[User]  # sorted by name
    unreadable: int  # session entries that did not decode (skipped)


async def list_users(redis: Redis, prefix: str) -> UserList:
    """Every logged-on user, from the public list the coordinator keeps.

    What Redis holds is not trusted: an entry that does not decode is skipped and counted.
    """
    entries = cast(dict[str, str], await redis.hgetall(Keys(prefix).users))
    entries.pop(USERS_PLACEHOLDER, None)
    users, unreadable = [], 0
    for name, raw in entries.items():
        try:
            users.append(decode_user(name, raw))
        except ProtocolError:
            unreadable += 1
    return UserList(sorted(users), unreadable)
