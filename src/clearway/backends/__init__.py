"""Backends: engines that make the control plane's desired state real.

One interface (``base.Backend``), several implementations, like httpx's
transports: ``local`` runs replicas as OS processes behind clearway's own
gateway; a Kubernetes backend (roadmap) will render the same desired state to
Deployments, Services and routes. The control plane talks only to the protocol.
"""

from clearway.backends.base import (
    Artifact,
    Backend,
    ComponentObservation,
    DesiredState,
    ReplicaInfo,
    ReplicaStart,
    RevisionObservation,
    TrafficTarget,
    Workload,
)

__all__ = [
    "Artifact",
    "Backend",
    "ComponentObservation",
    "DesiredState",
    "ReplicaInfo",
    "ReplicaStart",
    "RevisionObservation",
    "TrafficTarget",
    "Workload",
]
