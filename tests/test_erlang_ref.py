"""The Erlang reference's harness (benchmarks/erlang_ref.py) works and cleans up: every figure
comes back, and no node or epmd it started outlives it. Figures are not judged here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmarks import erlang_ref
from benchmarks.figures import Env, NotRun

_KEYS = {
    *(
        f"throughput.{mode}.{n}pairs.erlang"
        for mode in ("awaited", "inflight16")
        for n in (1, 8, 32)
    ),
    *(f"rtt.{q}.erlang" for q in ("p50", "p99", "p999")),
    "logon.rate.erlang",
    "crash.detect.erlang",
}


def _children() -> set[int]:
    """PIDs of this process's children (Linux), zombies included."""
    me = os.getpid()
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            found.add(int(stat.parent.name))
    return found


async def test_missing_erl_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    env = Env(redis_url="", quick=True, repeat=3, work_dir=str(tmp_path))
    with pytest.raises(NotRun, match="erl not found: apt-get install erlang-base"):
        await erlang_ref.run(env)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("erl") is None, reason="erl not installed (erlang-base)")
async def test_every_figure_and_nothing_left(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(erlang_ref, "_QUICK", erlang_ref._Counts(400, 200, 200))
    before = _children()
    env = Env(redis_url="", quick=True, repeat=3, work_dir=str(tmp_path))
    figures = await erlang_ref.run(env)
    assert {f.key for f in figures} == _KEYS
    assert all(len(f.values) == 3 and f.low > 0 for f in figures)
    assert _children() <= before
