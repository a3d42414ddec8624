"""Redis Sentinel: a primary, a replica and three sentinels (one redis-server binary), and a
failover during traffic that the coordinator and the clients follow.

The messenger reaches Redis through `redis+sentinel://` URLs: every new connection asks the
sentinels where the primary is, so a process whose connection broke reaches the new primary on
its next attempt. What has to happen after a failover, and what each test checks:

- the client users are on the replica before any failover (ACL users are not replicated: the
  coordinator makes them on every replica itself), so the clients are let in on the new primary
  at once; the coordinator gets a RedisError and serves again on the new primary;
- messages flow again, new logons work, the user list holds exactly the live clients (no ghost)
  and no name twice;
- after a manual failover, whose old primary Sentinel demotes only some 10 s later, the
  coordinator leaves it within a second or two and takes the clients with it, so nothing is
  written there meanwhile (a logoff there would come back as a ghost when it resyncs).

Every process (redis-servers, sentinels, messenger) is started here and ended by its PID.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from messenger import acl
from messenger.embedded import EmbeddedRedis, find_redis_server, free_port
from messenger.errors import ConfigError
from messenger.keys import USERS_PLACEHOLDER, Keys
from tests.harness import Proc, Procs, wait_until

pytestmark = pytest.mark.integration

SERVICE = "mymaster"
CLIENT_PASSWORD = "client-" + secrets.token_hex(8)
# Long enough to outlast a failover: a session whose heartbeat key lives through it survives.
LONG_TTL = "20"
FAILOVER_DEADLINE = 40.0  # seconds for the sentinels to agree on a new primary (and demote)
# After SENTINEL FAILOVER: seconds until the coordinator serves on the new primary and clients
# talk through it. It takes 1-2 s; Sentinel itself demotes the old primary only after some 10 s,
# which is when everything followed before the coordinator looked for itself.
FOLLOW_BOUND = 6.0


def _sync(port: int, password: str | None) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )


@dataclass
class SentinelCluster:
    """A primary, a replica and three sentinels on free 127.0.0.1 ports, all behind passwords.

    The data servers are EmbeddedRedis (configuration on stdin, so the admin password is in no
    argv); a sentinel must have its configuration in a file it can rewrite, so that file is
    written (0600) in a private temporary directory, which is removed at the end."""

    binary: str
    admin_password: str = field(default_factory=lambda: secrets.token_hex(16))
    sentinel_password: str = field(default_factory=lambda: secrets.token_hex(16))
    servers: list[EmbeddedRedis] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    sentinel_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mt-sentinel-")))

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> SentinelCluster:
        # Both data servers take the same admin password, and each may replicate from the other:
        # after a failover the old primary becomes a replica of the new one.
        common = {"masterauth": self.admin_password}
        primary = EmbeddedRedis(password=self.admin_password, extra_config=common)
        primary.binary = self.binary
        self.servers.append(primary.start())
        replica = EmbeddedRedis(
            password=self.admin_password,
            extra_config={**common, "replicaof": f"127.0.0.1 {primary.port}"},
        )
        replica.binary = self.binary
        self.servers.append(replica.start())
        wait_until(self._replica_in_sync, 15.0, "the replica to sync with the primary")
        for i in range(3):
            self._start_sentinel(i, primary.port)
        wait_until(self._sentinels_see_everyone, 20.0, "the sentinels to see each other")
        return self

    def _start_sentinel(self, i: int, primary_port: int) -> None:
        port = free_port()
        directory = self.workdir / f"sentinel-{i}"
        directory.mkdir(mode=0o700)
        conf = directory / "sentinel.conf"
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            "daemonize no",
            f'dir "{directory}"',
            f'logfile "{directory / "sentinel.log"}"',
            # The sentinels' own password (clients give it as ?sentinel_password=); they use it
            # with each other too, so all three have the same.
            f"requirepass {self.sentinel_password}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
            f"sentinel auth-pass {SERVICE} {self.admin_password}",
            # Short timings, so a test sees a failover within seconds.
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 4000",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        proc = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.sentinel_procs.append(proc)
        self.sentinel_ports.append(port)

        def up() -> bool:
            if proc.poll() is not None:
                log = directory / "sentinel.log"
                said = log.read_text(errors="replace")[-800:] if log.exists() else ""
                raise AssertionError(f"sentinel {i} exited ({proc.returncode}): {said}")
            try:
                with self.sentinel(i) as s:
                    return bool(s.ping())
            except redis.RedisError:
                return False

        wait_until(up, 10.0, f"sentinel {i} to answer")

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # --- looking at it ------------------------------------------------------------------------

    def sentinel(self, i: int) -> redis.Redis:
        return _sync(self.sentinel_ports[i], self.sentinel_password)

    def server_on(self, port: int) -> redis.Redis:
        return _sync(port, self.admin_password)

    def server(self, port: int) -> EmbeddedRedis:
        return next(s for s in self.servers if s.port == port)

    def primary_port(self, i: int = 0) -> int | None:
        """The primary's port as sentinel `i` sees it; None if it cannot say."""
        try:
            with self.sentinel(i) as s:
                found = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        except redis.RedisError:
            return None
        return None if not found else int(found[1])

    def role(self, port: int) -> str | None:
        try:
            with self.server_on(port) as r:
                return str(r.execute_command("ROLE")[0])
        except redis.RedisError:
            return None

    def _replica_in_sync(self) -> bool:
        with self.server_on(self.servers[1].port) as r:
            info = r.info("replication")
        return bool(info.get("master_link_status") == "up")

    def _sentinels_see_everyone(self) -> bool:
        for i in range(3):
            with self.sentinel(i) as s:
                state = s.sentinel_master(SERVICE)
                replicas = s.sentinel_slaves(SERVICE)
            if int(state["num-other-sentinels"]) < 2 or len(replicas) < 1:
                return False
        return True

    def wait_for_new_primary(self, old: int, *, demoted: bool) -> tuple[int, float]:
        """Wait until every sentinel names a primary other than `old`, and that server says it is
        a primary (and, with `demoted`, the old one says it is a replica now); return its port and
        the seconds it took."""
        found: list[int] = []

        def moved() -> bool:
            ports = {self.primary_port(i) for i in range(3)}
            if len(ports) != 1 or None in ports or old in ports:
                return False
            (new,) = ports
            assert new is not None
            if self.role(new) != "master" or (demoted and self.role(old) != "slave"):
                return False
            found[:] = [new]
            return True

        took = wait_until(moved, FAILOVER_DEADLINE, f"a failover away from port {old}")
        return found[0], took

    # --- URLs ---------------------------------------------------------------------------------

    def url(self, userinfo: str) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{userinfo}@{hosts}/{SERVICE}/0?sentinel_password={self.sentinel_password}"

    def admin_url(self) -> str:
        return self.url(f":{self.admin_password}")

    def client_url(self, prefix: str) -> str:
        return self.url(f"{prefix}-client:{CLIENT_PASSWORD}")


def _sentinel_binary() -> str:
    """The binary the other integration tests use; skip if it has no sentinel mode."""
    try:
        binary = find_redis_server()
    except ConfigError as e:
        pytest.skip(f"no redis-server: {e.message}")
    out = subprocess.run(
        [binary, "--sentinel"], capture_output=True, text=True, timeout=10, check=False
    )
    said = out.stdout + out.stderr
    # A binary with sentinel mode refuses to start without a config file, and says so; one
    # without it would start as a plain server (or refuse the option) and say nothing of that.
    if "Sentinel needs config file" not in said:
        pytest.skip(f"{binary} has no sentinel mode (it said: {said.strip()[-200:]!r})")
    return binary


@pytest.fixture
def cluster() -> Iterator[SentinelCluster]:
    c = SentinelCluster(_sentinel_binary())
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def sentinel_procs(cluster: SentinelCluster, base_env: dict[str, str]) -> Iterator[Procs]:
    """Processes as deployed behind Sentinel: the coordinator with the admin credential and the
    client password, every client with the client credential; all with a heartbeat TTL that
    outlasts a failover."""
    prefix = base_env["MESSENGER_PREFIX"]
    procs = Procs(
        {
            **base_env,
            "MESSENGER_REDIS_URL": cluster.client_url(prefix),
            "MESSENGER_HEARTBEAT_TTL": LONG_TTL,
        },
        server_env={
            "MESSENGER_REDIS_URL": cluster.admin_url(),
            "MESSENGER_CLIENT_PASSWORD": CLIENT_PASSWORD,
        },
    )
    try:
        yield procs
    finally:
        procs.cleanup()


# --- helpers ------------------------------------------------------------------------------------


class Traffic:
    """`messenger message TO ...` from one node, over and over, on a thread: the traffic a
    failover happens in. Records (when, exit code, reply) of every attempt."""

    def __init__(self, procs: Procs, node: str, to: str) -> None:
        self.procs, self.node, self.to = procs, node, to
        # (started, ended, exit code, reply) of `traffic N`, N = index + 1
        self.results: list[tuple[float, float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            started = time.monotonic()
            code, out, _ = self.procs.run("message", self.to, f"traffic {n}", "--node", self.node)
            self.results.append((started, time.monotonic(), code, out[0] if out else ""))
            self._stop.wait(0.3)

    def sent_after(self, moment: float) -> int:
        return sum(1 for _, ended, _, reply in self.results if ended > moment and reply == "sent")

    def first_sent_since(self, moment: float) -> tuple[str, float] | None:
        """The text of the first message sent that was started after `moment`, and when its
        `sent` came back."""
        for n, (started, ended, _, reply) in enumerate(list(self.results), 1):
            if started > moment and reply == "sent":
                return f"traffic {n}", ended
        return None


def _users(r: redis.Redis, keys: Keys) -> dict[str, str]:
    users = {str(k): str(v) for k, v in r.hgetall(keys.users).items()}
    users.pop(USERS_PLACEHOLDER, None)
    return users


def _client_connections(cluster: SentinelCluster, port: int, prefix: str) -> int | None:
    """How many connections of the client users (heartbeats included) the server on `port` has;
    None if it cannot say."""
    users = acl.users_of(prefix)
    try:
        with cluster.server_on(port) as r:
            return sum(1 for c in r.client_list() if c.get("user") in users)
    except redis.RedisError:
        return None


def _wait_users_on_replicas(cluster: SentinelCluster, primary: int, prefix: str) -> None:
    """The coordinator puts the client users on every replica as it becomes active (ACL users
    are not replicated), so that a promoted replica lets the clients in before it has served
    there."""
    for replica in (s.port for s in cluster.servers if s.port != primary):
        with cluster.server_on(replica) as r:

            def there(r: redis.Redis = r) -> bool:
                return all(r.acl_getuser(u) is not None for u in acl.users_of(prefix))

            wait_until(there, 10.0, f"the client users on the replica on port {replica}")


def _lines(proc: Proc, pattern: str) -> int:
    return sum(1 for line in proc.err if re.search(pattern, line))


def _send(procs: Procs, node: str, to: str, text: str) -> tuple[int, str]:
    code, out, _ = procs.run("message", to, text, "--node", node)
    return code, out[0] if out else ""


def _check_after_failover(
    cluster: SentinelCluster,
    procs: Procs,
    server: Proc,
    new: int,
    live: dict[str, Proc],
) -> None:
    """What holds after a failover whatever the clients do: the coordinator serves on the new
    primary with the client users re-created there, new logons work and talk, no name is taken
    twice, and the user list ends up holding exactly the clients that run."""
    keys = Keys(procs.env["MESSENGER_PREFIX"])
    prefix = keys.prefix
    # The coordinator follows: one failed attempt logged, then active again, on the new primary.
    wait_until(lambda: _lines(server, "is active") >= 2, 20.0, "the coordinator to be active again")
    assert _lines(server, r"Redis at sentinel service mymaster via ") >= 1, server.err[-10:]
    with cluster.server_on(new) as r:
        # ACL users are not replicated: the coordinator made them there (on the replica, and
        # again when it became active there).
        assert r.acl_getuser(f"{prefix}-client") is not None
        assert r.acl_getuser(f"{prefix}-client-hb") is not None
    assert server.running, server.err[-10:]
    # New logons work, and messages flow between them.
    carol = procs.logon("carol", "n3")
    dave = procs.logon("dave", "n4")
    live.update(carol=carol, dave=dave)
    assert _send(procs, "n3", "dave", "after the failover") == (0, "sent")
    dave.wait_line("^Message from carol: after the failover$", 10.0)
    # No name twice: a second carol is refused while the first is logged on.
    code, out, _ = procs.run("logon", "carol", "--node", "n9")
    assert (code, out) == (1, ["user-exists-at-other-node"]), out
    # No ghost: the user list on the new primary is exactly the clients still running (sessions
    # of clients that stopped go once their heartbeat key expires there).
    with cluster.server_on(new) as r:

        def exact() -> bool:
            running = {name for name, p in live.items() if p.running}
            return set(_users(r, keys)) == running

        wait_until(exact, float(LONG_TTL) + 10.0, "the user list to be exactly the live clients")
        names = {str(k): str(v) for k, v in r.hgetall(keys.names).items()}
        assert len(set(names.values())) == len(names), names  # one session per name


def _check_clients_stayed(procs: Procs, alice: Proc, bob: Proc, since: float, t: Traffic) -> None:
    """The intended behaviour (issue 12): clients whose heartbeat TTL outlasts the failover stay
    logged on across it and receive messages again."""
    for who in (alice, bob):
        assert who.running, f"{who.args} stopped across the failover: {who.out} {who.err[-5:]}"
    wait_until(lambda: t.sent_after(since) >= 2, 30.0, "alice's traffic to be `sent` again")
    assert "noconnection" not in alice.out + bob.out
    code, reply = _send(procs, "n1", "bob", "still here")
    assert (code, reply) == (0, "sent")
    bob.wait_line("^Message from alice: still here$", 10.0)


# --- tests --------------------------------------------------------------------------------------


def test_sentinel_failover_during_traffic_is_followed(
    cluster: SentinelCluster, sentinel_procs: Procs
) -> None:
    procs = sentinel_procs
    keys = Keys(procs.env["MESSENGER_PREFIX"])
    server = procs.server()
    alice = procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    # One client whose heartbeat TTL may not outlast the failover.
    erin = procs.logon("erin", "n5", MESSENGER_HEARTBEAT_TTL="2")
    # One who logs off as soon as the clients have followed.
    frank = procs.logon("frank", "n6")
    assert _send(procs, "n1", "bob", "before") == (0, "sent")
    bob.wait_line("^Message from alice: before$", 10.0)
    old = cluster.primary_port()
    assert old is not None
    _wait_users_on_replicas(cluster, old, keys.prefix)
    with Traffic(procs, "n1", "bob") as traffic:
        wait_until(lambda: traffic.sent_after(0) >= 1, 20.0, "traffic to flow")
        failed_over = time.monotonic()
        with cluster.sentinel(1) as s:
            assert s.execute_command("SENTINEL", "FAILOVER", SERVICE)
        # Sentinel promotes the replica within a second or two, but it demotes the old primary
        # only some 10 s later, and until then the old one takes writes (lost when it resyncs).
        new, took = cluster.wait_for_new_primary(old, demoted=False)
        print(f"failover: new primary on port {new} after {took:.1f} s")

        # The coordinator does not wait for that: it serves on the new primary (where it made the
        # client users) ...
        def active_on_new() -> bool:
            if _lines(server, "is active") < 2:
                return False
            with cluster.server_on(new) as r:
                return r.acl_getuser(acl.users_of(keys.prefix)[0]) is not None

        wait_until(active_on_new, FAILOVER_DEADLINE, "the coordinator to serve on the new primary")
        active = time.monotonic() - failed_over
        # ... and no client is left on the old one, which the sentinels may not have demoted yet.
        wait_until(
            lambda: _client_connections(cluster, old, keys.prefix) == 0,
            FAILOVER_DEADLINE,
            "the clients to leave the old primary",
        )
        left = time.monotonic()
        # A logoff now is applied on the new primary, so it is not lost when the old one resyncs.
        code, out, err = procs.run("logoff", "--node", "n6")
        assert (code, out) == (0, ["logged-off"]), f"{err} / frank: {frank.err[-5:]}"
        assert frank.wait_exit(10.0) == 0
        # alice stayed logged on: a message she sends now goes through the new primary to bob.
        wait_until(lambda: traffic.first_sent_since(left) is not None, 30.0, "a message via new")
        found = traffic.first_sent_since(left)
        assert found is not None
        text, sent = found
        bob.wait_line(f"^Message from alice: {text}$", 10.0)
        delivered = sent - failed_over
        print(
            f"after SENTINEL FAILOVER: coordinator active on the new primary in {active:.1f} s, "
            f"clients off the old one in {left - failed_over:.1f} s, a message sent through "
            f"the new one in {delivered:.1f} s"
        )
        assert active < FOLLOW_BOUND, f"the coordinator took {active:.1f} s to follow"
        assert delivered < FOLLOW_BOUND, f"messages took {delivered:.1f} s to flow again"

        # Sentinel demotes the old primary and it resyncs from the new one: frank stays gone.
        cluster.wait_for_new_primary(old, demoted=True)
        with cluster.server_on(old) as r:
            wait_until(
                lambda: r.info("replication").get("master_link_status") == "up",
                FAILOVER_DEADLINE,
                "the old primary to resync from the new one",
            )
            assert "frank" not in _users(r, keys)
        with cluster.server_on(new) as r:
            assert "frank" not in _users(r, keys)
        # erin's short TTL may or may not have outlived the clients' move: either she is still
        # logged on, or she was told (noconnection, exit 3) and can log on again at once.
        if not erin.running or "noconnection" in erin.out:
            assert erin.wait_exit(10.0) == 3
            assert "noconnection" in erin.out
            erin = procs.logon("erin", "n5", MESSENGER_HEARTBEAT_TTL="2")
        live = {"alice": alice, "bob": bob, "erin": erin}
        _check_after_failover(cluster, procs, server, new, live)
        _check_clients_stayed(procs, alice, bob, left, traffic)


def test_sigkilled_primary_is_replaced_and_followed(
    cluster: SentinelCluster, sentinel_procs: Procs
) -> None:
    procs = sentinel_procs
    keys = Keys(procs.env["MESSENGER_PREFIX"])
    server = procs.server()
    alice = procs.logon("alice", "n1")
    bob = procs.logon("bob", "n2")
    assert _send(procs, "n1", "bob", "before") == (0, "sent")
    bob.wait_line("^Message from alice: before$", 10.0)
    old = cluster.primary_port()
    assert old is not None
    _wait_users_on_replicas(cluster, old, keys.prefix)
    with Traffic(procs, "n1", "bob") as traffic:
        wait_until(lambda: traffic.sent_after(0) >= 1, 20.0, "traffic to flow")
        killed = cluster.server(old)
        os.kill(killed.pid, signal.SIGKILL)
        # The sentinels see it down after down-after-milliseconds (1 s), agree, and promote.
        new, took = cluster.wait_for_new_primary(old, demoted=False)
        print(f"failover: new primary on port {new} after {took:.1f} s (old one killed)")
        moved = time.monotonic()
        live = {"alice": alice, "bob": bob}
        _check_after_failover(cluster, procs, server, new, live)
        _check_clients_stayed(procs, alice, bob, moved, traffic)
