"""The backend protocol: desired state in, observations out.

The unit the control plane reasons about is the *revision*: "run revision
hello-3 with web x3 and janitor x1", "send hello's traffic 100% to hello-3".
How that becomes processes, sockets and route tables is the backend's job, so
the same reconciler drives one machine today and a cluster tomorrow.

``apply`` is idempotent and level-triggered: it is called with the whole
desired state on every reconcile pass, never with deltas, so a missed call or a
restart of the control plane cannot leave the backend out of step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from clearway.spec.model import AppSpec


@dataclass(frozen=True)
class Artifact:
    """What a revision runs, named by digests rather than host paths.

    A backend resolves the references itself: the local backend to directories
    under ``$CLEARWAY_HOME`` (``backends.local.artifacts``), the Kubernetes
    backend (later) to the same artifact fetched onto another machine. Paths
    would tie a revision to the machine that built it.
    """

    code: str
    """The code snapshot's digest (64 hex digits; unique within its app)."""
    env: str | None
    """The environment's ``sha256:<hex>``; None: a revision from before per-app
    environments, run with the platform's own interpreter."""
    python: str
    """The interpreter version the environment was built for, e.g. ``"3.11.7"``."""


@dataclass(frozen=True)
class Workload:
    """One revision to run, with the replica count wanted per component."""

    app: str
    revision: str
    spec: AppSpec
    artifact: Artifact
    app_file: str
    env: Mapping[str, str]
    replicas: Mapping[str, int]
    #: The app's own uid (= gid) its replicas run as; None: the platform's own user.
    uid: int | None = None


@dataclass(frozen=True)
class TrafficTarget:
    """A share of an app's requests. Weight 0 still answers pinned requests."""

    revision: str
    weight: int


@dataclass(frozen=True)
class HostAlias:
    """More hosts of an app: ``<label>.<app>`` served by ``targets``.

    A preview of a branch (``feature-x.shop``) and the revision built from a
    commit (``abc1234.shop``) are aliases; the app's own host (``shop``)
    follows ``DesiredState.traffic``.
    """

    app: str
    label: str
    targets: list[TrafficTarget]


@dataclass(frozen=True)
class DesiredState:
    workloads: list[Workload] = field(default_factory=list)
    #: The app's production traffic, by app (its own host and ``/_apps/<app>/...``).
    traffic: Mapping[str, list[TrafficTarget]] = field(default_factory=dict)
    aliases: list[HostAlias] = field(default_factory=list)
    #: Apps whose production traffic is split by a rollout with sticky sessions
    #: (``CanaryPolicy.sticky``): the data plane keeps each browser on one side.
    sticky: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ComponentObservation:
    desired: int
    ready: int
    #: Set when the component cannot become ready (crash loop, import error,
    #: never healthy): the text a user needs, usually a traceback.
    error: str | None = None
    #: The latest trouble of a replica that is still being retried (shown when
    #: the deploy gives up waiting): why its last process ended or was refused.
    last_error: str | None = None


@dataclass(frozen=True)
class RevisionObservation:
    revision: str
    components: Mapping[str, ComponentObservation]

    @property
    def ready(self) -> bool:
        return all(c.ready >= c.desired for c in self.components.values())

    @property
    def error(self) -> str | None:
        for name, comp in self.components.items():
            if comp.error:
                return f"component {name!r}: {comp.error}"
        return None


@dataclass(frozen=True)
class ReplicaInfo:
    """What ``clearway status`` shows for one replica."""

    id: str
    revision: str
    component: str
    state: str
    pid: int | None
    endpoint: str | None
    restarts: int
    error: str | None
    started_by: str | None = None
    """How its process was made: "fork" (from a warm parent) or "spawn" (a new interpreter)."""
    launch_ms: float | None = None
    """Milliseconds the fork or spawn took."""
    start_ms: float | None = None
    """Milliseconds from the launch to its first passed readiness probe (None until ready)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "revision": self.revision,
            "component": self.component,
            "state": self.state,
            "pid": self.pid,
            "endpoint": self.endpoint,
            "restarts": self.restarts,
            "error": self.error,
            "started_by": self.started_by,
            "launch_ms": self.launch_ms,
            "start_ms": self.start_ms,
        }


@dataclass(frozen=True)
class ReplicaStart:
    """The start-up of one replica process, kept after the process ends (a function
    scaled to zero still shows how its last cold start went)."""

    replica: str
    how: str
    """"fork" (from a warm parent) or "spawn" (a new interpreter)."""
    launch_ms: float
    """Milliseconds the fork or spawn took."""
    ready_ms: float
    """Milliseconds from the launch to its first passed readiness probe."""

    def to_json(self) -> dict[str, Any]:
        return {"replica": self.replica, "how": self.how, "launch_ms": self.launch_ms, "ready_ms": self.ready_ms}


@dataclass(frozen=True)
class TrafficSample:
    """One reading of a revision's request counters at the gateway.

    The counters only grow while the gateway runs, so what happened between
    two readings is ``later.minus(earlier)``; the canary analysis
    (``clearway.control.analysis``) judges such windows.  A counter that went
    down means the gateway restarted and its counts began again: that window
    is unknown, not negative, so ``minus`` answers None.
    """

    by_class: tuple[int, int, int, int, int]
    """Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx."""
    buckets: tuple[int, ...]
    """Request durations, NON-cumulative: ``buckets[i]`` counts durations in
    ``(bounds[i-1], bounds[i]]``; the extra last slot counts those above the last bound."""
    bounds: tuple[float, ...]
    """Upper bounds of the buckets in seconds, increasing (the gateway's ``DURATION_BUCKETS``)."""

    def __post_init__(self) -> None:
        if len(self.by_class) != 5:
            raise ValueError(f"a traffic sample has 5 status classes, not {len(self.by_class)}")
        if len(self.buckets) != len(self.bounds) + 1:
            raise ValueError(
                f"a traffic sample has one bucket per bound plus +Inf: "
                f"{len(self.buckets)} buckets for {len(self.bounds)} bounds"
            )

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> TrafficSample:
        """No requests yet (a revision the gateway has not counted anything for)."""
        return cls((0, 0, 0, 0, 0), (0,) * (len(bounds) + 1), bounds)

    @property
    def total(self) -> int:
        """Every answered request (4xx and 5xx included)."""
        return sum(self.by_class)

    @property
    def errors(self) -> int:
        """Answers with a 5xx status: the server's failures."""
        return self.by_class[4]

    def minus(self, earlier: TrafficSample) -> TrafficSample | None:
        """What happened since ``earlier``; None when a counter went backwards (the gateway restarted)
        or the two readings use different buckets."""
        if earlier.bounds != self.bounds:
            return None
        a, b, c, d, e = (now - then for now, then in zip(self.by_class, earlier.by_class, strict=True))
        buckets = tuple(now - then for now, then in zip(self.buckets, earlier.buckets, strict=True))
        if min(a, b, c, d, e) < 0 or min(buckets) < 0:
            return None
        return TrafficSample((a, b, c, d, e), buckets, self.bounds)

    def to_json(self) -> dict[str, Any]:
        return {"by_class": list(self.by_class), "buckets": list(self.buckets), "bounds": list(self.bounds)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrafficSample:
        """The sample ``to_json`` wrote (raises ValueError on anything else)."""
        try:
            by_class = [_count(v) for v in data["by_class"]]
            buckets = tuple(_count(v) for v in data["buckets"])
            bounds = tuple(float(v) for v in data["bounds"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a traffic sample: {exc!r}") from exc
        if len(by_class) != 5:
            raise ValueError(f"a traffic sample has 5 status classes, not {len(by_class)}")
        a, b, c, d, e = by_class
        return cls((a, b, c, d, e), buckets, bounds)


@dataclass(frozen=True)
class ComponentLoad:
    """The data plane's load on one component of one revision, for the autoscaler.

    ``in_flight`` and ``held`` are now; ``requests`` counts every request
    answered since the data plane started (cumulative, like ``TrafficSample``:
    the autoscaler subtracts two readings, and one that went down means the
    data plane restarted). ``component`` is "" for requests of routes that
    name no component.
    """

    app: str
    revision: str
    component: str
    #: Requests the gateway is answering now, the held ones included (held <= in_flight).
    in_flight: int
    #: Requests waiting for a ready replica now (scale from zero acts on them).
    held: int
    #: Requests answered so far.
    requests: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ComponentLoad:
        """An entry of the gateway's ``GET /load`` (raises ValueError on anything else)."""
        try:
            app, revision, component = data["app"], data["revision"], data["component"]
            in_flight, held, requests = data["in_flight"], data["held"], data["requests"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a component load: {exc!r}") from exc
        if not all(isinstance(v, str) for v in (app, revision, component)):
            raise ValueError(f"a component load names its app, revision and component: {data!r}")
        return cls(app, revision, component, _count(in_flight), _count(held), _count(requests))


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a traffic counter must be a non-negative integer, not {value!r}")
    return value


class Backend(Protocol):
    """What the control plane needs from an engine."""

    async def start(self) -> None:
        """Bring up the engine, re-adopting whatever is still running."""

    async def apply(self, desired: DesiredState) -> None:
        """Converge towards ``desired`` (idempotent; called on every pass)."""

    async def converged(self) -> bool:
        """Wait (bounded) until the data plane routes as the last ``apply`` asked;
        False when it did not within the bound (the caller must not count on it)."""

    def replica_incarnation(self, replica_id: str) -> str | None:
        """The incarnation of the process running as ``replica_id`` now, if any:
        how the control plane refuses a stopped or restarted replica's credential."""

    async def set_shard_owners(self, app: str, component: str, owners: Mapping[int, str]) -> None:
        """Which replica (id) owns each shard of sharded service ``component`` of ``app`` now
        (the holders of its shard locks, any revision): the data plane sends a request
        with a key to its shard's owner when that replica is ready (key affinity)."""

    def observe(self) -> Mapping[str, RevisionObservation]:
        """Readiness per revision that the backend runs."""

    def replicas(self, app: str) -> list[ReplicaInfo]: ...

    def last_starts(self, app: str) -> Mapping[tuple[str, str], ReplicaStart]:
        """The newest start-up of each ``(revision, component)`` of ``app`` since the
        backend started, also of replicas that have since stopped."""

    def urls(self, spec: AppSpec, *, branch: str | None = None, commit: str | None = None) -> list[str]:
        """Public URLs of an app; of a preview of ``branch`` and/or of a ``commit`` when given."""

    def logs(self, app: str, *, revision: str | None, component: str | None, tail: int, follow: bool) -> AsyncIterator[str]:
        """Log lines of an app's replicas, prefixed with the replica id."""

    async def metrics(self) -> str:
        """Data-plane metrics in Prometheus text format."""

    async def traffic(self) -> Mapping[str, TrafficSample]:
        """The data plane's request counters now, per revision id (empty when it cannot tell)."""

    async def load(self) -> list[ComponentLoad]:
        """The data plane's load now, per (app, revision, component) (empty when it cannot tell)."""

    async def wait_held(self, after: int, within: float) -> int:
        """Wait until the gateway holds a new request (a request for something with no ready replica)
        or ``within`` seconds pass; returns the hold sequence number to pass as ``after`` next time.

        Pass -1 the first time: the answer comes at once.  It also comes at once
        whenever the gateway's number differs from ``after`` (holds were missed,
        or the gateway restarted).  When the data plane cannot tell, ``after``
        is returned once ``within`` has passed.  This is the autoscaler's
        cold-start trigger: it then reads ``load`` to see what is held.
        """

    async def close(self, *, stop_workloads: bool) -> None:
        """Stop watching; with ``stop_workloads`` also stop every replica and the gateway."""
