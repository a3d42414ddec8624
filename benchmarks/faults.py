"""faults: `kill -9` and SIGSTOP of a client until its removal; coordinator hand-over times.

    python -m benchmarks.faults [--quick] [--repeat 3]

Real processes on one Redis, as deployed: two coordinators (`python -m messenger server`, the
admin URL and a client password; one active, one standing by) and clients (`python -m messenger
logon NAME --node N`, the client credential only, a runtime directory each). Each repetition:

- `kill -9` of a logged-on client → its name gone from `{p}:names` (the admin connection polls
  every 5 ms): the crash fast path (messenger/crashes.py);
- SIGSTOP of a client → gone (its connection stays open, so only its heartbeat deadline);
- `kill -9` of the active coordinator → the standby's `coordinator … is active` line;
- SIGTERM of the active coordinator with a standby → the standby's line.

A new standby is started (and seen standing by) after each hand-over. Default timings (heartbeat
1 s, TTL 3 s, lease TTL 2 s). Quick mode: one repetition of each (figures need 3 or more).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

from redis.asyncio import Redis

from benchmarks.figures import Env, Figure
from benchmarks.procs import Proc, messenger_env, stop_all
from benchmarks.standalone import run_alone, table
from messenger import acl
from messenger.connection import connect
from messenger.keys import Keys

_POLL = 0.005
_ACTIVE = r"coordinator (\w+) is active"
_STANDBY = r"waiting as standby"


class _Faults:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.keys = Keys("faults" + secrets.token_hex(3))
        self.password = secrets.token_hex(16)
        url = urlsplit(env.redis_url)
        self.client_url = acl.client_url(
            url.hostname or "127.0.0.1",
            url.port or 6379,
            self.keys.prefix,
            self.password,
            db=int(url.path.strip("/") or 0),
        )
        self.admin: Redis = connect(env.redis_url, socket_timeout=5.0, name="bench-faults")
        self.work = Path(env.work_dir) / self.keys.prefix
        self.procs: list[Proc] = []
        self.active: Proc | None = None
        self.standby: Proc | None = None
        self._clients = 0

    async def coordinator(self) -> Proc:
        env = messenger_env(
            redis_url=self.env.redis_url,
            client_password=self.password,
            prefix=self.keys.prefix,
            runtime_dir=str(self.work / "server"),
        )
        proc = await Proc.start("server", env=env)
        self.procs.append(proc)
        return proc

    async def start_pair(self) -> None:
        self.active = await self.coordinator()
        await self.active.wait_line(_ACTIVE, 30.0)
        await self.new_standby()

    async def new_standby(self) -> None:
        self.standby = await self.coordinator()
        # Logged after its first lease attempt, which also put it in `{p}:coordinators`: from
        # then on, an active coordinator that stops knows a standby is there.
        await self.standby.wait_line(_STANDBY, 30.0)

    async def client(self) -> tuple[Proc, str]:
        self._clients += 1
        name, node = f"u{self._clients}", f"n{self._clients}"
        env = messenger_env(
            redis_url=self.client_url,
            prefix=self.keys.prefix,
            runtime_dir=str(self.work / node),
        )
        proc = await Proc.start("logon", name, "--node", node, env=env)
        self.procs.append(proc)
        await proc.wait_line(r"^logged-on$", 15.0, stderr=False)
        return proc, name

    async def gone(self, name: str, timeout: float) -> float:
        """Seconds until `name` is no longer in `{p}:names`, polled every 5 ms from now."""
        started = time.monotonic()
        while await self.admin.hexists(self.keys.names, name):
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{name} still logged on after {timeout:g} s")
            await asyncio.sleep(_POLL)
        return time.monotonic() - started

    async def kill9_client(self) -> float:
        proc, name = await self.client()
        proc.signal(signal.SIGKILL)
        took = await self.gone(name, 10.0)
        await proc.stop()
        return took * 1000

    async def sigstop_client(self) -> float:
        proc, name = await self.client()
        proc.signal(signal.SIGSTOP)
        took = await self.gone(name, 15.0)
        await proc.stop()  # SIGCONT first: it learns `you-are-not-logged-on`, or is ended
        return took

    async def handover(self, sig: signal.Signals) -> float:
        """From `sig` to the active coordinator until the standby says it is active; then a
        new standby, so the next repetition starts from the same state."""
        old, new = self.active, self.standby
        assert old is not None
        assert new is not None
        mark = new.err.count
        started = time.monotonic()
        old.signal(sig)
        line = await new.wait_line(_ACTIVE, 15.0, since=mark)
        took = line.at - started
        await old.stop()
        self.active = new
        await self.new_standby()
        return took

    async def run(self) -> list[Figure]:
        reps = 1 if self.env.quick else max(3, self.env.repeat)
        note = f"{reps} repetition{'s' if reps > 1 else ''}"
        if self.env.quick:
            note += " (quick mode; figures need 3 or more: full mode)"
        try:
            await self.start_pair()
            kill9 = [await self.kill9_client() for _ in range(reps)]
            sigstop = [await self.sigstop_client() for _ in range(reps)]
            by_kill = [await self.handover(signal.SIGKILL) for _ in range(reps)]
            by_term = [await self.handover(signal.SIGTERM) for _ in range(reps)]
        finally:
            await stop_all(self.procs)
            await self.cleanup()
        timings = "heartbeat 1 s, TTL 3 s, sweep 0.25 s, lease TTL 2 s polled every 0.5 s"
        return [
            Figure(
                "faults.kill9.removal_ms",
                "client kill -9 to its name gone from {p}:names",
                "ms",
                tuple(kill9),
                better="lower",
                notes=f"{note}; the crash fast path (NUMSUB each sweep); {timings}",
            ),
            Figure(
                "faults.sigstop.removal_s",
                "client SIGSTOP to its name gone from {p}:names",
                "s",
                tuple(sigstop),
                better="lower",
                notes=f"{note}; its heartbeat deadline (TTL + up to a sweep); {timings}",
            ),
            Figure(
                "faults.handover.kill9_s",
                "active coordinator kill -9 to the standby's `is active`",
                "s",
                tuple(by_kill),
                better="lower",
                notes=f"{note}; the lease expires, the standby takes it at its next poll",
            ),
            Figure(
                "faults.handover.sigterm_s",
                "active coordinator SIGTERM to the standby's `is active`",
                "s",
                tuple(by_term),
                better="lower",
                notes=f"{note}; the lease is given up, the standby takes it at its next poll",
            ),
        ]

    async def cleanup(self) -> None:
        k = self.keys
        fixed = [k.sessions, k.names, k.nodes, k.users, k.deadlines, k.requests, k.inflight]
        await self.admin.unlink(*fixed, k.lease, k.coordinators, k.acl)
        for user in acl.users_of(k.prefix):
            await self.admin.acl_deluser(user)
        await self.admin.aclose()


async def run(env: Env) -> list[Figure]:
    return await _Faults(env).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition of each")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(table(run_alone(run, quick=args.quick, repeat=args.repeat)))


if __name__ == "__main__":
    main()
