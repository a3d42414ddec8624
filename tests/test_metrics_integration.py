"""`messenger server --metrics-port`: a real coordinator's /metrics, scraped over HTTP while real
clients log on, talk, log off and crash; a standby that takes over; and the errors that say
what is wrong with the option."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Procs, wait_until

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample of the coordinator's /metrics, by name and labels; {} if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return {}
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(port: int, name: str, **labels: str) -> float | None:
    return scrape(port).get((name, frozenset(labels.items())))


def wait_sample(port: int, value: float, name: str, timeout: float = 10.0, **labels: str) -> None:
    """Wait until the scraped sample has `value`, saying what it was at the deadline."""
    try:
        wait_until(lambda: sample(port, name, **labels) == value, timeout, f"{name} == {value}")
    except AssertionError:
        got = sample(port, name, **labels)
        raise AssertionError(f"{name}{labels}: {got}, not {value}, after {timeout} s") from None


def metrics_server(procs: Procs, *args: str) -> tuple[int, str]:
    """A `messenger server` with metrics on a free port: (port, its `metrics on` line)."""
    port = free_port()
    server = procs.server("--metrics-port", str(port), *args)
    return port, server.wait_line(r"metrics on http://", 5, stderr=True)


def test_the_counters_follow_logons_messages_logoffs_and_crashes(procs: Procs) -> None:
    port, line = metrics_server(procs)
    assert line.endswith(f"metrics on http://127.0.0.1:{port}/metrics")
    wait_sample(port, 1, "messenger_active")
    assert sample(port, "messenger_activations_total") == 1
    assert sample(port, "messenger_removals_total", reason="crash") == 0  # there from the start

    alice = procs.logon("alice", "n1")
    procs.logon("bob", "n2")
    wait_sample(port, 2, "messenger_requests_total", kind="logon", reply="logged-on")
    wait_sample(port, 2, "messenger_sessions")

    assert procs.run("message", "bob", "hi", "--node", "n1")[:2] == (0, ["sent"])
    wait_sample(port, 1, "messenger_requests_total", kind="message-to", reply="sent")
    code, out, _ = procs.run("message", "carol", "hi", "--node", "n1")
    assert (code, out) == (1, ["receiver-not-found"])
    wait_sample(port, 1, "messenger_requests_total", kind="message-to", reply="receiver-not-found")
    # each answered request was timed, on Redis's clock, in well under the reply timeout
    wait_sample(port, 2, "messenger_request_duration_seconds_count", kind="message-to")
    total = sample(port, "messenger_request_duration_seconds_sum", kind="message-to")
    assert total is not None
    assert 0 <= total < 5

    assert procs.run("logoff", "--node", "n2")[:2] == (0, ["logged-off"])
    wait_sample(port, 1, "messenger_requests_total", kind="logoff", reply="logged-off")
    wait_sample(port, 1, "messenger_removals_total", reason="logoff")
    wait_sample(port, 1, "messenger_sessions")

    alice.kill()  # kill -9: her connection goes, and the crash check sees it
    wait_sample(port, 1, "messenger_removals_total", reason="crash")
    wait_sample(port, 0, "messenger_sessions")
    assert sample(port, "messenger_removals_total", reason="timeout") == 0
    assert (sample(port, "messenger_sweeps_total") or 0) > 0
    assert sample(port, "messenger_requests_dropped_total", reason="unauthenticated") == 0


def test_a_standby_that_takes_over_says_so(procs: Procs) -> None:
    first, _ = metrics_server(procs)
    standby_port = free_port()
    standby = procs.start("server", "--metrics-port", str(standby_port), **procs.server_env)
    standby.wait_line("waiting as standby", 15, stderr=True)
    assert sample(standby_port, "messenger_active") == 0
    assert sample(standby_port, "messenger_activations_total") == 0
    procs.started[0].kill()  # kill -9 the active one: its lease runs out
    wait_sample(standby_port, 1, "messenger_active", timeout=15)
    assert sample(standby_port, "messenger_activations_total") == 1
    assert scrape(first) == {}  # the dead one's metrics died with it


# --- errors that say what is wrong --------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "env_port", "said"),
    [
        (("--metrics-port", "70000"), "", "Invalid value for '--metrics-port'"),
        (("--metrics-port", "-1"), "", "Invalid value for '--metrics-port'"),
        ((), "nine", "'nine' is not a valid integer"),
        (
            ("--metrics-port", "0", "--metrics-host", "no-such-host.invalid"),
            "",
            "Error: --metrics-host (or MESSENGER_METRICS_HOST): cannot listen on "
            "'no-such-host.invalid' port 0",
        ),
    ],
)
def test_a_bad_metrics_option_is_a_clear_error(
    procs: Procs, args: tuple[str, ...], env_port: str, said: str
) -> None:
    # An empty variable is an unset one (click's rule, as for every MESSENGER_* option).
    code, out, err = procs.run("server", *args, MESSENGER_METRICS_PORT=env_port)
    assert (code, out) == (2, [])
    assert said in err
    assert "Traceback" not in err


def test_a_metrics_port_in_use_is_refused_before_anything_starts(
    base_env: dict[str, str], taken_port: int
) -> None:
    """With no Redis URL `server` would start an embedded Redis: it must not, nor leave a
    server file behind, when its metrics port cannot be had."""
    local_only = Procs(dict(base_env))
    try:
        code, out, err = local_only.run("server", "--metrics-port", str(taken_port))
    finally:
        local_only.cleanup()
    assert (code, out) == (2, [])
    assert err.splitlines()[-1] == (
        f"Error: --metrics-port (or MESSENGER_METRICS_PORT): cannot listen on '127.0.0.1' port "
        f"{taken_port}: Address already in use"
    )
    assert "embedded redis-server" not in err
    assert not (Path(base_env["MESSENGER_RUNTIME_DIR"]) / "server.json").exists()
