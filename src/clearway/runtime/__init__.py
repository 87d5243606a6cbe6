"""The process runtime: runs replicas of an app's components as supervised OS processes.

The control plane (through the local backend) describes each replica with a
`ReplicaSpec` and hands it to a `Supervisor`, which starts it with a
`Launcher`, isolates it (bubblewrap, its own uid), probes it over its unix
socket, restarts it with backoff, limits it with cgroups, caps its logs, and
reports every `ReplicaStatus` change. Inside each replica process runs
``python -m clearway.runtime.replica``; beside it, its log writer
(``clearway.runtime.logwriter``).

Layering: the runtime imports the SDK (to load apps) and the spec, never the
control plane, the gateway, the backends or the CLI (``.importlinter``).

Modules, one concept each::

    spec          ReplicaSpec, the replica's environment
    status        ReplicaState, ReplicaStatus
    supervisor    Supervisor: the per-replica loop, probes, restarts, adoption
    launcher      Launcher protocol, SpawnLauncher (posix_spawn)
    forking       ForkLauncher: function replicas forked from a warm parent
    warmparent    the warm parent process (run with -m): imports once, forks replicas
    warmprotocol  the descriptor numbers and sizes both ends of a fork request agree on
    isolation     bubblewrap view and setpriv uid switch, for every replica
    process       pidfd watching, (pid, start time) identity, group signals
    restarts      backoff and crash-loop policy
    probes        HTTP readiness/liveness probes over unix sockets
    cgroups       memory and CPU limits (cgroup v2, else v1)
    logwriter     the per-process log writer that enforces the cap (run as a process)
    logs          tail, follow and read across rotation; copytruncate for platform logs
    clock         injected time
    interface     ASGI/WSGI detection
    servers       the HTTP server a replica runs (granian or uvicorn) and what ``auto`` means
    functions     the function server: function_app, the ASGI app of a function replica
    exit_codes    what a replica's exit code means
    coordinated   singletons and sharded workers: who may act, resigning, standing by
    replica       the replica process's entry point (not imported here: it is run with -m)
"""

from __future__ import annotations

from clearway.runtime.clock import Clock, ManualClock, SystemClock
from clearway.runtime.forking import ForkLauncher
from clearway.runtime.isolation import Isolation, find_bwrap, isolated_argv
from clearway.runtime.launcher import LaunchedProcess, Launcher, LaunchRequest, SpawnLauncher
from clearway.runtime.logs import follow_log, rotate_log, tail_log
from clearway.runtime.probes import ProbePolicy
from clearway.runtime.restarts import RestartPolicy
from clearway.runtime.spec import ReplicaSpec
from clearway.runtime.status import ReplicaState, ReplicaStatus
from clearway.runtime.supervisor import (
    Credentials,
    StatusCallback,
    Supervisor,
    SupervisorConfig,
    UnknownReplicaError,
)

__all__ = [
    "Clock",
    "Credentials",
    "ForkLauncher",
    "Isolation",
    "LaunchRequest",
    "LaunchedProcess",
    "Launcher",
    "ManualClock",
    "ProbePolicy",
    "ReplicaSpec",
    "ReplicaState",
    "ReplicaStatus",
    "RestartPolicy",
    "SpawnLauncher",
    "StatusCallback",
    "Supervisor",
    "SupervisorConfig",
    "SystemClock",
    "UnknownReplicaError",
    "find_bwrap",
    "follow_log",
    "isolated_argv",
    "rotate_log",
    "tail_log",
]
