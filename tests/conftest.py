from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from messenger.embedded import EmbeddedRedis
from tests.harness import Procs


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


@pytest.fixture
def procs(redis_server: EmbeddedRedis, base_env: dict[str, str]) -> Iterator[Procs]:
    """Start `messenger` processes against the shared real Redis; all are ended after the test."""
    factory = Procs({**base_env, "MESSENGER_REDIS_URL": redis_server.url})
    yield factory
    factory.cleanup()
