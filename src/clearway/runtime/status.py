"""The observed state of a replica, as the supervisor reports it.

`ReplicaStatus` is an immutable snapshot: the supervisor builds a new one on
every change and hands it to its ``on_change`` callback, so the control plane
can persist it (and later hand ``pid``, ``pid_start_time`` and ``incarnation`` back to
`Supervisor.adopt` after a restart of its own) without ever racing the
supervisor's bookkeeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["ReplicaState", "ReplicaStatus"]


class ReplicaState(enum.Enum):
    # Spawned (or adopted) and not yet answering its readiness probe.
    STARTING = "starting"
    # Answering its probe: a service may receive traffic, a worker is running.
    READY = "ready"
    # Was ready, then failed its latest liveness probe: out of rotation at once (only READY
    # replicas are routed); READY again on the next success; restarted (via BACKOFF) once
    # `ProbePolicy.failure_threshold` probes in a row have failed.
    UNHEALTHY = "unhealthy"
    # Exited, failed or was killed; waiting out an exponential backoff before restarting.
    BACKOFF = "backoff"
    # Keeps crashing (or never gets ready); still retried, slowly, but needs a human.
    CRASHLOOP = "crashloop"
    # Asked to stop: SIGTERM sent, draining in-flight work until the grace period ends.
    STOPPING = "stopping"
    # Stopped on request. Terminal.
    STOPPED = "stopped"
    # Cannot be launched at all (e.g. the sandbox tool vanished). Terminal; see last_error.
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (ReplicaState.STOPPED, ReplicaState.FAILED)


@dataclass(frozen=True)
class ReplicaStatus:
    replica_id: str
    state: ReplicaState
    since: float
    """Wall-clock time (Unix seconds) at which ``state`` was entered."""
    pid: int | None = None
    """The replica's process (the process group leader). None between processes."""
    pid_start_time: int | None = None
    """Field 22 of /proc/<pid>/stat: with ``pid``, identifies the process across pid reuse."""
    socket_path: str | None = None
    """The unix socket a service listens on (its spec's); stays the same across restarts."""
    incarnation: str | None = None
    """Random hex minted at each process start (names the process in its credential)."""
    restarts: int = 0
    last_exit_code: int | None = None
    """Of the previous process; negative for a signal (-9: killed); None when unknown."""
    last_error: str | None = None
    """Why the previous process ended, with the tail of its log (the traceback) for crashes."""
    warnings: tuple[str, ...] = field(default=())
    """Degradations that did not stop the replica, e.g. a memory limit that could not be applied."""
    started_by: str | None = None
    """How the current process was created: "spawn" (a new interpreter) or "fork" (a warm parent)."""
    launch_seconds: float | None = None
    """How long creating the current process took (the launcher's part of its start-up)."""
    start_seconds: float | None = None
    """From the launch of the current process to its first passed readiness probe; None until then."""
