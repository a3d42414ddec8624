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
from redis.exceptions import RedisError

from messenger import local
from messenger.connection import describe, explain
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
    Reply,
    ReplyEvent,
    Request,
    StoppingEvent,
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
        self.clock = clock
        self.sid = secrets.token_hex(16)  # names the session in requests; no secret
        # The session's secret: it signs every request and names the inbox and heartbeat key,
        # so nobody else can speak as this session, listen to it or keep it alive.
        self.key = new_session_key()
        self.inbox = self.keys.inbox(inbox_id(self.key))
        self.hb_key = self.keys.hb(heartbeat_id(self.key))
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
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(reason or Rejected(Reply.NOT_LOGGED_ON))

    async def logon(self) -> None:
        """Log the user on; raises Rejected, NoConnection or NoResponse if that fails."""
        try:
            self._pubsub = self.redis.pubsub()
            await self._pubsub.subscribe(self.inbox, self.keys.control)
            await self._confirm_subscriptions(2)
            await self._read_clock()
        except RedisError as e:
            raise NoConnection(f"Redis at {describe(self.redis)}: {explain(e)}") from None
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
        self._coordinator_until = after + self.settings.coordinator_grace

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
        self._spawn(self._heartbeat(), "heartbeat")

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run a background task whose end, unless the client is stopping, stops the client:
        a client must never stay logged on with no reader or no heartbeat."""
        task = asyncio.create_task(coro, name=f"messenger client {what}")
        task.add_done_callback(functools.partial(self._task_ended, what))
        self._tasks.append(task)

    def _task_ended(self, what: str, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.debug("the client's %s failed", what, exc_info=error)
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
        for task in self._tasks:
            task.cancel()
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
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request.req] = fut
        request = replace(request, sent_ms=self._redis_now())
        try:
            try:
                await self.redis.rpush(self.keys.requests, encode_request(request, self.key))
            except RedisError as e:
                if self.finished.done():  # stopped (and closed) meanwhile: say why, not this
                    raise self.finished.result() or Rejected(Reply.NOT_LOGGED_ON) from None
                raise NoConnection(f"Redis at {describe(self.redis)}: {explain(e)}") from None
            reply = await self._reply(fut, request.wait_ms / 1000)
        except (NoConnection, NoResponse) as e:
            self.stop(e)
            raise
        finally:
            self._pending.pop(request.req, None)
            # stop() fails every pending future, this one too when it runs while the push is
            # in flight (or from the except above); nobody awaits it then, so mark it retrieved
            # rather than let asyncio print "Future exception was never retrieved".
            if fut.done() and not fut.cancelled():
                fut.exception()
        if reply in STOP_REPLIES:
            self.stop(Rejected(reply))
        return reply

    async def _reply(self, fut: asyncio.Future[Reply], wait: float) -> Reply:
        """The reply, within `wait` seconds (else No response from server), unless no
        coordinator shows a sign of life meanwhile: that is the seed's `noconnection`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            left = deadline - loop.time()
            silent = self._coordinator_until - time.monotonic()
            if silent <= 0:  # first: it says more than a timeout would
                raise NoConnection("no coordinator is running (no sign of one)")
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

    async def logoff(self, *, wait_ms: int = 0) -> Reply:
        """Log off; the client stops cleanly whatever the server answers."""
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
        assert self._pubsub is not None
        while True:
            try:
                msg: Any = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
            except (RedisError, OSError) as e:
                self.stop(NoConnection(f"lost the pub/sub connection: {e}"))
                return
            if msg is None:
                continue
            if msg["type"] == "pong":
                self._last_pong = time.monotonic()
            elif msg["type"] == "message":
                self._dispatch(msg["data"])

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
        elif isinstance(event, MessageEvent):
            self.out(format_message(event.sender, event.text))
        elif isinstance(event, StoppingEvent):
            self.stop(NoConnection("the server stopped"))

    async def _heartbeat(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        beat = loop.time()
        while not self.finished.done():
            # On a fixed beat: the round trips below must not stretch the period.
            beat = max(beat + s.heartbeat_interval, loop.time())
            await asyncio.sleep(beat - loop.time())
            try:
                # Only refreshes the key's TTL, never creates it: a session the coordinator
                # removed (or whose key expired while this client hung) stays dead.
                alive = await self.heartbeat_redis.pexpire(self.hb_key, s.heartbeat_ttl_ms)
                assert self._pubsub is not None
                # A half-open pub/sub socket is only noticed if a PING's answer is awaited.
                await self._pubsub.ping()
            except (RedisError, OSError) as e:
                self.stop(NoConnection(f"Redis unreachable: {e}"))
                return
            if not alive:
                self.stop(Rejected(Reply.YOU_ARE_NOT_LOGGED_ON))
            elif time.monotonic() > self._coordinator_until:
                self.stop(NoConnection("no coordinator is running (no sign of one)"))
            elif time.monotonic() - self._last_pong > s.heartbeat_ttl + s.heartbeat_interval:
                self.stop(NoConnection("the pub/sub connection stopped answering"))

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
            if req.op == "logoff":
                reply = await self.logoff(wait_ms=req.wait_ms)
            else:
                reply = await self.send(req.to, req.text, wait_ms=req.wait_ms)
            return {"reply": reply.value}
        except MessengerError as e:
            return {"reply": e.message, "exit": str(e.exit_code)}
        except Exception as e:  # a bug: the command gets an answer, and this client goes on
            log.error("a command from this node failed: %s: %s", type(e).__name__, e)
            log.debug("the failure", exc_info=True)
            return {"reply": f"this node's client failed: {type(e).__name__}", "exit": "1"}


class UserList(NamedTuple):
    users: list[tuple[str, str]]  # (name, node), sorted; raw, so escape them to print
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
            users.append((name, decode_user(raw)))
        except ProtocolError:
            unreadable += 1
    return UserList(sorted(users), unreadable)
