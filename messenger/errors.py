"""One exception root; every error knows the exit code the CLI leaves with.

Exit codes: 1 the server (or this node) said no, or this node's client broke; 2 bad usage or
input; 3 `noconnection` (Redis or the coordinator is gone); 4 `No response from server` (a reply
did not come in time, or this node's client went away without one).
"""

from __future__ import annotations


class MessengerError(Exception):
    """Root of every error the messenger raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Rejected(MessengerError):
    """The server or this node refused: the message is one of the seed's reply words."""

    exit_code = 1


class ClientFailure(MessengerError):
    """This node's client broke (a bug, or its own output gone): it stops rather than stay
    logged on deaf. The session dies with its connection, as after a crash."""

    exit_code = 1


class InvalidInput(MessengerError):
    """A name, node or text that breaks the rules in `protocol`."""

    exit_code = 2


class ConfigError(MessengerError):
    """Settings that cannot work (bad URL, bad number, no binary for the embedded Redis)."""

    exit_code = 2


class ProtocolError(MessengerError):
    """A request or event that does not decode; logged and dropped, never fatal to the server."""

    exit_code = 2


class NoConnection(MessengerError):
    """Redis is unreachable or no coordinator holds the lease: the seed's `noconnection`."""

    exit_code = 3

    def __init__(self, detail: str = "") -> None:
        super().__init__("noconnection")
        self.detail = detail


class LeaseLost(MessengerError):
    """Another coordinator holds the lease now: this one must not act any more."""

    exit_code = 3


class NoResponse(MessengerError):
    """No reply within the reply timeout: the seed's `No response from server`."""

    exit_code = 4

    def __init__(self, detail: str = "") -> None:
        super().__init__("No response from server")
        self.detail = detail
