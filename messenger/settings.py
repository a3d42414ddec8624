"""All configuration in one frozen dataclass, read from options or the environment."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from messenger.errors import ConfigError

ENV_PREFIX = "MESSENGER_"
# Times travel as milliseconds of at most 7 digits (see protocol); an hour is plenty.
_MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS connection to Redis (rediss://). None: not given.

    `ca_file` is a CA the server's certificate may be signed by (besides the system's CAs);
    `cert_file` and `key_file`, always both or neither, are this side's client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


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


@dataclass(frozen=True)
class Settings:
    """Everything a coordinator, client or command needs to know.

    Times are in seconds. The defaults follow the issue: heartbeat every 1 s with a 3 s TTL, a 5 s
    reply timeout (the seed's `after 5000`), and a coordinator lease short enough that clients
    notice a dead coordinator within 5 s (lease TTL + one heartbeat).
    """

    redis_url: str | None = None
    node: str = field(default_factory=socket.gethostname)
    prefix: str = "messenger"
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 3.0
    reply_timeout: float = 5.0
    lease_ttl: float = 2.0
    sweep_interval: float = 0.25
    max_message_bytes: int = 64 * 1024
    # The coordinator's limit per session (logons aside): `rate_limit` requests per second
    # after a burst of `rate_burst`; past it, requests are answered `rate-limited`. Far above
    # what a person types, far below what a loop sends (docs/security.md, "Floods").
    rate_limit: float = 20.0
    rate_burst: int = 40
    runtime_dir: Path = field(default_factory=default_runtime_dir)
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The coordinator's: the password of the Redis users it makes for clients (docs/security.md).
    # Never shown (repr) and never written anywhere by the messenger.
    client_password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
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
