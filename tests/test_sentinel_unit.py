"""Sentinel URLs without any server: parsing, the errors a user sees, redaction, describe()."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    SentinelConnectionPool,
    SentinelManagedSSLConnection,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from messenger import acl, coordinator
from messenger.cli import main
from messenger.connection import (
    PrimaryMoved,
    SentinelRedis,
    SentinelUrl,
    check_url,
    connect,
    describe,
    explain,
    parse_sentinel_url,
    primary_moved,
    redact,
)
from messenger.coordinator import Coordinator
from messenger.embedded import free_port
from messenger.errors import ConfigError
from messenger.settings import Settings, TlsFiles
from tests.certs import Certs

HOSTS = "h1:26379,h2:26380,[::1]:26381"
SETTINGS = Settings(redis_url="redis://fake", node="test", prefix="u")


def test_a_full_url_is_parsed() -> None:
    url = f"redis+sentinel://messenger-client:p%40ss@{HOSTS}/mymaster/3?sentinel_password=sp"
    assert parse_sentinel_url(url) == SentinelUrl(
        tls=False,
        sentinels=(("h1", 26379), ("h2", 26380), ("::1", 26381)),
        service="mymaster",
        db=3,
        username="messenger-client",
        password="p@ss",
        sentinel_password="sp",
    )


def test_defaults_port_db_and_no_credentials() -> None:
    parsed = parse_sentinel_url("rediss+sentinel://sentinel.example/prod-redis")
    assert parsed == SentinelUrl(
        tls=True, sentinels=(("sentinel.example", 26379),), service="prod-redis"
    )
    assert parse_sentinel_url("redis+sentinel://:pw@h/s/").password == "pw"
    assert parse_sentinel_url("redis+sentinel://:pw@h/s/").db == 0


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+sentinel://h1:26379", "no service name"),
        ("redis+sentinel://h1:26379/", "no service name"),
        ("redis+sentinel:///mymaster", "no sentinel address"),
        ("redis+sentinel://:pw@/mymaster", "no sentinel address"),
        ("redis+sentinel://h1:26379,,h2/mymaster", "empty sentinel address"),
        ("redis+sentinel://h1:26379,/mymaster", "empty sentinel address"),
        ("redis+sentinel://h1:port/mymaster", "port must be a number"),
        ("redis+sentinel://h1:0/mymaster", "port must be a number"),
        ("redis+sentinel://h1:65536/mymaster", "port must be a number"),
        ("redis+sentinel://h1:/mymaster", "port must be a number"),
        ("redis+sentinel://h1:26379/mymaster/x", "database number"),
        ("redis+sentinel://h1:26379/mymaster/1/2", "database number"),
        ("redis+sentinel://h1:26379/mymaster/123456", "database number"),
        ("redis+sentinel://h1:26379/my%20master", "service name"),
        ("redis+sentinel://h1/s?ssl_cert_reqs=none", "unknown option 'ssl_cert_reqs'"),
        ("redis+sentinel://h1/s?sentinel_password=a&sentinel_password=b", "given twice"),
        ("redis+sentinel://h1/s#frag", "fragment"),
    ],
)
def test_bad_urls_are_config_errors_that_say_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match="invalid Redis Sentinel URL") as caught:
        check_url(url)
    assert words in caught.value.message


def test_the_cli_says_it_in_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["who", "--redis-url", "redis+sentinel://:secret@h1:26379,h2:x/mymaster"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "sentinel address 'h2:x'" in err
    assert "secret" not in err


def test_an_unknown_scheme_names_the_sentinel_ones() -> None:
    with pytest.raises(ConfigError, match=r"redis\+sentinel://"):
        check_url("sentinel://h1/mymaster")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"redis+sentinel://messenger-client:topsecret@{HOSTS}/mymaster/0",
            f"redis+sentinel://messenger-client:***@{HOSTS}/mymaster/0",
        ),
        (
            "redis+sentinel://:topsecret@h1/s?sentinel_password=topsecret",
            "redis+sentinel://:***@h1/s?sentinel_password=***",
        ),
        (
            "redis+sentinel://h1/s?sentinel_username=u&sentinel_password=topsecret",
            "redis+sentinel://h1/s?sentinel_username=u&sentinel_password=***",
        ),
        ("redis+sentinel://h1,h2/s", "redis+sentinel://h1,h2/s"),
    ],
)
def test_redact_hides_both_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_a_bad_url_error_never_shows_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        check_url("redis+sentinel://u:topsecret@h1/s/x?sentinel_password=topsecret2")
    assert "topsecret" not in caught.value.message


def test_connect_gives_a_client_of_the_services_primary() -> None:
    url = f"redis+sentinel://messenger-client:pw@{HOSTS}/mymaster/2?sentinel_password=sp"
    redis = connect(url, socket_timeout=2.0, name="messenger-test")
    assert isinstance(redis, SentinelRedis)
    pool = redis.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    kw = pool.connection_kwargs
    # The same fail-fast options as a plain URL's; the URL's credential is the servers'.
    assert kw["username"] == "messenger-client"
    assert kw["password"] == "pw"
    assert kw["db"] == 2
    assert kw["decode_responses"] is True
    assert kw["encoding_errors"] == "replace"
    assert kw["protocol"] == 2
    assert kw["client_name"] == "messenger-test"
    assert kw["socket_timeout"] == 2.0
    assert kw["retry"].get_retries() == 0
    sentinels = pool.sentinel_manager.sentinels
    assert len(sentinels) == 3
    for sentinel in sentinels:  # the sentinels' own credential, and no retries either
        skw = sentinel.connection_pool.connection_kwargs
        assert skw["password"] == "sp"
        assert skw["retry"].get_retries() == 0
    assert describe(redis) == "sentinel service mymaster via h1:26379,h2:26380,[::1]:26381/2"
    pool.master_address = ("10.0.0.7", 6380)  # as after a connection was made
    assert describe(redis) == (
        "sentinel service mymaster via h1:26379,h2:26380,[::1]:26381 (primary 10.0.0.7:6380)/2"
    )
    asyncio.run(redis.aclose())


def test_sentinels_without_a_password_get_none() -> None:
    redis = connect("redis+sentinel://:pw@h1/mymaster", socket_timeout=1.0)
    pool = redis.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert (
        pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs.get("password") is None
    )
    asyncio.run(redis.aclose())


def test_rediss_sentinel_is_tls_to_the_servers(certs: Certs) -> None:
    redis = connect(
        "rediss+sentinel://:pw@h1/mymaster", socket_timeout=1.0, tls=TlsFiles(ca_file=certs.ca)
    )
    pool = redis.connection_pool
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    assert pool.connection_kwargs["ssl_check_hostname"] is True
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    assert describe(redis).endswith(" over TLS")
    asyncio.run(redis.aclose())


def test_tls_files_need_rediss_sentinel(certs: Certs) -> None:
    with pytest.raises(ConfigError, match=r"rediss\+sentinel://"):
        connect("redis+sentinel://h1/mymaster", socket_timeout=1.0, tls=TlsFiles(ca_file=certs.ca))


def test_heartbeat_url_keeps_scheme_hosts_service_and_options() -> None:
    url = f"redis+sentinel://messenger-client:p%40ss@{HOSTS}/mymaster/0?sentinel_password=sp"
    hb = acl.heartbeat_url(url)
    assert (
        hb == f"redis+sentinel://messenger-client-hb:p%40ss@{HOSTS}/mymaster/0?sentinel_password=sp"
    )
    parsed = parse_sentinel_url(hb)
    assert parsed.username == "messenger-client-hb"
    assert parsed.password == "p@ss"
    assert parsed.sentinels == parse_sentinel_url(url).sentinels
    assert acl.heartbeat_url(f"redis+sentinel://:admin@{HOSTS}/mymaster") is None


def test_no_sentinel_answering_is_explained_in_words() -> None:
    port = free_port()  # nothing listens there
    redis = connect(f"redis+sentinel://:pw@127.0.0.1:{port}/mymaster", socket_timeout=1.0)

    async def ping() -> str:
        try:
            await redis.ping()
        except RedisError as e:
            return explain(e)
        finally:
            await redis.aclose()
        raise AssertionError("a ping without any sentinel answered")

    said = asyncio.run(ping())
    assert said.startswith("no sentinel named a primary that is up"), said
    assert f"127.0.0.1:{port}" in said
    assert "<redis." not in said  # redis-py's client reprs are reduced to host:port
    assert "service name" in said


# --- primary_moved, close_clients_on and the coordinator's use of them ----------------------------

OLD, NEW = ("10.0.0.1", 6379), ("10.0.0.2", 6379)


class FakeSentinel:
    """One sentinel's SENTINEL MASTERS, as redis-py parses it (or the error it raises)."""

    def __init__(self, names: tuple[str, int] | Exception) -> None:
        self.names = names
        self.asked = 0

    async def sentinel_masters(self) -> dict[str, dict[str, Any]]:
        self.asked += 1
        if isinstance(self.names, Exception):
            raise self.names
        host, port = self.names
        return {"mymaster": {"ip": host, "port": port, "is_master": True}}


class FakeManager:
    """The sentinel manager of a pool: discover_master asks the first sentinel, as redis-py's."""

    def __init__(self, *names: tuple[str, int] | Exception) -> None:
        self.sentinels = [FakeSentinel(n) for n in names]
        self.discovered = 0

    async def discover_master(self, service: str) -> tuple[str, int]:
        assert service == "mymaster"
        self.discovered += 1
        first = self.sentinels[0].names
        if isinstance(first, Exception):
            raise MasterNotFoundError(f"No master found for {service!r}")
        return first

    async def aclose(self) -> None:
        pass


def _sentinel_client(manager: FakeManager, on: tuple[str, int] | None = OLD) -> Redis:
    redis = connect(f"redis+sentinel://:pw@{HOSTS}/mymaster", socket_timeout=1.0)
    pool = redis.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    pool.sentinel_manager = manager
    pool.master_address = on  # where its connections go, as after one was made
    return redis


def test_primary_moved_is_none_at_once_without_sentinel(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = connect(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1.0)

    def no_io(*_: object, **__: object) -> None:
        raise AssertionError("primary_moved made a connection for a client of one Redis")

    monkeypatch.setattr(redis.connection_pool, "get_connection", no_io)
    assert asyncio.run(primary_moved(redis)) is None


def test_primary_not_moved_costs_one_sentinel_answer() -> None:
    manager = FakeManager(OLD, OLD, OLD)
    assert asyncio.run(primary_moved(_sentinel_client(manager))) is None
    assert manager.discovered == 1
    assert [s.asked for s in manager.sentinels] == [0, 0, 0]
    # No connection made yet: nothing to compare with, nothing asked.
    fresh = FakeManager(NEW, NEW, NEW)
    assert asyncio.run(primary_moved(_sentinel_client(fresh, on=None))) is None
    assert fresh.discovered == 0


def test_primary_moved_once_most_sentinels_name_another() -> None:
    lost = RedisConnectionError("a sentinel is down")
    Names = list[tuple[tuple[str, int] | Exception, ...]]
    moves: Names = [(NEW, NEW, NEW), (NEW, NEW, OLD), (NEW, lost, NEW)]
    for names in moves:
        moved = asyncio.run(primary_moved(_sentinel_client(FakeManager(*names))))
        assert moved == PrimaryMoved(OLD, NEW), names
        assert str(moved) == "the sentinels name 10.0.0.2:6379 as primary now, not 10.0.0.1:6379"
    # One sentinel alone (cut off during a failover, say) is not enough: the old address would
    # be acted on (CLIENT KILL there) while the others still name it.
    too_few: Names = [(NEW, OLD, OLD), (NEW, lost, lost), (NEW, OLD, lost)]
    for names in too_few:
        assert asyncio.run(primary_moved(_sentinel_client(FakeManager(*names)))) is None, names


def test_primary_moved_is_no_news_when_no_sentinel_answers() -> None:
    manager = FakeManager(RedisConnectionError("down"), RedisConnectionError("down"))
    assert asyncio.run(primary_moved(_sentinel_client(manager))) is None


def test_the_coordinator_checks_only_with_sentinel(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(redis: Redis) -> None:
        raise AssertionError("checked a client of one Redis")

    monkeypatch.setattr(coordinator, "primary_moved", never)
    plain = Coordinator(connect("redis://127.0.0.1:1/0", socket_timeout=1.0), SETTINGS)
    asyncio.run(plain.follow_primary())


def test_the_coordinator_leaves_a_demoted_primary(monkeypatch: pytest.MonkeyPatch) -> None:
    """It closes the clients' connections on the old address only, drops its own and raises
    ConnectionError (run() connects again, through the sentinels); no move: nothing."""
    closed_on: list[tuple[str, int]] = []
    answer: list[PrimaryMoved | None] = [None]

    async def moved(redis: Redis) -> PrimaryMoved | None:
        return answer[0]

    async def close(redis: Redis, address: tuple[str, int]) -> int:
        closed_on.append(address)
        return 7

    monkeypatch.setattr(coordinator, "primary_moved", moved)
    monkeypatch.setattr(coordinator, "close_clients_on", close)
    c = Coordinator(_sentinel_client(FakeManager(OLD)), SETTINGS)

    async def go() -> None:
        await c.follow_primary()
        assert closed_on == []
        answer[0] = PrimaryMoved(OLD, NEW)
        with pytest.raises(RedisConnectionError, match=r"not 10\.0\.0\.1:6379; closed 7 client"):
            await c.follow_primary()

    asyncio.run(go())
    assert closed_on == [OLD]


def test_a_slow_sentinel_answer_is_read_at_the_next_refresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sentinels that are slow never hold a lease refresh up for long; a check does not outlive
    the activation it was started in (a standby must never act on one)."""
    answered = asyncio.Event()

    async def slow(redis: Redis) -> PrimaryMoved | None:
        await answered.wait()
        return PrimaryMoved(OLD, NEW)

    async def close(redis: Redis, address: tuple[str, int]) -> int:
        return 0

    monkeypatch.setattr(coordinator, "primary_moved", slow)
    monkeypatch.setattr(coordinator, "close_clients_on", close)
    c = Coordinator(_sentinel_client(FakeManager(OLD)), SETTINGS)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await c.follow_primary()  # not answered yet: nothing happens
        await c.follow_primary()  # the same check, still running: no second one
        assert loop.time() - started < 0.5
        answered.set()
        await asyncio.sleep(0)
        with pytest.raises(RedisConnectionError):
            await c.follow_primary()
        answered.clear()
        await c.follow_primary()
        check = c._primary_check
        assert check is not None
        assert not check.done()
        c._stop_following()  # as serve() does when it ends
        await asyncio.sleep(0)
        assert check.cancelled()
        assert c._primary_check is None

    asyncio.run(go())
