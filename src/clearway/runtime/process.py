"""Watching and signalling replica processes the supervisor may not have parented.

A replica must outlive a crash of the control plane, and function replicas are
forked from a warm parent process (`clearway.runtime.forking`), so the
supervisor cannot rely on ``waitpid`` or on ``asyncio`` child watchers, which
only work for its own children. Instead it watches each process through a pidfd (``os.pidfd_open``,
Linux 5.3+), which becomes readable when *any* process exits, and plugs it into
the event loop with ``loop.add_reader``. When the process happens to be our
child we also reap it (``waitpid(WNOHANG)``) to learn its exit code; otherwise
the code comes from whoever is its parent (a warm parent reports it to the fork
launcher), or is unknown (None) for a process adopted after a restart.

A pid alone does not identify a process across a restart of the control plane:
pids are reused. ``(pid, start time)`` does, where the start time is field 22
of ``/proc/<pid>/stat`` (clock ticks since boot).

Every replica is the leader of its own session and process group
(``start_new_session``), so signals go to the group: that reaches processes the
app spawned, and the real replica inside a bubblewrap sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

__all__ = [
    "ProcessExit",
    "ProcessWatch",
    "describe_exit_code",
    "is_alive",
    "read_start_time",
    "signal_group",
]


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the parenthesised command name), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may itself contain spaces and parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def read_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None when there is no such process."""
    fields = _stat_fields(pid)
    return int(fields[22 - 3]) if fields else None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """The process exists, is not a zombie and (if given) started at ``start_time``."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[22 - 3]) == start_time


def _parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[4 - 3]) if fields else None


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group led by ``pid``; no error if it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def describe_exit_code(code: int | None) -> str:
    if code is None:
        return "exited (exit code unknown: it was not our child)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


@dataclass(frozen=True)
class ProcessExit:
    code: int | None
    """As ``Popen.returncode``: negative for a signal; None when not our child."""


class ProcessWatch:
    """Resolves `exited` when the process ends. Call `close` to stop watching early.

    When the process ends, whatever is left of its process group (processes the
    app started and did not wait for) is killed: a replica's processes end with it.
    This happens *before* the leader is reaped, while its zombie still pins the
    group id, so the signal cannot reach a newer group that reused the number.
    """

    def __init__(self, pid: int, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.pid = pid
        self._loop = loop or asyncio.get_running_loop()
        self.exited: asyncio.Future[ProcessExit] = self._loop.create_future()
        self._is_child = _parent_pid(pid) == os.getpid()
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None
            self._finish()
            return
        self._loop.add_reader(self._pidfd, self._finish)

    def _finish(self) -> None:
        if self.exited.done():
            return
        code: int | None = None
        signal_group(self.pid, signal.SIGKILL)
        if self._is_child:
            # The pidfd is readable once the process is a zombie, so this does not block.
            with contextlib.suppress(ChildProcessError):
                reaped, status = os.waitpid(self.pid, os.WNOHANG)
                if reaped == self.pid:
                    code = os.waitstatus_to_exitcode(status)
        self.close()
        self.exited.set_result(ProcessExit(code))

    def close(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
