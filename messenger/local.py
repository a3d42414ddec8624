"""How a command reaches its node's running client: a unix socket in the runtime directory.

This is the seed's registered `mess-client` process: `message` and `logoff` find the client of
this node by a local name, not through Redis. The socket file lives in a directory only this OS
user can enter. A socket file can outlive its process (`kill -9`) and a stopped process's socket
still accepts connections, so callers always wait for an answer with a deadline.

A command's call is synchronous and light (the socket module, no asyncio): `messenger message`
and `messenger logoff` start in a few milliseconds of Python (see `entry`).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from messenger import private
from messenger.errors import MessengerError, NoResponse, Rejected
from messenger.rules import OK_REPLIES, Reply, encode_local, printable, validate_name, validate_text
from messenger.settings import Settings

TYPE_CHECKING = False  # typing's own costs a command a few milliseconds at start-up
if TYPE_CHECKING:
    from typing import Any

_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux
# JSON escapes a control character as six bytes (`\u0001`); the rest of a request is small.
_ESCAPED_BYTES_PER_BYTE = 6
_LINE_OVERHEAD = 4096
# A client whose listen backlog is full (it is stopped, and commands piled up) refuses a
# connection at once; it may take it a moment later, until the command's deadline.
_BACKLOG_RETRY = 0.01


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
        import hashlib  # only for long names: loading OpenSSL would cost every command

        digest = hashlib.sha256(settings.node.encode()).hexdigest()[:16]
        path = settings.runtime_dir / f"node-{digest}.sock"
    return path


def message_request(
    settings: Settings, to: str, words: tuple[str, ...], *, receipt_ms: int = 0
) -> dict[str, str]:
    """`messenger message TO WORDS...` as a request: the words joined by spaces, the name and
    the text checked (InvalidInput says what is wrong). `receipt_ms` (`message --wait`): how
    long the client waits, after `sent`, for the receiver's receipt."""
    text = " ".join(words)
    validate_name(to)
    validate_text(text, settings.max_message_bytes)
    request = {"op": "message", "to": to, "text": text}
    if receipt_ms > 0:
        request["receipt_ms"] = str(receipt_ms)
    return request


# A command waits this long for its answer before it shows a spinner (on a terminal only).
PATIENCE = 0.5


def command(settings: Settings, request: dict[str, str]) -> tuple[str, str, int]:
    """Have this node's client do `request` as `messenger message` and `logoff` do: the reply
    (escaped: it came from outside this process), the receipt word (`message --wait`:
    `delivered` or `not-delivered`; else "") and the exit code (1 for `not-delivered`)."""
    # The client's request waits no longer than this command does (so a request that this
    # command gave up on is never applied), and its answer gets half a second to come back.
    # And if the client reads it late (it hung meanwhile), it knows when this command gave up.
    # With a receipt wanted, the command also waits the receipt's time after the reply's.
    timeout_ms = settings.reply_timeout_ms
    receipt_ms = int(request.get("receipt_ms", "0"))
    request = {
        **request,
        "wait_ms": str(timeout_ms),
        "until_ms": str(int(time.time() * 1000) + timeout_ms),
    }
    answer = ask(settings, request, (timeout_ms + receipt_ms) / 1000 + 0.5, spin=True)
    reply: str = answer["reply"]
    receipt = answer.get("receipt")
    receipt = printable(receipt) if isinstance(receipt, str) and receipt_ms else ""
    if "exit" in answer:
        return printable(reply), receipt, int(answer["exit"])
    code = 0 if reply in OK_REPLIES else 1
    if receipt_ms and code == 0 and receipt != "delivered":
        code = 1  # not-delivered (or no word at all: nobody says it was shown)
        receipt = receipt or "not-delivered"
    return printable(reply), receipt, code


def ask(
    settings: Settings, request: dict[str, str], timeout: float, *, spin: bool = False
) -> dict[str, Any]:
    """Send one request to this node's client and return its answer, within `timeout` seconds.
    With `spin`, an answer that takes more than PATIENCE seconds gets a spinner on stderr (on
    a terminal), erased before this returns.

    Raises Rejected(not-logged-on) when no client runs on this node (nothing listens on its
    socket), NoResponse when it does not answer in time or goes away without answering: then
    nobody knows whether the request was applied, which `not-logged-on` would deny. An answer
    that is not one (not a JSON object with a string `reply`, and if it has an `exit`, an exit
    status) is a MessengerError.
    """
    if not private.check_dir(settings.runtime_dir):
        raise Rejected(Reply.NOT_LOGGED_ON)  # no runtime directory: no client ever ran here
    deadline = time.monotonic() + timeout
    try:
        sock = _connect(str(socket_path(settings)), deadline)
    except (FileNotFoundError, ConnectionRefusedError):
        raise Rejected(Reply.NOT_LOGGED_ON) from None
    except TimeoutError:
        raise NoResponse() from None
    with sock:
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(encode_local(request))
            line = _read_line(sock, line_limit(settings), deadline, spin)
        except TimeoutError:
            raise NoResponse() from None
        except (ConnectionError, ValueError) as e:  # ValueError: an answer past the line limit
            raise NoResponse(f"this node's client did not answer properly: {e}") from None
    if not line:
        raise NoResponse("this node's client closed the connection without answering")
    try:
        answer: object = json.loads(line)
    except (ValueError, RecursionError):
        answer = None
    if not (
        isinstance(answer, dict)
        and isinstance(answer.get("reply"), str)
        and _exit_status(answer.get("exit", "0"))
    ):
        raise MessengerError("garbled answer from this node's client")
    return answer


def _exit_status(value: object) -> bool:
    """Whether an answer's `exit` is one (the client sends a string; a number is as good)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 256


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _connect(path: str, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(path)
            return sock
        except BlockingIOError:  # a full backlog: see _BACKLOG_RETRY
            sock.close()
            time.sleep(min(_BACKLOG_RETRY, _left(deadline)))
        except BaseException:
            sock.close()
            raise


def _read_line(sock: socket.socket, limit: int, deadline: float, spin: bool = False) -> bytes:
    """One line, its end included (at the end of the stream: what came before it). A line of
    more than `limit` bytes is a ValueError. With `spin`, a spinner once PATIENCE has passed."""
    spinner = None
    # A spinner only ever draws on a terminal: on a pipe nothing more is loaded, ever.
    patience = time.monotonic() + PATIENCE if spin and _stderr_is_a_terminal() else None
    data = bytearray()
    try:
        while True:
            left = _left(deadline)
            if patience is not None:
                if time.monotonic() >= patience:
                    # Only now: a command that is answered at once loads nothing more.
                    from messenger.spinner import Spinner

                    spinner = Spinner("waiting for this node's client", delay=0).start()
                    patience = None
                else:
                    left = min(left, patience - time.monotonic())
            sock.settimeout(max(left, 0.001))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if patience is not None and time.monotonic() < deadline:
                    continue
                raise
            end = chunk.find(b"\n")
            data += chunk if end < 0 else chunk[: end + 1]
            if len(data) > limit:
                raise ValueError(f"an answer of more than {limit} bytes")
            if end >= 0 or not chunk:
                return bytes(data)
    finally:
        if spinner is not None:
            spinner.stop()


def _stderr_is_a_terminal() -> bool:
    import sys

    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


async def call(settings: Settings, request: dict[str, str], timeout: float) -> dict[str, Any]:
    """`ask` from a coroutine (in a thread: the event loop goes on meanwhile)."""
    import asyncio  # already imported by whoever runs this coroutine; a command's path is not

    return await asyncio.to_thread(ask, settings, request, timeout)


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
