"""The admin socket: a tiny HTTP/1.0 server on a Unix socket for the control plane.

It is a separate listener, on a Unix socket, so that it is reachable only by
local processes with file permissions to the socket - never by the traffic the
gateway proxies - and so that scraping metrics never queues behind user
requests.  Asyncio Streams are fine here: this is not the hot path.

    GET /healthz   200 "ok"
    GET /routes    {"generation": N}   (the control plane polls it after a reload)
    GET /held      {"<revision>": <held requests>}   (what scale-from-zero will act on)
    GET /load      [{"app", "revision", "component", "in_flight", "held",
                     "requests" (answered so far, cumulative),
                     "cold_count", "cold_hold_sum" (held requests released to a
                     replica, and their seconds held; cumulative)}]   (the autoscaler)
    GET /holds?after=N&wait=S   {"seq": M}   (long-poll: the autoscaler's cold-start trigger)
    GET /metrics   Prometheus text format
    GET /stats     {"bounds": [s...], "revisions": [{"app", "revision", "component",
                    "by_class": [1xx..5xx], "buckets": [non-cumulative, last +Inf]}]}

``/stats`` is for the control plane's canary analysis: it needs the raw
counters of each revision, which it subtracts between two readings, and
parsing them back out of the Prometheus text would tie it to label names and
cumulative ``le`` buckets.  The counters only grow for the gateway's life, so
a reading that went down means the gateway restarted.  A revision with
several counted components has one entry per component; ``/held`` sums them.

``/load`` is what the autoscaler polls, often: per (app, revision, component)
the requests in flight now (held ones included), held now, and answered so
far (the autoscaler subtracts readings to see whether a function was idle).
It is a few integers per entry, with no buckets, so it stays cheap.

``/holds`` is how a cold start reaches the control plane in milliseconds
rather than at its next ``/load`` poll.  ``M`` counts the requests that began
to be held (found no ready replica) since the gateway started.  The answer
comes at once when ``M != N`` (``after`` missing or invalid counts as -1:
at once), else as soon as a request is held, else after ``S`` seconds with
``M`` unchanged (``wait`` missing or invalid: 0; clamped to [0, 30]).  A
reader whose ``N`` is ahead of ``M`` is talking to a restarted gateway and
is answered at once, to resynchronise.  Each connection has its own handler
task, so a waiting ``/holds`` blocks no other admin request; closing the
server answers the waiting ones at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["AdminServer", "AdminSource"]

_MAX_HEAD = 16 * 1024
#: The longest a ``GET /holds`` waits (seconds), whatever it asks.
_MAX_HOLDS_WAIT = 30.0


class AdminSource(Protocol):
    """What the admin endpoints report: one gateway's own state, or its workers' summed (``_workers.py``)."""

    async def generation(self) -> int: ...
    async def held(self) -> dict[str, int]: ...
    async def load(self) -> list[dict[str, Any]]: ...
    async def metrics(self) -> bytes: ...
    async def stats(self) -> dict[str, Any]: ...
    async def holds(self, after: int, within: float) -> int: ...


class AdminServer:
    """Serves the admin endpoints of one gateway on a Unix socket."""

    def __init__(self, path: str | Path, source: AdminSource) -> None:
        self.path = Path(path)
        self._source = source
        self._server: asyncio.AbstractServer | None = None
        #: ``/holds`` waits in progress; cancelled (and so answered) by ``close()``.
        self._polls: set[asyncio.Future[int]] = set()
        #: Connections being answered; ``close()`` lets them finish before the loop ends.
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a previous run
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def close(self) -> None:
        """Stop accepting, answer the waiting ``/holds`` at once, let every answer finish (2 s at most)."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connection from here on
        for poll in self._polls:
            poll.cancel()
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=2.0)
        for handler in set(self._handlers):
            handler.cancel()  # stuck (a client that never sent its request): not worth waiting for
        if server is not None:
            await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > _MAX_HEAD:
                return
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
            status, ctype, body = await self._respond(method, target)
            writer.write(
                b"HTTP/1.0 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, b"OK" if status == 200 else b"Error", ctype.encode(), len(body))
                + (b"" if method == b"HEAD" else body)
            )
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _respond(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        path, _, query = target.partition(b"?")
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"The admin socket only answers GET.\n"
        if path == b"/healthz":
            return 200, "text/plain", b"ok\n"
        if path == b"/routes":
            return 200, "application/json", json.dumps({"generation": await self._source.generation()}).encode()
        if path == b"/held":
            return 200, "application/json", json.dumps(await self._source.held()).encode()
        if path == b"/load":
            return 200, "application/json", json.dumps(await self._source.load()).encode()
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, await self._source.metrics()
        if path == b"/stats":
            return 200, "application/json", json.dumps(await self._source.stats()).encode()
        if path == b"/holds":
            return 200, "application/json", json.dumps({"seq": await self._wait_holds(query)}).encode()
        return (
            404,
            "text/plain",
            b"Unknown admin path; try /healthz, /routes, /held, /load, /holds, /metrics or /stats.\n",
        )

    async def _wait_holds(self, query: bytes) -> int:
        """The hold sequence number, per ``/holds`` (see the module docstring)."""
        after, wait = _holds_query(query)
        poll = asyncio.ensure_future(self._source.holds(after, 0.0 if self._closing else wait))
        self._polls.add(poll)
        try:
            return await poll
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this handler itself is being cancelled
            return await self._source.holds(-1, 0.0)  # close() cut the wait: answer with the count now
        finally:
            self._polls.discard(poll)


def _holds_query(query: bytes) -> tuple[int, float]:
    """``after`` and ``wait`` of a ``/holds`` query; -1 and 0 when missing or not numbers."""
    fields = parse_qs(query.decode("latin-1"))
    try:
        after = int(fields.get("after", ["-1"])[-1])
    except ValueError:
        after = -1
    try:
        wait = float(fields.get("wait", ["0"])[-1])
    except ValueError:
        wait = 0.0
    if math.isnan(wait):
        wait = 0.0
    return after, min(max(wait, 0.0), _MAX_HOLDS_WAIT)
