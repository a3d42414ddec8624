"""Finding and connecting to Redis, with failures that surface fast.

redis-py retries failed commands by default (with backoff up to about a second) and quietly
reconnects pub/sub. A messenger client must notice a lost Redis within seconds, so every
connection here has no retries and short timeouts; callers turn RedisError into NoConnection.

A `redis+sentinel://` URL names Redis Sentinels and a service instead of one Redis: each new
connection asks the sentinels where the service's primary is now, so a process that reconnects
after a failover (a broken connection is a RedisError like any other) reaches the new primary.
An open connection is not told: after a failover the old primary keeps taking writes until
Sentinel demotes it (some 10 s later), so the coordinator asks (`primary_moved`) and closes the
connections there itself (`close_clients_on`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    InvalidResponse,
    NoPermissionError,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from messenger import private
from messenger.errors import ConfigError, NoConnection
from messenger.settings import Settings, TlsFiles

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_TLS_SCHEMES = ("rediss", "rediss+sentinel")
_SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)
_DB_PATH = re.compile(r"/?[0-9]{0,5}")
_DB = re.compile(r"[0-9]{1,5}")
SENTINEL_PORT = 26379  # Sentinel's own default port
# A Sentinel service (master) name as written in sentinel.conf: it is also sent to the sentinels
# as a command argument, so nothing that could be mistaken for a separator.
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HOST = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>.*))?|(?P<host>[^:\[\]]+)(?::(?P<port>.*))?"
)
# The only query options of a Sentinel URL: the sentinels' own credential (most run without one).
# Anything else is refused rather than passed on, so nothing in the URL can turn TLS checks off.
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
# One sentinel's failure in a MasterNotFoundError: `<redis...host=H,port=P,...)>)>)> - error`.
_SENTINEL_FAILURE = re.compile(
    r"<redis\.\S*?Redis\(.*?host=([^,]+),port=(\d+),.*?\)>\)>\)> - (.*?)(?=, <redis\.|$)"
)
_PASSWORD_PARAM = re.compile(r"(?i)((?:^|&)[^=&]*password=)[^&]*")
# OpenSSL's verify codes for a certificate of another host (by name, by IP address): the CA is
# fine there, so the advice differs.
_X509_V_ERR_HOSTNAME_MISMATCH = (62, 64)

SERVER_FILE = "server.json"


def server_file(settings: Settings) -> Path:
    """Where an embedded Redis's address (with its password) is kept for same-host clients."""
    return settings.runtime_dir / SERVER_FILE


def resolve_url(settings: Settings) -> str:
    """The configured Redis URL, else the one the local embedded server published."""
    if settings.redis_url:
        return settings.redis_url
    path = server_file(settings)
    try:
        private.check_dir(settings.runtime_dir)
        data = json.loads(private.read_file(path))
        url, pids = str(data["url"]), [int(data[k]) for k in ("pid", "redis_pid") if k in data]
    except FileNotFoundError:
        raise NoConnection(
            "no Redis URL configured (--redis-url / MESSENGER_REDIS_URL) and no `messenger "
            f"server` with an embedded Redis runs on this host (looked for {path})"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ConfigError(f"unreadable server file {path}: {e}") from None
    gone = [pid for pid in pids if not _process_exists(pid)]
    if gone:
        # A server killed with -9 cannot remove its file; its Redis died with it.
        raise NoConnection(
            f"the messenger server recorded in {path} is gone (pid {gone[0]} is not running): "
            "start one with `messenger server`, or pass --redis-url"
        )
    return url


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone's process: not ours to judge, so the connection will tell
    return True


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `redis[s]+sentinel://[user[:password]@]host[:port][,host[:port]...]/service[/db]`.

    `username`/`password` are the Redis servers' (the primary's, and a replica's once promoted);
    `sentinel_username`/`sentinel_password` (query options) the sentinels' own, if they have one.
    """

    tls: bool
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a Sentinel URL; a ConfigError that says what is wrong with it otherwise.

    urlsplit cannot read a list of hosts (its `port` fails on `h1:1,h2:2`), so the host list,
    the path and the options are read here."""
    shown = redact(url)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid Redis Sentinel URL {shown!r}: {why}")

    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise bad("the scheme must be redis+sentinel:// or rediss+sentinel://")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hostlist:
        raise bad("no sentinel address (host:port[,host:port...]) after the scheme")
    sentinels = tuple(_sentinel_address(entry, bad) for entry in hostlist.split(","))
    service, db = _service_and_db(parts.path, bad)
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _SENTINEL_OPTIONS:
            raise bad(f"unknown option {key!r} (only {', '.join(_SENTINEL_OPTIONS)})")
        if key in options:
            raise bad(f"option {key!r} given twice")
        options[key] = value
    if parts.fragment:
        raise bad("a URL fragment (#...) means nothing here")
    return SentinelUrl(
        tls=parts.scheme == "rediss+sentinel",
        sentinels=sentinels,
        service=service,
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def _sentinel_address(entry: str, bad: Any) -> tuple[str, int]:
    if not entry:
        raise bad("an empty sentinel address in the host list (two commas, or a trailing one)")
    found = _HOST.fullmatch(entry)
    if found is None:
        raise bad(f"sentinel address {entry!r} is not host[:port]")
    host = found["v6"] or found["host"]
    port = found["p6"] if found["v6"] else found["port"]
    if port is None:
        return host, SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise bad(f"sentinel address {entry!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def _service_and_db(path: str, bad: Any) -> tuple[str, int]:
    names = path[1:].split("/") if path.startswith("/") else []
    if not names or not names[0]:
        raise bad("no service name: the path must be /<service>[/<database number>]")
    service = unquote(names[0])
    if not _SERVICE.fullmatch(service):
        raise bad(
            f"service name {service!r}: letters, digits, '.', '_' and '-' only, starting with "
            "a letter or a digit"
        )
    if len(names) > 2 or (len(names) == 2 and names[1] and not _DB.fullmatch(names[1])):
        raise bad(f"after /{names[0]} only /<database number> may follow, not {path!r}")
    return service, int(names[1]) if len(names) == 2 and names[1] else 0


def check_url(url: str) -> str:
    """Refuse a URL that redis-py would quietly misread (e.g. `/xyz` as database 0)."""
    if is_sentinel(url):
        parse_sentinel_url(url)
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as e:
        raise ConfigError(f"invalid Redis URL {redact(url)!r}: {e}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"invalid Redis URL {redact(url)!r}: the scheme must be one of "
            + ", ".join(f"{s}://" for s in _SCHEMES)
        )
    if parts.scheme != "unix" and not _DB_PATH.fullmatch(parts.path):
        raise ConfigError(
            f"invalid Redis URL {redact(url)!r}: after host:port only /<database number> may "
            f"follow, not {parts.path!r}"
        )
    return url


def redact(url: str) -> str:
    """The URL with its password replaced, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        # A Sentinel URL may carry the sentinels' password as an option, too.
        query = _PASSWORD_PARAM.sub(r"\1***", parts.query)
        if parts.password is None and query == parts.query:
            return url
        if parts.password is not None:
            user = parts.username or ""
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{user}:***@{host}")
        return urlunsplit(parts._replace(query=query))
    except ValueError:
        return "<unparsable URL>"


def describe(redis: Redis) -> str:
    """Where a client connects, without its password: for messages that say what was tried."""
    pool = redis.connection_pool
    kw = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        return _describe_sentinel(redis, pool)
    if "path" in kw:
        return f"unix://{kw['path']}"
    where = f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
    if issubclass(redis.connection_pool.connection_class, SSLConnection):
        return f"{where} over TLS"
    return where


def _describe_sentinel(redis: Redis, pool: SentinelConnectionPool) -> str:
    """`sentinel service S via h1:p1,h2:p2 (primary h:p)/db`: the sentinels in the URL's order
    (redis-py reorders its own list), and the primary they named last, if any yet."""
    addresses = getattr(redis, "sentinel_addresses", None) or [
        (
            s.connection_pool.connection_kwargs.get("host", "?"),
            s.connection_pool.connection_kwargs.get("port", "?"),
        )
        for s in pool.sentinel_manager.sentinels
    ]
    via = ",".join(f"[{h}]:{p}" if ":" in str(h) else f"{h}:{p}" for h, p in addresses)
    primary = "" if pool.master_address is None else " (primary {}:{})".format(*pool.master_address)
    db = pool.connection_kwargs.get("db", 0)
    where = f"sentinel service {pool.service_name} via {via}{primary}/{db}"
    if issubclass(pool.connection_class, SSLConnection):
        return f"{where} over TLS"
    return where


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a redis-py error: redis-py raises its own ConnectionError while
    handling the ssl module's, which stays reachable as the context."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _ssl_words(error: Exception) -> str:
    """OpenSSL's message without the C source location, which tells a user nothing."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(error)).strip() or type(error).__name__


def _explain_tls(error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        advice = (
            "connect by a host name or address that the certificate names"
            if error.verify_code in _X509_V_ERR_HOSTNAME_MISMATCH
            else "give the CA certificate that signed it with --tls-ca-file"
        )
        return f"the server's TLS certificate was not trusted ({error.verify_message}): {advice}"
    said = _ssl_words(error)
    if error.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return (
            f"the server requires a client certificate ({said}): give --tls-cert-file and "
            "--tls-key-file"
        )
    if error.reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return f"the server did not accept this client certificate ({said})"
    return f"TLS failed ({said})"


def explain(error: RedisError) -> str:
    """One line that says what went wrong with Redis, in words a user can act on."""
    tls_error = _ssl_cause(error)
    if tls_error is not None:
        return _explain_tls(tls_error)
    said = str(error).rstrip(". ") or type(error).__name__
    if isinstance(error, MasterNotFoundError):
        # redis-py names each sentinel that failed by its client's whole repr (every option):
        # keep host:port and the error of each.
        failed = [f"{host}:{port}: {why}" for host, port, why in _SENTINEL_FAILURE.findall(said)]
        head = said.partition(" : ")[0]
        return (
            f"no sentinel named a primary that is up ({'; '.join([head, *failed])}): check the "
            "sentinels' addresses and the service name"
        )
    if isinstance(error, InvalidResponse):
        return f"that is not a Redis server (it answered: {said})"
    if isinstance(error, AuthenticationError | AuthorizationError | NoPermissionError):
        return f"Redis refused these credentials ({said})"
    if isinstance(error, RedisTimeoutError):
        return f"no answer in time ({said})"
    return said


def tls_arguments(url: str, tls: TlsFiles | None) -> dict[str, Any]:
    """redis-py's TLS arguments for `url`: none for redis:// and unix://, which refuse TLS files.

    For rediss:// the server's certificate is always verified, host name included. The files
    are loaded once here, so a bad one is a ConfigError now, not a TLS error at every attempt.
    """
    if urlsplit(url).scheme not in _TLS_SCHEMES:
        if tls is not None:
            raise ConfigError(
                "--tls-ca-file, --tls-cert-file and --tls-key-file need a rediss:// (or "
                "rediss+sentinel://) Redis URL, "
                f"and the Redis URL is {redact(url)!r}"
            )
        return {}
    tls = tls or TlsFiles()
    ca, cert, key = (
        None if p is None else str(p) for p in (tls.ca_file, tls.cert_file, tls.key_file)
    )
    # As redis-py builds it: the system's CAs, plus the CA file if one is given.
    context = ssl.create_default_context()
    try:
        if ca is not None:
            context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"TLS CA file {ca}: not usable ({_ssl_words(e)})") from None
    try:
        if cert is not None:
            # An empty password: an encrypted key fails here instead of OpenSSL prompting on
            # the terminal (a server or a client must never hang on a hidden prompt).
            context.load_cert_chain(cert, key, password="")
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(
            f"TLS client certificate {cert} with key {key}: not usable ({_ssl_words(e)}); "
            "both must be PEM, the key unencrypted and matching the certificate"
        ) from None
    return {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": ca,
        "ssl_certfile": cert,
        "ssl_keyfile": key,
        "ssl_password": "",
    }


class SentinelRedis(Redis):
    """A client of a Sentinel-managed primary: closing it also closes its connections to the
    sentinels (redis-py leaves those to whoever made the Sentinel), and it remembers the
    sentinels in the URL's order for `describe`."""

    sentinel_addresses: tuple[tuple[str, int], ...] = ()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            pool = self.connection_pool
            if isinstance(pool, SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


def connect(
    url: str,
    *,
    socket_timeout: float | None,
    name: str = "messenger",
    tls: TlsFiles | None = None,
) -> Redis:
    """A client that fails fast instead of retrying (see the module docstring).

    `tls`: the CA and client certificate files for a rediss:// URL (None: the system's CAs
    and no client certificate); given with any other URL, a ConfigError."""
    check_url(url)
    tls_kwargs = tls_arguments(url, tls)
    options: dict[str, Any] = {
        "decode_responses": True,
        # Bytes that are not UTF-8 (from a rogue writer) must not crash a reader: they decode
        # to U+FFFD and then fail validation like any other bad input.
        "encoding_errors": "replace",
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout or 5.0, 5.0),
        "retry": Retry(NoBackoff(), 0),
        "client_name": name,
        # RESP2 on purpose: under RESP3 redis-py 8 mis-parses a decoded PONG on a subscribed
        # connection, and the client relies on pub/sub PINGs to detect a half-open socket.
        "protocol": 2,
    }
    if is_sentinel(url):
        return _connect_sentinel(parse_sentinel_url(url), options, tls_kwargs)
    try:
        return Redis.from_url(url, **options, **tls_kwargs)
    except ValueError as e:
        raise ConfigError(f"invalid Redis URL: {e}") from None


def _connect_sentinel(
    parsed: SentinelUrl, options: dict[str, Any], tls_kwargs: dict[str, Any]
) -> Redis:
    """A client of the service's primary, wherever the sentinels say it is when a connection is
    made. redis-py asks them at every new connection, and turns a READONLY reply (a connection
    to a primary demoted meanwhile) into a ConnectionError that drops that connection; a
    sentinel demoting a primary also kills its clients' connections. Either way the caller sees
    a RedisError, and its next connection goes to the new primary."""
    # The sentinels get the same fail-fast options (no retries, short timeouts), their own
    # credential if any, and never TLS: they hand out addresses, the data goes to the servers.
    sentinel_options = {
        key: options[key]
        for key in ("socket_timeout", "socket_connect_timeout", "retry", "client_name")
    }
    sentinel_options["decode_responses"] = True
    if parsed.sentinel_password is not None:
        sentinel_options["password"] = parsed.sentinel_password
        sentinel_options["username"] = parsed.sentinel_username
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    redis: SentinelRedis = sentinel.master_for(
        parsed.service,
        redis_class=SentinelRedis,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.tls,
        **options,
        **tls_kwargs,
    )
    redis.sentinel_addresses = parsed.sentinels
    return redis


Address = tuple[str, int]


def _address(found: Any) -> Address:
    host, port = found
    return str(host), int(port)


def _shown(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class PrimaryMoved:
    """The sentinels name `new` as the primary while a client's connections go to `old`."""

    old: Address
    new: Address

    def __str__(self) -> str:
        return f"the sentinels name {_shown(self.new)} as primary now, not {_shown(self.old)}"


async def primary_moved(redis: Redis) -> PrimaryMoved | None:
    """Whether the sentinels name another primary than the one `redis` connects to (the one
    its pool last got from them); None at once, with no I/O, for a client of one Redis.

    While nothing moved this is one round trip, to the sentinel that answered last. A move
    counts only once most of the URL's sentinels name the same new primary: one that was cut
    off during a failover may name an old primary for a while, and the caller acts on the old
    address (close_clients_on), which must never be one the sentinels still name.

    Sentinels that do not answer are no news (None), not an error: the primary's own connection
    tells whether Redis is usable, and an outage of the sentinels alone must not stop a
    coordinator that is serving (a RedisError would make it start over at every check)."""
    pool = redis.connection_pool
    if not isinstance(pool, SentinelConnectionPool) or pool.master_address is None:
        return None
    old = _address(pool.master_address)
    manager = pool.sentinel_manager
    try:
        new = _address(await manager.discover_master(pool.service_name))
        if new == old:
            return None
        # SENTINEL MASTERS, as discover_master asks: a sentinel user allowed that is enough.
        answers = await asyncio.gather(
            *(s.sentinel_masters() for s in manager.sentinels), return_exceptions=True
        )
    except (RedisError, OSError):
        return None
    agreeing = sum(1 for masters in answers if _names(masters, pool.service_name, new))
    return PrimaryMoved(old, new) if 2 * agreeing > len(manager.sentinels) else None


def _names(masters: Any, service: str, address: Address) -> bool:
    """Whether one sentinel's SENTINEL MASTERS answer (or its error) names `address`."""
    state = masters.get(service) if isinstance(masters, dict) else None
    return isinstance(state, dict) and _address((state["ip"], state["port"])) == address


@contextlib.asynccontextmanager
async def _straight_to(redis: Redis, address: Address) -> AsyncIterator[SentinelManagedConnection]:
    """A connection of its own made straight to the server at `address`, with the credentials
    and TLS of `redis`'s pool, never one of the pool's: one of those may reconnect on use, and
    it would reconnect to whatever the sentinels name now. Raises RedisError."""
    pool = redis.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        raise TypeError("for clients of a Sentinel-managed primary only")
    connection = pool.connection_class(**pool.connection_kwargs)
    assert isinstance(connection, SentinelManagedConnection)
    try:
        await connection.connect_to(address)  # type: ignore[no-untyped-call]
        yield connection
    finally:
        await connection.disconnect()


async def close_clients_on(redis: Redis, address: Address) -> int:
    """Close every client connection (normal and pub/sub) on the server at `address`, as Sentinel
    does when it demotes a primary; return how many. Raises RedisError. SKIPME keeps our own
    connection to the end."""
    async with _straight_to(redis, address) as connection:
        closed = 0
        for kind in ("pubsub", "normal"):
            await connection.send_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
            closed += int(await connection.read_response())
        return closed


async def on_replicas(
    redis: Redis, commands: list[tuple[str, ...]], timeout: float
) -> list[tuple[Address, str]]:
    """Run `commands` on every replica the sentinels name for `redis`'s primary, each over a
    connection straight to it with the pool's credentials; [] at once for a client of one
    Redis. Returns each replica's address with "" if all went through, else why not: one
    replica that is down or refuses must not keep the others from being done.

    For what Redis does not replicate (ACL users): a replica the sentinels promote must
    already have them."""
    pool = redis.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return []
    try:
        found = await pool.sentinel_manager.discover_slaves(pool.service_name)
    except (RedisError, OSError):
        return []  # no news from the sentinels: next time

    async def run(address: Address) -> str:
        async with _straight_to(redis, address) as connection:
            for command in commands:
                await connection.send_command(*command)
                await connection.read_response()
        return ""

    replicas = [_address(a) for a in found]
    results = await asyncio.gather(
        *(asyncio.wait_for(run(a), timeout) for a in replicas), return_exceptions=True
    )
    said = []
    for address, result in zip(replicas, results, strict=True):
        if isinstance(result, RedisError):
            said.append((address, explain(result)))
        elif isinstance(result, TimeoutError | OSError):
            said.append(
                (address, "no answer in time" if isinstance(result, TimeoutError) else str(result))
            )
        elif isinstance(result, BaseException):
            raise result
        else:
            said.append((address, ""))
    return said
