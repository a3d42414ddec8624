"""Finding and connecting to Redis, with failures that surface fast.

redis-py retries failed commands by default (with backoff up to about a second) and quietly
reconnects pub/sub. A messenger client must notice a lost Redis within seconds, so every
connection here has no retries and short timeouts; callers turn RedisError into NoConnection.
"""

from __future__ import annotations

import json
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from messenger.errors import ConfigError, NoConnection
from messenger.settings import Settings

SERVER_FILE = "server.json"


def server_file(settings: Settings) -> Path:
    """Where an embedded Redis's address (with its password) is kept for same-host clients."""
    return settings.runtime_dir / SERVER_FILE


def resolve_url(settings: Settings) -> str:
    """The configured Redis URL, else the one the local embedded server published."""
    if settings.redis_url:
        return settings.redis_url
    path = server_file(settings)
    try:
        data = json.loads(path.read_text())
        return str(data["url"])
    except FileNotFoundError:
        raise NoConnection(
            "no Redis URL configured (--redis-url / MESSENGER_REDIS_URL) and no `messenger "
            f"server` with an embedded Redis runs on this host (looked for {path})"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"unreadable server file {path}: {e}") from None


def connect(url: str, *, socket_timeout: float | None, name: str = "messenger") -> Redis:
    """A client that fails fast instead of retrying (see the module docstring)."""
    try:
        return Redis.from_url(
            url,
            decode_responses=True,
            # Bytes that are not UTF-8 (from a rogue writer) must not crash a reader: they
            # decode to U+FFFD and then fail validation like any other bad input.
            encoding_errors="replace",
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout or 5.0, 5.0),
            retry=Retry(NoBackoff(), 0),
            client_name=name,
            # RESP2 on purpose: under RESP3 redis-py 8 mis-parses a decoded PONG on a subscribed
            # connection, and the client relies on pub/sub PINGs to detect a half-open socket.
            protocol=2,
        )
    except ValueError as e:
        raise ConfigError(f"invalid Redis URL: {e}") from None
