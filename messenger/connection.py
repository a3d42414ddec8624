"""Finding and connecting to Redis, with failures that surface fast.

redis-py retries failed commands by default (with backoff up to about a second) and quietly
reconnects pub/sub. A messenger client must notice a lost Redis within seconds, so every
connection here has no retries and short timeouts; callers turn RedisError into NoConnection.
"""

from __future__ import annotations

import json
import os
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
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

_SCHEMES = ("redis", "rediss", "unix")
_DB_PATH = re.compile(r"/?[0-9]{0,5}")
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


def check_url(url: str) -> str:
    """Refuse a URL that redis-py would quietly misread (e.g. `/xyz` as database 0)."""
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
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparsable URL>"


def describe(redis: Redis) -> str:
    """Where a client connects, without its password: for messages that say what was tried."""
    kw = redis.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    where = f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
    if issubclass(redis.connection_pool.connection_class, SSLConnection):
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
    if urlsplit(url).scheme != "rediss":
        if tls is not None:
            raise ConfigError(
                "--tls-ca-file, --tls-cert-file and --tls-key-file need a rediss:// Redis URL, "
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
    try:
        return Redis.from_url(
            url,
            decode_responses=True,
            # Bytes that are not UTF-8 (from a rogue writer) must not crash a reader: they
            # decode to U+FFFD and then fail validation like any other bad input.
            encoding_errors="replace",
            socket_timeout=socket_timeout,
            socket_connect_timeout=min(socket_timeout or 5.0, 5.0),
            retry=Retry(NoBackoff(), 0),
            client_name=name,
            # RESP2 on purpose: under RESP3 redis-py 8 mis-parses a decoded PONG on a subscribed
            # connection, and the client relies on pub/sub PINGs to detect a half-open socket.
            protocol=2,
            **tls_kwargs,
        )
    except ValueError as e:
        raise ConfigError(f"invalid Redis URL: {e}") from None
