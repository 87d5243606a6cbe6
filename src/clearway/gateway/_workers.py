"""A gateway of N worker processes: one listening socket, one route table, one admin socket.

One Python process proxies on one core.  To use every core the gateway runs
as a *master* and N *workers* (``--workers``, default: the cores this process
may run on).  The master binds the listening socket and never accepts on it;
every worker is ``python -m clearway.gateway`` in worker mode, serving the
inherited socket with its own event loop, router, pools and counters.

Why one shared socket rather than one ``SO_REUSEPORT`` socket per worker:

* the accept queue belongs to the socket, not to a worker, so when a worker
  dies the connections waiting in the queue are taken by the others: only
  the dead worker's own connections fail.  (With ``SO_REUSEPORT`` each worker
  has its own queue, and the kernel resets what is queued in a dead one.)
* a busy worker accepts less and an idle one more, where ``SO_REUSEPORT``
  hashes a connection to a worker whether or not it is busy;
* no reuse-port group exists that another process of the same user could
  join, and the port stays bound while workers come and go.

Route tables: the control plane writes ``routes.json`` and sends SIGHUP to
the master, which forwards it to every worker; each reloads the file.  A
worker is spawned with SIGHUP *blocked*, installs its handler, unblocks it and
only then reads the file, so a table written while it starts is never missed
(a pending SIGHUP is delivered on unblocking) and an early SIGHUP never kills
it.  ``GET /routes`` answers the *lowest* generation among the ready workers:
the control plane treats a table as applied (and stops the replicas it
drained) only when every worker serves it.

The admin socket is the master's.  ``/held``, ``/load``, ``/stats`` and
``/metrics`` ask every ready worker's own admin socket (``<admin>.<index>``,
beside it, so only the platform's user can reach them) and add the answers
up (``_merge.py``).  ``/holds`` is the master's own `HoldSequence`, advanced
by one long-poll per worker, so a cold start in any worker reaches the
control plane as fast as in a single process.

What changes with N workers, and what does not:

* every request is still checked, routed and counted by one worker, with the
  same refusals (malformed requests, smuggling, identity checks) in each;
* held requests are held by the worker that received them and released by
  its own reload: every worker reloads, so every held request is released;
* least-outstanding balancing is per worker: each sees its own requests in
  flight, not the others'.  With N workers a replica can get up to N
  requests before a less busy one gets its first; the spread is still fair
  on average (random choice between the least busy);
* key affinity and pins are decided from the table alone: unchanged;
* a killed worker loses its own in-flight requests only.  The master starts
  a new one at once (then after 0.5 s, 1 s, ... up to 10 s if it keeps
  dying young), and counts restarts in ``clearway_gateway_worker_restarts``.

Workers die with the master: each asks the kernel for SIGTERM when its parent
exits (``PR_SET_PDEATHSIG``), so a killed master leaves no orphan holding the
port; they stop accepting at once (the port is free for the next master) and
finish their in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from clearway.tasks import TaskSupervisor

from ._holding import HoldSequence
from ._merge import merge_held, merge_load, merge_metrics, merge_stats

__all__ = ["WorkerExited", "WorkerPool", "default_workers", "worker_argv"]

logger = logging.getLogger("clearway.gateway")

#: How long a worker may take to print READY.
WORKER_START_TIMEOUT = 30.0
#: How long the master waits for a worker's admin answer.
ASK_TIMEOUT = 3.0
#: Restart back-off of a worker that died young: first, longest, and how long counts as young.
RESTART_FIRST = 0.5
RESTART_MAX = 10.0
RESTART_YOUNG = 30.0
#: The longest ``/holds`` wait the master asks of a worker.
HOLDS_POLL = 25.0


def default_workers() -> int:
    """The number of cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)))


class WorkerExited(Exception):
    """A worker exited before it was ready; ``code`` is its exit code."""

    def __init__(self, index: int, code: int) -> None:
        super().__init__(f"gateway worker {index} exited with code {code} before it was ready")
        self.index = index
        self.code = code


class _Worker:
    """One worker process (one incarnation of worker ``index``)."""

    def __init__(self, index: int, pid: int, admin: Path, ready_fd: int) -> None:
        self.index = index
        self.pid = pid
        self.admin = admin
        self.started = time.monotonic()
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._ready_fd = ready_fd
        self._pidfd = os.pidfd_open(pid)
        self._seen = b""
        loop = asyncio.get_running_loop()
        loop.add_reader(ready_fd, self._on_output)
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_output(self) -> None:
        try:
            chunk = os.read(self._ready_fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            asyncio.get_running_loop().remove_reader(self._ready_fd)
            return
        self._seen = (self._seen + chunk)[-64:]
        if b"READY\n" in self._seen and not self.ready.done():
            self.ready.set_result(None)

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        with contextlib.suppress(OSError):
            loop.remove_reader(self._ready_fd)
        os.close(self._pidfd)
        os.close(self._ready_fd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = -1
        if not self.ready.done():
            self.ready.set_exception(WorkerExited(self.index, code))
            self.ready.exception()  # retrieved: whoever waits on it is told, no one else warns
        self.exited.set_result(code)

    def signal(self, signum: int) -> None:
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class WorkerPool:
    """The master's side: spawns, watches and replaces the workers; answers the admin socket for all.

    ``argv(index)`` is the command line of worker ``index`` (``python -m
    clearway.gateway --worker-of ...``); the listening socket is passed as
    the fd it has here, made inheritable.
    """

    def __init__(
        self,
        count: int,
        listener: socket.socket,
        *,
        argv: Callable[[int], Sequence[str]],
        admin: Callable[[int], Path],
    ) -> None:
        if count < 1:
            raise ValueError(f"a gateway needs at least 1 worker, not {count}")
        self.count = count
        self._listener = listener
        self._argv = argv
        self._admin = admin
        self._workers: dict[int, _Worker] = {}
        self._supervisor = TaskSupervisor(logger)
        self._closing = False
        #: Requests that began to be held in any worker (each worker's sequence, added up).
        self.hold_sequence = HoldSequence()
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until all are ready; `WorkerExited` if one dies first."""
        os.set_inheritable(self._listener.fileno(), True)
        workers = [self._spawn(index) for index in range(self.count)]
        try:
            async with asyncio.timeout(WORKER_START_TIMEOUT):
                await asyncio.gather(*(worker.ready for worker in workers))
        except BaseException:
            await self.close(grace=0)
            raise
        for worker in workers:
            self._follow(worker)

    def _spawn(self, index: int) -> _Worker:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        argv = list(self._argv(index))
        try:
            pid = os.posix_spawn(
                argv[0],
                argv,
                dict(os.environ),
                file_actions=[(os.POSIX_SPAWN_DUP2, write_fd, 1)],
                setsigmask={signal.SIGHUP},
            )
        finally:
            os.close(write_fd)
        worker = self._workers[index] = _Worker(index, pid, self._admin(index), read_fd)
        return worker

    def _follow(self, worker: _Worker) -> None:
        self._supervisor.start(f"gateway worker {worker.index} holds", self._follow_holds(worker))
        self._supervisor.start(f"gateway worker {worker.index} exit", self._replace_when_dead(worker))

    async def _replace_when_dead(self, worker: _Worker) -> None:
        code = await worker.exited
        if self._closing:
            return
        self.restarts += 1
        lived = time.monotonic() - worker.started
        logger.error("gateway worker %d (pid %d) exited with code %d; starting another", worker.index, worker.pid, code)
        delay = 0.0 if lived >= RESTART_YOUNG else RESTART_FIRST
        while not self._closing:
            if delay:
                await asyncio.sleep(delay)
            if self._closing:
                return
            replacement = self._spawn(worker.index)
            try:
                async with asyncio.timeout(WORKER_START_TIMEOUT):
                    await replacement.ready
            except (WorkerExited, TimeoutError) as exc:
                logger.error("gateway worker %d did not start: %s", worker.index, exc)
                replacement.signal(signal.SIGKILL)
                await replacement.exited
                delay = min(max(delay * 2, RESTART_FIRST), RESTART_MAX)
                continue
            self._follow(replacement)
            return

    async def _follow_holds(self, worker: _Worker) -> None:
        """Advance the master's hold sequence by what this worker holds, as it holds it."""
        seen = 0
        while not worker.exited.done():
            try:
                answer = await self._ask(worker, f"/holds?after={seen}&wait={HOLDS_POLL}", within=HOLDS_POLL + ASK_TIMEOUT)
            except (OSError, ValueError, TimeoutError):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESTART_FIRST):
                        await asyncio.shield(worker.exited)
                continue
            seq = int(answer["seq"])
            if seq > seen:
                self.hold_sequence.bump(seq - seen)
            seen = seq

    def reload(self) -> None:
        """Have every worker re-read the routes file (and the identity key)."""
        for worker in self._workers.values():
            worker.signal(signal.SIGHUP)

    async def close(self, grace: float) -> None:
        """SIGTERM every worker (each drains for up to its own grace), then wait; SIGKILL after ``grace`` + 5 s."""
        self._closing = True
        for worker in self._workers.values():
            worker.signal(signal.SIGTERM)
        pending = [worker.exited for worker in self._workers.values() if not worker.exited.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace + 5.0)
            for worker in self._workers.values():
                if not worker.exited.done():
                    worker.signal(signal.SIGKILL)
            if late:
                await asyncio.wait(late, timeout=5.0)
        await self._supervisor.close()

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers.values() if not worker.exited.done()]

    # -- the admin socket, for all ------------------------------------------------

    def _ready(self) -> list[_Worker]:
        return [
            worker
            for worker in self._workers.values()
            if worker.ready.done() and not worker.ready.exception() and not worker.exited.done()
        ]

    async def _ask(self, worker: _Worker, target: str, *, within: float = ASK_TIMEOUT) -> Any:
        """The JSON (or, for ``/metrics``, the bytes) a worker's admin socket answers."""
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(worker.admin))
            try:
                writer.write(f"GET {target} HTTP/1.0\r\n\r\n".encode())
                response = await reader.read()
            finally:
                writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.0 200 "):
            raise ValueError(f"gateway worker {worker.index} answered {head[:40]!r} to {target}")
        return body if target == "/metrics" else json.loads(body)

    async def _ask_all(self, target: str) -> list[Any]:
        answers = await asyncio.gather(*(self._ask(worker, target) for worker in self._ready()), return_exceptions=True)
        return [answer for answer in answers if not isinstance(answer, BaseException)]

    async def generation(self) -> int:
        """The lowest generation a ready worker serves; -1 when one of them does not say."""
        workers = self._ready()
        answers = await asyncio.gather(*(self._ask(worker, "/routes") for worker in workers), return_exceptions=True)
        generations = [int(answer["generation"]) for answer in answers if not isinstance(answer, BaseException)]
        if not generations or len(generations) < len(answers):
            return -1  # a worker that cannot answer may still serve an old table
        return min(generations)

    async def held(self) -> dict[str, int]:
        return merge_held(await self._ask_all("/held"))

    async def load(self) -> list[dict[str, Any]]:
        return merge_load(await self._ask_all("/load"))

    async def stats(self) -> dict[str, Any]:
        return merge_stats(await self._ask_all("/stats"))

    async def metrics(self) -> bytes:
        workers = GaugeMetricFamily("clearway_gateway_workers", "Gateway worker processes serving now.")
        workers.add_metric([], len(self._ready()))
        restarts = CounterMetricFamily(
            "clearway_gateway_worker_restarts", "Gateway worker processes that died and were replaced."
        )
        restarts.add_metric([], self.restarts)
        return merge_metrics(await self._ask_all("/metrics"), extra=[workers, restarts])

    async def holds(self, after: int, within: float) -> int:
        return await self.hold_sequence.wait(after, within)


def worker_argv(options: Sequence[str], *, master: int, listen_fd: int, admin: Path) -> list[str]:
    """A worker's command line: the master's ``options``, its own admin socket, the inherited listener."""
    return [
        sys.executable, "-m", "clearway.gateway", *options,
        "--admin-socket", str(admin), "--worker-of", str(master), "--listen-fd", str(listen_fd),
    ]  # fmt: skip
