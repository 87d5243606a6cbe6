"""How long replicas take to start, per revision and component, as Prometheus histograms.

A cold start is a chain: the request waits at the gateway (its
``clearway_gateway_hold_seconds``), the replica's process is made (forked
from a warm parent, or spawned), it initialises until its readiness probe
passes, then it answers the held request (the gateway's
``clearway_gateway_held_first_response_seconds``). The middle two are the
runtime's, and they are recorded here, from the supervisor's reports, so that
``GET /v1/metrics`` shows every link of the chain side by side:

``clearway_replica_start_seconds{app, revision, component, how, phase}``
    ``how`` is ``fork`` or ``spawn``; ``phase`` is ``launch`` (making the
    process) or ``init`` (from then until its first readiness probe passed:
    the app's and the server's start-up, and the probe).

Each process start is observed once, when it first becomes ready. The newest
start of each revision's component is also kept as a `ReplicaStart`, for
``clearway functions``: a function scaled to zero has no replica left to ask.
Both live in memory: a restarted control plane starts them afresh.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from clearway.backends.base import ReplicaStart
from clearway.runtime import ReplicaSpec, ReplicaStatus

__all__ = ["StartupMetrics"]

#: From a fork (a millisecond or so) to a slow import (tens of seconds).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class StartupMetrics:
    def __init__(self) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        self._seconds = Histogram(
            "clearway_replica_start_seconds",
            "Start-up of replica processes: making the process (launch), then until its readiness probe passed (init).",
            ["app", "revision", "component", "how", "phase"],
            buckets=BUCKETS,
            registry=self._registry,
        )
        self._last: dict[tuple[str, str, str], ReplicaStart] = {}

    def observe(self, spec: ReplicaSpec | None, status: ReplicaStatus) -> None:
        """Record the start of ``status``'s process (call once, when it is first ready)."""
        if spec is None or status.start_seconds is None:
            return
        labels = (spec.app, spec.revision, spec.component, status.started_by or "spawn")
        launch = status.launch_seconds or 0.0
        self._seconds.labels(*labels, "launch").observe(launch)
        self._seconds.labels(*labels, "init").observe(max(0.0, status.start_seconds - launch))
        self._last[(spec.app, spec.revision, spec.component)] = ReplicaStart(
            replica=spec.replica_id,
            how=status.started_by or "spawn",
            launch_ms=round(launch * 1000, 2),
            ready_ms=round(status.start_seconds * 1000, 2),
        )

    def last(self, app: str) -> dict[tuple[str, str], ReplicaStart]:
        """The newest start of each ``(revision, component)`` of ``app``."""
        return {(rev, comp): start for (a, rev, comp), start in self._last.items() if a == app}

    def exposition(self) -> str:
        return generate_latest(self._registry).decode()
