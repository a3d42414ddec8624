"""The benchmark suite keeps working: it runs, messages arrive, every figure is there.

Never a threshold on a number: timings belong to benchmarks (docs/reliability.md), and a shared
machine makes them drift. The smoke mode is the quick mode cut down, so this stays short.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import benchmarks.__main__ as runner
from benchmarks.figures import Env, Figure, NotRun, Partial
from benchmarks.messenger_path import expected_keys as messenger_keys
from benchmarks.raw import expected_keys as raw_keys
from benchmarks.relay_ref import expected_keys as relay_keys

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    return result, report


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_smoke_run_has_every_figure(tmp_path: Path) -> None:
    result, report = _run(tmp_path, "--smoke", "--only", "raw,relay_ref,messenger_path", "--check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    env = Env("", quick=True, repeat=3, work_dir="", smoke=True)
    figures = report["figures"]
    for key in raw_keys(env) + relay_keys(env) + messenger_keys(env):
        assert key in figures, f"{key} missing: {sorted(figures)}"
        figure = figures[key]
        assert len(figure["values"]) == 3
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert figure["median"] > 0
        assert figure["extra"].get("messages", 1) > 0
        if figure["ref"] is not None:
            assert figure["ref"] in figures
            assert figure["ratio"] is not None
            assert figure["ratio"] > 0
    run = report["run"]
    assert run["mode"] == "smoke"
    assert run["machine"]["cpus"] > 0
    assert run["redis"]["version"]
    assert {name: s["status"] for name, s in report["scenarios"].items()} == {
        "raw": "ok",
        "relay_ref": "ok",
        "messenger_path": "ok",
    }
    table = (tmp_path / "bench.md").read_text()
    assert "throughput.awaited.8pairs.messenger" in table
    assert "throughput.awaited.8pairs.messenger" in result.stdout
    compared = {(c["key"], c["ref"]) for c in report["comparisons"]}
    assert ("throughput.awaited.8pairs.messenger", "throughput.awaited.8pairs.relay") in compared
    assert ("capacity.coordinator.messenger", "capacity.coordinator.relay") in compared


def test_check_fails_on_an_unknown_scenario(tmp_path: Path) -> None:
    result, _ = _run(tmp_path, "--smoke", "--only", "nonesuch", "--check")
    assert result.returncode == 2
    assert "nonesuch" in result.stderr


def _scenario(run: Any, keys: list[str] | None = None) -> ModuleType:
    module = ModuleType("benchmarks.fake")
    module.run = run  # type: ignore[attr-defined]
    if keys is not None:
        module.expected_keys = lambda env: keys  # type: ignore[attr-defined]
    return module


_ENV = Env("redis://unused", quick=True, repeat=3, work_dir="/nonexistent", smoke=True)
_FIGURE = Figure("a.raw", "a", "msgs/s", (1.0, 2.0, 3.0), extra={"messages": 10})


async def test_a_scenario_that_raises_is_failed_and_reported() -> None:
    async def broken(env: Env) -> list[Figure]:
        raise RuntimeError("it broke")

    outcome = await runner._run_one("fake", _scenario(broken), _ENV)
    assert (outcome.status, outcome.error) == ("failed", "RuntimeError: it broke")
    assert runner.check([outcome], {}) == [
        "fake failed: RuntimeError: it broke",
        "no figure at all was measured",
    ]


async def test_partial_keeps_its_figures_and_not_run_is_no_failure() -> None:
    async def partial(env: Env) -> list[Figure]:
        raise Partial([_FIGURE], {"b": "TimeoutError: slow"})

    async def absent(env: Env) -> list[Figure]:
        raise NotRun("no such package")

    got = await runner._run_one("fake", _scenario(partial, ["a.raw", "b.raw"]), _ENV)
    assert (got.status, got.figures, got.missing) == ("failed", [_FIGURE], ["b.raw"])
    skipped = await runner._run_one("absent", _scenario(absent, ["c.raw"]), _ENV)
    assert (skipped.status, skipped.error, skipped.missing) == ("not run", "no such package", [])
    assert runner.check([skipped], {"a.raw": _FIGURE}) == []


def test_check_wants_messages_and_references() -> None:
    empty = Figure(
        "x.messenger", "x", "msgs/s", (1.0, 1.0, 1.0), ref="x.raw", extra={"messages": 0}
    )
    assert runner.check([runner.Outcome("fake")], {"x.messenger": empty}) == [
        "x.messenger: no messages arrived",
        "x.messenger: its reference x.raw was not measured",
    ]
    assert runner.ratio(empty, _FIGURE) == 0.5


def test_channels_redis_missing_is_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import channels_ref

    monkeypatch.setitem(sys.modules, "channels_redis.core", None)  # import raises ImportError
    with pytest.raises(NotRun, match="channels_redis is not installed"):
        channels_ref._factory("core", "redis://unused")
