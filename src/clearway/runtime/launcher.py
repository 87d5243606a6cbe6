"""How a replica process comes to exist: the `Launcher` protocol and `SpawnLauncher`.

The supervisor decides *when* a replica runs; a launcher decides *how* its
process is created. There are two ways: `SpawnLauncher`, a fresh ``python -m
clearway.runtime.replica``, and the fork launcher
(`clearway.runtime.forking.ForkLauncher`), which forks function replicas
from a warm parent that has already imported the app (millisecond starts)
and spawns everything else. The protocol is shaped for both:

* ``launch`` is async (the fork launcher asks its warm parent over a socket);
* it returns a `LaunchedProcess`: the pid and start time that identify the
  process, and, when the supervisor is not its parent (a forked replica is
  the warm parent's child), a future the launcher resolves with its exit
  code. The supervisor never assumes it is the parent (it watches through
  pidfds, see `clearway.runtime.process`);
* the request carries everything the new process must *have* (env, listening
  socket, cgroups to join, log file), not how to get it;
* ``retain`` tells the launcher which replicas may be launched soon (a
  function at zero replicas is one request away from a start), so it can
  keep ready what makes that fast, and let go of the rest.

`SpawnLauncher` uses ``os.posix_spawn`` rather than ``subprocess.Popen``: the
supervisor owns the process's lifetime, and a ``Popen`` object would try to own
it too (and warn when dropped while the replica is meant to keep running).
The replica gets its own session (it survives the control plane and can be
signalled as a group), stdin from /dev/null, the listening unix socket as fd
3, and stdout and stderr on a pipe read by its own log writer
(`clearway.runtime.logwriter`), which enforces the log's size cap.

Every replica runs isolated (`clearway.runtime.isolation`): bubblewrap, and
``setpriv`` to its own uid when we are root. Joining cgroups and ignoring
SIGTERM (for bubblewrap, see there) must happen in the new process before it
executes anything else, and ``posix_spawn`` cannot do either, so replicas start
through a two-line ``/bin/sh`` prologue that does both and ``exec``s.

The log writer is started first, from the platform's own interpreter, as
``python -I -S .../logwriter.py``: it needs only the standard library, and
``-m clearway.runtime.logwriter`` would import clearway (0.4 s of CPU instead
of 0.04 s, for every start). It runs as the platform's user in its own
session; the launcher reaps it when it exits (it is our child).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from clearway.exceptions import RuntimeStartError
from clearway.runtime.isolation import isolated_argv, replica_isolation
from clearway.runtime.process import ProcessWatch, read_start_time
from clearway.runtime.spec import LISTEN_FD_ENV_VAR, ReplicaSpec

__all__ = ["LaunchRequest", "LaunchedProcess", "Launcher", "SpawnLauncher"]

#: The fd number at which a replica finds its listening socket.
LISTEN_FD = 3

#: The log writer, run as a file so that starting it does not import clearway.
LOG_WRITER = str(Path(__file__).with_name("logwriter.py"))

# Runs as `sh -c PROLOGUE clearway-launch <cgroup.procs files...> -- <command...>`.
_PROLOGUE = (
    'trap "" TERM; '
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
    """The supervisor's listening unix socket for a service; the replica gets a copy as fd 3."""
    cgroup_procs: tuple[Path, ...] = ()
    """``cgroup.procs`` files the process must join before running anything."""
    log_max_bytes: int = 10 * 1024 * 1024
    """The cap on ``spec.log_path``, enforced by its log writer."""
    log_keep: int = 3
    """Rotated copies the log writer keeps."""


@dataclass(frozen=True)
class LaunchedProcess:
    pid: int
    start_time: int
    how: str = "spawn"
    """"spawn" (a new interpreter) or "fork" (from a warm parent)."""
    exit_code: asyncio.Future[int | None] | None = field(default=None, compare=False)
    """Resolved by the launcher with the exit code when the supervisor is not the parent;
    None when it is (it reaps the process itself)."""


class Launcher(Protocol):
    async def launch(self, request: LaunchRequest) -> LaunchedProcess:
        """Start the replica process; raise `RuntimeStartError` when it cannot be started."""
        ...

    def retain(self, templates: Iterable[ReplicaSpec]) -> None:
        """Replicas like these may be launched soon; anything kept for others may go."""
        ...

    async def close(self) -> None:
        """Stop what the launcher runs for itself (replicas keep running)."""
        ...


class SpawnLauncher:
    """Starts every replica as a new interpreter (``python -m clearway.runtime.replica``)."""

    def __init__(self) -> None:
        self._writers: set[ProcessWatch] = set()

    async def launch(self, request: LaunchRequest) -> LaunchedProcess:
        return self.spawn(request, [request.spec.python, "-m", "clearway.runtime.replica"])

    def retain(self, templates: Iterable[ReplicaSpec]) -> None:
        """Nothing to keep: every start is a new interpreter."""

    def spawn(
        self, request: LaunchRequest, command: list[str], *, fds: Mapping[int, int] | None = None
    ) -> LaunchedProcess:
        """Start ``command`` isolated as the replica ``request.spec``; ``fds`` maps a target
        descriptor number in the new process to one of ours (besides the listening socket)."""
        spec = request.spec
        try:
            argv = isolated_argv(replica_isolation(spec), command)
        except OSError as error:
            raise RuntimeStartError(
                f"cannot build the isolated view for replica {spec.replica_id}: {error}"
            ) from error
        procs = [str(path) for path in request.cgroup_procs]
        argv = ["/bin/sh", "-c", _PROLOGUE, "clearway-launch", *procs, "--", *argv]
        env = dict(request.env)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        copies: list[int] = []
        try:
            self.start_log_writer(request, read_end)
            actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, write_end, 1),
                (os.POSIX_SPAWN_DUP2, write_end, 2),
            ]
            wanted = dict(fds or {})
            if request.listen_fd is not None:
                wanted[LISTEN_FD] = request.listen_fd
                env[LISTEN_FD_ENV_VAR] = str(LISTEN_FD)
            for target, source in sorted(wanted.items()):
                # A close-on-exec copy numbered above the targets, so that dup2 onto the target
                # always happens (and clears close-on-exec on it only); every other fd of ours
                # is close-on-exec.
                copy = fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 10)
                copies.append(copy)
                actions.append((os.POSIX_SPAWN_DUP2, copy, target))
            try:
                # posix_spawn returns as soon as the child exists (vfork-style): it does not block.
                pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)
            except OSError as error:
                raise RuntimeStartError(
                    f"could not start {argv[0]} for replica {spec.replica_id}: {error}. "
                    "Check that the interpreter exists and is executable."
                ) from error
        finally:
            for copy in copies:
                os.close(copy)
            # The writer and the replica hold their own ends; the writer sees end of file
            # once the replica and everything it started have closed theirs.
            os.close(read_end)
            os.close(write_end)
        start_time = read_start_time(pid)
        # Our own child stays readable in /proc (as a zombie at worst) until we reap it.
        assert start_time is not None
        return LaunchedProcess(pid=pid, start_time=start_time)

    def start_log_writer(self, request: LaunchRequest, read_end: int) -> None:
        """Start the log writer of ``request.spec``, reading ``read_end``, and watch it."""
        self.watch_log_writer(self.spawn_log_writer(request, read_end))

    @staticmethod
    def log_destination(request: LaunchRequest) -> bytes:
        """The first line a spare log writer reads: where, and under which cap, it writes."""
        path = str(request.spec.log_path)
        if "\t" in path or "\n" in path:
            raise RuntimeStartError(f"the log path {path!r} holds a tab or a newline")
        return f"{path}\t{request.log_max_bytes}\t{request.log_keep}\n".encode("utf-8", "surrogateescape")

    def spawn_log_writer(self, request: LaunchRequest | None, read_end: int) -> int:
        """Start the log writer of ``request.spec``; its pid. With no request, a spare one
        that reads its destination from its first line (`log_destination`)."""
        argv = [sys.executable, "-I", "-S", LOG_WRITER]
        if request is None:
            argv.append("--from-stdin")
        else:
            argv += [
                str(request.spec.log_path),
                "--max-bytes", str(request.log_max_bytes), "--keep", str(request.log_keep),
            ]  # fmt: skip
        actions = [
            (os.POSIX_SPAWN_DUP2, read_end, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        try:
            pid = os.posix_spawn(
                argv[0], argv, {"LANG": "C.UTF-8"}, file_actions=actions, setsid=True
            )
        except OSError as error:
            whose = f"replica {request.spec.replica_id}" if request is not None else "a replica"
            raise RuntimeStartError(f"could not start the log writer for {whose}: {error}") from error
        return pid

    def watch_log_writer(self, pid: int) -> None:
        """Reap the log writer ``pid`` when it exits."""
        watch = ProcessWatch(pid)
        self._writers.add(watch)
        watch.exited.add_done_callback(lambda _: self._writers.discard(watch))

    async def close(self) -> None:
        """Stop watching log writers (they keep running, and exit with their replicas)."""
        for watch in list(self._writers):
            with contextlib.suppress(OSError):
                watch.close()
        self._writers.clear()
