"""Certificates the tests make for themselves (trustme): nothing secret is checked in, and
nothing expires in the repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certs:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate signed by
    it, and a second CA with a client certificate of its own (what a server must not trust)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path


def make_certs(directory: Path) -> Certs:
    ca, other = trustme.CA(), trustme.CA()
    # The address clients connect to: redis-py checks the host name (here, the IP) too.
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("messenger-client.test")
    stranger = other.issue_cert("stranger.test")
    certs = Certs(
        ca=directory / "ca.pem",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
        stranger_cert=directory / "stranger.crt",
        stranger_key=directory / "stranger.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca))
    other.cert_pem.write_to_path(str(certs.other_ca))
    for leaf, cert, key in (
        (server, certs.server_cert, certs.server_key),
        (client, certs.client_cert, certs.client_key),
        (stranger, certs.stranger_cert, certs.stranger_key),
    ):
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
    return certs
