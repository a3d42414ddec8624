"""All configuration in one frozen value, read from options or the environment.

Light on purpose: `messenger message` imports this at start-up, and `dataclasses` (with the
`inspect` it imports and the code it generates) would cost that command about 10 ms, a quarter
of Python's own start. So the values are plain classes with `__slots__`, frozen and compared
field by field as frozen dataclasses are.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

from messenger.errors import ConfigError

ENV_PREFIX = "MESSENGER_"
# Times travel as milliseconds of at most 7 digits (see protocol); an hour is plenty.
_MAX_SECONDS = 3600.0


def _restore(cls: type[_Frozen], values: tuple[object, ...]) -> _Frozen:
    obj = object.__new__(cls)
    for name, value in zip(cls.__slots__, values, strict=True):
        object.__setattr__(obj, name, value)
    return obj


class _Frozen:
    """A value whose fields are its `__slots__`: immutable, equal to another of its class with
    equal fields, hashable, shown by repr (but for `_unshown`), copied and pickled whole."""

    __slots__: tuple[str, ...] = ()
    _unshown: frozenset[str] = frozenset()

    def _init(self, **values: object) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Frozen) and other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = (f"{n}={getattr(self, n)!r}" for n in self.__slots__ if n not in self._unshown)
        return f"{type(self).__name__}({', '.join(shown)})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return _restore, (type(self), self._values())


class TlsFiles(_Frozen):
    """The PEM files of a TLS connection to Redis (rediss://). None: not given.

    `ca_file` is a CA the server's certificate may be signed by (besides the system's CAs);
    `cert_file` and `key_file`, always both or neither, are this side's client certificate."""

    __slots__ = ("ca_file", "cert_file", "key_file")
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None

    def __init__(
        self,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        self._init(ca_file=ca_file, cert_file=cert_file, key_file=key_file)


_TLS_FIELDS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def _where(name: str) -> str:
    """How a user sets the field `name`: for messages that say what to change."""
    return f"--{name.replace('_', '-')} (or {ENV_PREFIX}{name.upper()})"


def _check_readable_file(name: str, path: Path) -> None:
    """A clear ConfigError now rather than an OpenSSL error at the first connection."""
    if not path.exists():
        problem = "no such file"
    elif not path.is_file():
        problem = "not a file"
    elif not os.access(path, os.R_OK):
        problem = "not readable by this user"
    else:
        return
    raise ConfigError(f"{_where(name)}: {path}: {problem}")


def default_runtime_dir() -> Path:
    """Where node sockets and the embedded server's address live: private to this OS user."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "messenger"
    return Path(f"/tmp/messenger-{os.getuid()}")


class Settings(_Frozen):
    """Everything a coordinator, client or command needs to know.

    Times are in seconds. The defaults follow the issue: heartbeat every 1 s with a 3 s TTL, a 5 s
    reply timeout (the seed's `after 5000`), and a coordinator lease short enough that clients
    notice a dead coordinator within 5 s (lease TTL + one heartbeat).
    """

    __slots__ = (  # noqa: RUF023 (in the order repr shows them)
        "redis_url",
        "node",
        "prefix",
        "heartbeat_interval",
        "heartbeat_ttl",
        "reply_timeout",
        "lease_ttl",
        "sweep_interval",
        "max_message_bytes",
        "rate_limit",
        "rate_burst",
        "runtime_dir",
        "tls_ca_file",
        "tls_cert_file",
        "tls_key_file",
        "client_password",
    )
    # Never shown (repr) and never written anywhere by the messenger.
    _unshown = frozenset({"client_password"})

    redis_url: str | None
    node: str
    prefix: str
    heartbeat_interval: float
    heartbeat_ttl: float
    reply_timeout: float
    lease_ttl: float
    sweep_interval: float
    max_message_bytes: int
    rate_limit: float
    rate_burst: int
    runtime_dir: Path
    tls_ca_file: Path | None
    tls_cert_file: Path | None
    tls_key_file: Path | None
    client_password: str | None

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        node: str | None = None,  # None: the host name
        prefix: str = "messenger",
        heartbeat_interval: float = 1.0,
        heartbeat_ttl: float = 3.0,
        reply_timeout: float = 5.0,
        lease_ttl: float = 2.0,
        sweep_interval: float = 0.25,
        max_message_bytes: int = 64 * 1024,
        # The coordinator's limit per session (logons aside): `rate_limit` requests per second
        # after a burst of `rate_burst`; past it, requests are answered `rate-limited`. Far
        # above what a person types, far below what a loop sends (docs/security.md, "Floods").
        rate_limit: float = 20.0,
        rate_burst: int = 40,
        runtime_dir: Path | None = None,  # None: default_runtime_dir()
        tls_ca_file: Path | None = None,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        # The coordinator's: the password of the Redis users it makes for clients
        # (docs/security.md).
        client_password: str | None = None,
    ) -> None:
        self._init(
            redis_url=redis_url,
            node=socket.gethostname() if node is None else node,
            prefix=prefix,
            heartbeat_interval=heartbeat_interval,
            heartbeat_ttl=heartbeat_ttl,
            reply_timeout=reply_timeout,
            lease_ttl=lease_ttl,
            sweep_interval=sweep_interval,
            max_message_bytes=max_message_bytes,
            rate_limit=rate_limit,
            rate_burst=rate_burst,
            runtime_dir=default_runtime_dir() if runtime_dir is None else runtime_dir,
            tls_ca_file=tls_ca_file,
            tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file,
            client_password=client_password,
        )
        self._check()

    def _check(self) -> None:
        for name in (
            "heartbeat_interval",
            "heartbeat_ttl",
            "reply_timeout",
            "lease_ttl",
            "sweep_interval",
        ):
            value = getattr(self, name)
            if not 0 < value <= _MAX_SECONDS:
                raise ConfigError(f"{name} must be positive and at most {_MAX_SECONDS} s")
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError("heartbeat_ttl must be longer than heartbeat_interval")
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes must be positive")
        if not (math.isfinite(self.rate_limit) and self.rate_limit > 0):
            raise ConfigError(f"{ENV_PREFIX}RATE_LIMIT must be a positive number of requests/s")
        if self.rate_burst <= 0:
            raise ConfigError(f"{ENV_PREFIX}RATE_BURST must be a positive number of requests")
        if not self.prefix or any(c in self.prefix for c in " *?[]{}"):
            raise ConfigError(f"invalid key prefix {self.prefix!r}")
        for name in _TLS_FIELDS:
            path = getattr(self, name)
            if path is not None:
                _check_readable_file(name, path)
        # One without the other cannot make a client certificate; refusing it beats a server
        # that silently sees no certificate.
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given, missing = (
                ("tls_cert_file", "tls_key_file")
                if self.tls_key_file is None
                else ("tls_key_file", "tls_cert_file")
            )
            raise ConfigError(
                f"{_where(given)} needs {_where(missing)} too: a client certificate and its key"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from MESSENGER_* variables, then explicit overrides (CLI options)."""
        env = dict(os.environ) if env is None else env
        values: dict[str, object] = {}
        casts: dict[str, type] = {
            "redis_url": str,
            "node": str,
            "prefix": str,
            "heartbeat_interval": float,
            "heartbeat_ttl": float,
            "reply_timeout": float,
            "lease_ttl": float,
            "sweep_interval": float,
            "max_message_bytes": int,
            "rate_limit": float,
            "rate_burst": int,
            "runtime_dir": Path,
            "client_password": str,
            "tls_ca_file": Path,
            "tls_cert_file": Path,
            "tls_key_file": Path,
        }
        for name, cast in casts.items():
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[name] = cast(raw)
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}{name.upper()}: not a valid {cast.__name__}: {raw!r}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    @property
    def tls(self) -> TlsFiles | None:
        """The TLS files given, or None when none is (then rediss:// uses the system's CAs)."""
        files = TlsFiles(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        return None if files == TlsFiles() else files

    @property
    def heartbeat_ttl_ms(self) -> int:
        return int(self.heartbeat_ttl * 1000)

    @property
    def reply_timeout_ms(self) -> int:
        return int(self.reply_timeout * 1000)

    @property
    def lease_ttl_ms(self) -> int:
        return int(self.lease_ttl * 1000)

    @property
    def lease_poll(self) -> float:
        """How often a coordinator renews the lease (and ticks), and a standby tries to take it."""
        return self.lease_ttl / 4

    @property
    def coordinator_grace(self) -> float:
        """How long a client may go without a sign of a coordinator before it concludes that
        none is left: a hand-over (the lease expiring, then a standby's next poll) fits in it
        with a poll and a quarter second to spare."""
        return self.lease_ttl + 2 * self.lease_poll + 0.25
