"""tests/netns.py itself: hosts reach each other, faults really drop packets, nothing is left.

Root only (skips elsewhere, saying why); CI runs as root.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from messenger.embedded import EmbeddedRedis
from tests.harness import Procs, wait_until
from tests.netns import STATE_DIR, Network, clean_stale, network, sh

pytestmark = pytest.mark.integration
__all__ = ["network"]  # the fixture, imported for pytest


def _echo_server(net: Network, name: str) -> tuple[subprocess.Popen[str], int]:
    """A one-line TCP echo server inside host `name`, on a fixed port."""
    host = net.hosts[name]
    port = 7100
    code = (
        "import socket,sys\n"
        f"s=socket.create_server(('{host.ip}',{port}));print('up',flush=True)\n"
        "while True:\n"
        " c,_=s.accept()\n"
        " d=c.recv(100)\n"
        " c.sendall(d);c.close()\n"
    )
    proc = subprocess.Popen(
        host.argv([sys.executable, "-c", code]), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    return proc, port


def _rtt(ip: str, port: int, timeout: float = 1.0) -> float | None:
    """Seconds for connect + one echo from the root namespace; None if it timed out."""
    start = time.monotonic()
    try:
        with socket.create_connection((ip, port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"x")
            if s.recv(10) != b"x":
                return None
    except OSError:
        return None
    return time.monotonic() - start


def test_hosts_faults_and_pids(network: Network) -> None:
    a = network.add_host("ha")
    b = network.add_host("hb")
    server, port = _echo_server(network, "ha")
    try:
        assert _rtt(a.ip, port) is not None  # the root namespace reaches a host
        # Host to host, and the PID ip netns exec gives is the command's own.
        probe = (
            "import socket,os;print(os.getpid(),flush=True);"
            f"s=socket.create_connection(('{a.ip}',{port}),2);s.sendall(b'y');print(s.recv(9))"
        )
        proc = subprocess.Popen(b.argv([sys.executable, "-c", probe]), stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=10)
        assert out.split()[0] == str(proc.pid).encode()
        assert b"b'y'" in out

        for fault, undo in ((a.link_down, a.link_up), (a.cut, a.heal)):
            fault()
            assert _rtt(a.ip, port, 0.5) is None, f"{fault.__name__} let packets through"
            undo()
            wait_until(lambda: _rtt(a.ip, port) is not None, 5.0, f"{undo.__name__}")

        base = min(r for r in (_rtt(a.ip, port) for _ in range(3)) if r is not None)
        backend = a.netem(100, 0, 0)
        rtts = [_rtt(a.ip, port, 3.0) for _ in range(3)]
        print(f"\n[netem] backend {backend}: rtts {rtts}, unshaped {base:.4f}s")
        # connect + echo = two packets toward the host, each delayed 100 ms
        assert all(r is not None and r >= 0.18 for r in rtts), rtts
        a.clear_netem()
        assert (_rtt(a.ip, port) or 1.0) < 0.1
    finally:
        server.kill()
        server.wait(5)
        assert server.stdout is not None
        server.stdout.close()


def test_embedded_redis_in_a_host_and_restart(network: Network) -> None:
    host = network.add_host("r")
    server = EmbeddedRedis(
        host=host.ip, wrapper=host.wrap, extra_config={"appendonly": "yes", "appendfsync": "always"}
    )
    with server:
        import redis

        r = redis.Redis.from_url(server.url)
        r.set("k", "v")
        port, pid = server.port, server.pid
        assert sh("ip", "netns", "pids", host.ns).stdout.split() == [str(pid)]
        server.kill()
        server.restart()
        assert (server.port, server.pid != pid) == (port, True)
        assert r.get("k") == b"v"  # persisted, same dir
        r.close()


def test_procs_wrap_runs_messenger_inside_the_host(network: Network, tmp_path: object) -> None:
    host = network.add_host("p")
    procs = Procs({"PYTHONUNBUFFERED": "1", "PATH": "/usr/sbin:/usr/bin:/bin"})
    try:
        proc = procs.start("--help", wrap=host.wrap)
        assert proc.wait_exit(15) == 0
        sleeper = procs.start_module("http.server", "--help", wrap=host.wrap)
        sleeper.wait_exit(15)
    finally:
        procs.cleanup()


def test_cleanup_and_stale_runs() -> None:
    with Network() as net:
        host = net.add_host("x")
        sleeper = subprocess.Popen(host.argv(["sleep", "60"]))
    assert sleeper.wait(5) == -signal.SIGKILL  # the run's own process, ended at exit
    assert host.ns not in sh("ip", "netns", "list").stdout
    assert net.bridge not in sh("ip", "link").stdout

    # A run whose owner died (SIGKILL: no cleanup) is removed by the next one.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os,signal\n"
            "from tests.netns import Network\n"
            "n=Network().__enter__(); h=n.add_host('y'); print(n.run_id, h.ns, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    run_id, ns = child.stdout.split()
    assert ns in sh("ip", "netns", "list").stdout
    assert json.loads((STATE_DIR / f"run-{run_id}.json").read_text())["namespaces"] == [ns]
    assert run_id in clean_stale()
    assert ns not in sh("ip", "netns", "list").stdout
    assert f"mb{run_id}" not in sh("ip", "link").stdout
    assert not (STATE_DIR / f"run-{run_id}.json").exists()
