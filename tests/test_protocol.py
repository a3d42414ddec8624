"""Pure protocol: validation, encoding, decoding. No Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from messenger.errors import InvalidInput, ProtocolError
from messenger.protocol import (
    AliveEvent,
    MessageEvent,
    Reply,
    ReplyEvent,
    Request,
    StoppingEvent,
    User,
    decode_event,
    decode_local_request,
    decode_request,
    decode_user,
    encode_event,
    encode_request,
    heartbeat_id,
    inbox_id,
    max_entry_bytes,
    printable,
    sign,
    validate_name,
    validate_node,
    validate_text,
)

SID = "a" * 32
REQ = "b" * 32


@pytest.mark.parametrize("name", ["alice", "Bob_2", "x", "a.b-c", "a" * 32])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "a" * 33, "-lead", "has space", "a*", "a?", "a[b]", "a:b", "é", "a\x1b", "a\n"]
)
def test_invalid_names_are_rejected_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidInput, match="letters, digits"):
        validate_name(name)


@pytest.mark.parametrize("node", ["n1", "host.example.org", "messenger@renat", "a" * 64])
def test_valid_nodes(node: str) -> None:
    assert validate_node(node) == node


@pytest.mark.parametrize("node", ["", "a" * 65, "n 1", "n*", "n:1", "/etc"])
def test_invalid_nodes(node: str) -> None:
    with pytest.raises(InvalidInput):
        validate_node(node)


def test_text_rules() -> None:
    assert validate_text("hé", 3) == "hé"
    with pytest.raises(InvalidInput, match="empty"):
        validate_text("", 10)
    with pytest.raises(InvalidInput, match="4 bytes; the limit is 3"):
        validate_text("héé"[:2] + "x", 3)
    with pytest.raises(InvalidInput, match="UTF-8"):
        validate_text("bad\udcff", 100)


def test_printable_escapes_terminal_control() -> None:
    assert printable("hi\x1b[2J\r\x07there\u202e") == "hi\\x1b[2J\\x0d\\x07there\\u202e"
    assert printable("plain ünïcode") == "plain ünïcode"
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # joined by zero-width joiners
    assert printable(family) == family
    assert printable("a\u2028b\ud800") == "a\\u2028b\\ud800"


KEY = "c" * 64


def entry(payload: dict[str, str], key: str = KEY) -> str:
    text = json.dumps(payload)
    return sign(text, key) + text


def test_request_round_trip_and_signature() -> None:
    req = Request("message-to", REQ, SID, to="bob", text="hello", sent_ms=1700000000123)
    signed = decode_request(encode_request(req, KEY), 100)
    assert signed.request == req
    assert signed.verify(KEY)
    assert not signed.verify("d" * 64)
    logon = Request("logon", REQ, SID, name="alice", node="n1", key=KEY, ttl_ms=3000)
    assert decode_request(encode_request(logon, KEY), 100).request == logon
    assert decode_request(encode_request(Request("logoff", REQ, SID), KEY), 100).request.kind
    waited = Request("logoff", REQ, SID, wait_ms=1234)
    assert decode_request(encode_request(waited, KEY), 100).request.wait_ms == 1234


def test_a_changed_request_no_longer_verifies() -> None:
    good = encode_request(Request("message-to", REQ, SID, to="bob", text="hi", sent_ms=5), KEY)
    for forged in (good.replace('"bob"', '"eve"'), good.replace('"5"', '"6"')):
        assert not decode_request(forged, 100).verify(KEY)


def test_inbox_and_heartbeat_ids_come_from_the_key() -> None:
    assert inbox_id(KEY) == inbox_id(KEY) != heartbeat_id(KEY)
    assert inbox_id(KEY) != inbox_id("d" * 64)
    assert len(inbox_id(KEY)) == 32
    assert KEY not in inbox_id(KEY)


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"k": "nope", "req": REQ, "sid": SID, "t": "1"},
        {"k": "logoff", "req": "short", "sid": SID, "t": "1"},
        {"k": "logoff", "req": REQ, "sid": "x" * 32, "t": "1"},
        {"k": "logoff", "req": REQ, "sid": SID},
        {"k": "logoff", "req": REQ, "sid": SID, "t": "-1"},
        {"k": "logon", "req": REQ, "sid": SID, "t": "1", "name": "bad name", "node": "n1"},
        {"k": "logon", "req": REQ, "sid": SID, "t": "1", "name": "alice", "node": "n1"},
        {"k": "logon", "req": REQ, "sid": SID, "t": "1", "name": "a", "node": "n", "key": "x"},
        {"k": "message-to", "req": REQ, "sid": SID, "t": "1", "to": "bob", "text": ""},
        {"k": "message-to", "req": REQ, "sid": SID, "t": "1", "to": "bob", "text": "x" * 101},
        {"k": "logoff", "req": REQ, "sid": SID, "t": "1", "wait": "-1"},
        {"k": "logoff", "req": REQ, "sid": SID, "t": "1", "wait": "99999999999"},
    ],
)
def test_malformed_requests_raise_protocol_error(payload: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        decode_request(entry(payload), 100)


@pytest.mark.parametrize("raw", ["", "x" * 64 + "{}", "0" * 63, "0" * 64 + "[" * 10_000])
def test_entries_without_a_signature_or_a_payload_raise_protocol_error(raw: str) -> None:
    with pytest.raises(ProtocolError):
        decode_request(raw, 100)


def test_an_entry_longer_than_any_request_is_refused_unparsed() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        decode_request("0" * 64 + " " * max_entry_bytes(100), 100)


@pytest.mark.parametrize(
    "event",
    [
        ReplyEvent(REQ, Reply.SENT),
        MessageEvent("alice", "hi ü"),
        StoppingEvent("c1"),
        AliveEvent("c", 5),
    ],
)
def test_event_round_trip(event: ReplyEvent | MessageEvent | StoppingEvent) -> None:
    assert decode_event(encode_event(event)) == event


def test_event_from_lua_cjson_decodes() -> None:
    # cjson escapes '/' and leaves UTF-8 raw; both must decode.
    assert decode_event('{"t":"msg","from":"a","text":"x\\/y ü"}') == MessageEvent("a", "x/y ü")


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xfe",
        "[]",
        "{}",
        '{"t":"reply","req":"x","r":"bogus"}',
        '{"t":"other"}',
        '{"t":"msg"}',
        "null",
        "42",
    ],
)
def test_garbage_events_raise_protocol_error(data: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_event(data)


def test_local_requests() -> None:
    assert decode_local_request(b'{"op":"message","to":"bob","text":"hi"}\n').to == "bob"
    assert decode_local_request(b'{"op":"logoff"}').op == "logoff"
    assert decode_local_request(b'{"op":"logoff","wait_ms":"1500"}').wait_ms == 1500
    with pytest.raises(ProtocolError):
        decode_local_request(b'{"op":"logoff","wait_ms":"-5"}')
    for bad in (b"", b"{}", b'{"op":"rm -rf"}', b"\xff"):
        with pytest.raises(ProtocolError):
            decode_local_request(bad)


# --- every input decodes to a result or a ProtocolError, never anything else ---------------------

# Deep nesting made Python's json recurse past its limit: a RecursionError killed the reader.
NESTED: list[str | bytes] = [
    b"[" * 100_000,
    b"{" * 100_000,
    b'{"t":' * 50_000,
    '{"t":"msg","from":"a","text":' + "[" * 100_000,
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
# Objects shaped like the real ones, with any value in any field: the decoders' type checks.
shaped = st.fixed_dictionaries(
    {"t": st.sampled_from(["reply", "msg", "stopping"]) | json_values},
    optional={
        k: json_values | st.sampled_from(["sent", REQ, "alice"])
        for k in ("req", "r", "from", "text", "coordinator")
    },
)
local_shaped = st.fixed_dictionaries(
    {"op": st.sampled_from(["message", "logoff", "ping"]) | json_values},
    optional={k: json_values | st.just("1500") for k in ("to", "text", "wait_ms")},
)


def _inputs(shape: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return (
        st.binary(max_size=200)
        | st.sampled_from([v if isinstance(v, bytes) else v.encode() for v in NESTED])
        | json_values.map(lambda v: json.dumps(v).encode())
        | shape.map(lambda v: json.dumps(v).encode())
    )


@pytest.mark.parametrize("data", NESTED)
def test_deeply_nested_json_is_a_protocol_error(data: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_event(data)
    with pytest.raises(ProtocolError):
        decode_local_request(data if isinstance(data, bytes) else data.encode())


@settings(max_examples=400, deadline=None)
@given(_inputs(shaped))
def test_decode_event_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        event = decode_event(data)
    except ProtocolError:
        return
    assert isinstance(event, ReplyEvent | MessageEvent | StoppingEvent)
    assert all(isinstance(v, str) for v in vars(event).values())


@settings(max_examples=400, deadline=None)
@given(_inputs(local_shaped))
def test_decode_local_request_never_raises_anything_but_protocol_error(data: bytes) -> None:
    try:
        req = decode_local_request(data)
    except ProtocolError:
        return
    assert req.op in ("message", "logoff", "ping")
    assert isinstance(req.to, str)
    assert isinstance(req.text, str)
    assert isinstance(req.wait_ms, int)


request_payloads = st.fixed_dictionaries(
    {"k": st.sampled_from(["logon", "message-to", "logoff"]) | st.text(max_size=5)},
    optional={
        k: st.text(max_size=40) | st.sampled_from([REQ, SID, KEY, "1700000000000", "alice"])
        for k in ("req", "sid", "t", "wait", "ttl", "name", "node", "to", "text", "key")
    },
)


@settings(max_examples=400, deadline=None)
@given(
    st.text(max_size=300)
    | request_payloads.map(entry)
    | request_payloads.map(lambda p: "0" * 64 + json.dumps(p))
)
def test_decode_request_never_raises_anything_but_protocol_error(raw: str) -> None:
    try:
        signed = decode_request(raw, 100)
    except ProtocolError:
        return
    assert signed.request.kind in ("logon", "message-to", "logoff")
    assert isinstance(signed.verify(KEY), bool)


@given(st.text())
def test_printable_is_the_same_on_its_ascii_fast_path(text: str) -> None:
    """The fast path (plain ASCII text returned as it is) agrees with the look at each
    character: what it returns has no control character, and escaping is only ever needed
    outside printable ASCII."""
    out = printable(text)
    assert all(ch == "\\" or " " <= ch <= "~" or ord(ch) > 0x7F for ch in out)
    if all(" " <= ch <= "~" for ch in text):
        assert out == text
    assert printable(out) == out  # escaped text is printable as it is


@pytest.mark.parametrize(
    ("entry", "since"),
    [
        ('{"node": "n1", "since": "1700000000123"}', 1700000000123),  # as the Lua writes it
        ('{"node": "n1", "since": 1700000000123}', 1700000000123),
        ('{"node": "n1"}', None),
        ('{"node": "n1", "since": "soon"}', None),
        ('{"node": "n1", "since": true}', None),
        ('{"node": "n1", "since": "9999999999999999999"}', None),
    ],
)
def test_a_user_entry_needs_a_node_and_may_say_since_when(entry: str, since: int | None) -> None:
    assert decode_user("alice", entry) == User("alice", "n1", since)


@pytest.mark.parametrize("entry", ['{"since": "1"}', '{"node": 1}', "[]", "n1", b"\xff"])
def test_a_user_entry_without_a_node_is_refused(entry: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_user("alice", entry)
