"""The wire protocol, pure: reply words, requests, events, validation. No Redis in here.

Requests travel to the coordinator as entries of one Redis stream (flat str -> str fields);
replies and messages travel to a client as JSON on that session's inbox channel. The Lua in
`scripts` writes the JSON events, so the field names below are shared with it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from messenger.errors import InvalidInput, ProtocolError


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
    # Not a reply anyone sees: the request outlived its sender's wait and was not applied.
    EXPIRED = "expired"


# Replies after which the client stops (the seed's `#(messenger stop Why)`).
STOP_REPLIES = frozenset({Reply.USER_EXISTS, Reply.ALREADY_LOGGED_ON, Reply.YOU_ARE_NOT_LOGGED_ON})
# Replies that mean the request did what was asked.
OK_REPLIES = frozenset({Reply.LOGGED_ON, Reply.SENT, Reply.LOGGED_OFF})

NAME_RULE = "1-32 characters: letters, digits, '_', '.', '-', starting with a letter or digit"
NODE_RULE = "1-64 characters: letters, digits, '_', '.', '-', '@', starting with a letter or digit"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,31}")
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}")
# Kept well under anything that could hurt: ids appear in key and channel names.
_ID_RE = re.compile(r"[0-9a-f]{32}")
_WAIT_RE = re.compile(r"[0-9]{1,7}")  # milliseconds, under 3 hours: waits and TTLs


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


def printable(text: str) -> str:
    """Escape control characters (and bidi overrides) so text can never drive the terminal."""
    out = []
    for ch in text:
        if ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


# --- requests (client -> coordinator, stream entries) -------------------------------------------

Kind = Literal["logon", "message-to", "logoff"]
KINDS: tuple[Kind, ...] = ("logon", "message-to", "logoff")


@dataclass(frozen=True)
class Request:
    """One request. `sid` is the sender's session id: the fencing token the coordinator checks."""

    kind: Kind
    req: str
    sid: str
    name: str = ""
    node: str = ""
    to: str = ""
    text: str = ""
    sent_ms: int = 0  # Redis time at XADD, from the stream entry id; 0 until read back
    # How long the sender waits for the reply; 0: not said (the coordinator's own timeout).
    # The coordinator never applies a request its sender has stopped waiting for.
    wait_ms: int = 0
    # logon: the client's heartbeat TTL, so its first deadline matches the ones it will set.
    ttl_ms: int = 0

    def fields(self) -> dict[str, str]:
        """Stream fields for XADD (the entry id, hence `sent_ms`, is Redis's to choose)."""
        out = {"k": self.kind, "req": self.req, "sid": self.sid}
        if self.wait_ms:
            out["wait"] = str(self.wait_ms)
        if self.kind == "logon":
            out |= {"name": self.name, "node": self.node}
            if self.ttl_ms:
                out["ttl"] = str(self.ttl_ms)
        elif self.kind == "message-to":
            out |= {"to": self.to, "text": self.text}
        return out


def entry_ms(entry_id: str) -> int:
    """Milliseconds part of a stream entry id: Redis's clock when the request was added."""
    ms, _, _seq = entry_id.partition("-")
    try:
        return int(ms)
    except ValueError:
        raise ProtocolError(f"bad stream entry id {entry_id!r}") from None


def decode_request(entry_id: str, fields: dict[str, str], max_text_bytes: int) -> Request:
    """Decode and fully validate one stream entry; anything off raises ProtocolError."""
    kind = fields.get("k")
    if kind not in KINDS:
        raise ProtocolError(f"unknown request kind {kind!r}")
    req, sid = fields.get("req", ""), fields.get("sid", "")
    if not _ID_RE.fullmatch(req) or not _ID_RE.fullmatch(sid):
        raise ProtocolError("request without a valid req/sid id")
    wait, ttl = fields.get("wait", "0"), fields.get("ttl", "0")
    if not _WAIT_RE.fullmatch(wait) or not _WAIT_RE.fullmatch(ttl):
        raise ProtocolError(f"bad wait or ttl {wait[:20]!r} {ttl[:20]!r}")
    common: dict[str, Any] = {"sent_ms": entry_ms(entry_id), "wait_ms": int(wait)}
    try:
        if kind == "logon":
            return Request(
                kind,
                req,
                sid,
                name=validate_name(fields.get("name", "")),
                node=validate_node(fields.get("node", "")),
                ttl_ms=int(ttl),
                **common,
            )
        if kind == "message-to":
            return Request(
                kind,
                req,
                sid,
                to=validate_name(fields.get("to", "")),
                text=validate_text(fields.get("text", ""), max_text_bytes),
                **common,
            )
        return Request(kind, req, sid, **common)
    except InvalidInput as e:
        raise ProtocolError(e.message) from None


# --- events (coordinator -> client, JSON on the inbox and control channels) ---------------------


@dataclass(frozen=True)
class ReplyEvent:
    req: str
    reply: Reply


@dataclass(frozen=True)
class MessageEvent:
    sender: str
    text: str


@dataclass(frozen=True)
class StoppingEvent:
    """The coordinator is shutting down on purpose."""

    coordinator: str


Event = ReplyEvent | MessageEvent | StoppingEvent


def encode_event(event: Event) -> str:
    if isinstance(event, ReplyEvent):
        return json.dumps({"t": "reply", "req": event.req, "r": event.reply.value})
    if isinstance(event, MessageEvent):
        return json.dumps({"t": "msg", "from": event.sender, "text": event.text})
    return json.dumps({"t": "stopping", "coordinator": event.coordinator})


def _json_object(data: str | bytes, what: str) -> dict[str, Any]:
    """Parse one JSON object; every other input (bytes that are not UTF-8, JSON nested deeper
    than the parser recurses, a list, a number...) raises ProtocolError."""
    try:
        obj: Any = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"undecodable {what}: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def _field(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{what} without a string {key!r}")
    return value


def decode_event(data: str | bytes) -> Event:
    """Decode one pub/sub payload; anything else raises ProtocolError, never another error."""
    obj = _json_object(data, "event")
    t = obj.get("t")
    if t == "reply":
        word = _field(obj, "r", "reply")
        try:
            reply = Reply(word)
        except ValueError:
            raise ProtocolError(f"unknown reply {printable(word[:40])!r}") from None
        return ReplyEvent(_field(obj, "req", "reply"), reply)
    if t == "msg":
        return MessageEvent(_field(obj, "from", "message"), _field(obj, "text", "message"))
    if t == "stopping":
        return StoppingEvent(_field(obj, "coordinator", "stopping event"))
    raise ProtocolError(f"unknown event type {printable(str(t)[:40])!r}")


def decode_session(raw: str | bytes) -> tuple[str, str]:
    """(name, node) of one `sessions` entry; anything else raises ProtocolError."""
    obj = _json_object(raw, "session entry")
    return _field(obj, "name", "session entry"), _field(obj, "node", "session entry")


# --- the local protocol between a command and its node's client (JSON lines on a unix socket) --


@dataclass(frozen=True)
class LocalRequest:
    op: Literal["message", "logoff", "ping"]
    to: str = ""
    text: str = ""
    # How long the command waits for the answer; the client's request must not outlive it.
    wait_ms: int = 0


def encode_local(obj: dict[str, str]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def decode_local_request(line: bytes) -> LocalRequest:
    """Decode one line from the node socket; anything else raises ProtocolError."""
    obj = _json_object(line, "local request")
    wait = obj.get("wait_ms", "0")
    if not isinstance(wait, str) or not _WAIT_RE.fullmatch(wait):
        raise ProtocolError(f"bad wait_ms {printable(str(wait)[:20])!r}")
    op = obj.get("op")
    if op == "message":
        return LocalRequest(
            "message", _field(obj, "to", "message"), _field(obj, "text", "message"), int(wait)
        )
    if op in ("logoff", "ping"):
        return LocalRequest(op, wait_ms=int(wait))
    raise ProtocolError(f"unknown local op {printable(str(op)[:40])!r}")
