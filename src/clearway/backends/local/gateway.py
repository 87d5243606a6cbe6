"""The gateway as a child process of the control plane — but not a dependent one.

The gateway runs in its own session with its output in a log file (not a pipe),
so a crash of the control plane never interrupts traffic. Its pid and start
time are recorded in ``gateway.json``; a restarted control plane adopts the
running gateway when the pid still names the same process (start time matches)
and it listens where it should, and starts a new one otherwise.

Routes reach it as a file written atomically (write, rename) followed by
SIGHUP; not fsynced, because the write is on the path of every cold start (an
fsync costs milliseconds) and the rename alone is atomic for every process
that reads it: the page cache outlives any process crash, and after a crash of
the machine itself nothing it describes is running any more — the control
plane publishes a new table on start. the gateway reports the generation it has loaded on its admin socket,
which is how the backend knows when it is safe to stop a drained replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from clearway.backends.base import ComponentLoad, TrafficSample
from clearway.exceptions import RuntimeStartError
from clearway.runtime.process import ProcessWatch, is_alive, read_start_time

#: How long a fresh gateway may take to answer on its admin socket.
START_TIMEOUT = 20.0
#: How much longer than the asked wait a ``GET /holds`` may take to be answered.
HOLDS_MARGIN = 2.0

log = logging.getLogger("clearway.backends.local")


class GatewayProcess:
    def __init__(
        self,
        home: Path,
        *,
        host: str,
        port: int,
        identity_key: Path | None = None,
        python: str = sys.executable,
        workers: int | None = None,
    ) -> None:
        self.home = home
        self.host = host
        self.port = port
        #: The public key that verifies replica and pin tokens (None: internal routes refuse all).
        self.identity_key = identity_key
        self.python = python
        #: Worker processes asked for (None: the gateway's default, one per core, or
        #: whatever the running gateway that is adopted has).
        self.workers = workers
        self.routes_path = home / "routes.json"
        self.admin_socket = home / "gateway.sock"
        self.log_path = home / "logs" / "gateway.log"
        self.access_log = home / "logs" / "access.log"
        self.record_path = home / "gateway.json"
        self.pid: int | None = None
        self._start_time: int | None = None
        self._exit: ProcessWatch | None = None
        #: Called when the gateway process ends (the backend restarts it).
        self.on_exit: Callable[[], None] = lambda: None
        #: ``wait_held`` failed last time (it warns once per outage, not per call).
        self._holds_failing = False
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(self.admin_socket)),
            base_url="http://gateway",
            timeout=5.0,
        )

    async def start_or_adopt(self, initial_routes: dict[str, Any]) -> None:
        if self._adopt():
            self.reload()
            return
        try:
            json.loads(self.routes_path.read_text())
        except (OSError, ValueError):  # none yet, or torn by a crash of the machine
            self.write_routes(initial_routes)
        await self._start()

    def _adopt(self) -> bool:
        try:
            record = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return False
        pid, start = record.get("pid"), record.get("start_time")
        if not isinstance(pid, int) or not is_alive(pid, start):
            return False
        wanted = (self.host, self.port, str(self.identity_key) if self.identity_key else None)
        recorded = (record.get("host"), record.get("port"), record.get("identity_key"))
        other_workers = self.workers is not None and record.get("workers") != self.workers
        if recorded != wanted or other_workers:
            # Restarted on another port, with other keys or asked for another number of
            # workers: replace the gateway. (Not asking for a number keeps the running one.)
            os.kill(pid, signal.SIGTERM)
            return False
        self.workers = record.get("workers") if self.workers is None else self.workers
        self._watch(pid)
        return True

    async def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.admin_socket.unlink(missing_ok=True)
        argv = [
            self.python,
            "-m",
            "clearway.gateway",
            "--listen",
            f"{self.host}:{self.port}",
            "--routes",
            str(self.routes_path),
            "--admin-socket",
            str(self.admin_socket),
            "--access-log",
            str(self.access_log),
        ]
        if self.identity_key is not None:
            argv += ["--identity-key", str(self.identity_key)]
        if self.workers is not None:
            argv += ["--workers", str(self.workers)]
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            # posix_spawn rather than Popen: the gateway is meant to outlive us,
            # and a Popen object would complain when dropped with it running.
            pid = os.posix_spawn(  # noqa: ASYNC221 - returns as soon as the child exists
                self.python,
                argv,
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(log_fd)
        watch = ProcessWatch(pid)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if watch.exited.done():
                raise RuntimeStartError(self._failure_text(watch.exited.result().code))
            if await self._healthy():
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise RuntimeStartError(
                    f"the gateway did not come up within {START_TIMEOUT:.0f}s; see {self.log_path}"
                )
            await asyncio.sleep(0.05)
        self._watch(pid, watch)
        tmp = self.record_path.with_suffix(".tmp")
        record = {
            "pid": pid,
            "start_time": self._start_time,
            "host": self.host,
            "port": self.port,
            "identity_key": str(self.identity_key) if self.identity_key else None,
            "workers": self.workers,
        }
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.record_path)

    def _watch(self, pid: int, watch: ProcessWatch | None = None) -> None:
        """Follow the gateway's exit (our child or adopted) so a crash is noticed at once."""
        self.pid = pid
        self._start_time = read_start_time(pid)
        self._exit = watch or ProcessWatch(pid)
        self._exit.exited.add_done_callback(lambda _: self.on_exit())

    @property
    def running(self) -> bool:
        return self._exit is not None and not self._exit.exited.done()

    def _failure_text(self, code: int | None) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = next((line for line in reversed(lines) if line.strip()), "")
        if code == 3 and last:
            return last
        return f"the gateway exited with code {code}: {last or 'see ' + str(self.log_path)}"

    async def _healthy(self) -> bool:
        if not self.admin_socket.exists():
            return False
        try:
            response = await self._client.get("/healthz")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def write_routes(self, table: dict[str, Any]) -> None:
        tmp = self.routes_path.with_suffix(".tmp")
        with tmp.open("w") as handle:
            json.dump(table, handle)
        os.replace(tmp, self.routes_path)

    def reload(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGHUP)

    async def generation(self) -> int | None:
        try:
            response = await self._client.get("/routes")
            return int(response.json()["generation"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def metrics(self) -> str:
        try:
            response = await self._client.get("/metrics")
        except httpx.HTTPError as exc:
            return f"# the gateway did not answer: {exc}\n"
        return response.text

    async def stats(self) -> dict[str, TrafficSample]:
        """The gateway's request counters per revision (``GET /stats``); {} if it does not answer.

        A revision's routes (public, ``/_services``, ``/_apps``) are summed:
        the canary analysis judges the revision, whichever way it was called.
        """
        try:
            response = await self._client.get("/stats")
            response.raise_for_status()
            data = response.json()
            bounds = tuple(float(b) for b in data["bounds"])
            samples: dict[str, TrafficSample] = {}
            for entry in data["revisions"]:
                revision = entry["revision"]
                if not isinstance(revision, str) or not revision:
                    continue  # requests for an app with no revision to send them to
                sample = TrafficSample.from_json({**entry, "bounds": bounds})
                earlier = samples.get(revision)
                samples[revision] = sample if earlier is None else _sum(earlier, sample)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read the gateway's traffic statistics: %s", exc)
            return {}
        return samples

    async def load(self) -> list[ComponentLoad]:
        """Requests in flight, held and answered per (app, revision, component) (``GET /load``).

        [] if the gateway does not answer (logged): the autoscaler then sees
        no load, and it must treat "no reading" as unknown, not as idle.
        Entries for requests that found no revision to go to are left out.
        """
        try:
            response = await self._client.get("/load")
            response.raise_for_status()
            data = response.json()
            if not isinstance(data, list):
                raise ValueError(f"expected a list, got {type(data).__name__}")
            loads = [ComponentLoad.from_json(entry) for entry in data]
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot read the gateway's load: %s", exc)
            return []
        return [load for load in loads if load.revision]

    async def wait_held(self, after: int, within: float) -> int | None:
        """The gateway's hold sequence number once it differs from ``after``, or after ``within`` s.

        A long-poll of ``GET /holds``: the gateway answers as soon as a request
        is held (it found no ready replica), which is how a cold start reaches
        the autoscaler in milliseconds.  None when the gateway does not answer;
        then the rest of ``within`` is waited out first, so a caller looping
        on this never spins while the gateway is down.  The first failure of
        an outage is a warning, later ones are debug messages.
        """
        deadline = time.monotonic() + within
        try:
            response = await self._client.get(
                "/holds", params={"after": after, "wait": within}, timeout=within + HOLDS_MARGIN
            )
            response.raise_for_status()
            seq = response.json()["seq"]
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise ValueError(f"expected an integer seq, got {seq!r}")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            if self._holds_failing:
                log.debug("cannot wait for held requests at the gateway: %s", exc)
            else:
                self._holds_failing = True
                log.warning("cannot wait for held requests at the gateway: %s", exc)
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            return None
        self._holds_failing = False
        return seq

    async def stop(self) -> None:
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        exit_watch = self._exit
        self.on_exit = lambda: None
        if exit_watch is not None:
            try:
                await asyncio.wait_for(asyncio.shield(exit_watch.exited), 15)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                await exit_watch.exited
        self.record_path.unlink(missing_ok=True)
        self.pid = None

    async def close(self) -> None:
        self.on_exit = lambda: None
        if self._exit is not None:
            self._exit.close()
        await self._client.aclose()


def _sum(a: TrafficSample, b: TrafficSample) -> TrafficSample:
    c1, c2, c3, c4, c5 = (x + y for x, y in zip(a.by_class, b.by_class, strict=True))
    buckets = tuple(x + y for x, y in zip(a.buckets, b.buckets, strict=True))
    return TrafficSample((c1, c2, c3, c4, c5), buckets, a.bounds)
