"""The fork launcher: function replicas forked from a warm parent in milliseconds.

`ForkLauncher` is a `Launcher` that keeps, for every function of every
running revision, one warm parent (`clearway.runtime.warmparent`): a process
started exactly like a replica of that function — the same bubblewrap view,
uid, cgroup limits, code, interpreter and environment — that has imported
the app and everything serving it needs, and forks a replica on request.
A fresh interpreter importing a function and its dependencies takes hundreds
of milliseconds; a fork, about one. Services and workers, and functions
whose warm parent cannot be had (it failed to import the app, the app
starts threads at import), are spawned (`SpawnLauncher`), so the fork is
only ever a shortcut, never a different behaviour.

A forked replica keeps what a spawned one has:

* **its sandbox and uid**: it is a child of a process already inside them.
  Replicas forked from one parent share its view of the file system (its
  private ``/tmp``, its hostname, the directory holding their workdirs):
  they are replicas of one function of one revision under one uid, so
  nothing crosses a boundary that separates anything;
* **its cgroup limits**: the child waits, before running anything of the
  app, until the launcher has moved it into the replica's cgroup;
* **its identity**: pid and start time in the host's pid namespace,
  learned from the kernel (the credentials the child's first message
  carries), so the supervisor watches, signals and adopts it like any other;
* **its exit status**: the warm parent reaps it and reports the code on the
  child's own report socket; it arrives here as `LaunchedProcess.exit_code`;
* **adoption after a control-plane crash**: the replica does not depend on
  the launcher. A warm parent that loses its launcher stays while it has
  children (they live in its pid namespace) and exits with the last; the
  new control plane starts new warm parents for new replicas.

A warm parent that dies takes its children with it (their pid namespace
ends); the supervisor sees them exit and restarts them, from a new parent
the next launch starts. A warm parent is keyed by everything a replica of
its function shares (the spec without the per-replica fields, and the
environment): a new revision, or new configuration, gets a new parent, and
the parent itself refuses a request for anything else, so a forked replica
never runs another revision's code.

Every launch is timed (`LaunchedProcess.how` says which way it went), and
the supervisor reports launch and start-up times per replica, so the cost
of each way is visible rather than assumed.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clearway.exceptions import RuntimeStartError
from clearway.runtime.cgroups import Cgroup, CgroupUnavailable, create_cgroup
from clearway.runtime.launcher import LaunchedProcess, LaunchRequest, SpawnLauncher
from clearway.runtime.logs import log_position, read_log_since
from clearway.runtime.process import ProcessWatch, is_alive, read_start_time, signal_group
from clearway.runtime.spec import ReplicaSpec, replica_environment
from clearway.runtime.warmprotocol import CONTROL_FD, MAX_MESSAGE
from clearway.tasks import TaskSupervisor

__all__ = ["ForkLauncher", "warm_parent_spec"]

logger = logging.getLogger("clearway.runtime")

#: After a warm parent could not be had, launches of its function spawn for this long.
FAILED_PARENT_COOLDOWN = 30.0
#: How long after a launch the next spare log writer is started (off that launch's path).
SPARE_WRITER_DELAY = 0.2
#: How long a warm parent may take to exit once killed or let go with no replicas.
KILL_WAIT = 5.0
#: How long a launch waits for the forked child's first message.
HELLO_TIMEOUT = 10.0
#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")


def warm_parent_spec(spec: ReplicaSpec) -> ReplicaSpec:
    """The spec of the warm parent that replicas like ``spec`` fork from.

    Its workdir is the directory holding theirs (so their workdirs are in its
    view), its id and log are the function's, and it listens on nothing."""
    name = f"{spec.revision}.{spec.component}.warm"
    return dataclasses.replace(
        spec,
        replica_id=name,
        index=-1,
        workdir=spec.workdir.parent,
        log_path=spec.log_path.with_name(f"{name}.log"),
        socket_path=None,
    )


def _key(spec: ReplicaSpec) -> str:
    parent = warm_parent_spec(spec)
    text = parent.to_json() + json.dumps(dict(sorted(parent.env.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class _WarmParent:
    key: str
    spec: ReplicaSpec
    ready: asyncio.Future[None]
    control: socket.socket | None = None
    watch: ProcessWatch | None = None
    cgroup: Cgroup | None = None
    failed_at: float | None = None
    error: str | None = None
    #: Children launched from it that have not exited yet (host pids).
    children: set[int] = field(default_factory=set)

    @property
    def usable(self) -> bool:
        return (
            self.ready.done()
            and not self.ready.cancelled()
            and self.ready.exception() is None
            and self.control is not None
            and self.watch is not None
            and not self.watch.exited.done()
        )


class ForkLauncher:
    """Forks function replicas from warm parents; spawns everything else (see the module docstring)."""

    def __init__(self, *, cgroup_parent: str = "clearway", spawn: SpawnLauncher | None = None) -> None:
        self.spawner = spawn or SpawnLauncher()
        self.cgroup_parent = cgroup_parent
        self._parents: dict[str, _WarmParent] = {}
        self._tasks = TaskSupervisor(logger)
        self._closed = False
        #: The write end of the spare log writer's pipe (see `_log_pipe`).
        self._spare: int | None = None
        self._refill: asyncio.TimerHandle | None = None

    # -- the Launcher protocol ----------------------------------------------------------

    async def launch(self, request: LaunchRequest) -> LaunchedProcess:
        spec = request.spec
        if spec.kind != "function" or self._closed:
            return await self.spawner.launch(request)
        parent = await self._parent_for(spec)
        if parent is None:
            return await self.spawner.launch(request)
        try:
            return await self._fork(parent, request)
        except _ParentGone as gone:
            logger.warning("warm parent of %s: %s; spawning replica %s instead",
                           spec.component, gone, spec.replica_id)  # fmt: skip
            return await self.spawner.launch(request)

    def retain(self, templates: Iterable[ReplicaSpec]) -> None:
        """Start warm parents for the functions among ``templates``; retire the others.

        A retired parent is only let go (its control socket closed): it exits
        once its last replica has."""
        if self._closed:
            return
        wanted = {_key(t): t for t in templates if t.kind == "function"}
        for key in list(self._parents):
            if key not in wanted:
                self._retire(self._parents.pop(key))
        for key, template in wanted.items():
            if key not in self._parents:
                self._start_parent(key, template)

    async def close(self) -> None:
        """Let every warm parent go (each exits with its last replica) and stop watching."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
        if self._spare is not None:
            os.close(self._spare)  # end of file before a destination: the spare exits
            self._spare = None
        parents = list(self._parents.values())
        self._parents.clear()
        for parent in parents:
            self._retire(parent)
        # A parent with no replica left exits now; wait for it, so that its cgroup goes too.
        idle = [p.watch.exited for p in parents if p.watch is not None and not p.children]
        if idle:
            await asyncio.wait(idle, timeout=KILL_WAIT)
        await self._tasks.close()
        for parent in parents:
            await self._remove_cgroup(parent)
        await self.spawner.close()

    # -- introspection ------------------------------------------------------------------

    def parents(self) -> dict[str, dict[str, object]]:
        """Warm parents by id: pid, state, live children (for status views and tests)."""
        views: dict[str, dict[str, object]] = {}
        for parent in self._parents.values():
            state = "ready" if parent.usable else "failed" if parent.error else "starting"
            views[parent.spec.replica_id] = {
                "pid": parent.watch.pid if parent.watch else None,
                "state": state,
                "children": len(parent.children),
                "error": parent.error,
            }
        return views

    # -- warm parents -------------------------------------------------------------------

    async def _parent_for(self, spec: ReplicaSpec) -> _WarmParent | None:
        key = _key(spec)
        parent = self._parents.get(key)
        if parent is not None and parent.failed_at is not None:
            if time.monotonic() - parent.failed_at < FAILED_PARENT_COOLDOWN:
                return None
            self._parents.pop(key, None)
            parent = None
        if parent is not None and parent.ready.done() and not parent.usable:
            self._parents.pop(key, None)  # it died since: start another
            parent = None
        if parent is None:
            parent = self._start_parent(key, spec)
        try:
            await asyncio.wait_for(asyncio.shield(parent.ready), spec.startup_timeout)
        except (TimeoutError, RuntimeStartError, asyncio.CancelledError) as error:
            if isinstance(error, asyncio.CancelledError) and not parent.ready.cancelled():
                raise
            return None
        return parent if parent.usable else None

    def _start_parent(self, key: str, template: ReplicaSpec) -> _WarmParent:
        loop = asyncio.get_running_loop()
        parent = _WarmParent(key=key, spec=warm_parent_spec(template), ready=loop.create_future())
        parent.ready.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        self._parents[key] = parent
        self._tasks.start(f"warm-parent:{parent.spec.replica_id}", self._run_parent(parent))
        return parent

    async def _run_parent(self, parent: _WarmParent) -> None:
        """Boot one warm parent, then watch it until it exits (a supervised task)."""
        spec = parent.spec
        try:
            try:
                await self._boot(parent)
            except RuntimeStartError as error:
                parent.failed_at = time.monotonic()
                parent.error = str(error)
                logger.warning("%s; its replicas are spawned instead", error)
                if not parent.ready.done():
                    parent.ready.set_exception(error)
                if parent.watch is not None:  # stuck importing, say: it must not linger
                    signal_group(parent.watch.pid, signal.SIGKILL)
                    await asyncio.wait([parent.watch.exited], timeout=KILL_WAIT)
            else:
                assert parent.watch is not None
                exited = await parent.watch.exited
                if parent.control is not None:  # not retired: it died under us
                    logger.warning(
                        "warm parent %s (pid %d) exited (code %s); its replicas end with it and are "
                        "restarted from a new one", spec.replica_id, parent.watch.pid, exited.code,
                    )  # fmt: skip
            self._discard(parent)
            await self._remove_cgroup(parent)
        except asyncio.CancelledError:
            if parent.watch is not None:
                parent.watch.close()  # the launcher is closing: stop watching, leave it be
            raise

    @staticmethod
    async def _remove_cgroup(parent: _WarmParent) -> None:
        """Once the parent is gone (never before: removing kills what is inside)."""
        if parent.cgroup is None or parent.watch is None or not parent.watch.exited.done():
            return
        warning = await parent.cgroup.remove()
        if warning:
            logger.warning("warm parent %s: %s", parent.spec.replica_id, warning)
        parent.cgroup = None

    async def _boot(self, parent: _WarmParent) -> None:
        spec = parent.spec
        self._prepare_root(spec)
        try:
            parent.cgroup = create_cgroup(
                spec.replica_id, memory_mb=spec.memory_mb, cpu=spec.cpu, parent=self.cgroup_parent
            )
        except CgroupUnavailable as error:
            logger.info("warm parent %s: resource limits not applied: %s", spec.replica_id, error)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        since = log_position(spec.log_path)
        request = LaunchRequest(
            spec=spec,
            env=replica_environment(spec),
            listen_fd=None,
            cgroup_procs=parent.cgroup.procs_files if parent.cgroup is not None else (),
        )
        try:
            process = self.spawner.spawn(
                request, [spec.python, "-m", "clearway.runtime.warmparent"], fds={CONTROL_FD: theirs.fileno()}
            )
        except RuntimeStartError:
            ours.close()
            raise
        finally:
            theirs.close()
        parent.watch = ProcessWatch(process.pid)
        parent.control = ours
        try:
            message = await self._first_message(parent, spec.startup_timeout)
        except RuntimeStartError as error:
            tail = read_log_since(spec.log_path, since, lines=20)
            raise RuntimeStartError(f"{error}{'; last log lines:' + chr(10) + tail if tail else ''}") from None
        if message.get("ready") is not True:
            raise RuntimeStartError(f"warm parent {spec.replica_id}: {message.get('error', message)}")
        logger.info("warm parent %s ready (pid %d)", spec.replica_id, process.pid)
        parent.ready.set_result(None)
        self._refill_soon()

    async def _first_message(self, parent: _WarmParent, within: float) -> dict[str, object]:
        assert parent.control is not None and parent.watch is not None
        loop = asyncio.get_running_loop()
        receive = loop.create_task(loop.sock_recv(parent.control, MAX_MESSAGE))
        waiters: set[asyncio.Future[Any]] = {receive, parent.watch.exited}
        done, _ = await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await receive
            what = "exited" if parent.watch.exited.done() else f"was not ready within {within:g}s"
            raise RuntimeStartError(f"warm parent {parent.spec.replica_id} {what}")
        try:
            data = receive.result()
            message = json.loads(data) if data else {"error": "it closed its control socket"}
        except (OSError, ValueError) as error:
            message = {"error": f"unreadable answer: {error!r}"}
        return message if isinstance(message, dict) else {"error": repr(message)}

    @staticmethod
    def _prepare_root(spec: ReplicaSpec) -> None:
        """The directory holding the replicas' workdirs: the parent's view and cwd, the app's."""
        spec.workdir.mkdir(parents=True, exist_ok=True)
        if spec.uid is not None and os.geteuid() == 0:
            os.chown(spec.workdir, spec.uid, spec.gid if spec.gid is not None else spec.uid)
            spec.workdir.chmod(0o700)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)

    def _retire(self, parent: _WarmParent) -> None:
        if parent.control is not None:
            parent.control.close()  # the parent exits once its last child has
            parent.control = None
        if not parent.ready.done():
            parent.ready.cancel()

    def _discard(self, parent: _WarmParent) -> None:
        if parent.control is not None:
            parent.control.close()
            parent.control = None
        if self._parents.get(parent.key) is parent and parent.failed_at is None:
            del self._parents[parent.key]

    # -- forking ------------------------------------------------------------------------

    async def _fork(self, parent: _WarmParent, request: LaunchRequest) -> LaunchedProcess:
        spec = request.spec
        if request.listen_fd is None:
            raise RuntimeStartError(f"function replica {spec.replica_id} has no listening socket")
        loop = asyncio.get_running_loop()
        write_end = self._log_pipe(request)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        try:
            message = json.dumps({"spec": spec.to_json(), "env": dict(request.env)}).encode()
            fds = array.array("i", [request.listen_fd, write_end, theirs.fileno()])
            control = parent.control
            if control is None:
                raise _ParentGone("it was retired")
            try:
                control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
            except OSError as error:
                raise _ParentGone(f"it does not take requests ({error.strerror or error})") from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(write_end)  # the log writer sees end of file once the replica is gone
        try:
            pid = await self._hello(ours, spec, parent)
            start_time = read_start_time(pid)
            if start_time is None:
                raise RuntimeStartError(f"forked replica {spec.replica_id} (pid {pid}) vanished at once")
            for procs in request.cgroup_procs:
                try:
                    procs.write_text(str(pid))
                except OSError as error:
                    logger.warning("replica %s: could not join cgroup %s: %s", spec.replica_id, procs, error)
            await loop.sock_sendall(ours, b"go")
        except BaseException:
            ours.close()
            raise
        parent.children.add(pid)
        exit_code = self._tasks.start(f"exit-code:{spec.replica_id}", self._exit_code(ours, pid, parent))
        return LaunchedProcess(pid=pid, start_time=start_time, how="fork", exit_code=exit_code)

    # -- log writers --------------------------------------------------------------------

    def _log_pipe(self, request: LaunchRequest) -> int:
        """The write end of a pipe whose log writer writes ``request``'s log.

        The spare writer when there is one (starting a writer costs a few
        milliseconds an idle launcher can pay in advance), else a new one."""
        spare, self._spare = self._spare, None
        self._refill_soon()
        if spare is not None:
            try:
                os.write(spare, self.spawner.log_destination(request))
                return spare
            except OSError:  # the spare died: start one for this replica
                os.close(spare)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.spawner.start_log_writer(request, read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return write_end

    def _refill_soon(self) -> None:
        if self._refill is None and not self._closed:
            self._refill = asyncio.get_running_loop().call_later(SPARE_WRITER_DELAY, self._refill_spare)

    def _refill_spare(self) -> None:
        self._refill = None
        if self._spare is not None or self._closed:
            return
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self.spawner.spawn_log_writer(None, read_end)
        except RuntimeStartError as error:
            os.close(write_end)
            logger.warning("%s; the next replica starts its own", error)
            return
        finally:
            os.close(read_end)
        self.spawner.watch_log_writer(pid)
        self._spare = write_end

    async def _hello(self, ours: socket.socket, spec: ReplicaSpec, parent: _WarmParent) -> int:
        """The child's host pid, from the credentials on its first message."""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(ours.fileno(), wake)
        try:
            assert parent.watch is not None
            waiters: set[asyncio.Future[Any]] = {readable, parent.watch.exited}
            done, _ = await asyncio.wait(waiters, timeout=HELLO_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(ours.fileno())
        if readable not in done:
            if parent.watch.exited.done():
                raise _ParentGone("it exited")
            raise RuntimeStartError(f"forked replica {spec.replica_id} did not report within {HELLO_TIMEOUT:g}s")
        data, ancdata, _, _ = ours.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        if data != b"hello":
            try:
                answer = json.loads(data) if data else {"error": "the warm parent closed the channel"}
            except ValueError:
                answer = {"error": repr(data[:200])}
            raise RuntimeStartError(f"could not fork replica {spec.replica_id}: {answer.get('error', answer)}")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid, uid, _gid = _UCRED.unpack(payload[: _UCRED.size])
                expected = spec.uid if spec.uid is not None and os.geteuid() == 0 else os.geteuid()
                if uid != expected or not is_alive(pid):
                    raise RuntimeStartError(
                        f"forked replica {spec.replica_id} reported as uid {uid}, pid {pid}; expected uid {expected}"
                    )
                return int(pid)
        raise RuntimeStartError(f"forked replica {spec.replica_id} reported without credentials")

    async def _exit_code(self, ours: socket.socket, pid: int, parent: _WarmParent) -> int | None:
        """The code the warm parent reports when it reaps the child; None if it cannot."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(ours, 4096)
            answer = json.loads(data) if data else {}
            code = answer.get("exit") if isinstance(answer, dict) else None
            return code if isinstance(code, int) else None
        except (OSError, ValueError):
            return None
        finally:
            ours.close()
            parent.children.discard(pid)


class _ParentGone(Exception):
    """The warm parent cannot take the request: the launch spawns instead."""

