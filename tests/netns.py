"""Hosts made of Linux network namespaces, with real faults between them (root only).

    with Network() as net:                       # a bridge in the root namespace, 10.X.0.254/24
        redis_host = net.add_host("redis")       # netns m<run>-redis, eth0 10.X.0.1/24
        c1 = net.add_host("c1")                  # 10.X.0.2, ...
        proc = subprocess.Popen(c1.argv(["python", "-m", "messenger", ...]))
        c1.link_down(); c1.link_up()             # partition / heal: the host's link goes down
        c1.cut(); c1.heal()                      # cut off in the bridge, its link still up
        c1.netem(100, 50, 5.0); c1.clear_netem() # delay ± jitter (ms), loss (%) toward the host

Layout: one bridge `mb<run>` in the root namespace holds the address 10.X.0.254, so the test
process itself reaches every host (e.g. Redis with the admin credential, a node's unix socket is
a path and works across namespaces anyway). Each host is a namespace `m<run>-<name>` with `lo`
and `eth0` (10.X.0.N/24), the inner end of a veth pair whose outer end `mv<run><N>` is a port of
the bridge. `<run>` is 4 random hex digits and X is a /24 no other interface uses, so concurrent
runs (other sessions on the machine) never collide.

The faults, each of which drops packets silently (no RST, no FIN), so only timeouts notice:
- `link_down()`/`link_up()`: the bridge-side veth goes down/up (the host's cable pulled);
- `cut()`/`heal()`: the link stays up, but an nftables `bridge` table of this run drops every
  frame to or from the host's port, the bridge's own address included (if `nft` is missing the
  port leaves the bridge instead, `nomaster`);
- `netem(delay_ms, jitter_ms, loss_pct)`: `tc qdisc replace dev <veth> root netem ...` on the
  bridge-side veth (so on packets toward the host). Kernels built without `sch_netem` (this
  machine's and CI's) get the same on the same packets from user space: an iptables NFQUEUE rule
  on the host's eth0 input and tests/netem_queue.py holding each packet in the kernel for its
  delay (see there). `Host.netem_backend` says which ran ("tc" or "nfqueue").

Processes run inside a host with `host.argv(cmd)`, i.e. `ip netns exec <ns> cmd...`: `ip` execs
the command in place, so the PID that Popen returns is the command's own and signals sent to it
(SIGKILL, SIGSTOP) hit the process itself. Pass `host.wrap` to tests/harness.py's `Procs` methods
(`wrap=`) and to EmbeddedRedis (`wrapper=`).

Cleanup: `Network.__exit__` kills what is still running inside its namespaces (only those: they
are this run's), deletes the namespaces, veths, the nft table and the bridge. The same runs at
exit (atexit) and on SIGTERM while a network is open (turned into KeyboardInterrupt, so pytest's
finalizers run). A run killed with SIGKILL leaves a state file in STATE_DIR naming its owner's PID
and start time; the next `Network()` removes whatever such a dead owner left (`clean_stale()`).

`network` is a module-scoped pytest fixture (import it into a test module): it skips outside
root ("needs root for ip netns (CI runs as root)") and where `ip` is missing, saying why; CI runs
as root with iproute2, so there it never skips.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

STATE_DIR = Path("/tmp/messenger-netns")
ROOT_REASON = "needs root for ip netns (CI runs as root)"


def skip_reason() -> str | None:
    """Why these fixtures cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return ROOT_REASON
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2) for network namespaces"
    return None


def sh(*cmd: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    """Run one command (ip, tc, nft, iptables); fail with its stderr if it fails and `check`."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell a PID from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _kill_ns_processes(ns: str) -> None:
    """SIGKILL every process still inside `ns`: a namespace of this harness, whose processes
    are this run's (or a dead run's), and which lives on while any process is in it."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGCONT)
            os.kill(int(pid), signal.SIGKILL)


def _remove(state: dict[str, Any]) -> None:
    """Remove everything a state file lists; what is already gone is skipped."""
    for ns in state.get("namespaces", []):
        _kill_ns_processes(ns)
    for pid in state.get("helpers", []):  # netem_queue helpers, started by this harness
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    for veth in state.get("veths", []):
        sh("ip", "link", "del", veth, check=False)
    for ns in state.get("namespaces", []):
        sh("ip", "netns", "del", ns, check=False)
    if state.get("nft_table") and shutil.which("nft"):
        sh("nft", "delete", "table", "bridge", state["nft_table"], check=False)
    if state.get("bridge"):
        sh("ip", "link", "del", state["bridge"], check=False)


@contextlib.contextmanager
def _state_lock() -> Iterator[None]:
    STATE_DIR.mkdir(mode=0o700, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clean_stale() -> list[str]:
    """Remove what runs whose owner process is dead left behind; return their run ids."""
    cleaned: list[str] = []
    for path in sorted(STATE_DIR.glob("run-*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(int(state["pid"])) == state.get("start_time"):
            continue  # its owner lives: not ours to touch
        _remove(state)
        path.unlink(missing_ok=True)
        cleaned.append(str(state.get("run")))
    return cleaned


def _used_subnets() -> set[int]:
    """Second octets of the 10.X.0.0/16 ranges any interface of the root namespace uses."""
    used: set[int] = set()
    for line in sh("ip", "-4", "-o", "addr").stdout.splitlines():
        for word in line.split():
            if word.startswith("10.") and "/" in word:
                used.add(int(word.split(".")[1]))
    return used


def _netem_args(delay_ms: float, jitter_ms: float, loss_pct: float) -> list[str]:
    args = ["delay", f"{delay_ms}ms"]
    if jitter_ms:
        args.append(f"{jitter_ms}ms")
    if loss_pct:
        args += ["loss", f"{loss_pct}%"]
    return args


@dataclass
class Host:
    """One network namespace with one link to the bridge."""

    network: Network
    name: str
    index: int
    ns: str
    ip: str
    veth: str  # the bridge-side end: what link_down/cut/netem act on
    netem_backend: str | None = None
    _queue_helper: subprocess.Popen[str] | None = field(default=None, repr=False)
    _queue_rule: list[str] | None = field(default=None, repr=False)

    @property
    def wrap(self) -> tuple[str, ...]:
        """The argv prefix that runs a command inside this host."""
        return ("ip", "netns", "exec", self.ns)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return [*self.wrap, *cmd]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*self.wrap, *cmd, check=check)

    # --- partition: the link itself -----------------------------------------------------------

    def link_down(self) -> None:
        sh("ip", "link", "set", self.veth, "down")

    def link_up(self) -> None:
        sh("ip", "link", "set", self.veth, "up")

    # --- cut off in the bridge, link up ---------------------------------------------------------

    def cut(self) -> None:
        if self.network.nft_table:
            self._cut_set("add")
        else:
            sh("ip", "link", "set", self.veth, "nomaster")

    def heal(self) -> None:
        if self.network.nft_table:
            self._cut_set("delete")
        else:
            sh("ip", "link", "set", self.veth, "master", self.network.bridge)

    def _cut_set(self, op: str) -> None:
        """Add this host's port to the nft set of cut ports, or delete it from there."""
        assert self.network.nft_table
        sh("nft", op, "element", "bridge", self.network.nft_table, "cut", f"{{ {self.veth} }}")

    # --- delay, jitter, loss ----------------------------------------------------------------------

    def netem(self, delay_ms: float, jitter_ms: float = 0.0, loss_pct: float = 0.0) -> str:
        """Shape the packets toward this host; return the backend used ("tc" or "nfqueue")."""
        self.clear_netem()
        args = _netem_args(delay_ms, jitter_ms, loss_pct)
        tc = sh("tc", "qdisc", "replace", "dev", self.veth, "root", "netem", *args, check=False)
        if tc.returncode == 0:
            self.netem_backend = "tc"
            return "tc"
        if "unknown" not in tc.stderr.lower():  # a real error, not a kernel without netem
            raise RuntimeError(f"tc netem on {self.veth}: {tc.stderr.strip()}")
        # No sch_netem in this kernel: the same shaping from user space (tests/netem_queue.py).
        queue = str(self.index)
        helper = subprocess.Popen(
            self.argv(
                [
                    sys.executable,
                    "-m",
                    "tests.netem_queue",
                    queue,
                    str(delay_ms),
                    str(jitter_ms),
                    str(loss_pct),
                ]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        self._queue_helper = helper
        self.network._note_helper(helper.pid)
        assert helper.stdout is not None
        line = helper.stdout.readline()  # "ready" once the queue is bound
        if line.strip() != "ready":
            helper.kill()
            _, err = helper.communicate(timeout=5)
            raise RuntimeError(f"netem_queue did not start: {line!r} {err.strip()}")
        # Without --queue-bypass: if the helper dies the host's input is dropped, loudly, never
        # silently unshaped.
        rule = ["INPUT", "-i", "eth0", "-j", "NFQUEUE", "--queue-num", queue]
        self.run("iptables", "-I", *rule)
        self._queue_rule = rule
        self.netem_backend = "nfqueue"
        return "nfqueue"

    def clear_netem(self) -> None:
        if self.netem_backend == "tc":
            sh("tc", "qdisc", "del", "dev", self.veth, "root", check=False)
        if self._queue_rule is not None:
            self.run("iptables", "-D", *self._queue_rule, check=False)
            self._queue_rule = None
        if self._queue_helper is not None:
            helper, self._queue_helper = self._queue_helper, None
            helper.terminate()
            try:
                helper.wait(5)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait(5)
            for stream in (helper.stdout, helper.stderr):
                if stream is not None:
                    stream.close()
        self.netem_backend = None

    def reset(self) -> None:
        """Back to a healthy link: up, in the bridge, unshaped (between tests)."""
        self.clear_netem()
        self.link_up()
        if self.network.nft_table:
            sh(
                "nft",
                "delete",
                "element",
                "bridge",
                self.network.nft_table,
                "cut",
                f"{{ {self.veth} }}",
                check=False,
            )
        else:
            sh("ip", "link", "set", self.veth, "master", self.network.bridge, check=False)


class Network:
    """A bridge and the hosts on it; a context manager that always removes all of it."""

    def __init__(self) -> None:
        self.run_id = secrets.token_hex(2)
        self.bridge = f"mb{self.run_id}"
        self.subnet = 0  # X of 10.X.0.0/24, chosen at __enter__
        self.hosts: dict[str, Host] = {}
        self.nft_table: str | None = None
        self._state_path = STATE_DIR / f"run-{self.run_id}.json"
        self._helpers: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        self._old_sigterm: Any = None

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge: how the test process reaches hosts."""
        return f"10.{self.subnet}.0.254"

    def _state(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "bridge": self.bridge,
            "nft_table": self.nft_table,
            "namespaces": [h.ns for h in self.hosts.values()],
            "veths": [h.veth for h in self.hosts.values()],
            "helpers": self._helpers,
        }

    def _save(self) -> None:
        # Written before each resource is made, so a SIGKILL at any point leaves it listed.
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state()))
        tmp.replace(self._state_path)

    def _note_helper(self, pid: int) -> None:
        with self._lock:
            self._helpers.append(pid)
            self._save()

    def __enter__(self) -> Network:
        reason = skip_reason()
        if reason:
            raise RuntimeError(reason)
        with _state_lock():
            clean_stale()
            used = _used_subnets()
            free = [x for x in range(100, 250) if x not in used]
            self.subnet = random.choice(free)
            if shutil.which("nft"):
                self.nft_table = f"m{self.run_id}"
            self._save()
            try:
                self._make_bridge()
            except BaseException:
                self.close()
                raise
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGTERM)
            if current in (signal.SIG_DFL, None):
                self._old_sigterm = current
                signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        return self

    def _make_bridge(self) -> None:
        sh(
            "ip",
            "link",
            "add",
            self.bridge,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        )
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        if self.nft_table:
            # Frames to, from or through a cut port are dropped: forward (host to host), input
            # and output (host to and from the bridge's own address, i.e. the test process).
            t = self.nft_table
            script = (
                f"table bridge {t} {{\n"
                "  set cut { type ifname; }\n"
                "  chain cforward { type filter hook forward priority 0;"
                " iifname @cut drop; oifname @cut drop; }\n"
                "  chain cinput { type filter hook input priority 0; iifname @cut drop; }\n"
                "  chain coutput { type filter hook output priority 0; oifname @cut drop; }\n"
                "}\n"
            )
            result = subprocess.run(
                ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10
            )
            if result.returncode != 0:
                raise RuntimeError(f"nft: {result.stderr.strip()}")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        assert index < 100, "at most 99 hosts"
        ns = f"m{self.run_id}-{name}"
        veth = f"mv{self.run_id}{index:02d}"
        peer = f"mp{self.run_id}{index:02d}"
        ip = str(ipaddress.IPv4Address(f"10.{self.subnet}.0.{index}"))
        host = Host(self, name, index, ns, ip, veth)
        with self._lock:
            self.hosts[name] = host
            self._save()
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "-n", ns, "link", "set", peer, "name", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "set", veth, "master", self.bridge)
        sh("ip", "link", "set", veth, "up")
        return host

    def reset(self) -> None:
        """Every host healthy again (between tests that share the network)."""
        for host in self.hosts.values():
            host.reset()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                host.clear_netem()
        _remove(self._state())
        self._state_path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if (
            self._old_sigterm is not None
            or signal.getsignal(signal.SIGTERM) is _sigterm_as_interrupt
        ):
            with contextlib.suppress(ValueError):  # not on the main thread
                signal.signal(signal.SIGTERM, self._old_sigterm or signal.SIG_DFL)

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sigterm_as_interrupt(_sig: int, _frame: FrameType | None) -> None:
    # pytest runs its finalizers on KeyboardInterrupt, but dies at once on an unhandled SIGTERM.
    raise KeyboardInterrupt("SIGTERM")


def wait_reachable(host: Host, port: int, timeout: float = 10.0) -> float:
    """Seconds until a TCP connect from the root namespace to host:port succeeds."""
    import socket

    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((host.ip, port), 0.5):
                return time.monotonic() - start
        except OSError:
            if time.monotonic() - start > timeout:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    """A Network for one test module; hosts are added by the tests (or a module fixture)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with Network() as net:
        yield net
