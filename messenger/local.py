"""How a command reaches its node's running client: a unix socket in the runtime directory.

This is the seed's registered `mess-client` process: `message` and `logoff` find the client of
this node by a local name, not through Redis. The socket file lives in a directory only this OS
user can enter. A socket file can outlive its process (`kill -9`) and a stopped process's socket
still accepts connections, so callers always wait for an answer with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from messenger import private
from messenger.errors import MessengerError, NoResponse, Rejected
from messenger.protocol import Reply, encode_local
from messenger.settings import Settings

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux
# JSON escapes a control character as six bytes (`\u0001`); the rest of a request is small.
_ESCAPED_BYTES_PER_BYTE = 6
_LINE_OVERHEAD = 4096


def line_limit(settings: Settings) -> int:
    """The longest line either end of the node socket reads: any text the rules allow, escaped.

    asyncio's default (64 KiB) would refuse a message within the 64 KiB limit once escaped.
    """
    return _ESCAPED_BYTES_PER_BYTE * settings.max_message_bytes + _LINE_OVERHEAD


def ensure_runtime_dir(settings: Settings) -> Path:
    """Create the runtime directory, or check that an existing one is private to this user."""
    return private.ensure_dir(settings.runtime_dir)


def socket_path(settings: Settings) -> Path:
    path = settings.runtime_dir / f"node-{settings.node}.sock"
    if len(str(path)) > _MAX_UNIX_PATH:
        digest = hashlib.sha256(settings.node.encode()).hexdigest()[:16]
        path = settings.runtime_dir / f"node-{digest}.sock"
    return path


async def call(settings: Settings, request: dict[str, str], timeout: float) -> dict[str, Any]:
    """Send one request to this node's client and return its answer.

    Raises Rejected(not-logged-on) when no client runs on this node (nothing listens on its
    socket), NoResponse when it does not answer within `timeout` or goes away without answering:
    then nobody knows whether the request was applied, which `not-logged-on` would deny.
    """
    if not private.check_dir(settings.runtime_dir):
        raise Rejected(Reply.NOT_LOGGED_ON)  # no runtime directory: no client ever ran here
    path = socket_path(settings)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=line_limit(settings)), timeout
        )
    except (FileNotFoundError, ConnectionRefusedError):
        raise Rejected(Reply.NOT_LOGGED_ON) from None
    except TimeoutError:
        raise NoResponse() from None
    try:
        writer.write(encode_local(request))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise NoResponse() from None
    except (ConnectionError, ValueError) as e:  # ValueError: an answer past the line limit
        raise NoResponse(f"this node's client did not answer properly: {e}") from None
    finally:
        writer.close()
    if not line:
        raise NoResponse("this node's client closed the connection without answering")
    try:
        answer: Any = json.loads(line)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("reply"), str):
        raise MessengerError("garbled answer from this node's client")
    return answer


async def client_alive(settings: Settings, timeout: float = 2.0) -> bool:
    """Whether a client already runs on this node (a stale socket file is removed)."""
    path = socket_path(settings)
    if not private.check_dir(settings.runtime_dir) or not path.exists():
        return False
    try:
        await call(settings, {"op": "ping"}, timeout)
        return True
    except Rejected:
        path.unlink(missing_ok=True)
        return False
    except NoResponse:
        return True  # a stopped client still owns its node
