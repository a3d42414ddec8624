"""The coordinator's Prometheus metrics (`messenger server --metrics-port PORT`).

Every metric lives in a registry of this object's own, never prometheus-client's global one:
several coordinators in one process (the tests) each count their own. The coordinator calls the
methods below at its hooks, and only when it was given a Metrics (`metrics is None`: nothing is
counted, nothing costs anything). docs/metrics.md has each metric with an example scrape.

    messenger_requests_total{kind,reply}        counter   verified requests, by kind and reply
                                                          (the reply word, `expired`,
                                                          `rate-limited` or `failed`)
    messenger_requests_dropped_total{reason}    counter   entries dropped unanswered: malformed,
                                                          unauthenticated, oversized
    messenger_request_duration_seconds{kind}    histogram from a request's signed send time to
                                                          the end of the batch that answered it
    messenger_rate_limited_total                counter   requests refused for their session's rate
    messenger_batch_size                        histogram requests per batch script
    messenger_sessions                          gauge     sessions logged on (0 on a standby)
    messenger_active                            gauge     1 while this coordinator holds the lease
    messenger_activations_total                 counter   times this coordinator became active
    messenger_sweeps_total                      counter   heartbeat-deadline sweeps
    messenger_removals_total{reason}            counter   sessions removed: logoff, timeout, crash,
                                                          replaced, server
    messenger_coordinator_info{id}              gauge     1, labelled with the id the logs show
    process_*                                   (prometheus-client's process collector)

The request path serves tens of thousands of requests a second in batches of up to 100, each
request costing the coordinator some 28 µs of CPU; prometheus-client's `labels(...).inc()` and
`observe()` cost 1-2 µs each. So nothing here goes through prometheus-client once a request:
`answered` counts a batch's replies in C (collections.Counter) and adds each distinct (kind,
reply) once, and the duration histogram is kept here (`_BatchHistogram`), its values sorted once
a batch and bisected once a bucket: under a microsecond a request in a full batch, most of it
reading each request's kind and send time (docs/metrics.md, "What it costs").
"""

from __future__ import annotations

import bisect
import itertools
import operator
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import HistogramMetricFamily, Metric

from messenger.rules import Reply

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from redis.asyncio import Redis

    from messenger.keys import Keys
    from messenger.protocol import SignedRequest

# The coordinator's batches are answered within milliseconds when it keeps up, and a request is
# never applied after its sender's wait (5 s by default): the buckets span both.
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# A batch holds at most 100 requests (coordinator._BATCH).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100)
# Reasons counted from the start, at 0, so that rate() and alerts see them before the first one.
# Any other reason is counted too when first given: adding one is a `removed("why")` call.
REMOVAL_REASONS = ("logoff", "timeout", "crash", "replaced", "server")  # protocol.REASONS
DROP_REASONS = ("malformed", "unauthenticated", "oversized")
FAILED = "failed"
# Plain strings: compared once a request in `answered`.
_EXPIRED = str(Reply.EXPIRED)
_RATE_LIMITED = str(Reply.RATE_LIMITED)
_LOGGED_OFF = str(Reply.LOGGED_OFF)
# How often the Redis clock is read again while active (see Metrics.sample): a Redis host whose
# wall clock is stepped must not skew the durations for longer than this.
_CLOCK_PERIOD = 60.0


class _BatchHistogram:
    """A histogram by one label, fed a batch of values at a time (milliseconds), read by
    prometheus-client at each scrape (it is a collector).

    A big batch's values are sorted (in C) and each bucket's count found by one bisection: 15
    bisections a batch rather than a bucket search and a lock a value, as Histogram.observe
    does. The scrape runs in the HTTP server's thread, so the counts change under a lock, taken
    once a batch."""

    # Below this many values a bucket search each is cheaper than a sort and 15 bisections.
    _FEW = 8

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]):
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = tuple(buckets)
        self._bounds_ms = tuple(b * 1000 for b in buckets)
        self._lock = threading.Lock()
        # label value -> values per bucket (the last: above every bound), and their sum (ms)
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def add(self, label: str, values_ms: list[float]) -> None:
        """Count `values_ms` (it may be sorted in place); a value below 0 counts as 0: a clock's
        error, not a time travelled."""
        bounds = self._bounds_ms
        if len(values_ms) < self._FEW:
            found = [0] * (len(bounds) + 1)
            total = 0.0
            for v in values_ms:
                found[bisect.bisect_left(bounds, v)] += 1
                total += max(v, 0.0)
        else:
            values_ms.sort()
            below = bisect.bisect_left(values_ms, 0)
            total = sum(values_ms) - sum(values_ms[:below]) if below else sum(values_ms)
            upto = [bisect.bisect_right(values_ms, bound) for bound in bounds]
            upto.append(len(values_ms))
            found = [upto[0], *(b - a for a, b in itertools.pairwise(upto))]
        with self._lock:
            counts = self._counts.get(label)
            if counts is None:
                counts = self._counts[label] = [0] * len(found)
                self._sums[label] = 0.0
            counts[:] = map(operator.add, counts, found)
            self._sums[label] += total

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(k, list(v), self._sums[k]) for k, v in sorted(self._counts.items())]
        for label, counts, total_ms in snapshot:
            cumulative = list(itertools.accumulate(counts))
            buckets = [(_le(b), float(n)) for b, n in zip(self.bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([label], buckets, total_ms / 1000)
        yield family


def _le(bound: float) -> str:
    # As prometheus-client writes its own bounds (utils.floatToGoString, which is untyped) for
    # every bound here: 0.0005, 1.0, 10.0.
    return repr(float(bound))


class Metrics:
    """What a coordinator counts, in a registry of its own (`registry`), and `serve` to expose
    it over HTTP for Prometheus.

    Args:
        registry: where the metrics go; a new one by default.
        process: also export this process's CPU, memory and file descriptors (process_*).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True):
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self._requests = Counter(
            "messenger_requests",
            "Verified requests by kind and reply (the reply word, expired, rate-limited, failed).",
            ["kind", "reply"],
            registry=r,
        )
        self._dropped = Counter(
            "messenger_requests_dropped",
            "Request entries dropped without an answer, by reason.",
            ["reason"],
            registry=r,
        )
        self._duration = _BatchHistogram(
            "messenger_request_duration_seconds",
            "Seconds from a request's signed send time (Redis's clock) to the end of the batch "
            "that answered it; expired requests are not in it.",
            "kind",
            DURATION_BUCKETS,
        )
        r.register(self._duration)
        self._rate_limited = Counter(
            "messenger_rate_limited",
            "Requests refused because their session sent faster than the rate limit.",
            registry=r,
        )
        self._batch = Histogram(
            "messenger_batch_size",
            "Decoded requests per batch script (scripts that carried at least one).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._sessions = Gauge(
            "messenger_sessions",
            "Sessions logged on, as the active coordinator last read it (0 on a standby).",
            registry=r,
        )
        self._active = Gauge(
            "messenger_active", "1 while this coordinator holds the lease and serves.", registry=r
        )
        self._activations = Counter(
            "messenger_activations",
            "Times this coordinator became active (took the lease, or took it back after "
            "Redis was away).",
            registry=r,
        )
        self._sweeps = Counter("messenger_sweeps", "Sweeps of the heartbeat deadlines.", registry=r)
        self._removals = Counter(
            "messenger_removals", "Sessions removed, by reason.", ["reason"], registry=r
        )
        self._info = Gauge(
            "messenger_coordinator_info",
            "Always 1; `id` is the coordinator id as its log lines show it.",
            ["id"],
            registry=r,
        )
        if process:
            ProcessCollector(registry=r)
        for reason in REMOVAL_REASONS:
            self._removals.labels(reason)
        for reason in DROP_REASONS:
            self._dropped.labels(reason)
        self._pairs: dict[tuple[str, str], Counter] = {}  # the children of _requests, bound
        self._offset_ms: float | None = None  # Redis's clock - time.monotonic(), in ms
        self._clock_read = 0.0  # when (monotonic) the offset was last reckoned

    # --- the coordinator's hooks ------------------------------------------------------------

    def identify(self, coordinator_id: str) -> None:
        self._info.labels(coordinator_id[:8]).set(1)

    async def activated(self, redis: Redis) -> None:
        """The coordinator holds the lease and serves: it reckons Redis's clock now (the one
        requests' times are on; this host's may differ), as a client does at logon."""
        self._activations.inc()
        self._active.set(1)
        before = time.monotonic()
        secs, micros = await redis.time()
        self._set_offset(before, time.monotonic(), secs, micros)

    def deactivated(self) -> None:
        """Not serving any more (stopped, lost the lease or Redis): a standby counts no
        sessions, so that a sum or max over every coordinator is the active one's."""
        self._active.set(0)
        self._sessions.set(0)

    async def sample(self, redis: Redis, keys: Keys) -> None:
        """Once a sweep interval (Coordinator.housekeep): the sessions logged on, and Redis's
        clock again once a minute, in one round trip."""
        reckon = time.monotonic() - self._clock_read >= _CLOCK_PERIOD
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hlen(keys.sessions)
            if reckon:
                pipe.time()
            before = time.monotonic()
            results = await pipe.execute()
            after = time.monotonic()
        self._sessions.set(int(results[0]))
        if reckon:
            secs, micros = results[1]
            self._set_offset(before, after, secs, micros)

    def answered(
        self, batch: Sequence[SignedRequest], replies: Sequence[str | None], now_ms: int | None
    ) -> None:
        """A batch script returned: count its requests by (kind, reply), its logoffs, its
        refusals, and how long each answered request took since it was sent. `replies[i]` is
        None for a request dropped (counted by `dropped`) or failed (counted by `failed`).

        `now_ms` is the time on Redis's clock (the coordinator's fake clock in tests); None:
        reckoned here from the last TIME read (no durations before the first, at activation)."""
        if not batch:
            return
        self._batch.observe(len(batch))
        now = self._now_ms() if now_ms is None else now_ms
        kinds = [signed.request.kind for signed in batch]
        # A busy coordinator's batches are mostly of one kind (messages): then the replies are
        # counted in C, and the rest is a few calls a batch whatever its size.
        one_kind = kinds.count(kinds[0]) == len(kinds)
        for kind in (kinds[0],) if one_kind else set(kinds):
            mine = (
                replies
                if one_kind
                else [r for k, r in zip(kinds, replies, strict=True) if k == kind]
            )
            tally = Tally(mine)
            for reply, n in tally.items():
                if reply is not None:
                    self._count(kind, reply, n)
            if tally[_RATE_LIMITED]:
                self._rate_limited.inc(tally[_RATE_LIMITED])
            if kind == "logoff" and tally[_LOGGED_OFF]:
                self._removals.labels("logoff").inc(tally[_LOGGED_OFF])
            # An expired request is not one anyone waited for, and its time is whatever its
            # client signed (a clock gone wrong, a replay): it would only blur the others.
            untimed = tally[None] + tally[_EXPIRED]
            if now is None or untimed == len(mine):
                continue
            if one_kind and not untimed:
                ages = [now - signed.request.sent_ms for signed in batch]
            else:
                ages = [
                    now - signed.request.sent_ms
                    for signed, k, reply in zip(batch, kinds, replies, strict=True)
                    if k == kind and reply is not None and reply != _EXPIRED
                ]
            self._duration.add(kind, ages)

    def failed(self, kind: str) -> None:
        """A request's script failed in Redis (it is logged; the rest of its batch went on)."""
        self._count(kind, FAILED, 1)

    def dropped(self, reason: str, count: int = 1) -> None:
        """Entries dropped unanswered: `malformed` (does not decode), `unauthenticated` (unknown
        session or bad signature), `oversized` (longer than any request, dropped unread)."""
        self._dropped.labels(reason).inc(count)

    def swept(self) -> None:
        self._sweeps.inc()

    def removed(self, reason: str, count: int = 1) -> None:
        """Sessions removed other than by their own logoff (which `answered` counts):
        `timeout` (the sweep), `crash` (the crash check), `replaced` (a logon found it dead and
        took its name or node), `server` (the last coordinator stopped)."""
        if count:
            self._removals.labels(reason).inc(count)

    # --- exposing them ----------------------------------------------------------------------

    def serve(self, host: str, port: int) -> MetricsServer:
        """Start the HTTP server Prometheus scrapes (any path answers; /metrics is the usual),
        in a daemon thread. Raises OSError if it cannot listen (port taken, unknown host)."""
        server, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(server, thread)

    # --- internals --------------------------------------------------------------------------

    def _count(self, kind: str, reply: str, n: int) -> None:
        child = self._pairs.get((kind, reply))
        if child is None:
            child = self._pairs[kind, reply] = self._requests.labels(kind, reply)
        child.inc(n)

    def _set_offset(self, before: float, after: float, secs: int, micros: int) -> None:
        # As messenger/client.py reckons it: TIME's answer is taken as of the round trip's
        # middle, so the error is at most half the round trip (the client's is as small).
        self._offset_ms = secs * 1000 + micros / 1000 - (before + after) / 2 * 1000
        self._clock_read = after

    def _now_ms(self) -> float | None:
        if self._offset_ms is None:
            return None
        return time.monotonic() * 1000 + self._offset_ms


class MetricsServer:
    """The running HTTP server of `Metrics.serve`."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on: the port the OS chose, if it was given 0."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and free the port (waits for a scrape in progress)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
