"""Run every benchmark scenario on a redis-server of the run's own; write JSON and a table.

    python -m benchmarks [--quick] [--repeat N] [--only raw,messenger_path] [--json PATH] [--check]

Scenario modules run in order, each `async def run(env) -> list[Figure]` (benchmarks/figures.py);
one that raises is reported as failed and the others still run. The benchmark never fails on a
number: `--check` exits 1 only if a scenario failed, an expected figure is missing, or no
messages arrived (what CI needs to know that the suite still works). benchmarks/README.md
documents the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks._support import admin, shapes
from benchmarks.figures import Env, Figure, NotRun, Partial
from messenger.embedded import EmbeddedRedis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# In order: the references first, so a slow scenario later cannot starve them of the machine.
SCENARIOS = ("raw", "relay_ref", "erlang_ref", "channels_ref", "messenger_path", "scale", "faults")
# Written by others: run if present, not expected.
OPTIONAL = frozenset({"erlang_ref", "scale", "faults"})
# A scenario stuck past this is ended and reported as failed (quick, full).
TIMEOUTS = (180.0, 3600.0)
# Comparisons beyond each figure's own `ref`, made where both figures were measured: the
# messenger against the other systems of the same shape. The relay first: the floor of the
# messenger's own structure (benchmarks/relay_ref.py), so the ratio to it is what our code costs.
OTHERS = ("relay", "erlang", "channels_redis.core", "channels_redis.pubsub")
# The coordinator's drain, against the relay's in its place.
CAPACITY = ("coordinator", "coordinator_cpu", "redis_cpu")
# The issue's targets, shown beside the figures (informational: never an exit code). Each is
# (figure, reference or None for an absolute figure, "min"/"max", bound).
TARGETS: tuple[tuple[str, str | None, str, float], ...] = (
    ("throughput.awaited.8pairs.messenger", "throughput.awaited.8pairs.raw", "min", 0.6),
    ("throughput.inflight16.8pairs.messenger", "throughput.inflight16.8pairs.erlang", "min", 1.5),
    (
        "throughput.inflight16.8pairs.messenger",
        "throughput.inflight16.8pairs.channels_redis.core",
        "min",
        1.0,
    ),
    (
        "throughput.inflight16.8pairs.messenger",
        "throughput.inflight16.8pairs.channels_redis.pubsub",
        "min",
        1.0,
    ),
    ("capacity.coordinator.messenger", None, "min", 21_000.0),
    ("roundtrip.p50.messenger", "roundtrip.p50.raw", "max", 3.0),
    ("roundtrip.p99.messenger", "roundtrip.p99.raw", "max", 4.0),
    ("cli.message.messenger", "cli.message.floor", "max", 1.5),
)


def _comparison_pairs() -> list[tuple[str, str]]:
    pairs = [(s.key("messenger"), s.key(other)) for s in shapes() for other in OTHERS]
    for q in ("p50", "p99", "p999"):
        # The Erlang reference names its round trips `rtt.*` (today).
        pairs.append((f"roundtrip.{q}.messenger", f"rtt.{q}.erlang"))
        pairs += [(f"roundtrip.{q}.messenger", f"roundtrip.{q}.{o}") for o in OTHERS]
    pairs += [(f"capacity.{c}.messenger", f"capacity.{c}.relay") for c in CAPACITY]
    pairs.append(("logon.rate.messenger", "logon.rate.erlang"))
    pairs.append(("faults.kill9.removal_ms", "crash.detect.erlang"))
    return pairs


@dataclass
class Outcome:
    name: str
    status: str = "ok"  # "ok", "failed", "not run"
    seconds: float = 0.0
    error: str = ""
    figures: list[Figure] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "figures": [f.key for f in self.figures],
            "missing": self.missing,
        }


def _module(name: str) -> ModuleType | None:
    if importlib.util.find_spec(f"benchmarks.{name}") is None:
        return None
    return importlib.import_module(f"benchmarks.{name}")


async def _run_one(name: str, module: ModuleType, env: Env) -> Outcome:
    outcome = Outcome(name)
    started = time.perf_counter()
    try:
        figures = await asyncio.wait_for(module.run(env), TIMEOUTS[0 if env.quick else 1])
        outcome.figures = list(figures)
    except NotRun as e:
        outcome.status, outcome.error = "not run", str(e)
    except Partial as e:
        outcome.status, outcome.error, outcome.figures = "failed", str(e), e.figures
    except Exception as e:
        outcome.status = "failed"
        outcome.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    outcome.seconds = time.perf_counter() - started
    expected = getattr(module, "expected_keys", None)
    if outcome.status != "not run" and expected is not None:
        got = {f.key for f in outcome.figures}
        outcome.missing = [k for k in expected(env) if k not in got]
    print(
        f"benchmarks: {name}: {outcome.status} in {outcome.seconds:.1f} s"
        + (f" ({outcome.error})" if outcome.error else ""),
        file=sys.stderr,
        flush=True,
    )
    return outcome


def _git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in ("redis", "hiredis", "channels", "channels-redis", "messenger"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


async def _redis_info(url: str) -> dict[str, Any]:
    redis = admin(url)
    try:
        info = await redis.info("server")
        return {"version": info.get("redis_version"), "mode": info.get("redis_mode")}
    finally:
        await redis.aclose()


def ratio(figure: Figure, ref: Figure | None) -> float | None:
    """This figure's median over its reference's (None without a usable reference)."""
    if ref is None or ref.median == 0 or not math.isfinite(ref.median):
        return None
    return figure.median / ref.median


def comparisons(figures: dict[str, Figure]) -> list[dict[str, Any]]:
    """The messenger against each other system, where both ran."""
    return [
        {"key": ours, "ref": theirs, "ratio": ratio(figures[ours], figures[theirs])}
        for ours, theirs in _comparison_pairs()
        if ours in figures and theirs in figures
    ]


def targets(figures: dict[str, Figure]) -> list[dict[str, Any]]:
    """Each target with the value it is judged on (a ratio, or the median of an absolute one)
    and whether it is met; None where a figure was not measured."""
    out = []
    for key, ref, way, bound in TARGETS:
        figure = figures.get(key)
        value = None
        if figure is not None:
            value = figure.median if ref is None else ratio(figure, figures.get(ref))
        met = None if value is None else (value >= bound if way == "min" else value <= bound)
        out.append({"key": key, "ref": ref, "way": way, "bound": bound, "value": value, "met": met})
    return out


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"


def _cell(f: Figure) -> str:
    return f"{_number(f.median)} ({_number(f.low)}-{_number(f.high)}) {f.unit}"


def _ratio_cell(r: float | None, better: str) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}x ({'higher' if better == 'higher' else 'lower'} is better)"


def markdown(report: dict[str, Any], outcomes: list[Outcome], figures: dict[str, Figure]) -> str:
    run = report["run"]
    lines = [
        f"# Benchmarks ({run['mode']} mode, {run['date']})",
        "",
        f"commit {str(run['git']['commit'])[:12]}{' (dirty)' if run['git']['dirty'] else ''}"
        f" · {run['machine']['cpus']} CPUs · Python {run['machine']['python']}"
        f" · Redis {run['redis']['version']} · {run['repeat']} repetitions"
        f" · {run['seconds']:.0f} s",
        "",
        "Each figure: median (min-max) of the repetitions; ratio = median / reference median,",
        "both measured in this run on the same Redis.",
        "",
        "## Targets (issue 13; informational, never a failure)",
        "",
        "| figure | against | target | now | |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        unit = "x" if t["ref"] else ""
        target = f"{'>=' if t['way'] == 'min' else '<='} {_number(t['bound'])}{unit}"
        now = "not measured" if t["value"] is None else f"{_number(t['value'])}{unit}"
        verdict = {None: "", True: "met", False: "not met"}[t["met"]]
        lines.append(
            f"| `{t['key']}` | `{t['ref'] or '(absolute)'}` | {target} | {now} | {verdict} |"
        )
    lines.append("")
    for outcome in outcomes:
        lines += [f"## {outcome.name}: {outcome.status} ({outcome.seconds:.1f} s)", ""]
        if outcome.error:
            lines += [f"> {outcome.error}", ""]
        if outcome.missing:
            lines += [f"> missing figures: {', '.join(outcome.missing)}", ""]
        if not outcome.figures:
            continue
        lines += ["| figure | median (min-max) | reference | ratio |", "|---|---|---|---|"]
        for f in outcome.figures:
            ref = figures.get(f.ref) if f.ref else None
            ref_cell = f"`{f.ref}` {_number(ref.median)} {ref.unit}" if ref else (f.ref or "")
            lines.append(
                f"| {f.label} `{f.key}` | {_cell(f)} | {ref_cell} | "
                f"{_ratio_cell(ratio(f, ref), f.better)} |"
            )
        notes = sorted({f.notes for f in outcome.figures if f.notes})
        lines += ["", *(f"Note: {n}." for n in notes), ""]
    if report["comparisons"]:
        lines += ["## messenger against the other systems", "", "| figure | against | ratio |"]
        lines.append("|---|---|---|")
        for c in report["comparisons"]:
            r = c["ratio"]
            lines.append(f"| `{c['key']}` | `{c['ref']}` | {'—' if r is None else f'{r:.2f}x'} |")
        lines.append("")
    if run["mode"] != "full":
        lines.append(
            f"{run['mode'].capitalize()} mode: each repetition about "
            f"{'0.1' if run['mode'] == 'smoke' else '0.25'} s (full: 2 s)"
            + (", no 32-pair shapes." if run["mode"] == "smoke" else ".")
        )
    return "\n".join(lines) + "\n"


def check(outcomes: list[Outcome], figures: dict[str, Figure]) -> list[str]:
    """Sanity only, never a number: it ran, messages arrived, every figure is there."""
    problems = []
    for o in outcomes:
        if o.status == "failed":
            problems.append(f"{o.name} failed: {o.error}")
        problems += [f"{o.name}: figure {key} is missing" for key in o.missing]
    keys = [f.key for o in outcomes for f in o.figures]
    problems += [f"figure {k} was measured twice" for k in sorted(set(keys)) if keys.count(k) > 1]
    for f in figures.values():
        # Whether a value is good is never checked; only that there is one (a figure may be 0
        # or even below, e.g. a memory difference).
        if not f.values or not all(math.isfinite(v) for v in f.values):
            problems.append(f"{f.key}: values {list(f.values)} are not all finite numbers")
        if f.extra.get("messages", 1) <= 0:
            problems.append(f"{f.key}: no messages arrived")
        if f.ref and f.ref not in figures:
            problems.append(f"{f.key}: its reference {f.ref} was not measured")
    if not figures:
        problems.append("no figure at all was measured")
    return problems


async def _measure(
    args: argparse.Namespace, wanted: tuple[str, ...]
) -> tuple[list[Outcome], dict[str, Any]]:
    outcomes: list[Outcome] = []
    # SIGTERM cancels the run, so every scenario's clean-up runs (its processes are ended).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with tempfile.TemporaryDirectory(prefix="mb-") as work, EmbeddedRedis() as server:
        env = Env(server.url, args.quick or args.smoke, args.repeat, work, smoke=args.smoke)
        redis = await _redis_info(server.url)
        redis["binary"] = server.binary or os.environ.get("MESSENGER_REDIS_SERVER") or "PATH"
        for name in wanted:
            try:
                module = _module(name)
            except Exception as e:  # a module that does not even import fails alone
                traceback.print_exc()
                outcomes.append(Outcome(name, "failed", error=f"import: {type(e).__name__}: {e}"))
                continue
            if module is None:
                if name not in OPTIONAL or args.only is not None:
                    outcomes.append(Outcome(name, "failed", error="no such module"))
                continue
            outcomes.append(await _run_one(name, module, env))
    return outcomes, redis


def _report(
    args: argparse.Namespace,
    wanted: tuple[str, ...],
    outcomes: list[Outcome],
    redis: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    figures = {f.key: f for o in outcomes for f in o.figures}
    return {
        "schema": 1,
        "run": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
            "repeat": args.repeat,
            "only": None if args.only is None else list(wanted),
            "seconds": seconds,
            "git": _git_commit(),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "implementation": platform.python_implementation(),
            },
            "redis": redis,
            "packages": _versions(),
        },
        "scenarios": {o.name: o.as_json() for o in outcomes},
        "figures": {
            key: f.as_json() | {"ratio": ratio(f, figures.get(f.ref) if f.ref else None)}
            for key, f in figures.items()
        },
        "comparisons": comparisons(figures),
        "targets": targets(figures),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the whole suite in under 60 s")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="quick mode cut down further (for the test that keeps the suite working)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure (>= 3)")
    parser.add_argument("--only", help=f"comma-separated scenarios, of {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--json",
        default=str(HERE / "results" / "latest.json"),
        help="where the JSON goes (the markdown table goes beside it, .md)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a scenario failed, a figure is missing or no message arrived",
    )
    args = parser.parse_args(argv)
    if args.repeat < 3:
        parser.error("--repeat must be at least 3: every figure is a median with min and max")
    wanted = SCENARIOS if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in wanted if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    started = time.perf_counter()
    try:
        outcomes, redis = asyncio.run(_measure(args, wanted))
    except (asyncio.CancelledError, KeyboardInterrupt):
        print("benchmarks: stopped", file=sys.stderr)
        return 130
    report = _report(args, wanted, outcomes, redis, time.perf_counter() - started)
    figures = {f.key: f for o in outcomes for f in o.figures}
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    table = markdown(report, outcomes, figures)
    json_path.with_suffix(".md").write_text(table)
    print(table)
    if not args.check:
        return 0
    problems = check(outcomes, figures)
    for problem in problems:
        print(f"benchmarks --check: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("benchmarks --check: every scenario ran and every figure is there", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
