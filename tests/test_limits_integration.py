"""Every text the rules allow goes through every path (command -> node socket -> request stream
-> coordinator -> receiver's inbox -> terminal), at the size limit; one byte past it is refused
with the size error, and a failure on the node socket never reads as `not-logged-on`."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from messenger import local
from messenger.client import format_message
from messenger.errors import NoResponse
from messenger.settings import Settings
from tests.harness import Procs

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024  # the README's limit, in UTF-8 bytes

# Each exactly LIMIT bytes, and each escaped differently on the way: ASCII as is, 2- and 4-byte
# UTF-8 as `\uXXXX` (one or two) in JSON, control characters as six bytes each.
AT_LIMIT = {
    "ascii": "y" * LIMIT,
    "two-byte": "é" * (LIMIT // 2),
    "four-byte": "\U0001f600" * (LIMIT // 4),
    "controls": "\x01\x1b" * (LIMIT // 2),
}


@pytest.mark.parametrize("kind", sorted(AT_LIMIT))
def test_a_message_at_the_limit_goes_through(procs: Procs, kind: str) -> None:
    text = AT_LIMIT[kind]
    assert len(text.encode()) == LIMIT
    procs.server()
    procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    code, out, err = procs.run("message", "bob", text, "--node", "n1")
    assert (code, out) == (0, ["sent"]), err
    expected = format_message("alice", text)
    bob.wait_line("^Message from alice: ")
    assert bob.out[-1] == expected


@pytest.mark.parametrize("kind", sorted(AT_LIMIT))
def test_one_byte_past_the_limit_is_the_size_error(procs: Procs, kind: str) -> None:
    procs.server()
    procs.logon("alice", "n1")
    code, out, err = procs.run("message", "bob", AT_LIMIT[kind] + "z", "--node", "n1")
    assert code == 2
    assert out == []
    assert f"message text is {LIMIT + 1} bytes; the limit is {LIMIT}" in err


def _node(procs: Procs, node: str) -> Settings:
    return Settings(node=node, runtime_dir=Path(procs.env["MESSENGER_RUNTIME_DIR"]))


def test_the_node_socket_refuses_what_is_too_big_with_a_clear_error(procs: Procs) -> None:
    procs.server()
    alice = procs.logon("alice", "n1")
    n1 = _node(procs, "n1")
    # Past the text limit but within the line limit: the client's own size check answers.
    over = {"op": "message", "to": "bob", "text": "x" * (LIMIT + 1)}
    answer = asyncio.run(local.call(n1, over, 10))
    assert answer["exit"] == "2"
    assert "limit is 65536" in answer["reply"]
    # Past any line the client reads: an answer, not a closed socket read as not-logged-on.
    path = str(local.socket_path(n1))
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.settimeout(10)
        s.sendall(b"x" * (local.line_limit(n1) + 10) + b"\n")
        answer_line = s.makefile("rb").readline()
    assert b"too large" in answer_line
    assert b'"exit": "2"' in answer_line
    assert alice.running  # and the client goes on serving its node
    code, out, _ = procs.run("message", "alice", "still", "--node", "n1")
    assert (code, out) == (0, ["sent"])


def test_a_client_that_hangs_up_without_answering_is_no_response(tmp_path: Path) -> None:
    n1 = Settings(node="n1", runtime_dir=tmp_path)
    path = local.socket_path(n1)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(hang_up, str(path))
        async with server:
            with pytest.raises(NoResponse) as caught:
                await local.call(n1, {"op": "logoff"}, 5)
        assert "without answering" in caught.value.detail

    asyncio.run(scenario())
