"""TLS settings, arguments and error words, without a Redis: handshakes against a bare TLS
listener on 127.0.0.1 (the real redis-server over TLS is test_tls_integration.py's)."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from redis.asyncio.connection import SSLConnection
from redis.exceptions import RedisError

from messenger.connection import connect, describe, explain
from messenger.errors import ConfigError
from messenger.settings import Settings, TlsFiles
from tests.certs import Certs

# --- settings ---------------------------------------------------------------------------------


def test_tls_files_come_from_the_environment(certs: Certs) -> None:
    env = {
        "MESSENGER_TLS_CA_FILE": str(certs.ca),
        "MESSENGER_TLS_CERT_FILE": str(certs.client_cert),
        "MESSENGER_TLS_KEY_FILE": str(certs.client_key),
    }
    settings = Settings.from_env(env)
    assert settings.tls == TlsFiles(certs.ca, certs.client_cert, certs.client_key)


def test_an_option_wins_over_the_environment(certs: Certs) -> None:
    settings = Settings.from_env({"MESSENGER_TLS_CA_FILE": "/nonexistent"}, tls_ca_file=certs.ca)
    assert settings.tls == TlsFiles(ca_file=certs.ca)


def test_no_tls_files_is_no_tls_settings() -> None:
    assert Settings.from_env({}).tls is None


@pytest.mark.parametrize("field", ["tls_ca_file", "tls_cert_file", "tls_key_file"])
def test_a_missing_tls_file_is_a_clear_config_error(
    field: str, certs: Certs, tmp_path: Path
) -> None:
    pair = {"tls_cert_file": certs.client_cert, "tls_key_file": certs.client_key}
    values = {**pair, field: tmp_path / "missing.pem"} if field in pair else {field: tmp_path}
    option, env = "--" + field.replace("_", "-"), "MESSENGER_" + field.upper()
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({}, **values)
    problem = "no such file" if field in pair else "not a file"
    assert caught.value.message == f"{option} (or {env}): {values[field]}: {problem}"


def test_an_unreadable_tls_file_is_a_clear_config_error(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root reads every file whatever its mode, so the check's answer is what is faked here.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"--tls-ca-file .*: not readable by this user$"):
        Settings(tls_ca_file=certs.ca)


def test_a_certificate_without_its_key_is_refused(certs: Certs) -> None:
    with pytest.raises(ConfigError, match=r"--tls-cert-file .* needs --tls-key-file"):
        Settings(tls_cert_file=certs.client_cert)
    with pytest.raises(ConfigError, match=r"--tls-key-file .* needs --tls-cert-file"):
        Settings(tls_key_file=certs.client_key)


# --- connect() --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "unix:///tmp/redis.sock"])
def test_tls_files_with_a_url_that_is_not_rediss_are_refused(url: str, certs: Certs) -> None:
    with pytest.raises(ConfigError, match=r"need a rediss:// \(or rediss\+sentinel://\) Redis URL"):
        connect(url, socket_timeout=1.0, tls=TlsFiles(ca_file=certs.ca))


async def test_rediss_passes_the_files_and_always_verifies(certs: Certs) -> None:
    redis = connect(
        "rediss://127.0.0.1:6380/0",
        socket_timeout=1.0,
        tls=TlsFiles(certs.ca, certs.client_cert, certs.client_key),
    )
    try:
        pool = redis.connection_pool
        assert issubclass(pool.connection_class, SSLConnection)
        kw = pool.connection_kwargs
        assert kw["ssl_cert_reqs"] == "required"
        assert kw["ssl_check_hostname"] is True
        assert kw["ssl_ca_certs"] == str(certs.ca)
        assert (kw["ssl_certfile"], kw["ssl_keyfile"]) == (
            str(certs.client_cert),
            str(certs.client_key),
        )
        assert describe(redis) == "127.0.0.1:6380/0 over TLS"
    finally:
        await redis.aclose()


async def test_rediss_without_files_verifies_against_the_system_cas() -> None:
    redis = connect("rediss://127.0.0.1:6380/0", socket_timeout=1.0)
    try:
        kw = redis.connection_pool.connection_kwargs
        assert kw["ssl_cert_reqs"] == "required"
        assert kw["ssl_ca_certs"] is None
    finally:
        await redis.aclose()


def test_a_ca_file_that_is_no_certificate_is_a_config_error(certs: Certs) -> None:
    with pytest.raises(ConfigError, match=r"^TLS CA file .*: not usable \(.*no certificate"):
        connect("rediss://127.0.0.1:6380/0", socket_timeout=1.0, tls=TlsFiles(certs.client_key))


def test_a_key_of_another_certificate_is_a_config_error(certs: Certs) -> None:
    files = TlsFiles(certs.ca, certs.client_cert, certs.stranger_key)
    with pytest.raises(ConfigError, match=r"key values mismatch.*matching the certificate$"):
        connect("rediss://127.0.0.1:6380/0", socket_timeout=1.0, tls=files)


def test_an_encrypted_key_is_refused_not_prompted_for(certs: Certs, tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(certs.client_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    files = TlsFiles(certs.ca, certs.client_cert, encrypted)
    with pytest.raises(ConfigError, match="the key unencrypted"):
        connect("rediss://127.0.0.1:6380/0", socket_timeout=1.0, tls=files)


# --- the words of a failed handshake ----------------------------------------------------------


@contextlib.contextmanager
def tls_listener(certs: Certs, *, client_certs: bool = False) -> Iterator[int]:
    """A TLS server on a free 127.0.0.1 port with the server certificate, on a thread; it speaks
    no Redis, which does not matter: every test here fails in the handshake. Yields the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    if client_certs:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs.ca)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5.0)
            # A second descriptor keeps the connection open after the TLS socket closes: what
            # the client sent after its handshake is read to its end, so that closing sends
            # a FIN, not a reset that could reach the client before OpenSSL's alert does.
            raw = socket.socket(fileno=os.dup(conn.fileno()))
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(65536)
            except OSError:  # ssl.SSLError included: the handshake failed, the alert is sent
                pass
            with raw, contextlib.suppress(OSError):
                while raw.recv(65536):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(10.0)
        listener.close()


async def failure(url: str, tls: TlsFiles | None) -> tuple[str, str]:
    """(explain(), describe()) of a PING that must fail."""
    redis = connect(url, socket_timeout=5.0, tls=tls)
    try:
        with pytest.raises(RedisError) as caught:
            await redis.ping()
        return explain(caught.value), describe(redis)
    finally:
        with contextlib.suppress(RedisError, OSError):
            await redis.aclose()


async def test_a_server_certificate_of_another_ca_is_not_trusted(certs: Certs) -> None:
    with tls_listener(certs) as port:
        said, where = await failure(f"rediss://127.0.0.1:{port}/0", TlsFiles(certs.other_ca))
    assert said.startswith("the server's TLS certificate was not trusted (")
    assert said.endswith("give the CA certificate that signed it with --tls-ca-file")
    assert "\n" not in said
    assert where == f"127.0.0.1:{port}/0 over TLS"


async def test_a_certificate_for_another_host_says_so(certs: Certs) -> None:
    with tls_listener(certs) as port:
        # The certificate names 127.0.0.1 only; `localhost` reaches the same listener.
        said, _ = await failure(f"rediss://localhost:{port}/0", TlsFiles(certs.ca))
    assert said.startswith("the server's TLS certificate was not trusted (")
    assert said.endswith("connect by a host name or address that the certificate names")


async def test_a_server_that_requires_a_client_certificate_says_so(certs: Certs) -> None:
    with tls_listener(certs, client_certs=True) as port:
        said, _ = await failure(f"rediss://127.0.0.1:{port}/0", TlsFiles(certs.ca))
    assert said.startswith("the server requires a client certificate (")
    assert said.endswith("give --tls-cert-file and --tls-key-file")


async def test_a_client_certificate_of_another_ca_is_not_accepted(certs: Certs) -> None:
    files = TlsFiles(certs.ca, certs.stranger_cert, certs.stranger_key)
    with tls_listener(certs, client_certs=True) as port:
        said, _ = await failure(f"rediss://127.0.0.1:{port}/0", files)
    assert said.startswith("the server did not accept this client certificate (")
    assert "_ssl.c" not in said
