"""The soak: users chat on several hosts while random faults are injected, and invariants are
checked all the time; it ends with a table (docs/reliability.md holds the latest).

    python -m tests.system.soak --seconds 600 [--seed N] [--report PATH]   # as root (ip netns)
    python -m tests.system.soak --local --seconds 60                       # no root: fewer faults

Two coordinators (one active, one standby), a redis-server with AOF, and client nodes spread
over hosts (network namespaces, tests/netns.py). The test process chats through every node's
unix socket directly (the JSON line protocol of messenger/local.py: far cheaper than a
`messenger message` process per message), with a unique text per message, so each one can be
matched to the `Message from X: TEXT` lines of every receiver. A client that ends is logged on
again after a while, so the chat goes on.

The invariants (docs/reliability.md says why each is phrased so):
  1. never two sessions for one name;
  2. never two users on one node;
  3. no user listed whose client has been dead longer than TTL + 1 s;
  4. every message reported `sent` to a receiver that stayed up was printed by it exactly once;
  5. no message printed by anyone it was not addressed to;
  6. every request got exactly one reply;
and two the faults themselves call for: a hung client that was removed exits after SIGCONT
(you-are-not-logged-on or noconnection), and a standby takes over from a faulted coordinator.
1-3 are checked on Redis every 50 ms (the coordinator-private hashes, read with the admin
credential from the test process), 4-6 on the collected outputs at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import redis as redis_sync
from redis.backoff import NoBackoff
from redis.retry import Retry

from messenger import acl, local
from messenger.embedded import EmbeddedRedis
from messenger.keys import Keys
from messenger.settings import Settings

# The messenger's defaults: the bounds below are the issue's, for these settings.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0
DEAD_BOUND = HEARTBEAT_TTL + 1.0  # the issue: a dead client is logged off within TTL + 1 s
DEAD_SLACK = 0.5  # the checker's poll period and scheduling noise on a shared 2-core machine
WAIT_MS = 5000  # what each request waits: the reply timeout `messenger message` uses
DELIVERY_WINDOW = 2.0  # a receiver must stay up this long after `sent` to owe the message
FENCE_BOUND = 2 * HEARTBEAT_INTERVAL + 3.0  # a removed hung client exits within this of SIGCONT
HEALED_GRACE = 1.0  # a session removed this soon after its fault was healed was its doing
HANDOVER_BOUND = 15.0  # a standby must be active within this of a coordinator fault
RECOVERY_BOUND = 30.0  # the service must be whole again (a coordinator active) within this
POLL = 0.05

CLIENT_KINDS = ("client-kill9", "client-sigstop", "client-link-down", "client-cut", "client-netem")
COORDINATOR_KINDS = (
    "coordinator-kill9",
    "coordinator-sigstop",
    "coordinator-sigterm",
    "coordinator-partition",
)
GLOBAL_KINDS = (*COORDINATOR_KINDS, "redis-restart")
ALL_KINDS = (*CLIENT_KINDS, *GLOBAL_KINDS)
NETWORK_KINDS = frozenset(
    {"client-link-down", "client-cut", "client-netem", "coordinator-partition"}
)
# Faults after which a client is dead from Redis's point of view (no heartbeat gets through).
FATAL_KINDS = frozenset({"client-kill9", "client-sigstop", "client-link-down", "client-cut"})

INVARIANTS = (
    "1 one session per name",
    "2 one user per node",
    "3 no dead client listed past TTL + 1 s",
    "4 sent => printed exactly once by a receiver that stayed up",
    "5 printed only by its addressee",
    "6 one reply per request",
    "7 a removed hung client exits after SIGCONT",
    "8 a standby takes over, the service recovers",
    "9 an unfaulted client rides out hand-overs and Redis restarts",
)

LOGON_REPLIES = frozenset(
    {
        "logged-on",
        "user-exists-at-other-node",
        "already-logged-on",
        "noconnection",
        "No response from server",
    }
)
MESSAGE_LINE = re.compile(r"^Message from (\S+): (.*)$")
ACTIVE_LINE = re.compile(r"coordinator ([0-9a-f]{8}) is active")
CLIENT_PASSWORD = "soak-" + secrets.token_hex(12)


def now() -> float:
    return time.monotonic()


# --- processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    t: float  # monotonic time the line was read
    text: str


class Child:
    """One process with every output line timestamped; ended by its own PID only."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.started = now()
        self.out: list[Line] = []
        self.err: list[Line] = []
        self._lock = threading.Lock()
        # A session of its own: a Ctrl-C on the soak's terminal reaches the soak, which ends
        # every child itself (a client's SIGINT would be a logoff, not what the soak decides).
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: Any, sink: list[Line]) -> None:
        for text in iter(stream.readline, ""):
            with self._lock:
                sink.append(Line(now(), text.rstrip("\n")))

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def lines(self, *, stderr: bool = False) -> list[Line]:
        with self._lock:
            return list(self.err if stderr else self.out)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a stopped process must be able to die
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def close(self) -> None:
        """Kill it if need be, read its output to the end, release its pipes."""
        self.kill()
        for reader in self._readers:
            reader.join(5.0)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


# --- where processes run: hosts -------------------------------------------------------------------


class Topology(Protocol):
    """Hosts and the network faults between them."""

    description: str
    network_faults: bool  # whether link/cut/netem/partition faults can be injected

    def argv(self, host: str, cmd: list[str]) -> list[str]: ...
    def wrap(self, host: str) -> tuple[str, ...]: ...  # the argv prefix of argv()
    def address(self, host: str) -> str: ...  # how other hosts reach `host`
    def link_down(self, host: str) -> None: ...
    def link_up(self, host: str) -> None: ...
    def cut(self, host: str) -> None: ...
    def heal(self, host: str) -> None: ...
    def netem(self, host: str, delay_ms: float, jitter_ms: float, loss_pct: float) -> str: ...
    def netem_clear(self, host: str) -> None: ...
    def close(self) -> None: ...


class LocalTopology:
    """Every "host" is this machine: no network faults (for runs without root)."""

    description = "one host (no network namespaces)"
    network_faults = False

    def argv(self, host: str, cmd: list[str]) -> list[str]:
        return cmd

    def wrap(self, host: str) -> tuple[str, ...]:
        return ()

    def address(self, host: str) -> str:
        return "127.0.0.1"

    def _unsupported(self, host: str) -> None:
        raise RuntimeError("network faults need network namespaces (run as root, no --local)")

    link_down = link_up = cut = heal = netem_clear = _unsupported

    def netem(self, host: str, delay_ms: float, jitter_ms: float, loss_pct: float) -> str:
        self._unsupported(host)
        return ""

    def close(self) -> None:
        pass


# --- Redis ----------------------------------------------------------------------------------------


class SoakRedis:
    """The soak's redis-server (EmbeddedRedis on the Redis host) with AOF on, fsync always, so
    sessions survive a restart on the same port and directory: a kill -9 as much as a SIGTERM."""

    def __init__(self, topology: Topology, host: str) -> None:
        self.server = EmbeddedRedis(
            host=topology.address(host),
            wrapper=topology.wrap(host),
            extra_config={"appendonly": "yes", "appendfsync": "always"},
        )

    @property
    def url(self) -> str:
        return self.server.url

    def client_url(self, prefix: str) -> str:
        return acl.client_url(self.server.host, self.server.port, prefix, CLIENT_PASSWORD)

    def start(self) -> None:
        self.server.start()

    def admin(self, timeout: float) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def crash(self, sig: int) -> None:
        """Down by `sig` (SIGTERM: a clean shutdown, SIGKILL: a crash), port and files kept."""
        proc = self.server.proc
        if sig == signal.SIGKILL or proc is None:
            self.server.kill()
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()

    def restart(self) -> None:
        self.server.restart()

    def stop(self) -> None:
        self.server.stop()


# --- what the soak keeps track of -----------------------------------------------------------------


@dataclass
class Interval:
    start: float
    end: float | None  # None: still going
    cause: str

    def covers(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)

    def overlaps(self, a: float, b: float) -> bool:
        return self.start < b and (self.end is None or self.end > a)

    def overlap(self, a: float, b: float) -> float:
        end = b if self.end is None else min(b, self.end)
        return max(0.0, end - max(a, self.start))


@dataclass(eq=False)
class Incarnation:
    """One `messenger logon` process of a node: logged on (or refused) once, then ends."""

    id: int
    node: Node
    name: str
    child: Child
    contended: bool  # started with a name another live client of ours held
    logged_on_at: float | None = None
    first_line: str | None = None
    sid: str | None = None  # its session, once the checker has seen it in Redis
    removed_at: float | None = None  # when the checker saw that session gone
    exited_at: float | None = None
    exit_code: int | None = None
    dead: list[Interval] = field(default_factory=list)  # dead from Redis's point of view
    faults: list[Interval] = field(default_factory=list)  # faults injected into it

    @property
    def label(self) -> str:
        return f"{self.name}@{self.node.name}#{self.id}"

    @property
    def spawned(self) -> float:
        return self.child.started

    def dead_since(self, t: float) -> float | None:
        """The start of the dead stretch that covers `t` (overlapping intervals merged)."""
        covering = [i for i in self.dead if i.covers(t)]
        if not covering:
            return None
        start = min(i.start for i in covering)
        changed = True
        while changed:  # walk back through intervals that run into this stretch
            changed = False
            for i in self.dead:
                if i.start < start and (i.end is None or i.end >= start):
                    start, changed = i.start, True
        return start

    def faulted(self, a: float, b: float) -> bool:
        return any(i.overlaps(a, b) for i in self.faults if i.cause in FATAL_KINDS)

    def stderr_tail(self) -> str:
        err = self.child.lines(stderr=True)
        return err[-1].text[:120] if err else ""

    def end_reason(self) -> str:
        if self.exit_code is None:
            return "still running at the end"
        if self.exit_code == -signal.SIGKILL:
            return "killed (-9)"
        words = [line.text for line in self.child.lines() if not MESSAGE_LINE.match(line.text)]
        last = words[-1] if words else "(nothing)"
        return f"{last} (exit {self.exit_code})"


@dataclass(eq=False)
class Node:
    index: int
    name: str
    host: str
    runtime_dir: Path
    current: Incarnation | None = None
    incarnations: list[Incarnation] = field(default_factory=list)
    restart_at: float | None = None

    @property
    def socket_path(self) -> Path:
        return local.socket_path(Settings(node=self.name, runtime_dir=self.runtime_dir))


@dataclass(eq=False)
class Coordinator:
    label: str
    host: str
    runtime_dir: Path
    child: Child | None = None
    stopped: bool = False  # SIGSTOPped by the soak
    partitioned: bool = False
    generations: int = 0

    @property
    def healthy(self) -> bool:
        return (
            self.child is not None
            and self.child.running
            and not self.stopped
            and not self.partitioned
        )

    def active_lines(self, after: float) -> list[Line]:
        if self.child is None:
            return []
        return [
            line
            for line in self.child.lines(stderr=True)
            if line.t >= after and ACTIVE_LINE.search(line.text)
        ]


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    detail: str = ""
    end: float | None = None  # healed, resumed, restarted
    incs: list[Incarnation] = field(default_factory=list)
    sids: dict[int, str] = field(default_factory=dict)  # incarnation id -> session at the fault
    detection: list[float] = field(default_factory=list)  # seconds to each session's removal
    handover: float | None = None  # coordinator faults: until the other one was active
    restored: float | None = None  # global faults: until a coordinator was active again
    busy_at_stop: bool = False  # sigstop: a request of ours was in flight at the stop


@dataclass
class Request:
    op: str
    node: Node
    inc: Incarnation
    to: str
    text: str
    t0: float
    t1: float = 0.0
    answer: str = ""
    lines: int = 0
    detail: str = ""


@dataclass
class Violation:
    invariant: str
    t: float
    detail: str


# --- the soak -------------------------------------------------------------------------------------


@dataclass
class Options:
    seconds: float = 120.0
    seed: int | None = None
    hosts: int = 3
    nodes_per_host: int = 2
    extra_names: int = 2
    local: bool = False
    pause: tuple[float, float] = (0.5, 2.5)  # between injected faults
    verbose: bool = False


class Soak:
    def __init__(self, options: Options, topology: Topology) -> None:
        self.o = options
        self.seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
        self.rng = random.Random(self.seed)
        self.topology = topology
        self.kinds = tuple(
            k for k in ALL_KINDS if topology.network_faults or k not in NETWORK_KINDS
        )
        self.lock = threading.RLock()
        self.stopping = threading.Event()  # the run is over: no more chat or faults
        self.tmp = Path(tempfile.mkdtemp(prefix="soak-"))
        os.chmod(self.tmp, 0o755)
        self.prefix = "soak" + secrets.token_hex(4)
        self.keys = Keys(self.prefix)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MESSENGER_")}
        self.env.update({"PYTHONUNBUFFERED": "1", "MESSENGER_PREFIX": self.prefix})
        self.redis = SoakRedis(topology, "redis")
        self.coordinators = [
            Coordinator(f"c{i}", f"coord{i}", self.tmp / f"c{i}") for i in range(2)
        ]
        self.nodes = [
            Node(
                h * options.nodes_per_host + k,
                f"n{h * options.nodes_per_host + k}",
                f"host{h}",
                self.tmp / f"n{h * options.nodes_per_host + k}",
            )
            for h in range(options.hosts)
            for k in range(options.nodes_per_host)
        ]
        self.names = [f"u{i}" for i in range(len(self.nodes) + options.extra_names)]
        self.ids = itertools.count()
        self.seq = itertools.count()
        self.incarnations: list[Incarnation] = []
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.violations: list[Violation] = []
        self._reported: set[tuple[str, str]] = set()
        self.redis_down: list[Interval] = []
        self.gaps: list[Interval] = []  # no coordinator serving: a global fault until restored
        self.host_down: dict[str, Interval] = {}  # client hosts cut off right now
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.sid_owner: dict[str, Incarnation] = {}
        self.unknown_sessions: set[str] = set()
        self.sessions_kept: list[tuple[int, int]] = []  # Redis restarts: (before, kept)
        self.polls = 0
        self.poll_failures = 0
        self.started = 0.0
        self.ended = 0.0
        self.threads: list[threading.Thread] = []
        self.wall_start = ""

    # --- logging and violations ------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.o.verbose:
            print(f"[{now() - self.started:7.2f}] {text}", file=sys.stderr, flush=True)

    def violate(self, invariant: str, detail: str, key: str | None = None) -> None:
        with self.lock:
            if key is not None:
                if (invariant, key) in self._reported:
                    return
                self._reported.add((invariant, key))
            self.violations.append(Violation(invariant, now(), detail))
        self.say(f"VIOLATION {invariant}: {detail}")

    # --- processes -------------------------------------------------------------------------

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "messenger", *args]

    def start_coordinator(self, c: Coordinator) -> None:
        c.runtime_dir.mkdir(mode=0o700, exist_ok=True)
        env = {
            **self.env,
            "MESSENGER_REDIS_URL": self.redis.url,
            "MESSENGER_CLIENT_PASSWORD": CLIENT_PASSWORD,
            "MESSENGER_RUNTIME_DIR": str(c.runtime_dir),
        }
        if c.child is not None:
            c.child.close()
        c.generations += 1
        c.child = Child(
            f"{c.label}.{c.generations}", self.topology.argv(c.host, self._python("server")), env
        )
        c.stopped = c.partitioned = False
        self.say(f"started coordinator {c.label} (pid {c.child.pid})")

    def spawn(self, node: Node) -> Incarnation:
        """Log a user on at `node`: usually a name no live client of ours holds, sometimes one
        that another holds (that logon must be refused while the holder lives)."""
        with self.lock:
            held = {i.name for i in self.incarnations if i.exited_at is None and i.node is not node}
            free = [n for n in self.names if n not in held]
            previous = node.incarnations[-1].name if node.incarnations else None
            contended = bool(held) and self.rng.random() < 0.1
            if contended:
                name = self.rng.choice(sorted(held))
            elif previous in free and self.rng.random() < 0.7:
                assert previous is not None
                name = previous
            else:
                name = self.rng.choice(free)
            node.runtime_dir.mkdir(mode=0o700, exist_ok=True)
            env = {
                **self.env,
                "MESSENGER_REDIS_URL": self.redis.client_url(self.prefix),
                "MESSENGER_RUNTIME_DIR": str(node.runtime_dir),
            }
            inc_id = next(self.ids)
            argv = self.topology.argv(node.host, self._python("logon", name, "--node", node.name))
            inc = Incarnation(
                inc_id, node, name, Child(f"{name}@{node.name}", argv, env), contended
            )
            node.current = inc
            node.incarnations.append(inc)
            node.restart_at = None
            self.incarnations.append(inc)
        self.say(f"spawned {inc.label}{' (contended)' if contended else ''}")
        return inc

    # --- the supervisor: exits, restarts, timers ---------------------------------------------

    def supervise(self) -> None:
        while not self.stopping.is_set() or self.timers:
            t = now()
            with self.lock:
                due = [f for at, f in self.timers if at <= t]
                self.timers = [(at, f) for at, f in self.timers if at > t]
            for action in due:
                action()
            for node in self.nodes:
                self._watch_node(node, t)
            time.sleep(POLL)

    def _watch_node(self, node: Node, t: float) -> None:
        with self.lock:
            inc = node.current
            if inc is None:
                return
            if inc.first_line is None:
                out = inc.child.lines()
                if out:
                    inc.first_line = out[0].text
                    if out[0].text == "logged-on":
                        inc.logged_on_at = out[0].t
                        self.say(f"{inc.label} logged on")
                    else:
                        self.say(f"{inc.label}: {out[0].text}")
            if inc.exited_at is None and not inc.child.running:
                inc.exited_at = t
                inc.exit_code = inc.child.popen.returncode
                inc.dead.append(Interval(t, None, "exited"))
                self.say(f"{inc.label} ended: {inc.end_reason()}")
            if inc.exited_at is not None:
                if self.stopping.is_set() or node.host in self.host_down:
                    return
                if node.restart_at is None:
                    node.restart_at = t + self.rng.uniform(0.3, 1.5)
                elif t >= node.restart_at:
                    self.spawn(node)

    def later(self, delay: float, action: Callable[[], None]) -> None:
        with self.lock:
            self.timers.append((now() + delay, action))

    # --- the checker: invariants 1-3 on Redis, all the time -------------------------------------

    def check(self) -> None:
        admin = self.redis.admin(0.5)
        try:
            while not self.stopping.is_set():
                self._check_once(admin)
                time.sleep(POLL)
            self._check_once(admin)
        finally:
            admin.close()

    def _check_once(self, admin: redis_sync.Redis) -> None:
        k = self.keys
        try:
            # One transaction: the three hashes as of one instant.
            pipe = admin.pipeline(transaction=True)
            pipe.hgetall(k.names)
            pipe.hgetall(k.nodes)
            pipe.hgetall(k.sessions)
            names, nodes, raw_sessions = pipe.execute()
        except (redis_sync.RedisError, OSError):
            self.poll_failures += 1
            return
        t = now()
        self.polls += 1
        sessions: dict[str, dict[str, Any]] = {}
        for sid, raw in raw_sessions.items():
            try:
                record = json.loads(raw)
            except ValueError:
                self.violate(INVARIANTS[0], f"undecodable session record {sid}", key=sid)
                continue
            sessions[sid] = record
        by_name: dict[str, list[str]] = defaultdict(list)
        by_node: dict[str, list[str]] = defaultdict(list)
        for sid, record in sessions.items():
            by_name[str(record.get("name"))].append(sid)
            by_node[str(record.get("node"))].append(sid)
        for name, sids in by_name.items():
            if len(sids) > 1:
                detail = f"{name} has sessions {sorted(s[:8] for s in sids)}"
                self.violate(INVARIANTS[0], detail, key=",".join(sorted(sids)))
        for node_name, sids in by_node.items():
            if len(sids) > 1:
                detail = f"node {node_name} has sessions {sorted(s[:8] for s in sids)}"
                self.violate(INVARIANTS[1], detail, key=",".join(sorted(sids)))
        # The indexes must point only at sessions that exist, under the same name / node.
        for index, field_name, inv in ((names, "name", 0), (nodes, "node", 1)):
            for key, sid in index.items():
                record = sessions.get(sid)
                if record is None or record.get(field_name) != key:
                    detail = f"{field_name} index {key} -> {sid[:8]}, which is {record}"
                    self.violate(INVARIANTS[inv], detail, key=f"{key}->{sid}")
        with self.lock:
            for sid, record in sessions.items():
                inc = self.sid_owner.get(sid) or self._claim(sid, record)
                if inc is None:
                    continue
                start = inc.dead_since(t)
                if start is None:
                    continue
                allowed = DEAD_BOUND + DEAD_SLACK + self._excused(start, t)
                if t - start > allowed:
                    causes = ", ".join(i.cause for i in inc.dead if i.covers(t))
                    self.violate(
                        INVARIANTS[2],
                        f"{inc.label} still listed {t - start:.2f}s after it died ({causes}); "
                        f"allowed {allowed:.2f}s",
                        key=sid,
                    )
            for inc in self.incarnations:
                if inc.sid is not None and inc.removed_at is None and inc.sid not in sessions:
                    inc.removed_at = t
                    self.say(f"{inc.label} removed from the list")
                    self._detected(inc, t)

    def _claim(self, sid: str, record: dict[str, Any]) -> Incarnation | None:
        """The client a session seen for the first time belongs to: the newest one of ours at
        its node, with its name, that has no session yet."""
        for node in self.nodes:
            if node.name != record.get("node"):
                continue
            for inc in reversed(node.incarnations):
                if inc.name == record.get("name") and inc.sid is None:
                    inc.sid = sid
                    self.sid_owner[sid] = inc
                    return inc
        if sid not in self.unknown_sessions:
            self.unknown_sessions.add(sid)
            self.violate(INVARIANTS[0], f"a session nobody of ours made: {record}", key=sid)
        return None

    def _excused(self, a: float, b: float) -> float:
        """Time in [a, b] when nobody could log anyone off: Redis down, or no coordinator."""
        stretches = sorted(
            (i.start, b if i.end is None else i.end)
            for i in (*self.redis_down, *self.gaps)
            if i.overlaps(a, b)
        )
        total, reach = 0.0, a
        for start, end in stretches:
            start, end = max(start, reach), min(end, b)
            if end > start:
                total += end - start
                reach = end
        return total

    def _detected(self, inc: Incarnation, t: float) -> None:
        for fault in self.faults:
            # A removal long after a stop or partition was healed has another cause (the
            # client went on, and later ended): it is not this fault's detection.
            if (
                fault.kind in FATAL_KINDS
                and fault.sids.get(inc.id) == inc.sid
                and fault.start <= t
                and (fault.end is None or t <= fault.end + HEALED_GRACE)
            ):
                fault.detection.append(t - fault.start)

    # --- chat ----------------------------------------------------------------------------------

    def chat(self, node: Node) -> None:
        rng = random.Random(f"{self.seed}-{node.name}")
        while not self.stopping.is_set():
            time.sleep(rng.uniform(0.15, 0.5))
            with self.lock:
                inc = node.current
                if inc is None or inc.logged_on_at is None or inc.exited_at is not None:
                    continue
                others = sorted(
                    {
                        i.name
                        for i in self.incarnations
                        if i.logged_on_at is not None and i.exited_at is None and i is not inc
                    }
                )
            if rng.random() < 0.01:
                self.send(node, inc, {"op": "logoff", "wait_ms": str(WAIT_MS)}, "logoff", "", "")
                continue
            # Mostly to someone logged on; now and then to anyone (receiver-not-found).
            to = rng.choice(others) if others and rng.random() < 0.9 else rng.choice(self.names)
            text = f"m{next(self.seq)}-{inc.name}-{node.name}-{secrets.token_hex(3)}"
            payload = {"op": "message", "to": to, "text": text, "wait_ms": str(WAIT_MS)}
            self.send(node, inc, payload, "message", to, text)

    def send(
        self, node: Node, inc: Incarnation, payload: dict[str, Any], op: str, to: str, text: str
    ) -> None:
        req = Request(op, node, inc, to, text, now())
        with self.lock:
            self.requests.append(req)
        # As `messenger message` does: a client that reads it late (hung) knows it gave up.
        payload = {**payload, "until_ms": str(int(time.time() * 1000) + WAIT_MS)}
        answer, lines, detail = call_node(node.socket_path, payload, WAIT_MS / 1000 + 3.0)
        req.t1, req.answer, req.lines, req.detail = now(), answer, lines, detail

    # --- faults ----------------------------------------------------------------------------------

    def inject_forever(self) -> None:
        deadline = self.started + self.o.seconds
        rounds = 0
        while now() < deadline - 3.0:
            kinds = list(self.kinds)
            self.rng.shuffle(kinds)
            rounds += 1
            for kind in kinds:
                if now() >= deadline - 3.0:
                    break
                try:
                    self.inject(kind)
                except Exception as e:  # the soak must report, not die, on one bad injection
                    self.violate(INVARIANTS[7], f"injecting {kind} failed: {type(e).__name__}: {e}")
                self._sleep_until(min(deadline, now() + self.rng.uniform(*self.o.pause)))

    def _sleep_until(self, t: float) -> None:
        while now() < t and not self.stopping.is_set():
            time.sleep(min(POLL, max(0.0, t - now())))

    def inject(self, kind: str) -> None:
        if kind in CLIENT_KINDS:
            self.inject_client(kind)
        elif kind == "redis-restart":
            self.inject_redis_restart()
        else:
            self.inject_coordinator(kind)

    def _record(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        self.say(f"FAULT {fault.kind} on {fault.target} {fault.detail}")
        return fault

    def _pick_clients(self, kind: str) -> tuple[str, list[Incarnation]] | None:
        """A target whose clients are logged on and not faulted already: a node (process
        faults) or a client host (network faults)."""
        deadline = now() + 10.0
        while now() < deadline:
            with self.lock:
                ok = [
                    n.current
                    for n in self.nodes
                    if n.current is not None
                    and n.current.logged_on_at is not None
                    and n.current.exited_at is None
                    and not any(i.end is None for i in n.current.faults)
                    and n.host not in self.host_down
                ]
                if kind in ("client-kill9", "client-sigstop") and ok:
                    inc = self.rng.choice(ok)
                    return inc.node.name, [inc]
                hosts = sorted({i.node.host for i in ok})
                if hosts:
                    host = self.rng.choice(hosts)
                    # Every live client of the host is hit, not only the healthy ones.
                    hit = [
                        n.current
                        for n in self.nodes
                        if n.host == host and n.current is not None and n.current.exited_at is None
                    ]
                    return host, hit
            time.sleep(0.1)
        return None

    def inject_client(self, kind: str) -> None:
        picked = self._pick_clients(kind)
        if picked is None:
            self.say(f"no client to inject {kind} into")
            return
        target, incs = picked
        t = now()
        fault = Fault(kind, target, t, incs=incs)
        with self.lock:
            for inc in incs:
                if inc.sid is not None and inc.removed_at is None:
                    fault.sids[inc.id] = inc.sid
            self.faults.append(fault)
        if kind == "client-kill9":
            incs[0].child.kill()
            self._mark(incs, Interval(t, None, kind))
            fault.end = t
        elif kind == "client-sigstop":
            inc = incs[0]
            fault.busy_at_stop = any(r.inc is inc and r.t1 == 0.0 for r in self.requests[-50:])
            inc.child.signal(signal.SIGSTOP)
            interval = Interval(t, None, kind)
            self._mark(incs, interval)
            duration = self.rng.uniform(1.0, 6.0)
            fault.detail = f"for {duration:.1f}s"

            def resume() -> None:
                inc.child.signal(signal.SIGCONT)
                interval.end = fault.end = now()
                self.say(f"SIGCONT {inc.label}")

            self.later(duration, resume)
        elif kind in ("client-link-down", "client-cut"):
            down, up = (
                (self.topology.link_down, self.topology.link_up)
                if kind == "client-link-down"
                else (self.topology.cut, self.topology.heal)
            )
            down(target)
            interval = Interval(t, None, kind)
            with self.lock:
                self.host_down[target] = interval
            self._mark(incs, interval)
            duration = self.rng.uniform(1.0, 6.0)
            fault.detail = f"for {duration:.1f}s ({', '.join(i.label for i in incs)})"

            def restore() -> None:
                up(target)
                with self.lock:
                    interval.end = fault.end = now()
                    self.host_down.pop(target, None)
                self.say(f"healed {target}")

            self.later(duration, restore)
        elif kind == "client-netem":
            delay = self.rng.choice((20, 50, 100, 200))
            loss = self.rng.choice((0.0, 1.0, 5.0, 10.0))
            backend = self.topology.netem(target, delay, delay / 2, loss)
            duration = self.rng.uniform(3.0, 8.0)
            fault.detail = (
                f"delay {delay}±{delay / 2:.0f} ms, loss {loss:.0f}% ({backend}) "
                f"for {duration:.1f}s"
            )
            interval = Interval(t, None, kind)
            for inc in incs:
                inc.faults.append(interval)

            def clear() -> None:
                self.topology.netem_clear(target)
                interval.end = fault.end = now()

            self.later(duration, clear)
        self.say(f"FAULT {kind} on {target} {fault.detail}")

    def _mark(self, incs: list[Incarnation], interval: Interval) -> None:
        with self.lock:
            for inc in incs:
                inc.dead.append(interval)
                inc.faults.append(interval)

    def active_coordinator(self, *, with_standby: bool = False) -> Coordinator | None:
        """The coordinator that holds the lease (its id's first 8 digits are in its log);
        `with_standby`: only if another one is alive in Redis's list of coordinators too (a
        coordinator back from a partition may not have reached Redis again yet)."""
        try:
            with contextlib.closing(self.redis.admin(0.5)) as admin:
                lease = admin.get(self.keys.lease)
                secs, micros = admin.time()
                alive = admin.zrangebyscore(
                    self.keys.coordinators, f"({secs * 1000 + micros // 1000}", "+inf"
                )
        except (redis_sync.RedisError, OSError):
            return None
        if not isinstance(lease, str):
            return None
        if with_standby and not any(c != lease for c in alive):
            return None
        for c in self.coordinators:
            if c.child is not None and c.child.running:
                lines = [ACTIVE_LINE.search(x.text) for x in c.child.lines(stderr=True)]
                if any(m is not None and m[1] == lease[:8] for m in lines):
                    return c
        return None

    def wait_whole(self, what: str) -> Coordinator | None:
        """Wait until both coordinators run, unfaulted, and one is active."""
        deadline = now() + RECOVERY_BOUND
        while now() < deadline and not self.stopping.is_set():
            active = self.active_coordinator(with_standby=True)
            if active is not None and all(c.healthy for c in self.coordinators):
                return active
            time.sleep(0.1)
        if not self.stopping.is_set():
            states = {c.label: c.healthy for c in self.coordinators}
            self.violate(INVARIANTS[7], f"before {what}: no active coordinator, healthy: {states}")
        return None

    def _restored(self, fault: Fault, gap: Interval, other: Coordinator | None) -> None:
        """Wait for a coordinator to log `is active` after the fault: the hand-over (by the
        other one) and the end of the gap when nobody served."""
        deadline = fault.start + HANDOVER_BOUND
        while now() < deadline:
            lines = [(line.t, c) for c in self.coordinators for line in c.active_lines(fault.start)]
            if lines:
                t, c = min(lines, key=lambda x: x[0])
                fault.restored = t - fault.start
                if other is not None and c is other:
                    fault.handover = t - fault.start
                gap.end = t
                return
            time.sleep(POLL)
        gap.end = now()
        self.violate(
            INVARIANTS[7],
            f"{fault.kind} on {fault.target}: no coordinator active within {HANDOVER_BOUND}s",
        )

    def inject_coordinator(self, kind: str) -> None:
        active = self.wait_whole(kind)
        if active is None:
            return
        other = next(c for c in self.coordinators if c is not active)
        assert active.child is not None
        fault = self._record(Fault(kind, active.label, now()))
        gap = Interval(fault.start, None, kind)
        with self.lock:
            self.gaps.append(gap)
        if kind == "coordinator-kill9":
            active.child.kill()
        elif kind == "coordinator-sigstop":
            active.child.signal(signal.SIGSTOP)
            active.stopped = True
        elif kind == "coordinator-sigterm":
            active.child.signal(signal.SIGTERM)
        else:
            # Either way of losing the network: the link down, or cut off in the bridge.
            how = self.rng.choice(("link down", "cut"))
            fault.detail = how
            (self.topology.link_down if how == "link down" else self.topology.cut)(active.host)
            active.partitioned = True
        self._restored(fault, gap, other)
        self._sleep_until(now() + self.rng.uniform(0.5, 2.0))
        if kind == "coordinator-sigstop":
            active.child.signal(signal.SIGCONT)
            active.stopped = False
        elif kind == "coordinator-partition":
            (self.topology.link_up if fault.detail == "link down" else self.topology.heal)(
                active.host
            )
            active.partitioned = False
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                active.child.popen.wait(10)
            if active.child.running:
                self.violate(INVARIANTS[7], f"{active.label} did not exit after {kind}")
            self.start_coordinator(active)
        fault.end = now()

    def inject_redis_restart(self) -> None:
        if self.wait_whole("redis-restart") is None:
            return
        sig = self.rng.choice((signal.SIGTERM, signal.SIGKILL))
        # Sessions outlive a restart only if their heartbeat keys do: a key may have been
        # refreshed a heartbeat interval before the kill, so it lives TTL - interval (2 s) after
        # it, and the coordinator (making the client users again) and the clients need about
        # half a second once Redis is back (docs/reliability.md).
        down_for = self.rng.uniform(0.3, 1.0)
        with self.lock:
            before = {inc.sid for inc in self.incarnations if inc.sid and inc.removed_at is None}
        fault = self._record(
            Fault("redis-restart", "redis", now(), f"{sig.name}, down {down_for:.1f}s")
        )
        outage = Interval(fault.start, None, "redis down")
        gap = Interval(fault.start, None, "redis-restart")
        with self.lock:
            self.redis_down.append(outage)
            self.gaps.append(gap)
        self.redis.crash(sig)
        time.sleep(down_for)  # how long Redis stays down: the fault, not a wait for anything
        self.redis.restart()
        outage.end = now()
        with contextlib.closing(self.redis.admin(1.0)) as admin:
            kept = sum(1 for sid in before if admin.hexists(self.keys.sessions, sid))
        self.sessions_kept.append((len(before), kept))
        self._restored(fault, gap, None)
        fault.end = now()

    def heal_all(self) -> None:
        """The end of the run: every fault still in force is lifted."""
        with self.lock:
            timers, self.timers = self.timers, []
        for _, action in timers:
            action()
        for c in self.coordinators:
            if c.stopped and c.child is not None:
                c.child.signal(signal.SIGCONT)
                c.stopped = False

    # --- the run -----------------------------------------------------------------------------

    def run(self) -> Report:
        self.wall_start = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.started = now()
        self.redis.start()
        for c in self.coordinators:
            self.start_coordinator(c)
        for node in self.nodes:
            self.spawn(node)
        workers = [self.supervise, self.check, *[lambda n=n: self.chat(n) for n in self.nodes]]
        self.threads = [threading.Thread(target=w, daemon=True) for w in workers]
        for thread in self.threads:
            thread.start()
        self._wait_started()
        try:
            self.inject_forever()
            self._sleep_until(self.started + self.o.seconds)
        finally:
            self.finish()
        return self.report()

    def _wait_started(self) -> None:
        deadline = now() + 30.0
        while now() < deadline:
            with self.lock:
                up = sum(1 for n in self.nodes if n.current and n.current.logged_on_at)
            if up == len(self.nodes) and self.active_coordinator() is not None:
                break
            time.sleep(0.1)
        self.say("every node logged on; chatting, injecting faults")
        self.started = now()

    def finish(self) -> None:
        self.heal_all()
        # Chat stops first; what was sent gets a moment to arrive, and a hung client resumed
        # at the very end gets its time to exit.
        self.stopping.set()
        last = max((f.end or f.start for f in self.faults), default=now())
        self._settle(max(now() + DELIVERY_WINDOW, last + FENCE_BOUND))
        for thread in self.threads:
            thread.join(WAIT_MS / 1000 + 5.0)
        self.ended = now()
        for inc in self.incarnations:
            inc.child.close()
            if inc.exited_at is None:
                inc.exit_code = None
        for c in self.coordinators:
            if c.child is not None:
                c.child.close()
        self.redis.stop()

    def _settle(self, until: float) -> None:
        while now() < until:
            time.sleep(POLL)

    def cleanup(self) -> None:
        """Everything this soak started ends, whatever happened (also after a failure)."""
        self.stopping.set()
        for inc in list(self.incarnations):
            with contextlib.suppress(Exception):
                inc.child.close()
        for c in self.coordinators:
            if c.child is not None:
                with contextlib.suppress(Exception):
                    c.child.close()
        with contextlib.suppress(Exception):
            self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the end: invariants 4-7 on the outputs, then the table --------------------------------

    def report(self) -> Report:
        for inc in self.incarnations:  # what the supervisor had no time to see, at the very end
            out = inc.child.lines()
            if inc.first_line is None and out:
                inc.first_line = out[0].text
                if out[0].text == "logged-on":
                    inc.logged_on_at = out[0].t
        printed: dict[str, list[tuple[Incarnation, str]]] = defaultdict(list)
        printed_at: dict[str, float] = {}
        for inc in self.incarnations:
            for line in inc.child.lines():
                m = MESSAGE_LINE.match(line.text)
                if m:
                    printed[m[2]].append((inc, m[1]))
                    printed_at.setdefault(m[2], line.t)
        by_text = {r.text: r for r in self.requests if r.op == "message"}
        for text, who in printed.items():
            if text not in by_text:
                self.violate(
                    INVARIANTS[4], f"printed a text nobody sent: {text!r} by {who[0][0].label}"
                )
        messages: Counter[str] = Counter()
        replies: Counter[str] = Counter()
        for r in self.requests:
            replies[f"{r.op}: {r.answer}"] += 1
            self._check_reply(r)
            if r.op != "message":
                continue
            who = printed.get(r.text, [])
            for inc, sender in who:
                if inc.name != r.to or sender != r.inc.name:
                    self.violate(
                        INVARIANTS[4],
                        f"{r.text!r} to {r.to} from {r.inc.name} printed by {inc.label} "
                        f"as from {sender}",
                    )
            if len(who) > 1:
                self.violate(
                    INVARIANTS[3],
                    f"{r.text!r} printed {len(who)} times: {[i.label for i, _ in who]}",
                )
            if r.answer != "sent":
                if who:
                    messages[f"printed although the reply was {r.answer}"] += 1
                    if r.answer == "No response from server" and printed_at[r.text] > r.t1:
                        # docs/protocol.md: such a request is never applied later. A client
                        # stopped with the request unread measures its wait from when it reads.
                        messages["printed after its sender gave up (No response)"] += 1
                continue
            messages["sent"] += 1
            receiver = self._receiver(r)
            stayed = receiver is not None and self._stayed_up(receiver, r)
            if len(who) == 1:
                messages["received exactly once"] += 1
            elif not who and stayed and self._redis_died_during(r):
                # Applied and published, then Redis died with the message still in its output
                # buffer (or before it): pub/sub keeps nothing, the seed's "no guarantee".
                messages["lost (Redis died meanwhile)"] += 1
            elif not who and stayed:
                assert receiver is not None
                messages["lost (violation)"] += 1
                self.violate(
                    INVARIANTS[3],
                    f"{r.text!r} `sent` to {receiver.label}, which stayed up, never printed "
                    f"(faults near: {self._near(r.t0)})",
                )
            elif not who:
                messages["lost (receiver faulted)"] += 1
        for inc in self.incarnations:
            self._check_logon(inc, replies)
        self._check_fences()
        self._check_survivors()
        return Report.of(self, messages, replies)

    def _redis_died_during(self, r: Request) -> bool:
        """Whether Redis went down between the request and its reply (a SIGKILLed Redis
        loses what it had not written to its clients' sockets yet)."""
        return any(
            o.start <= (r.t1 or now()) and (o.end is None or o.end >= r.t0) for o in self.redis_down
        )

    def _receiver(self, r: Request) -> Incarnation | None:
        """Whom a `sent` message was for: the newest client of ours logged on with that name
        that was alive when it was sent."""
        fits = [
            i
            for i in self.incarnations
            if i.name == r.to
            and i.logged_on_at is not None
            and i.spawned <= r.t1
            and (i.exited_at is None or i.exited_at >= r.t0)
        ]
        return max(fits, key=lambda i: i.spawned) if fits else None

    def _stayed_up(self, inc: Incarnation, r: Request) -> bool:
        until = r.t1 + DELIVERY_WINDOW
        if inc.exited_at is not None and inc.exited_at <= until:
            return False
        return not inc.faulted(r.t0, until)

    def _check_reply(self, r: Request) -> None:
        if r.lines > 1:
            self.violate(INVARIANTS[5], f"{r.op} via {r.inc.label}: {r.lines} answer lines")
        if r.lines == 1 and r.answer.startswith("garbled"):
            self.violate(INVARIANTS[5], f"{r.op} via {r.inc.label}: {r.answer}")
        if r.lines == 0 and r.answer == "No response from server":
            # No answer at all: only a client that was stopped or killed, or that ended,
            # meanwhile may leave a request so.
            ended = r.inc.exited_at is not None and r.inc.exited_at <= r.t1 + 1.0
            if not ended and not r.inc.faulted(r.t0, r.t1):
                self.violate(
                    INVARIANTS[5],
                    f"{r.op} via {r.inc.label} (up, unfaulted): no answer in "
                    f"{r.t1 - r.t0:.1f}s ({r.detail})",
                )

    def _check_logon(self, inc: Incarnation, replies: Counter[str]) -> None:
        """`logon` is a request too: its first line is its one reply, unless the soak killed
        it (or the run ended) before it could say anything."""
        if inc.first_line is not None:
            replies[f"logon: {inc.first_line}"] += 1
            if inc.first_line not in LOGON_REPLIES:
                self.violate(INVARIANTS[5], f"logon of {inc.label} said {inc.first_line!r}")
            return
        killed = inc.exit_code in (None, -signal.SIGKILL) or inc.faults
        replies["logon: (killed or faulted before any reply)" if killed else "logon: nothing"] += 1
        if not killed:
            self.violate(
                INVARIANTS[5],
                f"logon of {inc.label} ended (exit {inc.exit_code}) without a reply "
                f"[{inc.stderr_tail()}]",
            )

    def _near(self, t: float) -> str:
        """The faults that started within 10 s before `t` (or just after), for a diagnosis."""
        near = [
            f"{f.kind} on {f.target} {f.start - t:+.1f}s"
            for f in self.faults
            if -10.0 < f.start - t < 1.0
        ]
        return ", ".join(near) or "none"

    def _check_survivors(self) -> None:
        """A client that no fault touched ends only when told to (logoff): a hand-over, a
        SIGTERMed coordinator with a standby, a Redis restart shorter than the heartbeat TTL
        must go unnoticed (issue 12)."""
        for inc in self.incarnations:
            if inc.logged_on_at is None or inc.exited_at is None or inc.exit_code == 0:
                continue
            if inc.exit_code == -signal.SIGKILL or inc.faults:
                continue
            near = [
                f"{f.kind} {f.start - inc.exited_at:+.1f}s"
                for f in self.faults
                if f.kind in GLOBAL_KINDS and -15.0 < f.start - inc.exited_at < 1.0
            ]
            self.violate(
                INVARIANTS[8],
                f"{inc.label} ended: {inc.end_reason()} [{inc.stderr_tail()}]; global faults "
                f"just before: {', '.join(near) or 'none'}",
            )

    def _check_fences(self) -> None:
        for f in self.faults:
            if f.kind != "client-sigstop" or f.end is None:
                continue
            inc = f.incs[0]
            if inc.removed_at is None or inc.removed_at > f.end:
                continue  # it was still logged on when it resumed: it may go on
            words = {line.text for line in inc.child.lines()}
            allowed = {"you-are-not-logged-on", "noconnection"}
            # A request of ours in flight at the stop, or one sent while it was stopped (read on
            # SIGCONT, with what was left of its wait), may time out first: the seed's exit.
            sent_meanwhile = any(r.inc is inc and f.start <= r.t0 <= f.end for r in self.requests)
            if f.busy_at_stop or sent_meanwhile:
                allowed.add("No response from server")
            ended = inc.exited_at is not None and inc.exited_at <= f.end + FENCE_BOUND
            if not ended or not words & allowed:
                self.violate(
                    INVARIANTS[6],
                    f"{inc.label}: removed while stopped, resumed, then "
                    f"{inc.end_reason()} ({'in time' if ended else 'not within'} "
                    f"{FENCE_BOUND:.0f}s) [{inc.stderr_tail()}]",
                )


def call_node(path: Path, payload: dict[str, Any], timeout: float) -> tuple[str, int, str]:
    """One request on a node's socket, as `messenger message` makes it: (the answer, how many
    answer lines came, a detail). A missing or refused socket is `not-logged-on`, no answer is
    `No response from server` (local.call's words)."""
    deadline = now() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return "not-logged-on", 0, "no client listens"
        except OSError as e:
            return "No response from server", 0, f"connect: {e}"
        buf = b""
        try:
            s.sendall((json.dumps(payload) + "\n").encode())
            while True:
                s.settimeout(max(0.01, deadline - now()))
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            detail = "timed out"
        except OSError as e:
            detail = f"{type(e).__name__}: {e}"
        else:
            detail = "closed"
    lines = [x for x in buf.split(b"\n") if x.strip()]
    if not lines:
        return "No response from server", 0, detail
    try:
        answer = json.loads(lines[0])
        reply = answer["reply"]
        assert isinstance(reply, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"garbled: {lines[0][:80]!r}", len(lines), detail
    return reply, len(lines), detail


# --- the table ------------------------------------------------------------------------------------


def _stats(values: list[float]) -> str:
    if not values:
        return "- | -"
    return f"{statistics.median(values):.2f} s | {max(values):.2f} s"


@dataclass
class Report:
    seconds: float
    seed: int
    topology: str
    nodes: int
    hosts: int
    when: str
    machine: str
    faults: Counter[str]
    kinds: tuple[str, ...]
    messages: Counter[str]
    replies: Counter[str]
    violations: list[Violation]
    detection: dict[str, list[float]]
    not_removed: Counter[str]
    handover: dict[str, list[float]]
    restored: dict[str, list[float]]
    exits: Counter[str]
    sessions_kept: list[tuple[int, int]]
    incarnations: int
    polls: int

    @classmethod
    def of(cls, soak: Soak, messages: Counter[str], replies: Counter[str]) -> Report:
        detection: dict[str, list[float]] = defaultdict(list)
        not_removed: Counter[str] = Counter()
        handover: dict[str, list[float]] = defaultdict(list)
        restored: dict[str, list[float]] = defaultdict(list)
        for f in soak.faults:
            if f.kind in FATAL_KINDS:
                detection[f.kind].extend(f.detection)
                not_removed[f.kind] += len(f.sids) - len(f.detection)
            if f.handover is not None:
                handover[f.kind].append(f.handover)
            if f.restored is not None:
                restored[f.kind].append(f.restored)
        exits = Counter(inc.end_reason() for inc in soak.incarnations)
        return cls(
            seconds=soak.ended - soak.started,
            seed=soak.seed,
            topology=soak.topology.description,
            nodes=len(soak.nodes),
            hosts=soak.o.hosts,
            when=soak.wall_start,
            machine=f"{platform.node()} ({os.cpu_count()} CPUs, {platform.platform()})",
            faults=Counter(f.kind for f in soak.faults),
            kinds=soak.kinds,
            messages=messages,
            replies=replies,
            violations=list(soak.violations),
            detection=dict(detection),
            not_removed=not_removed,
            handover=dict(handover),
            restored=dict(restored),
            exits=exits,
            sessions_kept=list(soak.sessions_kept),
            incarnations=len(soak.incarnations),
            polls=soak.polls,
        )

    @property
    def missing_kinds(self) -> list[str]:
        return [k for k in self.kinds if self.faults[k] == 0]

    def markdown(self) -> str:
        out: list[str] = []
        add = out.append
        add(f"### Soak: {self.seconds:.0f} s, seed {self.seed}")
        add("")
        add(
            f"{self.when} on {self.machine}; {self.topology}; {self.nodes} client nodes on "
            f"{self.hosts} hosts, 2 coordinators, Redis with AOF; {self.incarnations} client "
            f"processes in all; Redis polled {self.polls} times."
        )
        add("")
        add(
            "| fault | injected | sessions removed | not removed (healed first) | "
            "detection median | worst |"
        )
        add("|---|---|---|---|---|---|")
        for kind in self.kinds:
            det = self.detection.get(kind, [])
            removed = str(len(det)) if kind in FATAL_KINDS else "-"
            kept = str(self.not_removed[kind]) if kind in FATAL_KINDS else "-"
            add(f"| {kind} | {self.faults[kind]} | {removed} | {kept} | {_stats(det)} |")
        add("")
        add("| hand-over / service restored | count | median | worst |")
        add("|---|---|---|---|")
        for kind in GLOBAL_KINDS:
            if kind not in self.kinds:
                continue
            if kind in COORDINATOR_KINDS:
                values = self.handover.get(kind, [])
                add(f"| {kind}: standby active | {len(values)} | {_stats(values)} |")
            else:
                values = self.restored.get(kind, [])
                add(f"| {kind}: a coordinator active again | {len(values)} | {_stats(values)} |")
        every = [v for values in self.handover.values() for v in values]
        add(f"| every hand-over | {len(every)} | {_stats(every)} |")
        if self.sessions_kept:
            before = sum(b for b, _ in self.sessions_kept)
            survived = sum(k for _, k in self.sessions_kept)
            add("")
            add(f"Sessions kept across Redis restarts: {survived} of {before}.")
        add("")
        add("| messages | count |")
        add("|---|---|")
        for key in (
            "sent",
            "received exactly once",
            "lost (receiver faulted)",
            "lost (Redis died meanwhile)",
            "lost (violation)",
        ):
            add(f"| {key} | {self.messages[key]} |")
        for key, count in sorted(self.messages.items()):
            if key.startswith("printed a"):
                add(f"| {key} | {count} |")
        add("")
        add("| request: answer | count |")
        add("|---|---|")
        for key, count in sorted(self.replies.items(), key=lambda kv: (-kv[1], kv[0])):
            add(f"| {key} | {count} |")
        add("")
        add("| how client processes ended | count |")
        add("|---|---|")
        for key, count in sorted(self.exits.items(), key=lambda kv: (-kv[1], kv[0])):
            add(f"| {key} | {count} |")
        add("")
        add("| invariant | violations | first examples |")
        add("|---|---|---|")
        by_inv: dict[str, list[Violation]] = defaultdict(list)
        for v in self.violations:
            by_inv[v.invariant].append(v)
        for inv in INVARIANTS:
            found = by_inv.get(inv, [])
            examples = "; ".join(v.detail.replace("|", "\\|") for v in found[:3])
            add(f"| {inv} | {len(found)} | {examples or '-'} |")
        if self.missing_kinds:
            add("")
            add(f"Fault kinds never injected: {', '.join(self.missing_kinds)}.")
        return "\n".join(out) + "\n"


# --- entry point ----------------------------------------------------------------------------------


def make_topology(options: Options) -> Topology:
    if options.local:
        return LocalTopology()
    from tests.system.hosts import NetnsTopology  # needs root: ip netns

    return NetnsTopology(options.hosts, coordinators=2)


@contextlib.contextmanager
def soak_running(options: Options) -> Iterator[Soak]:
    topology = make_topology(options)
    soak: Soak | None = None
    try:
        soak = Soak(options, topology)
        yield soak
    finally:
        if soak is not None:
            soak.cleanup()
        topology.close()


def run(options: Options) -> Report:
    # A SIGTERM ends the soak like a Ctrl-C: through the finally clauses that clean up.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with soak_running(options) as soak:
            return soak.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.system.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to inject faults")
    parser.add_argument("--seed", type=int, default=None, help="the random seed (printed)")
    parser.add_argument("--hosts", type=int, default=3, help="client hosts")
    parser.add_argument("--nodes-per-host", type=int, default=2)
    parser.add_argument(
        "--local",
        action="store_true",
        help="no network namespaces (no root needed): no network faults",
    )
    parser.add_argument("--report", type=Path, default=None, help="also write the table here")
    parser.add_argument("-v", "--verbose", action="store_true", help="narrate on stderr")
    args = parser.parse_args(argv)
    options = Options(
        seconds=args.seconds,
        seed=args.seed,
        hosts=args.hosts,
        nodes_per_host=args.nodes_per_host,
        local=args.local,
        verbose=args.verbose,
    )
    report = run(options)
    text = report.markdown()
    print(text)
    if args.report is not None:
        args.report.write_text(text)
    return 1 if report.violations or report.missing_kinds else 0


if __name__ == "__main__":
    sys.exit(main())
