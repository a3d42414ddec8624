"""The parts of the protocol a command checks before anything leaves this process: the seed's
reply words, what a name, a node and a text may be, how untrusted text is printed, and the
node socket's line. Light on purpose (no dataclasses, no hashing): `messenger message` and
`messenger logoff` import this, not `protocol`, which re-exports all of it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from enum import StrEnum

from messenger.errors import InvalidInput


class Reply(StrEnum):
    """The seed's words, printed alone on a line."""

    LOGGED_ON = "logged-on"
    USER_EXISTS = "user-exists-at-other-node"
    ALREADY_LOGGED_ON = "already-logged-on"
    NOT_LOGGED_ON = "not-logged-on"
    SENT = "sent"
    RECEIVER_NOT_FOUND = "receiver-not-found"
    YOU_ARE_NOT_LOGGED_ON = "you-are-not-logged-on"
    LOGGED_OFF = "logged-off"
    # Not one of the seed's: the session sent faster than the coordinator's limit allows
    # (settings.rate_limit); the request was not applied. The client goes on.
    RATE_LIMITED = "rate-limited"
    # Not a reply anyone sees: the request outlived its sender's wait and was not applied.
    EXPIRED = "expired"


# Replies that mean the request did what was asked.
OK_REPLIES = frozenset({Reply.LOGGED_ON, Reply.SENT, Reply.LOGGED_OFF})

NAME_RULE = "1-32 characters: letters, digits, '_', '.', '-', starting with a letter or digit"
NODE_RULE = "1-64 characters: letters, digits, '_', '.', '-', '@', starting with a letter or digit"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid user name, else raise InvalidInput with the rule."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidInput(f"invalid user name {printable(name)!r}: {NAME_RULE}")
    return name


def validate_node(node: str) -> str:
    """Return `node` if it is a valid node name, else raise InvalidInput with the rule."""
    if not _NODE_RE.fullmatch(node):
        raise InvalidInput(f"invalid node name {printable(node)!r}: {NODE_RULE}")
    return node


def validate_text(text: str, max_bytes: int) -> str:
    """A message must be non-empty UTF-8 of at most `max_bytes` bytes."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # click hands undecodable argv bytes over as lone surrogates.
        raise InvalidInput("message text is not valid UTF-8") from None
    if size == 0:
        raise InvalidInput("message text is empty")
    if size > max_bytes:
        raise InvalidInput(f"message text is {size} bytes; the limit is {max_bytes}")
    return text


# Bidirectional overrides and isolates can make text read differently from what it is
# ("Trojan Source"); other format characters (e.g. the joiner inside emoji) are harmless.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


# Text that is all printable ASCII needs no look at each character (most text: a client prints
# every message through printable, so this is on the hot path).
_PLAIN_RE = re.compile(r"[ -~]*")


def printable(text: str) -> str:
    """Escape control characters (and bidi overrides) so text can never drive the terminal."""
    if _PLAIN_RE.fullmatch(text):
        return text
    out = []
    for ch in text:
        if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


# --- the node socket: one JSON object per line -------------------------------------------------


def encode_local(obj: dict[str, str]) -> bytes:
    return (json.dumps(obj) + "\n").encode()
