"""The supervisor: keeps replica processes running, healthy and reported.

One `Supervisor` per control plane. For every replica it runs one supervised
background task (``replica:<id>``) that owns the replica's process from spawn
to exit, and loops::

    spawn ─▶ STARTING ─(readiness probe ok)─▶ READY ◀─(probe ok)─┐
               │  never ready in time /        │  │ liveness fails │
               │  exits before ready           │  └─────────▶ UNHEALTHY (out of rotation)
               │                               │ exits            │ fails N times in a row
               └─────────────────────▶ BACKOFF or CRASHLOOP ◀─ terminate
                                               │ delay elapsed
                                               └────────▶ spawn again

`stop` interrupts any stage: STOPPING (SIGTERM to the process group, SIGKILL
after the grace period) then STOPPED. Each transition produces a new immutable
`ReplicaStatus`, handed to the ``on_change`` callback so the control plane can
persist it; `wait_for` lets callers await a state.

Design points:

* **Replicas outlive the control plane.** They run in their own session, and
  the supervisor tracks them by ``(pid, start time)`` through pidfds rather
  than as children, so after a restart a new supervisor can `adopt` them.
  Closing the supervisor without stopping replicas only detaches.
* **The socket belongs to the replica, not to a process, and to no one else.**
  Services never listen on TCP, where any local process could reach them
  around the gateway's access control. The supervisor binds a unix socket at
  ``spec.socket_path`` (its directory 0700, the socket 0600: only the
  platform's user, i.e. the gateway and the probes, can connect; replicas run
  under other uids and do not even see the directory) once per service
  replica and passes it to each process it starts, so it is ready before the
  first start and stays the same across restarts (requests arriving during a
  restart wait in the backlog). An adopted replica's socket is in the old
  process; when it must be restarted the supervisor binds the path again.
* **How a process is made is the launcher's business** (`clearway.runtime.launcher`):
  spawned, or forked from a warm parent. The supervisor times the launch and
  the start-up until the first passed probe (``ReplicaStatus.launch_seconds``
  and ``start_seconds``), and takes the exit code from the launcher when it is
  not the process's parent (``LaunchedProcess.exit_code``).
* **Each process start is an incarnation**: a random id, reported in the
  status and named in the credential the ``credentials`` callback mints for
  that process (``CLEARWAY_REPLICA_TOKEN``), so a stopped process's token can
  be told from its successor's.
* **Out of rotation at the first failed liveness probe** (UNHEALTHY, which is
  not routed), back at the next success, restarted after
  ``failure_threshold`` failures: see `clearway.runtime.probes` for the bound.
* **Two clocks.** Decisions about history (backoff, crash loops, forgiveness)
  use the injected `Clock`, so tests can drive them. Deadlines that race real
  processes (startup timeout, grace period, probe timeouts) use the event
  loop's time: a fake clock cannot make a process start faster.
* **Limits, isolation and logs** are delegated to `clearway.runtime.cgroups`
  (best effort, reported as warnings) and to the launcher (bubblewrap and
  setpriv, `clearway.runtime.isolation`; a log writer per process that enforces
  the log cap, `clearway.runtime.logwriter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import secrets
import signal
import socket
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearway.exceptions import ClearwayError, RuntimeStartError
from clearway.runtime.cgroups import Cgroup, CgroupUnavailable, create_cgroup
from clearway.runtime.clock import Clock, SystemClock
from clearway.runtime.exit_codes import ExitCode
from clearway.runtime.isolation import find_bwrap
from clearway.runtime.launcher import LaunchedProcess, Launcher, LaunchRequest, SpawnLauncher
from clearway.runtime.logs import LogPosition, log_position, read_log_since
from clearway.runtime.probes import ProbePolicy, ProbeResult, probe_http, probe_until_ready
from clearway.runtime.process import (
    ProcessExit,
    ProcessWatch,
    describe_exit_code,
    is_alive,
    signal_group,
)
from clearway.runtime.restarts import RestartPolicy, RestartTracker
from clearway.runtime.spec import ReplicaSpec, replica_environment
from clearway.runtime.status import ReplicaState, ReplicaStatus
from clearway.tasks import TaskSupervisor

__all__ = [
    "Credentials",
    "StatusCallback",
    "Supervisor",
    "SupervisorConfig",
    "UnknownReplicaError",
]

logger = logging.getLogger("clearway.runtime")

#: How long the exit code of a process the supervisor did not parent may trail its exit.
EXIT_CODE_WAIT = 2.0

StatusCallback = Callable[[ReplicaStatus], None]
#: Mints the credential of one process start: (spec, incarnation) -> token.
Credentials = Callable[[ReplicaSpec, str], str]


class UnknownReplicaError(ClearwayError, KeyError):
    """No replica with this id is supervised here."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown replica"


@dataclass(frozen=True)
class SupervisorConfig:
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    probes: ProbePolicy = field(default_factory=ProbePolicy)
    log_max_bytes: int = 10 * 1024 * 1024
    """The cap on each replica log file, enforced by its log writer before every write."""
    log_keep: int = 3
    """Rotated copies kept: ``replica.log.1`` (newest) .. ``replica.log.<keep>``."""
    cgroup_parent: str = "clearway"
    error_log_lines: int = 40
    """Lines of the log tail quoted in ``last_error`` when a process crashes."""
    kill_timeout: float = 10.0
    """How long to wait for a process to vanish after SIGKILL before reporting it stuck."""


class _Outcome(enum.Enum):
    # stop() was called: terminate and finish.
    STOP = "stop"
    # The process ended or was ended by us (unhealthy, never ready): back off and restart.
    ENDED = "ended"


@dataclass(frozen=True)
class _End:
    outcome: _Outcome
    exit_code: int | None = None
    was_ready: bool = False
    error: str | None = None


class _Replica:
    """Everything the supervisor knows about one replica; its task runs `run`."""

    def __init__(self, supervisor: Supervisor, spec: ReplicaSpec, status: ReplicaStatus) -> None:
        self.supervisor = supervisor
        self.spec = spec
        self.status = status
        self.tracker = RestartTracker(supervisor.config.restart, supervisor.clock)
        self.listener: socket.socket | None = None
        self.cgroup: Cgroup | None = None
        self.watch: ProcessWatch | None = None
        self.stop_requested = asyncio.Event()
        self.stop_grace: float | None = None
        self.log_since = LogPosition(0, 0)
        #: The process being supervised, as its launcher described it.
        self.launched: LaunchedProcess | None = None
        #: When the launch of the current process began (monotonic); None once it is ready.
        self.launch_started: float | None = None

    # -- status -----------------------------------------------------------------------

    def update(self, **changes: Any) -> None:
        if "state" in changes and changes["state"] != self.status.state:
            changes.setdefault("since", self.supervisor.clock.time())
        self.status = dataclasses.replace(self.status, **changes)
        self.supervisor._publish(self.status)

    def warn(self, message: str) -> None:
        logger.warning("replica %s: %s", self.spec.replica_id, message)
        self.update(warnings=(*self.status.warnings, message))

    def note(self, message: str) -> None:
        """Append a supervisor line to the replica's log, where `clearway logs` shows it."""
        line = time.strftime("%Y-%m-%dT%H:%M:%S") + f" [clearway supervisor] {message}\n"
        try:
            with open(self.spec.log_path, "a", encoding="utf-8") as log:
                log.write(line)
        except OSError as error:
            logger.warning("cannot write to %s: %s", self.spec.log_path, error)

    # -- resources --------------------------------------------------------------------

    def prepare(self, *, adopted: bool) -> None:
        """Create the workdir, the log directory and the cgroup; bind the socket if needed."""
        spec = self.spec
        spec.workdir.mkdir(parents=True, exist_ok=True)
        if spec.uid is not None and os.geteuid() == 0:
            gid = spec.gid if spec.gid is not None else spec.uid
            os.chown(spec.workdir, spec.uid, gid)
            spec.workdir.chmod(0o700)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.kind != "worker":  # services and functions listen
            if spec.socket_path is None:
                raise RuntimeStartError(
                    f"service replica {spec.replica_id} has no socket_path: the platform must "
                    "say where its unix socket goes"
                )
            self.status = dataclasses.replace(self.status, socket_path=str(spec.socket_path))
            if not adopted:
                self.listener = _listen_unix(spec.socket_path)
        try:
            self.cgroup = create_cgroup(
                spec.replica_id,
                memory_mb=spec.memory_mb,
                cpu=spec.cpu,
                parent=self.supervisor.config.cgroup_parent,
            )
        except CgroupUnavailable as error:
            message = f"resource limits not applied: {error}"
            logger.warning("replica %s: %s", spec.replica_id, message)
            self.status = dataclasses.replace(
                self.status, warnings=(*self.status.warnings, message)
            )

    def ensure_listener(self) -> None:
        """After an adopted process ended: bind its socket path again for the next."""
        if self.spec.kind == "worker" or self.listener is not None:
            return
        assert self.spec.socket_path is not None
        self.listener = _listen_unix(self.spec.socket_path)

    async def release(self) -> None:
        """Free everything the replica held; only once it has stopped for good."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self.spec.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.spec.socket_path.unlink()
        if self.cgroup is not None:
            warning = await self.cgroup.remove()
            if warning:
                logger.warning("replica %s: %s", self.spec.replica_id, warning)
            self.cgroup = None

    def detach(self) -> None:
        """Stop watching without touching the process (the supervisor is closing)."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.listener is not None:
            # The replica process holds its own copy of the socket; this closes only ours.
            self.listener.close()
            self.listener = None

    # -- the loop ---------------------------------------------------------------------

    async def run(self, adopted: LaunchedProcess | None) -> None:
        try:
            await self._run(adopted)
        except asyncio.CancelledError:
            self.detach()
            raise

    async def _run(self, adopted: LaunchedProcess | None) -> None:
        process = adopted
        while True:
            if process is None:
                if self.stop_requested.is_set():
                    await self._finish_stopped()
                    return
                try:
                    process = await self._spawn()
                except RuntimeStartError as error:
                    await self._fail(str(error))
                    return
            self.watch = ProcessWatch(process.pid)
            self.launched = process
            end = await self._supervise(process)
            if end.outcome is _Outcome.STOP:
                await self._terminate(stopping=True)
                await self._finish_stopped()
                return
            process = None
            self.watch = None
            decision = self.tracker.ended(was_ready=end.was_ready)
            state = ReplicaState.CRASHLOOP if decision.crashloop else ReplicaState.BACKOFF
            self.update(
                state=state,
                pid=None,
                pid_start_time=None,
                last_exit_code=end.exit_code,
                last_error=end.error,
            )
            first_line = (end.error or "").splitlines()[0] if end.error else "ended"
            self.note(f"{first_line}; restarting in {decision.delay:g}s")
            logger.info(
                "replica %s: %s; %s, restarting in %gs",
                self.spec.replica_id, first_line, state.value, decision.delay,
            )  # fmt: skip
            if await self._stop_or(self.supervisor.clock.sleep(decision.delay)):
                await self._finish_stopped()
                return
            self.update(restarts=self.status.restarts + 1)

    async def _spawn(self) -> LaunchedProcess:
        spec, config = self.spec, self.supervisor.config
        self.ensure_listener()
        self.log_since = log_position(spec.log_path)
        incarnation = secrets.token_hex(8)
        token = None
        if self.supervisor.credentials is not None:
            try:
                token = self.supervisor.credentials(spec, incarnation)
            except Exception as error:
                raise RuntimeStartError(
                    f"could not mint the credential of replica {spec.replica_id}: {error!r}"
                ) from error
        request = LaunchRequest(
            spec=spec,
            env=replica_environment(spec, incarnation=incarnation, token=token),
            listen_fd=self.listener.fileno() if self.listener is not None else None,
            cgroup_procs=self.cgroup.procs_files if self.cgroup is not None else (),
            log_max_bytes=config.log_max_bytes,
            log_keep=config.log_keep,
        )
        started = time.monotonic()
        process = await self.supervisor.launcher.launch(request)
        self.launch_started = started  # `_run` records the process itself, adopted ones too
        how = "forked" if process.how == "fork" else "started"
        self.note(f"{how} process {process.pid} (incarnation {incarnation})")
        self.update(
            state=ReplicaState.STARTING,
            pid=process.pid,
            pid_start_time=process.start_time,
            incarnation=incarnation,
            started_by=process.how,
            launch_seconds=time.monotonic() - started,
            start_seconds=None,
        )
        return process

    async def _supervise(self, process: LaunchedProcess) -> _End:
        """Watch one process until it ends, turns unhealthy, or a stop is requested."""
        assert self.watch is not None
        spec, probes = self.spec, self.supervisor.config.probes
        exited = self.watch.exited
        if spec.kind != "worker":  # services and functions listen
            assert spec.socket_path is not None
            winner, result = await self._race(
                exited, self._await_ready(spec.socket_path), name=f"readiness:{spec.replica_id}"
            )
            if winner is _Outcome.STOP:
                return _End(_Outcome.STOP)
            if winner == "exited":
                return await self._ended_by_itself(was_ready=False)
            assert isinstance(result, ProbeResult)
            if not result.ok:
                self.note(result.detail)
                self.update(last_error=result.detail)
                await self._terminate(stopping=False)
                return _End(
                    _Outcome.ENDED,
                    exit_code=self.status.last_exit_code,
                    was_ready=False,
                    error=result.detail,
                )
        else:
            winner, _ = await self._race(
                exited, self._sleep_ok(probes.worker_ready_after), name=f"warmup:{spec.replica_id}"
            )
            if winner is _Outcome.STOP:
                return _End(_Outcome.STOP)
            if winner == "exited":
                return await self._ended_by_itself(was_ready=False)
        self.tracker.became_ready()
        if self.launch_started is not None:
            # The start-up breakdown: launch (fork or spawn) then init (until the probe passed).
            self.update(state=ReplicaState.READY, start_seconds=time.monotonic() - self.launch_started)
            self.launch_started = None
        else:
            self.update(state=ReplicaState.READY)
        if spec.kind != "worker":  # services and functions listen
            assert spec.socket_path is not None
            winner, result = await self._race(
                exited,
                self._await_unhealthy(spec.socket_path),
                name=f"liveness:{spec.replica_id}",
            )
        else:
            winner, result = await self._race(exited, None, name="")
        if winner is _Outcome.STOP:
            return _End(_Outcome.STOP)
        if winner == "exited":
            return await self._ended_by_itself(was_ready=True)
        assert isinstance(result, ProbeResult)
        error = f"failed {probes.failure_threshold} liveness probes in a row; last: {result.detail}"
        self.update(state=ReplicaState.UNHEALTHY, last_error=error)
        self.note(error)
        await self._terminate(stopping=False)
        return _End(
            _Outcome.ENDED, exit_code=self.status.last_exit_code, was_ready=True, error=error
        )

    async def _race(
        self,
        exited: asyncio.Future[ProcessExit],
        probe: Coroutine[Any, Any, ProbeResult] | None,
        *,
        name: str,
    ) -> tuple[object, ProbeResult | None]:
        """Wait for the first of: the process exits, the probe returns, stop is requested."""
        loop = asyncio.get_running_loop()
        stop = loop.create_task(
            self.stop_requested.wait(), name=f"stop-request:{self.spec.replica_id}"
        )
        waiters: set[asyncio.Future[Any]] = {stop, exited}
        probe_task = None
        if probe is not None:
            probe_task = loop.create_task(probe, name=name)
            waiters.add(probe_task)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (stop, probe_task):
                if waiter is not None and not waiter.done():
                    waiter.cancel()
                    await asyncio.wait([waiter])
        if stop.done() and not stop.cancelled():
            return _Outcome.STOP, None
        if exited.done():
            return "exited", None
        assert probe_task is not None
        return "probe", probe_task.result()

    @staticmethod
    async def _sleep_ok(seconds: float) -> ProbeResult:
        await asyncio.sleep(seconds)
        return ProbeResult(True, f"ran for {seconds:g}s")

    async def _await_ready(self, socket_path: Path) -> ProbeResult:
        return await probe_until_ready(
            socket_path,
            self.spec.health_path,
            startup_timeout=self.spec.startup_timeout,
            policy=self.supervisor.config.probes,
        )

    async def _await_unhealthy(self, socket_path: Path) -> ProbeResult:
        """Probe until ``failure_threshold`` failures in a row; the first takes the replica
        out of rotation (UNHEALTHY), a success puts it back (READY)."""
        probes = self.supervisor.config.probes
        failures = 0
        while True:
            await asyncio.sleep(probes.liveness_interval)
            result = await probe_http(socket_path, self.spec.health_path, within=probes.timeout)
            if result.ok:
                if failures:
                    self.note(f"liveness probe passed again ({result.detail}); back in rotation")
                    self.update(state=ReplicaState.READY)
                failures = 0
                self.tracker.still_ready()
                continue
            failures += 1
            logger.info(
                "replica %s: liveness probe failed (%d/%d): %s",
                self.spec.replica_id, failures, probes.failure_threshold, result.detail,
            )  # fmt: skip
            if failures >= probes.failure_threshold:
                return result
            if failures == 1:
                message = f"liveness probe failed: {result.detail}; out of rotation"
                self.note(message)
                self.update(state=ReplicaState.UNHEALTHY, last_error=message)

    async def _exit_code(self) -> int | None:
        """The ended process's exit code: ours when we reaped it, else the launcher's word."""
        assert self.watch is not None
        code = self.watch.exited.result().code
        reported = self.launched.exit_code if self.launched is not None else None
        if code is None and reported is not None:
            # The parent that reaps it (a warm parent) reports just after the exit.
            with contextlib.suppress(TimeoutError):
                code = await asyncio.wait_for(asyncio.shield(reported), EXIT_CODE_WAIT)
        return code

    async def _ended_by_itself(self, *, was_ready: bool) -> _End:
        assert self.watch is not None
        code = await self._exit_code()
        how = describe_exit_code(code)
        if code is not None and code >= 0:
            with contextlib.suppress(ValueError):
                how += f" ({ExitCode(code).describe()})"
        when = "" if was_ready else " before it was ready"
        tail = read_log_since(
            self.spec.log_path, self.log_since, lines=self.supervisor.config.error_log_lines
        )
        error = f"process {self.watch.pid} {how}{when}"
        if tail:
            error += f"; last log lines:\n{tail}"
        return _End(_Outcome.ENDED, exit_code=code, was_ready=was_ready, error=error)

    async def _terminate(self, *, stopping: bool) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period, await the exit."""
        watch = self.watch
        if watch is None:
            return
        grace = self.spec.grace_period
        if stopping:
            grace = self.stop_grace if self.stop_grace is not None else grace
            self.update(state=ReplicaState.STOPPING)
        signal_group(watch.pid, signal.SIGTERM)
        await asyncio.wait([watch.exited], timeout=grace)
        if not watch.exited.done():
            self.note(f"still running {grace:g}s after SIGTERM; sending SIGKILL")
            signal_group(watch.pid, signal.SIGKILL)
            await asyncio.wait([watch.exited], timeout=self.supervisor.config.kill_timeout)
        if not watch.exited.done():
            watch.close()
            self.warn(f"process {watch.pid} did not exit after SIGKILL; no longer watched")
            self.update(last_exit_code=None)
            return
        code = await self._exit_code()
        self.note(f"process {watch.pid} {describe_exit_code(code)}")
        self.update(last_exit_code=code)

    async def _stop_or(self, awaitable: Coroutine[Any, Any, None]) -> bool:
        """Await ``awaitable`` unless a stop is requested first; returns whether it was."""
        loop = asyncio.get_running_loop()
        stop = loop.create_task(
            self.stop_requested.wait(), name=f"stop-request:{self.spec.replica_id}"
        )
        other = loop.create_task(awaitable, name=f"backoff:{self.spec.replica_id}")
        await asyncio.wait({stop, other}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stop, other):
            if not waiter.done():
                waiter.cancel()
                await asyncio.wait([waiter])
        return self.stop_requested.is_set()

    async def _finish_stopped(self) -> None:
        self.watch = None
        await self.release()
        self.update(state=ReplicaState.STOPPED, pid=None, pid_start_time=None)

    async def _fail(self, error: str) -> None:
        self.note(error)
        await self.release()
        self.update(state=ReplicaState.FAILED, pid=None, pid_start_time=None, last_error=error)


def _listen_unix(path: Path) -> socket.socket:
    """Bind a listening unix socket at ``path`` that only our user can connect to."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left by a process that is gone: nothing listens on it any more
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(0o600)
        sock.listen(1024)
    except OSError as error:
        sock.close()
        raise RuntimeStartError(
            f"cannot listen on {path}: {error.strerror or error}. Remove whatever is there, "
            "or give the replica another socket path."
        ) from error
    return sock


class Supervisor:
    """Runs, watches and restarts replica processes; reports every status change."""

    def __init__(
        self,
        *,
        on_change: StatusCallback | None = None,
        config: SupervisorConfig | None = None,
        launcher: Launcher | None = None,
        clock: Clock | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        self.config = config or SupervisorConfig()
        self.credentials = credentials
        self.launcher: Launcher = launcher or SpawnLauncher()
        self.clock: Clock = clock or SystemClock()
        self._on_change = on_change
        self._replicas: dict[str, _Replica] = {}
        self._tasks = TaskSupervisor(logger)
        self._changed = asyncio.Event()
        self._closed = False

    # -- queries ----------------------------------------------------------------------

    def statuses(self) -> dict[str, ReplicaStatus]:
        return {replica_id: r.status for replica_id, r in self._replicas.items()}

    def status(self, replica_id: str) -> ReplicaStatus:
        return self._get(replica_id).status

    async def wait_for(
        self,
        replica_id: str,
        *states: ReplicaState,
        within: float,
        predicate: Callable[[ReplicaStatus], bool] | None = None,
    ) -> ReplicaStatus:
        """Wait until the replica is in one of ``states`` (and ``predicate`` holds).

        Raises ``TimeoutError`` naming the state it is stuck in.
        """

        def matches() -> bool:
            status = self._get(replica_id).status
            return (not states or status.state in states) and (
                predicate is None or predicate(status)
            )

        try:
            async with asyncio.timeout(within):
                while not matches():
                    await self._changed.wait()
        except TimeoutError:
            status = self._get(replica_id).status
            wanted = ", ".join(s.value for s in states) or "the condition"
            raise TimeoutError(
                f"replica {replica_id} did not reach {wanted} within {within:g}s; it is "
                f"{status.state.value} (last error: {status.last_error})"
            ) from None
        return self._get(replica_id).status

    # -- commands ---------------------------------------------------------------------

    async def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Start supervising a new replica; returns at once (state STARTING).

        Raises `RuntimeStartError` for problems no retry can fix (the id is in use,
        bubblewrap is missing, the socket path cannot be bound).
        """
        self._check_can_start(spec)
        find_bwrap()
        replica = _Replica(self, spec, ReplicaStatus(spec.replica_id, ReplicaState.STARTING,
                                                     since=self.clock.time()))  # fmt: skip
        replica.prepare(adopted=False)
        self._launch_task(replica, adopted=None)
        return replica.status

    async def adopt(
        self, spec: ReplicaSpec, pid: int, pid_start_time: int, incarnation: str | None
    ) -> bool:
        """Re-attach to a replica process left running by a previous supervisor.

        Returns False (and supervises nothing) when no process ``pid`` started at
        ``pid_start_time`` is alive: it died, or the pid now belongs to another
        process. The replica is probed again before it counts as READY.
        """
        self._check_can_start(spec)
        if not is_alive(pid, pid_start_time):
            return False
        status = ReplicaStatus(
            spec.replica_id,
            ReplicaState.STARTING,
            since=self.clock.time(),
            pid=pid,
            pid_start_time=pid_start_time,
            incarnation=incarnation,
        )
        replica = _Replica(self, spec, status)
        replica.prepare(adopted=True)
        replica.log_since = log_position(spec.log_path)
        replica.note(f"adopted process {pid} after a control plane restart")
        self._launch_task(replica, adopted=LaunchedProcess(pid=pid, start_time=pid_start_time))
        return True

    async def stop(self, replica_id: str, grace: float | None = None) -> ReplicaStatus:
        """Stop a replica (SIGTERM, then SIGKILL after ``grace``) and wait until it has."""
        replica = self._get(replica_id)
        replica.stop_grace = grace
        replica.stop_requested.set()
        task = self._tasks.get(_task_name(replica_id))
        if task is not None:
            await asyncio.wait([task])
        if replica.status.state is ReplicaState.FAILED:
            await replica.release()
        self._replicas.pop(replica_id, None)
        return replica.status

    async def close(self, *, stop_replicas: bool) -> None:
        """Stop supervising. With ``stop_replicas`` stop them all; otherwise leave them running
        (for a new supervisor to `adopt`)."""
        self._closed = True
        if stop_replicas:
            await asyncio.gather(*(self.stop(rid) for rid in list(self._replicas)))
        await self._tasks.close()
        self._replicas.clear()
        await self.launcher.close()

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(stop_replicas=True)

    # -- internals --------------------------------------------------------------------

    def _get(self, replica_id: str) -> _Replica:
        try:
            return self._replicas[replica_id]
        except KeyError:
            raise UnknownReplicaError(f"no replica {replica_id!r} is supervised here") from None

    def _check_can_start(self, spec: ReplicaSpec) -> None:
        if self._closed:
            raise RuntimeStartError("this supervisor is closed; create a new one")
        existing = self._replicas.get(spec.replica_id)
        if existing is not None:
            raise RuntimeStartError(
                f"replica {spec.replica_id} is already supervised "
                f"({existing.status.state.value}); stop it first or use another replica id"
            )

    def _launch_task(self, replica: _Replica, *, adopted: LaunchedProcess | None) -> None:
        self._replicas[replica.spec.replica_id] = replica
        self._publish(replica.status)

        def on_failure(error: BaseException) -> None:
            # A bug in the supervisor: do not leave a process running unsupervised.
            if replica.watch is not None:
                signal_group(replica.watch.pid, signal.SIGKILL)
                replica.watch.close()
            replica.update(
                state=ReplicaState.FAILED,
                last_error=f"the supervisor failed: {type(error).__name__}: {error}",
            )

        self._tasks.start(
            _task_name(replica.spec.replica_id), replica.run(adopted), on_failure=on_failure
        )

    def _publish(self, status: ReplicaStatus) -> None:
        if self._on_change is not None:
            try:
                self._on_change(status)
            except Exception:
                logger.exception("the on_change callback failed for %s", status.replica_id)

        # Wake every `wait_for`: each waits on the event current when it looked.
        self._changed.set()
        self._changed = asyncio.Event()


def _task_name(replica_id: str) -> str:
    return f"replica:{replica_id}"
