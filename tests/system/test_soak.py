"""The soak in the test suite (issue 12, point 6): MESSENGER_SOAK_SECONDS of chat under random
faults (120 by default, what CI runs), then no invariant may have been violated, every kind of
fault must have been injected, and messages must have got through. The table is printed (see
it with pytest -s); longer runs: `python -m tests.system.soak` (docs/reliability.md).

Root only (network namespaces): skips elsewhere, saying why; CI runs as root, so there it never
skips.
"""

from __future__ import annotations

import os

import pytest

from tests.netns import skip_reason
from tests.system.soak import Options, run

pytestmark = pytest.mark.integration

SECONDS = float(os.environ.get("MESSENGER_SOAK_SECONDS", "120"))
SETUP = 120.0  # namespaces, Redis, coordinators, first logons, settling and cleaning up


@pytest.mark.timeout(SECONDS + SETUP)
def test_soak() -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    seed = os.environ.get("MESSENGER_SOAK_SEED")
    report = run(Options(seconds=SECONDS, seed=int(seed) if seed else None))
    table = report.markdown()
    print("\n" + table)
    if report.violations:
        pytest.fail(f"invariants violated (seed {report.seed}):\n{table}", pytrace=False)
    assert not report.missing_kinds, f"fault kinds never injected: {report.missing_kinds}"
    assert report.messages["received exactly once"] > 0, f"no message got through:\n{table}"
