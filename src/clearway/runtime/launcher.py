"""How a replica process comes to exist: the `Launcher` protocol and `SpawnLauncher`.

The supervisor decides *when* a replica runs; a launcher decides *how* its
process is created. Today there is one way, `SpawnLauncher`: a fresh
``python -m clearway.runtime.replica``. The roadmap adds a fork launcher that
forks replicas from a warm parent which has already imported the app
(millisecond starts). The protocol is shaped for both:

* ``launch`` is async (a fork launcher asks its warm parent over a socket);
* it returns only a pid and its start time: the supervisor never assumes it is
  the parent (it watches through pidfds, see `clearway.runtime.process`);
* the request carries everything the new process must *have* (env, listening
  socket, cgroups to join, log file), not how to get it.

`SpawnLauncher` uses ``os.posix_spawn`` rather than ``subprocess.Popen``: the
supervisor owns the process's lifetime, and a ``Popen`` object would try to own
it too (and warn when dropped while the replica is meant to keep running).
The replica gets its own session (it survives the control plane and can be
signalled as a group), stdin from /dev/null, stdout and stderr appended
straight to its log file (``O_APPEND``, which is what lets the supervisor rotate
the log with copy-and-truncate), and the listening socket as fd 3.

Joining cgroups and ignoring SIGTERM (for bubblewrap, see
`clearway.runtime.sandbox`) must happen in the new process before it executes
anything else, and ``posix_spawn`` cannot do either, so those replicas start
through a two-line ``/bin/sh`` prologue that does both and ``exec``s.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from clearway.exceptions import RuntimeStartError
from clearway.runtime.process import read_start_time
from clearway.runtime.sandbox import find_bwrap, sandbox_argv
from clearway.runtime.spec import LISTEN_FD_ENV_VAR, ReplicaSpec

__all__ = ["LaunchRequest", "LaunchedProcess", "Launcher", "SpawnLauncher"]

#: The fd number at which a replica finds its listening socket.
LISTEN_FD = 3

# Runs as `sh -c PROLOGUE clearway-launch <cgroup.procs files...> -- <command...>`.
_PROLOGUE = (
    'while [ "$1" != "--" ]; do '
    'echo $$ 2>/dev/null > "$1" || echo "clearway: could not join cgroup $1" >&2; shift; '
    'done; shift; exec "$@"'
)


@dataclass(frozen=True)
class LaunchRequest:
    spec: ReplicaSpec
    env: Mapping[str, str]
    """The complete environment (see `replica_environment`)."""
    listen_fd: int | None
    """The supervisor's listening socket for a service; the replica gets a copy as fd 3."""
    cgroup_procs: tuple[Path, ...] = ()
    """``cgroup.procs`` files the process must join before running anything."""


@dataclass(frozen=True)
class LaunchedProcess:
    pid: int
    start_time: int


class Launcher(Protocol):
    async def launch(self, request: LaunchRequest) -> LaunchedProcess:
        """Start the replica process; raise `RuntimeStartError` when it cannot be started."""
        ...


class SpawnLauncher:
    """Starts every replica as a new interpreter (``python -m clearway.runtime.replica``)."""

    async def launch(self, request: LaunchRequest) -> LaunchedProcess:
        spec = request.spec
        argv = [spec.python, "-m", "clearway.runtime.replica"]
        if spec.sandbox:
            argv = sandbox_argv(spec, argv, bwrap=find_bwrap())
        if spec.sandbox or request.cgroup_procs:
            prologue = ('trap "" TERM; ' if spec.sandbox else "") + _PROLOGUE
            procs = [str(path) for path in request.cgroup_procs]
            argv = ["/bin/sh", "-c", prologue, "clearway-launch", *procs, "--", *argv]
        env = dict(request.env)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (
                os.POSIX_SPAWN_OPEN,
                1,
                str(spec.log_path),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                0o640,
            ),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        socket_copy: int | None = None
        if request.listen_fd is not None:
            # A close-on-exec copy numbered above 3, so that dup2 onto 3 always happens
            # (and clears close-on-exec on 3 only); every other fd of ours is close-on-exec.
            socket_copy = fcntl.fcntl(request.listen_fd, fcntl.F_DUPFD_CLOEXEC, 10)
            actions.append((os.POSIX_SPAWN_DUP2, socket_copy, LISTEN_FD))
            env[LISTEN_FD_ENV_VAR] = str(LISTEN_FD)
        try:
            # posix_spawn returns as soon as the child exists (vfork-style): it does not block.
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)  # noqa: ASYNC221
        except OSError as error:
            raise RuntimeStartError(
                f"could not start {argv[0]} for replica {spec.replica_id}: {error}. "
                "Check that the interpreter exists and is executable."
            ) from error
        finally:
            if socket_copy is not None:
                os.close(socket_copy)
        start_time = read_start_time(pid)
        # Our own child stays readable in /proc (as a zombie at worst) until we reap it.
        assert start_time is not None
        return LaunchedProcess(pid=pid, start_time=start_time)
