"""Per-revision (and per-component) request metrics, cheap to record and exposed via prometheus-client.

The hot path must not pay for metrics: prometheus-client's own metric objects
take a lock on every ``inc()``/``observe()``, which is measurable at tens of
thousands of requests per second.  The gateway is single-threaded, so it keeps
plain integer counters in a :class:`RevisionStats` per (app, revision,
component) - the router looks the object up when it binds a route table and
hands each request a direct reference, so recording is a few attribute
increments - and :class:`GatewayCollector` turns them into metric families only
when ``/metrics`` is scraped.  prometheus-client still owns the exposition
format.

Why a component in the key: a revision runs several components, and the
autoscaler sizes each function on its own load (requests in flight and held,
and how many were answered).  A route names the component it reaches
(``"component"`` in the routes file; empty for routes that do not say, such as
a service's, which then count for their revision as before).  The public,
``/_services`` and ``/_apps`` routes of one function share one
:class:`RevisionStats`, since they share the key.  Everything per revision
(``/stats`` as read by the canary analysis, ``/held``) sums over components.

Requests refused by access control (401/403) are counted twice: in their
revision's status classes like every answer, and in
``clearway_gateway_denied_total{app,revision,component,reason}``, so that an operator
sees *why* a service is being refused and to whom (the target's revision).

Cold starts.  A request that finds no ready replica is held (``_proxy.py``).
Each such request bumps :attr:`Metrics.holds` (a `HoldSequence`) once and wakes whoever waits
on it - the admin ``GET /holds`` long-poll, which is
how the control plane learns of a cold start within milliseconds instead of
at its next poll.  When a held request is finally sent to a replica, two
durations are kept for its (app, revision, component):
``clearway_gateway_hold_seconds`` (held until released to a replica: the
queue wait, scale-up included) and ``clearway_gateway_held_first_response_seconds``
(release to the replica's response head: the cold replica's first answer).
Together they split a cold start's latency into "waiting for a replica" and
"the replica being slow".  Only held requests pay for this; the families
appear once a revision had a cold start, as a labelled prometheus-client
metric would.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._holding import HoldSequence

__all__ = ["COLD_START_BUCKETS", "DURATION_BUCKETS", "GatewayCollector", "Metrics", "RevisionStats"]

#: Upper bounds (seconds) of the request-duration histogram buckets.
DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Upper bounds (seconds) of the cold-start histograms (hold time, first response):
#: a few milliseconds when a replica starts fast, up to the 30 s hold timeout.
COLD_START_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class RevisionStats:
    """Counters for one (app, revision, component); mutated in place on the hot path."""

    __slots__ = (
        "app",
        "buckets",
        "by_class",
        "cold_count",
        "cold_hold_sum",
        "component",
        "duration_sum",
        "first_response_buckets",
        "first_response_sum",
        "held",
        "hold_buckets",
        "in_flight",
        "revision",
    )

    def __init__(self, app: str, revision: str, component: str = "") -> None:
        self.app = app
        self.revision = revision
        #: The component the routes counted here reach ("" when they do not say).
        self.component = component
        #: Responses by status class: index 0 is 1xx ... index 4 is 5xx.
        self.by_class = [0, 0, 0, 0, 0]
        #: Non-cumulative histogram counts; the last slot is +Inf.
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.in_flight = 0
        self.held = 0
        #: Held requests released to a replica, and the seconds they were held in all.
        self.cold_count = 0
        self.cold_hold_sum = 0.0
        #: Non-cumulative counts over COLD_START_BUCKETS (last slot +Inf) of those holds...
        self.hold_buckets = [0] * (len(COLD_START_BUCKETS) + 1)
        #: ...and of the time from their release to the replica's response head.
        self.first_response_buckets = [0] * (len(COLD_START_BUCKETS) + 1)
        self.first_response_sum = 0.0

    def record(self, status: int, duration: float) -> None:
        """Count one finished request."""
        index = status // 100 - 1
        self.by_class[index if 0 <= index < 5 else 4] += 1
        self.buckets[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum += duration

    def record_hold(self, seconds: float) -> None:
        """Count one held request released to a replica after ``seconds`` held."""
        self.cold_count += 1
        self.cold_hold_sum += seconds
        self.hold_buckets[bisect_left(COLD_START_BUCKETS, seconds)] += 1

    def record_first_response(self, seconds: float) -> None:
        """Count a released held request's response head, ``seconds`` after its release."""
        self.first_response_sum += seconds
        self.first_response_buckets[bisect_left(COLD_START_BUCKETS, seconds)] += 1

    @property
    def requests(self) -> int:
        """Requests answered so far (every status)."""
        return sum(self.by_class)


class Metrics:
    """All :class:`RevisionStats` of one gateway, created on first use."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str, str], RevisionStats] = {}
        #: Refused requests by (app, revision, component, reason) of the target.
        self.denied: dict[tuple[str, str, str, str], int] = {}
        #: Requests that matched no route (404) or were malformed (400, 413).
        self.unrouted = self.stats("", "", "")
        #: Requests that began to be held, for the gateway's life (each counted once).
        self.holds = HoldSequence()

    def stats(self, app: str, revision: str, component: str) -> RevisionStats:
        """The stats of (app, revision, component); the same object for the gateway's life."""
        key = (app, revision, component)
        found = self._stats.get(key)
        if found is None:
            found = self._stats[key] = RevisionStats(app, revision, component)
        return found

    def deny(self, app: str, revision: str, component: str, reason: str) -> None:
        """Count one request refused by access control."""
        key = (app, revision, component, reason)
        self.denied[key] = self.denied.get(key, 0) + 1

    def hold_started(self) -> None:
        """A request began to be held: bump the hold sequence and wake every ``GET /holds``."""
        self.holds.bump()

    def all(self) -> list[RevisionStats]:
        return list(self._stats.values())

    def traffic(self) -> dict[str, Any]:
        """Raw counters per (app, revision, component), for the admin ``GET /stats``.

        The canary analysis compares a canary's answers with its stable
        revision's over the same minutes; it needs the counters themselves (to
        subtract two readings), not Prometheus text.  Buckets stay
        non-cumulative, as kept.  Unrouted requests belong to no revision and
        are left out.  A revision's components are separate entries; whoever
        judges the revision sums them.
        """
        return {
            "bounds": list(DURATION_BUCKETS),
            "revisions": [
                {
                    "app": stats.app,
                    "revision": stats.revision,
                    "component": stats.component,
                    "by_class": list(stats.by_class),
                    "buckets": list(stats.buckets),
                }
                for stats in self._stats.values()
                if stats is not self.unrouted
            ],
        }

    def load(self) -> list[dict[str, Any]]:
        """Load per (app, revision, component), for the admin ``GET /load`` (the autoscaler).

        ``in_flight`` and ``held`` are now (a held request is in flight too:
        the gateway is answering it; like the Prometheus gauges, so
        ``held <= in_flight``); ``requests`` is every request
        answered so far (cumulative: the reader subtracts two readings, and one
        that went down means the gateway restarted).  ``cold_count`` (held
        requests released to a replica) and ``cold_hold_sum`` (the seconds
        they were held) are cumulative too; their difference over a window
        is the mean cold-start wait.  A few numbers per entry, read without
        copying the buckets: cheap to poll every second.
        """
        return [
            {
                "app": stats.app,
                "revision": stats.revision,
                "component": stats.component,
                "in_flight": stats.in_flight,
                "held": stats.held,
                "requests": stats.requests,
                "cold_hold_sum": stats.cold_hold_sum,
                "cold_count": stats.cold_count,
            }
            for stats in self._stats.values()
            if stats is not self.unrouted
        ]

    def held(self) -> dict[str, int]:
        """Held requests per revision (summed over its components), for the admin ``GET /held``."""
        counts: dict[str, int] = {}
        for stats in self._stats.values():
            if stats.held:
                counts[stats.revision] = counts.get(stats.revision, 0) + stats.held
        return counts

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(GatewayCollector(self))
        return generate_latest(registry)


class GatewayCollector(Collector):
    """Turns :class:`Metrics` into Prometheus metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "clearway_gateway_requests",
            "Requests answered by the gateway, by status class.",
            labels=["app", "revision", "component", "code"],
        )
        duration = HistogramMetricFamily(
            "clearway_gateway_request_duration_seconds",
            "Time from the request head to the end of the response.",
            labels=["app", "revision", "component"],
        )
        in_flight = GaugeMetricFamily(
            "clearway_gateway_requests_in_flight",
            "Requests being proxied right now.",
            labels=["app", "revision", "component"],
        )
        held = GaugeMetricFamily(
            "clearway_gateway_held_requests",
            "Requests waiting for the revision to get a ready replica.",
            labels=["app", "revision", "component"],
        )
        hold = HistogramMetricFamily(
            "clearway_gateway_hold_seconds",
            "How long requests that found no ready replica were held before being sent to one.",
            labels=["app", "revision", "component"],
        )
        first_response = HistogramMetricFamily(
            "clearway_gateway_held_first_response_seconds",
            "For held requests, from being sent to the replica to its response head.",
            labels=["app", "revision", "component"],
        )
        denied = CounterMetricFamily(
            "clearway_gateway_denied",
            "Requests refused by access control (401/403), by target revision and reason.",
            labels=["app", "revision", "component", "reason"],
        )
        for (app, revision, component, reason), count in self._metrics.denied.items():
            denied.add_metric([app, revision, component, reason], count)
        for stats in self._metrics.all():
            labels = [stats.app, stats.revision, stats.component]
            for name, count in zip(_CLASSES, stats.by_class, strict=True):
                if count:
                    requests.add_metric([*labels, name], count)
            duration.add_metric(labels, _cumulative(DURATION_BUCKETS, stats.buckets), stats.duration_sum)
            in_flight.add_metric(labels, stats.in_flight)
            held.add_metric(labels, stats.held)
            if stats.cold_count:
                hold.add_metric(labels, _cumulative(COLD_START_BUCKETS, stats.hold_buckets), stats.cold_hold_sum)
                first_response.add_metric(
                    labels,
                    _cumulative(COLD_START_BUCKETS, stats.first_response_buckets),
                    stats.first_response_sum,
                )
        yield requests
        yield duration
        yield in_flight
        yield held
        yield hold
        yield first_response
        yield denied


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Non-cumulative counts (last slot +Inf) as Prometheus ``le`` buckets."""
    total = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(bounds, counts, strict=False):
        total += count
        buckets.append((repr(bound), total))
    total += counts[-1]
    buckets.append(("+Inf", total))
    return buckets
