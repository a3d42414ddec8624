"""Other OS users on a client's host are not trusted (docs/security.md): they can read every
process's argv and environment in /proc, and may pre-create the runtime directory (or a file in
it) in a shared /tmp to make a victim's commands talk to a socket or Redis of theirs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from messenger.embedded import EmbeddedRedis
from tests.harness import Procs

pytestmark = pytest.mark.integration

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")


def test_the_embedded_password_is_in_no_argv_and_no_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []
    real_popen = subprocess.Popen

    def spy(args: list[str], **kwargs: Any) -> Any:
        seen.append({"args": args, "env": kwargs.get("env")})
        return real_popen(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    with EmbeddedRedis() as server:
        assert server.password
        assert seen
        for call in seen:
            assert not any(server.password in arg for arg in call["args"])
            assert call["env"] is None or server.password not in json.dumps(call["env"])
        for what in ("cmdline", "environ"):
            assert server.password.encode() not in Path(f"/proc/{server.pid}/{what}").read_bytes()


def test_a_messenger_server_shows_its_password_nowhere_in_proc(base_env: dict[str, str]) -> None:
    local_only = Procs(dict(base_env))
    try:
        server = local_only.server()
        info = json.loads((Path(base_env["MESSENGER_RUNTIME_DIR"]) / "server.json").read_text())
        password = info["url"].split("@")[0].rsplit(":", 1)[1].encode()
        for pid in (server.pid, info["redis_pid"]):
            for what in ("cmdline", "environ"):
                assert password not in Path(f"/proc/{pid}/{what}").read_bytes()
    finally:
        local_only.cleanup()


COMMANDS = [
    ("message", "bob", "hi"),
    ("logoff",),
    ("who",),
    ("logon", "alice"),
    ("server",),
]


def run_in(procs: Procs, runtime_dir: Path, *command: str) -> tuple[int, list[str], str]:
    """Run a command with no Redis URL (so the server file is read) in `runtime_dir`."""
    env = {k: v for k, v in procs.env.items() if k != "MESSENGER_REDIS_URL"}
    there = Procs({**env, "MESSENGER_RUNTIME_DIR": str(runtime_dir)})
    try:
        return there.run(*command)
    finally:
        there.cleanup()


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_runtime_dir_open_to_others(
    procs: Procs, tmp_path: Path, command: tuple[str, ...]
) -> None:
    shared = tmp_path / "rt"
    shared.mkdir()
    shared.chmod(0o755)
    code, out, err = run_in(procs, shared, *command)
    assert (code, out) == (2, []), err
    assert "is open to others (mode 755)" in err
    assert "Traceback" not in err


@as_root
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_runtime_dir_of_another_user(
    procs: Procs, tmp_path: Path, command: tuple[str, ...]
) -> None:
    theirs = tmp_path / "rt"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    code, out, err = run_in(procs, theirs, *command)
    assert (code, out) == (2, []), err
    assert f"belongs to uid {NOBODY}, not to you" in err


def _planted_server_file(tmp_path: Path) -> Path:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    planted = rt / "server.json"
    planted.write_text(json.dumps({"url": "redis://:theirs@127.0.0.1:1/0", "pid": os.getpid()}))
    return planted


@pytest.mark.parametrize("command", [("who",), ("logon", "alice")], ids=lambda c: c[0])
def test_a_server_file_open_to_others_is_refused(
    procs: Procs, tmp_path: Path, command: tuple[str, ...]
) -> None:
    planted = _planted_server_file(tmp_path)
    planted.chmod(0o644)
    code, out, err = run_in(procs, planted.parent, *command)
    assert (code, out) == (2, []), err
    assert "is open to others (mode 644)" in err


@pytest.mark.parametrize("command", [("who",), ("logon", "alice")], ids=lambda c: c[0])
def test_a_server_file_that_is_a_symlink_is_refused(
    procs: Procs, tmp_path: Path, command: tuple[str, ...]
) -> None:
    planted = _planted_server_file(tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    planted.rename(elsewhere)
    elsewhere.chmod(0o600)
    planted.symlink_to(elsewhere)
    code, out, err = run_in(procs, planted.parent, *command)
    assert (code, out) == (2, []), err
    assert "is a symlink" in err


@as_root
@pytest.mark.parametrize("command", [("who",), ("logon", "alice")], ids=lambda c: c[0])
def test_a_server_file_of_another_user_is_refused(
    procs: Procs, tmp_path: Path, command: tuple[str, ...]
) -> None:
    planted = _planted_server_file(tmp_path)
    planted.chmod(0o600)
    os.chown(planted, NOBODY, NOBODY)
    code, out, err = run_in(procs, planted.parent, *command)
    assert (code, out) == (2, []), err
    assert f"belongs to uid {NOBODY}, not to you" in err
