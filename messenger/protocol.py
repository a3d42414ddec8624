"""The wire protocol, pure: reply words, requests, events, validation. No Redis in here.

The reply words, the name and text rules and `printable` are defined in `rules` (so that the
CLI's light path need not import this module) and re-exported here.

Requests travel to the coordinator as signed entries of one Redis list (a MAC, then JSON);
replies and messages travel to a client as JSON on that session's inbox channel. The Lua in
`scripts` writes the JSON events, so the field names below are shared with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from messenger.errors import InvalidInput, ProtocolError

# Re-exported: defined in `rules`, which the light CLI path imports without the rest of this.
from messenger.rules import NAME_RULE as NAME_RULE
from messenger.rules import NODE_RULE as NODE_RULE
from messenger.rules import OK_REPLIES as OK_REPLIES
from messenger.rules import Reply as Reply
from messenger.rules import encode_local as encode_local
from messenger.rules import printable as printable
from messenger.rules import validate_name as validate_name
from messenger.rules import validate_node as validate_node
from messenger.rules import validate_text as validate_text

# Replies after which the client stops (the seed's `#(messenger stop Why)`).
STOP_REPLIES = frozenset({Reply.USER_EXISTS, Reply.ALREADY_LOGGED_ON, Reply.YOU_ARE_NOT_LOGGED_ON})

# Kept well under anything that could hurt: ids appear in key and channel names.
_ID_RE = re.compile(r"[0-9a-f]{32}")
_WAIT_RE = re.compile(r"[0-9]{1,7}")  # milliseconds, under 3 hours: waits and TTLs


# --- requests (client -> coordinator, signed queue entries) -------------------------------------

# `delivered` is a receiver's receipt for a message it printed (docs/protocol.md, "Receipts").
Kind = Literal["logon", "message-to", "logoff", "delivered"]
KINDS: tuple[Kind, ...] = ("logon", "message-to", "logoff", "delivered")

_KEY_RE = re.compile(r"[0-9a-f]{64}")  # a session's secret: 256 random bits
_TIME_RE = re.compile(r"[0-9]{1,15}")  # milliseconds since the epoch
MAC_HEX = 64  # an entry starts with the HMAC-SHA256 of the rest, in hex
# JSON may escape a text byte as six (`\u0001`); the rest of an entry is well under 1 KiB.
_ENTRY_OVERHEAD = 1024


def max_entry_bytes(max_text_bytes: int) -> int:
    """The longest request entry a valid request can be (longer ones are dropped unread)."""
    return MAC_HEX + 6 * max_text_bytes + _ENTRY_OVERHEAD


def new_session_key() -> str:
    """A session's secret: it signs the session's requests and names its inbox and heartbeat.

    It travels once, in the logon request, which only the coordinator can read; it is stored
    only where only the coordinator can read it.
    """
    return secrets.token_hex(32)


def _derive(key: str, purpose: bytes) -> str:
    return hmac.new(bytes.fromhex(key), purpose, hashlib.sha256).hexdigest()[:32]


def inbox_id(key: str) -> str:
    """The session's inbox channel id: unguessable without the key, so only its client and the
    coordinator can subscribe to it (clients cannot list channels)."""
    return _derive(key, b"inbox")


def heartbeat_id(key: str) -> str:
    """The session's heartbeat key id: only its client can refresh it."""
    return _derive(key, b"heartbeat")


@dataclass(frozen=True)
class Request:
    """One request, signed with its session's key.

    `sid` names the session (it is no secret); the signature over the whole request, its time
    included, is what proves that the session's own client sent it.
    """

    kind: Kind
    req: str
    sid: str
    name: str = ""
    node: str = ""
    to: str = ""
    text: str = ""
    # When it was sent, on Redis's clock (as the client reckons it from TIME): signed, so a
    # request cannot be replayed later, and never applied after its sender stopped waiting.
    sent_ms: int = 0
    # How long the sender waits for the reply; 0: not said (the coordinator's own timeout).
    # The coordinator never applies a request its sender has stopped waiting for.
    wait_ms: int = 0
    # logon: the client's heartbeat TTL, so its first deadline matches the ones it will set.
    ttl_ms: int = 0
    # logon: the new session's secret key (the request is signed with it too).
    key: str = ""
    # message-to: how long (ms) the sender waits for the receiver's receipt; 0: it wants none.
    receipt_ms: int = 0
    # delivered: the message it is the receipt for (that message's request id).
    msg: str = ""

    def payload(self) -> str:
        """The signed part of the entry: compact JSON, string values only."""
        out = {"k": self.kind, "req": self.req, "sid": self.sid, "t": str(self.sent_ms)}
        if self.wait_ms:
            out["wait"] = str(self.wait_ms)
        if self.kind == "logon":
            out |= {"name": self.name, "node": self.node, "key": self.key}
            if self.ttl_ms:
                out["ttl"] = str(self.ttl_ms)
        elif self.kind == "message-to":
            out |= {"to": self.to, "text": self.text}
            if self.receipt_ms:
                out["rc"] = str(self.receipt_ms)
        elif self.kind == "delivered":
            out["msg"] = self.msg
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def _number(fields: dict[str, Any], name: str, rule: re.Pattern[str], default: str | None) -> int:
    value = fields.get(name, default)
    if not isinstance(value, str) or not rule.fullmatch(value):
        raise ProtocolError(f"bad {name} {printable(str(value)[:20])!r}")
    return int(value)


def sign(payload: str, key: str) -> str:
    return hmac.new(bytes.fromhex(key), payload.encode(), hashlib.sha256).hexdigest()


def encode_request(request: Request, key: str) -> str:
    """One entry of the request queue: the signature, then the payload it signs."""
    payload = request.payload()
    return sign(payload, key) + payload


@dataclass(frozen=True)
class SignedRequest:
    """A decoded entry whose signature is not checked yet (the key is the coordinator's)."""

    request: Request
    mac: str
    payload: str

    def verify(self, key: str) -> bool:
        return hmac.compare_digest(self.mac, sign(self.payload, key))


def decode_request(entry: str, max_text_bytes: int) -> SignedRequest:
    """Decode and fully validate one queue entry; anything off raises ProtocolError."""
    if len(entry) > max_entry_bytes(max_text_bytes):
        raise ProtocolError(f"request of {len(entry)} characters: too long")
    mac, payload = entry[:MAC_HEX], entry[MAC_HEX:]
    if not _KEY_RE.fullmatch(mac):
        raise ProtocolError("request without a signature")
    fields = _json_object(payload, "request")
    kind = fields.get("k")
    if kind not in KINDS:
        raise ProtocolError(f"unknown request kind {printable(str(kind)[:20])!r}")
    req, sid = fields.get("req"), fields.get("sid")
    if not isinstance(req, str) or not isinstance(sid, str):
        raise ProtocolError("request without a valid req/sid id")
    if not _ID_RE.fullmatch(req) or not _ID_RE.fullmatch(sid):
        raise ProtocolError("request without a valid req/sid id")
    common: dict[str, Any] = {
        "sent_ms": _number(fields, "t", _TIME_RE, None),
        "wait_ms": _number(fields, "wait", _WAIT_RE, "0"),
    }
    ttl = _number(fields, "ttl", _WAIT_RE, "0")
    try:
        if kind == "logon":
            key = _field(fields, "key", "logon")
            if not _KEY_RE.fullmatch(key):
                raise ProtocolError("logon without a valid key")
            request = Request(
                kind,
                req,
                sid,
                name=validate_name(_field(fields, "name", "logon")),
                node=validate_node(_field(fields, "node", "logon")),
                ttl_ms=ttl,
                key=key,
                **common,
            )
        elif kind == "message-to":
            request = Request(
                kind,
                req,
                sid,
                to=validate_name(_field(fields, "to", "message")),
                text=validate_text(_field(fields, "text", "message"), max_text_bytes),
                receipt_ms=_number(fields, "rc", _WAIT_RE, "0"),
                **common,
            )
        elif kind == "delivered":
            msg = fields.get("msg")
            if not isinstance(msg, str) or not _ID_RE.fullmatch(msg):
                raise ProtocolError("receipt without a valid msg id")
            request = Request(kind, req, sid, msg=msg, **common)
        else:
            request = Request(kind, req, sid, **common)
    except InvalidInput as e:
        raise ProtocolError(e.message) from None
    return SignedRequest(request, mac, payload)


# --- events (coordinator -> client, JSON on the inbox and control channels) ---------------------


@dataclass(frozen=True)
class ReplyEvent:
    req: str
    reply: Reply


@dataclass(frozen=True)
class MessageEvent:
    sender: str
    text: str
    # The message's id when its sender asked for a receipt: the receiving client sends a
    # `delivered` request with it once it has shown the message ("": no receipt wanted).
    msg_id: str = ""


@dataclass(frozen=True)
class ReceiptEvent:
    """To a sender: the receiver's client showed message `msg` (its request id). Only the
    coordinator publishes it, and only for the session the message went to."""

    msg: str


PresenceKind = Literal["logon", "logoff"]
# Why a session ended: its user logged off; its heartbeat stopped (hung, cut off); its client's
# connection closed (a crash); a new logon found it dead and took its name or node; the server
# stopped with no standby to take over.
REASONS = ("logoff", "timeout", "crash", "replaced", "server")


@dataclass(frozen=True)
class PresenceEvent:
    """On `{p}:presence`, public: a user logged on or off, and why. No secret: no session id,
    key or inbox; only what the public user list shows anyway."""

    kind: PresenceKind
    name: str
    node: str
    at_ms: int  # when, on Redis's clock (ms since the epoch)
    reason: str = ""  # for a logoff: one of REASONS


@dataclass(frozen=True)
class StoppingEvent:
    """The coordinator is shutting down on purpose."""

    coordinator: str


@dataclass(frozen=True)
class AliveEvent:
    """The active coordinator's tick on the control channel: clients cannot read the lease, so
    this is how they know a coordinator is there. `within_ms`: the next tick comes before that,
    unless the coordinator is gone (so clients need not share its settings)."""

    coordinator: str
    within_ms: int


Event = ReplyEvent | MessageEvent | StoppingEvent | AliveEvent | ReceiptEvent | PresenceEvent


def encode_event(event: Event) -> str:
    if isinstance(event, ReplyEvent):
        return json.dumps({"t": "reply", "req": event.req, "r": event.reply.value})
    if isinstance(event, MessageEvent):
        msg = {"t": "msg", "from": event.sender, "text": event.text}
        return json.dumps(msg | ({"id": event.msg_id} if event.msg_id else {}))
    if isinstance(event, ReceiptEvent):
        return json.dumps({"t": "receipt", "msg": event.msg})
    if isinstance(event, PresenceEvent):
        presence = {"t": "presence", "ev": event.kind, "name": event.name, "node": event.node}
        presence["at"] = str(event.at_ms)
        return json.dumps(presence | ({"reason": event.reason} if event.reason else {}))
    if isinstance(event, AliveEvent):
        return json.dumps(
            {"t": "alive", "coordinator": event.coordinator, "within": str(event.within_ms)}
        )
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
        msg_id = obj.get("id", "")
        if not isinstance(msg_id, str) or (msg_id and not _ID_RE.fullmatch(msg_id)):
            raise ProtocolError("message with a bad id")
        return MessageEvent(_field(obj, "from", "message"), _field(obj, "text", "message"), msg_id)
    if t == "receipt":
        msg = _field(obj, "msg", "receipt")
        if not _ID_RE.fullmatch(msg):
            raise ProtocolError("receipt with a bad msg id")
        return ReceiptEvent(msg)
    if t == "presence":
        return _presence(obj)
    if t == "stopping":
        return StoppingEvent(_field(obj, "coordinator", "stopping event"))
    if t == "alive":
        within = _field(obj, "within", "alive event")
        if not _WAIT_RE.fullmatch(within):
            raise ProtocolError(f"bad alive interval {printable(within[:20])!r}")
        return AliveEvent(_field(obj, "coordinator", "alive event"), int(within))
    raise ProtocolError(f"unknown event type {printable(str(t)[:40])!r}")


def _presence(obj: dict[str, Any]) -> PresenceEvent:
    kind = obj.get("ev")
    if kind not in ("logon", "logoff"):
        raise ProtocolError(f"unknown presence event {printable(str(kind)[:20])!r}")
    at = _field(obj, "at", "presence event")
    if not _TIME_RE.fullmatch(at):
        raise ProtocolError(f"bad presence time {printable(at[:20])!r}")
    reason = obj.get("reason", "")
    if kind == "logoff" and reason not in REASONS:
        raise ProtocolError(f"unknown logoff reason {printable(str(reason)[:20])!r}")
    name, node = _field(obj, "name", "presence event"), _field(obj, "node", "presence event")
    return PresenceEvent(kind, name, node, int(at), reason if kind == "logoff" else "")


class User(NamedTuple):
    """One entry of the public user list; raw, so escape name and node to print them."""

    name: str
    node: str
    since: int | None  # logged on at (ms since the epoch, Redis's clock); None: not said


def decode_user(name: str, entry: str | bytes) -> User:
    """One entry of the public user list (`{p}:users`: name -> {"node", "since"}). Only the
    node is required: a `since` that is not a time reads as None."""
    obj = _json_object(entry, "user entry")
    since = obj.get("since")
    if isinstance(since, int) and not isinstance(since, bool):
        since = str(since)
    at = int(since) if isinstance(since, str) and _TIME_RE.fullmatch(since) else None
    return User(name, _field(obj, "node", "user entry"), at)


# --- the local protocol between a command and its node's client (JSON lines on a unix socket) --


@dataclass(frozen=True)
class LocalRequest:
    op: Literal["message", "logoff", "ping"]
    to: str = ""
    text: str = ""
    # How long the command waits for the answer; the client's request must not outlive it.
    wait_ms: int = 0
    # When the command stops waiting (ms since the epoch on this host's clock, which the
    # command and its client share; 0: not said). A client that reads the request late (it
    # hung) must not send what its command has given up on.
    until_ms: int = 0
    # message: how long to wait, after `sent`, for the receiver's receipt (`message --wait`);
    # the answer then says "receipt": "delivered" or "not-delivered". 0: no receipt.
    receipt_ms: int = 0


_UNTIL_RE = re.compile(r"[0-9]{1,16}")


def decode_local_request(line: bytes) -> LocalRequest:
    """Decode one line from the node socket; anything else raises ProtocolError."""
    obj = _json_object(line, "local request")
    wait = obj.get("wait_ms", "0")
    if not isinstance(wait, str) or not _WAIT_RE.fullmatch(wait):
        raise ProtocolError(f"bad wait_ms {printable(str(wait)[:20])!r}")
    until = obj.get("until_ms", "0")
    if not isinstance(until, str) or not _UNTIL_RE.fullmatch(until):
        raise ProtocolError(f"bad until_ms {printable(str(until)[:20])!r}")
    op = obj.get("op")
    if op == "message":
        to, text = _field(obj, "to", "message"), _field(obj, "text", "message")
        receipt = obj.get("receipt_ms", "0")
        if not isinstance(receipt, str) or not _WAIT_RE.fullmatch(receipt):
            raise ProtocolError(f"bad receipt_ms {printable(str(receipt)[:20])!r}")
        return LocalRequest("message", to, text, int(wait), int(until), int(receipt))
    if op in ("logoff", "ping"):
        return LocalRequest(op, wait_ms=int(wait), until_ms=int(until))
    raise ProtocolError(f"unknown local op {printable(str(op)[:40])!r}")
