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
class DesiredState:
    workloads: list[Workload] = field(default_factory=list)
    traffic: Mapping[str, list[TrafficTarget]] = field(default_factory=dict)


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
        }


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

    def observe(self) -> Mapping[str, RevisionObservation]:
        """Readiness per revision that the backend runs."""

    def replicas(self, app: str) -> list[ReplicaInfo]: ...

    def urls(self, spec: AppSpec) -> list[str]:
        """Public URLs of an app."""

    def logs(self, app: str, *, revision: str | None, component: str | None, tail: int, follow: bool) -> AsyncIterator[str]:
        """Log lines of an app's replicas, prefixed with the replica id."""

    async def metrics(self) -> str:
        """Data-plane metrics in Prometheus text format."""

    async def close(self, *, stop_workloads: bool) -> None:
        """Stop watching; with ``stop_workloads`` also stop every replica and the gateway."""
