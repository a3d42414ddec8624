"""The messenger for programs: log a user on, send, receive, in a few lines of asyncio.

    import asyncio, messenger

    async def main() -> None:
        async with messenger.connect("echo", node="bot-1") as session:
            async for msg in session:                 # until logged off or disconnected
                await session.send(msg.sender, msg.text)

    asyncio.run(main())

A session is this node's client (messenger.client.Client), the same one `messenger logon` runs:
the same heartbeat, the same faults (a lost Redis or coordinator ends the iteration with
NoConnection, exit code 3 if it reaches the CLI's handler), and the node socket, so `messenger
message`/`logoff --node <its node>` work beside it. Configuration is the CLI's: keyword
arguments win over MESSENGER_* variables, which win over the defaults (with no Redis URL, the
embedded `messenger server` of this host). Every error is a messenger.errors.MessengerError.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from messenger import local
from messenger.client import Client, list_users
from messenger.connection import describe, explain
from messenger.errors import NoConnection, Rejected
from messenger.protocol import MessageEvent, PresenceEvent, Reply, User
from messenger.settings import Settings

__all__ = ["Message", "Presence", "Reply", "Session", "User", "connect"]


@dataclass(frozen=True)
class Message:
    """A message to this session's user. `sender` and `text` are as sent: escape them
    (messenger.protocol.printable) before they reach a terminal."""

    sender: str
    text: str


@dataclass(frozen=True)
class Presence:
    """A user logged on (`kind` "logon") or off ("logoff", with `reason`: logoff, timeout,
    crash, replaced or server). `at_ms`: when, on Redis's clock (ms since the epoch)."""

    kind: str
    name: str
    node: str
    at_ms: int
    reason: str = ""


_END = object()  # put on the queues when the session ends


class Session:
    """One logged-on user (made by connect()). Iterate over it for incoming messages; each is
    acknowledged (its sender's `delivered`) when the iteration hands it to you."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._messages: asyncio.Queue[Any] = asyncio.Queue()
        self._presence: asyncio.Queue[Any] = asyncio.Queue()
        client.finished.add_done_callback(self._ended)

    @property
    def name(self) -> str:
        return self._client.name

    @property
    def node(self) -> str:
        return self._client.node

    def _event(self, event: MessageEvent | PresenceEvent) -> None:
        if isinstance(event, MessageEvent):
            self._messages.put_nowait(event)
        else:
            self._presence.put_nowait(
                Presence(event.kind, event.name, event.node, event.at_ms, event.reason)
            )

    def _ended(self, _: object) -> None:
        self._messages.put_nowait(_END)
        self._presence.put_nowait(_END)

    def _raise_end(self) -> None:
        """The iteration is over: cleanly (logged off) or with the reason the session ended."""
        self._messages.put_nowait(_END)  # for any other iteration
        reason = self._client.finished.result()
        if reason is not None:
            raise reason
        raise StopAsyncIteration

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        item = await self._messages.get()
        if item is _END:
            self._raise_end()
        assert isinstance(item, MessageEvent)
        self._client.acknowledge(item.msg_id)  # handed over: that is "delivered"
        return Message(item.sender, item.text)

    async def presence(self) -> AsyncIterator[Presence]:
        """Each logon and logoff as it happens (connect(..., presence=True))."""
        while True:
            item = await self._presence.get()
            if item is _END:
                self._presence.put_nowait(_END)
                return
            yield item

    async def send(self, to: str, text: str) -> Reply:
        """The server's reply: Reply.SENT (a live client of `to` got it), RECEIVER_NOT_FOUND or
        RATE_LIMITED. Raises InvalidInput for a bad name or text, NoConnection/NoResponse."""
        return await self._client.send(to, text)

    async def send_and_confirm(self, to: str, text: str, timeout: float = 5.0) -> bool:
        """Send, then wait up to `timeout` seconds for the receiver's client to show it: True
        if it did (`delivered`), False if not (or it was not sent). Never a guess: only the
        receiver's own session can confirm."""
        reply, receipt = await self._client.send_with_receipt(
            to, text, receipt_ms=max(1, int(timeout * 1000))
        )
        return reply == Reply.SENT and receipt is not None and await receipt

    async def who(self) -> list[User]:
        """Every logged-on user, sorted by name: `name`, `node`, `since` (ms since the epoch)."""
        redis = self._client.redis
        try:
            return (await list_users(redis, self._client.settings.prefix)).users
        except RedisError as e:
            raise NoConnection(f"Redis at {describe(redis)}: {explain(e)}") from None

    async def logoff(self) -> None:
        """Log off; the iteration then ends."""
        await self._client.logoff()


@contextlib.asynccontextmanager
async def connect(
    name: str,
    *,
    node: str | None = None,
    redis_url: str | None = None,
    presence: bool = False,
    settings: Settings | None = None,
    **options: Any,
) -> AsyncIterator[Session]:
    """Log `name` on at `node` (default: MESSENGER_NODE, else the host name) and yield the
    Session; logs off when the block ends, however it ends.

    `options` are Settings' fields (reply_timeout=2.0, runtime_dir=..., prefix=...).
    Raises Rejected (e.g. `user-exists-at-other-node`), NoConnection, NoResponse, ConfigError.
    """
    if settings is None:
        settings = Settings.from_env(node=node, redis_url=redis_url, **options)
    local.ensure_runtime_dir(settings)
    if await local.client_alive(settings):
        raise Rejected(Reply.ALREADY_LOGGED_ON)
    session: Session | None = None

    def event(e: MessageEvent | PresenceEvent) -> None:
        assert session is not None  # made before the logon, which is when events can come
        session._event(e)

    client = Client.for_settings(settings, name, on_event=event, presence=presence)
    session = Session(client)
    logged_on = False
    try:
        await client.logon()
        logged_on = True
        await client.start_serving()
        yield session
    finally:
        if logged_on and not client.finished.done():
            await client.leave()
        await client.close()
