"""The seed's happy path through the real CLI on a real Redis."""

from __future__ import annotations

import pytest

from tests.harness import Procs

pytestmark = pytest.mark.integration


def test_two_users_chat(procs: Procs) -> None:
    procs.server()
    alice = procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    code, out, _ = procs.run("message", "bob", "hello", "bob", "--node", "n1")
    assert (code, out) == (0, ["sent"])
    bob.wait_line("^Message from alice: hello bob$")
    code, out, _ = procs.run("message", "alice", "hi", "--node", "n2")
    assert (code, out) == (0, ["sent"])
    alice.wait_line("^Message from bob: hi$")
