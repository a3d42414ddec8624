"""The reference: the seed's robust messenger in Erlang (benchmarks/erlang/), measured on the same
scenarios as the messenger, so that each messenger figure can be read against the original's.

    python -m benchmarks.erlang_ref [--full] [--repeat N] [--json]

It compiles benchmarks/erlang/*.erl (erlc, into the work directory), starts its own epmd on a free
loopback port, the server's node (which runs the driver, bench.erl) and two client nodes, plus one
node per repetition of the crash scenario, all on 127.0.0.1; it sends the driver one command per
run and parses the one JSON line it answers. Needs `erl`, `erlc` and `epmd` (Debian: apt-get install
erlang-base); without them `run` raises NotRun, which the runner reports as not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.figures import Env, Figure, NotRun, repeat

SOURCES = Path(__file__).resolve().parent / "erlang"
_HOST = "127.0.0.1"
_BOOT_S = 30.0  # a node's boot, and the driver's wait for its client nodes, on a busy machine
_RUN_S = 150.0  # one command (the driver's own bound for a run is 120 s)
_STOP_S = 5.0  # a node halting once its stdin closes
_PAIRS = (1, 8, 32)
_WINDOWS = {"awaited": 1, "inflight16": 16}  # in flight per sender; 1: each send awaited
_REF = "Erlang original"


@dataclass(frozen=True)
class _Counts:
    messages: int  # per throughput run, all pairs together
    rtt_samples: int  # round trips per run (after the driver's 100 of warm-up)
    logons: int  # users logging on at once per run


_QUICK = _Counts(messages=4000, rtt_samples=2000, logons=2000)
_FULL = _Counts(messages=20000, rtt_samples=10000, logons=5000)


def _tools() -> tuple[str, str, str]:
    erl, erlc, epmd = (shutil.which(name) for name in ("erl", "erlc", "epmd"))
    if erl is None or erlc is None or epmd is None:
        raise NotRun("erl not found: apt-get install erlang-base")
    return erl, erlc, epmd


def _free_port() -> int:
    # Another process may take it before epmd does: epmd then exits, and start() says so.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def _port_open(port: int, proc: asyncio.subprocess.Process, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"epmd exited ({proc.returncode}) before listening on {port}")
        try:
            reader, writer = await asyncio.open_connection(_HOST, port)
        except OSError:
            if loop.time() >= deadline:
                raise RuntimeError(f"epmd is not listening on {_HOST}:{port}") from None
            await asyncio.sleep(0.02)
            continue
        # A whole NAMES_REQ (length 1, 'n'), as `epmd -names` sends: a bare connect makes epmd
        # log "partial packet".
        writer.write(b"\x00\x01n")
        await reader.read()
        writer.close()
        await writer.wait_closed()
        return


class Cluster:
    """epmd, the server's node with the driver, two client nodes and `victims` spare nodes, each
    a child process ended by its PID (stdin closed first: every node halts at its end)."""

    def __init__(self, work_dir: str, victims: int) -> None:
        self.work = Path(work_dir) / f"erlang-{secrets.token_hex(4)}"
        self.victims = [f"v{i}@{_HOST}" for i in range(1, victims + 1)]
        self.nodes: dict[str, asyncio.subprocess.Process] = {}
        self.epmd: asyncio.subprocess.Process | None = None
        self.otp = ""

    async def start(self) -> None:
        erl, erlc, epmd = _tools()
        ebin = self.work / "ebin"
        ebin.mkdir(parents=True)
        sources = sorted(str(p) for p in SOURCES.glob("*.erl"))
        compiled = await asyncio.create_subprocess_exec(
            erlc, "-o", str(ebin), *sources,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await compiled.communicate()
        if compiled.returncode != 0:
            raise RuntimeError(f"erlc failed: {out.decode(errors='replace')}")
        # The cookie is read from $HOME/.erlang.cookie, not passed with -setcookie, which any
        # local user could read in ps and use to run code on these nodes.
        home = self.work / "home"
        home.mkdir(mode=0o700)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        common = [
            "-noshell",
            *("-start_epmd", "false"),  # fail rather than start an epmd nobody would end
            *("-connect_all", "false"),  # as in the seed: client nodes connect to the server only
            *("-kernel", "inet_dist_use_interface", "{127,0,0,1}"),
            *("-pa", str(ebin)),
        ]
        with (self.work / "nodes.log").open("ab") as log:  # the children keep their own fds
            # Our own epmd on a free port: other sessions' nodes (and their epmd on 4369) are
            # never touched, and ending it by PID ends only ours.
            port = _free_port()
            self.epmd = await asyncio.create_subprocess_exec(
                epmd, "-port", str(port), "-address", _HOST,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
            await _port_open(port, self.epmd, _BOOT_S)
            env = os.environ | {"ERL_EPMD_PORT": str(port), "HOME": str(home)}
            for name in [f"c1@{_HOST}", f"c2@{_HOST}", *self.victims]:
                self.nodes[name] = await asyncio.create_subprocess_exec(
                    erl, "-name", name, *common, "-run", "bench", "node_main",
                    stdin=asyncio.subprocess.PIPE, stdout=log, stderr=log, env=env,
                )  # fmt: skip
            self.nodes["driver"] = await asyncio.create_subprocess_exec(
                erl, "-name", f"srv@{_HOST}", *common,
                "-run", "bench", "driver", f"c1@{_HOST}", f"c2@{_HOST}",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
            )  # fmt: skip
        ready = await self._read(_BOOT_S)
        self.otp = str(ready.get("otp", ""))

    async def ask(self, command: str, timeout: float = _RUN_S) -> dict[str, Any]:
        driver = self.nodes["driver"]
        assert driver.stdin is not None
        driver.stdin.write(command.encode() + b"\n")
        await driver.stdin.drain()
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict[str, Any]:
        stdout = self.nodes["driver"].stdout
        assert stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                line = await stdout.readline()
                if not line:
                    raise RuntimeError(f"the Erlang driver exited: {self._log_tail()}")
                # Only the replies are JSON objects; logger reports also go to stdout.
                if line.startswith(b"{"):
                    reply: dict[str, Any] = json.loads(line)
                    if "error" in reply:
                        raise RuntimeError(f"Erlang driver: {reply['error']}")
                    return reply

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "nodes.log").read_text(errors="replace")[-2000:]
        return ""

    async def kill(self, node: str) -> int:
        """kill -9 a node; the time just before it (ns, the clock of os:system_time)."""
        proc = self.nodes.pop(node)
        killed = time.time_ns()
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()  # else its transport outlives the event loop
        return killed

    async def close(self) -> None:
        try:
            procs = list(self.nodes.values())
            for proc in procs:
                if proc.stdin is not None:
                    proc.stdin.close()
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), _STOP_S)
                except TimeoutError:
                    os.kill(proc.pid, signal.SIGKILL)
                    await proc.wait()
                if proc.stdout is not None:
                    # To its end: the pipe's transport closes then, rather than after the event
                    # loop has ("Event loop is closed" from its __del__).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.stdout.read(), _STOP_S)
            if self.epmd is not None and self.epmd.returncode is None:
                os.kill(self.epmd.pid, signal.SIGTERM)
                await self.epmd.wait()
        finally:
            # Cancelled or failed on the way: what still runs is killed now, without waiting. A
            # child not reaped yet keeps its PID (a zombie), so this PID is still ours.
            for proc in [*self.nodes.values(), *([self.epmd] if self.epmd else [])]:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def cluster(work_dir: str, victims: int) -> AsyncIterator[Cluster]:
    nodes = Cluster(work_dir, victims)
    try:
        await nodes.start()
        yield nodes
    finally:
        await nodes.close()


async def _crash_ms(nodes: Cluster, victim: str) -> float:
    ready = await nodes.ask(f"crash_prep {victim}")
    proc = nodes.nodes[victim]
    if int(ready["os_pid"]) != proc.pid:  # erl execs beam.smp: the PID we hold is the node
        raise RuntimeError(f"{victim} runs as {ready['os_pid']}, not as our child {proc.pid}")
    killed = await nodes.kill(victim)
    removed = await nodes.ask("crash_wait")
    return (int(removed["removed_ns"]) - killed) / 1e6


async def run(env: Env) -> list[Figure]:
    """Every scenario `env.repeat` times on the Erlang original; its figures (keys `*.erlang`)."""
    _tools()
    counts = _QUICK if env.quick else _FULL
    figures: list[Figure] = []
    async with cluster(env.work_dir, env.repeat) as nodes:
        otp = {"otp": nodes.otp}
        for mode, window in _WINDOWS.items():
            how = "each send awaited" if window == 1 else f"{window} in flight per sender"
            for pairs in _PAIRS:
                command = f"throughput {window} {pairs} {counts.messages}"

                async def once(command: str = command) -> float:
                    return float((await nodes.ask(command))["msgs_per_s"])

                figures.append(
                    Figure(
                        key=f"throughput.{mode}.{pairs}pairs.erlang",
                        label=f"one-way msgs/s, {pairs} pairs, {how}: {_REF}",
                        unit="msgs/s",
                        values=await repeat(env.repeat, once),
                        notes=(
                            f"{counts.messages} messages per run; senders on one node, receivers "
                            "on another, the server on a third. The seed's client has one request "
                            "at the server at a time, so a window queues at the client."
                        ),
                        extra=otp,
                    )
                )
        rtts = [await nodes.ask(f"rtt {counts.rtt_samples}") for _ in range(env.repeat)]
        for q in ("p50", "p99", "p999"):
            figures.append(
                Figure(
                    key=f"rtt.{q}.erlang",
                    label=f"round trip A→B→A {q}: {_REF}",
                    unit="µs",
                    values=tuple(float(r[f"{q}_us"]) for r in rtts),
                    better="lower",
                    notes=(
                        f"{counts.rtt_samples} round trips per run (nearest rank): A's message to "
                        "B, whose callback answers with message(A, ...), until A's callback has it."
                    ),
                    extra=otp,
                )
            )

        async def logons() -> float:
            return float((await nodes.ask(f"logon {counts.logons}"))["logons_per_s"])

        figures.append(
            Figure(
                key="logon.rate.erlang",
                label=f"logons/s, {counts.logons} at once from two nodes: {_REF}",
                unit="logons/s",
                values=await repeat(env.repeat, logons),
                notes="until every user has its logged_on; the seed's user list is a list.",
                extra=otp,
            )
        )
        crashes = [await _crash_ms(nodes, victim) for victim in nodes.victims]
        figures.append(
            Figure(
                key="crash.detect.erlang",
                label=f"client node kill -9 → user removed, ms: {_REF}",
                unit="ms",
                values=tuple(crashes),
                better="lower",
                notes=(
                    "from just before SIGKILL to the server's server_logoff of the user "
                    "(traced): the TCP close makes the link's EXIT noconnection at once."
                ),
                extra=otp,
            )
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="full counts (default: quick)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="erlang-ref-") as work:
        # No Redis here: the Erlang original does not use one.
        env = Env(redis_url="", quick=not args.full, repeat=args.repeat, work_dir=work)
        try:
            figures = asyncio.run(run(env))
        except (NotRun, RuntimeError) as e:
            sys.exit(f"not run: {e}")
    for fig in figures:
        if args.json:
            print(json.dumps(fig.as_json(), ensure_ascii=False))
        else:
            spread = f"{fig.low:,.1f}-{fig.high:,.1f}"
            print(f"{fig.key:36} {fig.median:>12,.1f} {fig.unit:9} ({spread})")


if __name__ == "__main__":
    main()
