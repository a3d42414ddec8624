"""The Erlang robust messenger on Redis: a coordinator, one client per node, and a CLI.

For programs: `messenger.connect(name, ...)` (messenger/api.py) logs a user on and yields a
session to send with and iterate over for messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from messenger.api import Message as Message
    from messenger.api import Presence as Presence
    from messenger.api import Session as Session
    from messenger.api import User as User
    from messenger.api import connect as connect

_API = frozenset({"connect", "Session", "Message", "Presence", "User"})


def __getattr__(name: str) -> Any:
    # Imported on first use: `messenger message` (which imports this package) must not pay
    # for redis and asyncio (docs/performance.md, "CLI start-up").
    if name in _API:
        from messenger import api

        return getattr(api, name)
    raise AttributeError(f"module 'messenger' has no attribute {name!r}")
