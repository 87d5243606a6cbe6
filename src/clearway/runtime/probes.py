"""Readiness and liveness probes of a service replica.

A probe is one ``GET`` on a fresh connection to the replica's unix socket
(services never listen on TCP: see `clearway.runtime.supervisor`), written by
hand on asyncio streams: a connection pool (an HTTP client's) would keep
connections to a process that has since been replaced, and we need nothing but
the status line.

Why not a plain TCP connect when the component declares no health path: the
listening socket is created by the supervisor before the replica starts, so the
kernel completes TCP handshakes even while the app is still importing, or hung.
Without a health path a probe therefore asks for ``/`` and accepts *any* HTTP
answer (even a 404 or a 500): it proves the server is up and serving, which is
what a TCP check was meant to prove.

How fast an unresponsive replica leaves rotation: the first failed liveness
probe makes it UNHEALTHY, which the backend does not route. A replica that
stops answering (hung, or SIGSTOPped) is therefore out of rotation within
``liveness_interval + timeout`` of hanging, plus the time the backend takes to
publish the route table to the gateway (milliseconds): about 2 s with the
defaults. It is restarted only after ``failure_threshold`` failures in a row,
so one slow answer costs a moment out of rotation, not a restart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProbePolicy", "ProbeResult", "probe_http", "probe_until_ready"]


@dataclass(frozen=True)
class ProbePolicy:
    readiness_interval: float = 0.05
    """Delay between readiness probes while a replica starts (kept small: it bounds start latency)."""
    liveness_interval: float = 1.0
    """Between liveness probes of a READY or UNHEALTHY replica."""
    timeout: float = 1.0
    """Per probe: connect, send, and read the status line."""
    failure_threshold: int = 3
    """Consecutive failed liveness probes that get a replica restarted (the first one
    already takes it out of rotation)."""
    worker_ready_after: float = 1.0
    """Workers have no probe: one counts as READY once it has run this long (a worker
    whose import fails thus never looks ready, like Kubernetes' ``minReadySeconds``)."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    """For failures: what went wrong, e.g. "GET /healthz answered 503"."""
    timed_out: bool = False
    """The probe got no answer within its time, as opposed to a wrong one."""


async def probe_http(socket_path: str | Path, path: str | None, *, within: float) -> ProbeResult:
    """One ``GET path`` over the unix socket at ``socket_path``."""
    target = path or "/"
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            try:
                writer.write(
                    f"GET {target} HTTP/1.1\r\nHost: localhost\r\n"
                    "User-Agent: clearway-probe\r\nConnection: close\r\n\r\n".encode("latin-1")
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return ProbeResult(False, f"GET {target} got no answer within {within:g}s", timed_out=True)
    except OSError as error:
        return ProbeResult(False, f"GET {target} failed: {error.strerror or error}")
    parts = status_line.split(maxsplit=2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        if not status_line:
            return ProbeResult(False, f"GET {target}: connection closed without an answer")
        return ProbeResult(False, f"GET {target}: not an HTTP answer: {status_line[:80]!r}")
    status = int(parts[1])
    if path is None or 200 <= status < 400:
        return ProbeResult(True, f"GET {target} answered {status}")
    return ProbeResult(False, f"GET {target} answered {status}")


async def probe_until_ready(
    socket_path: str | Path, path: str | None, *, startup_timeout: float, policy: ProbePolicy
) -> ProbeResult:
    """Probe every ``readiness_interval`` until the first success or ``startup_timeout``.

    The last probe is cut short by the deadline. When that one merely runs out of
    time, the failure reported is the one before it: "answered 503" says something
    about the app, "no answer within 0.01s" only says the deadline came.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    last_error: ProbeResult | None = None
    while True:
        within = max(0.01, min(policy.timeout, deadline - loop.time()))
        result = await probe_http(socket_path, path, within=within)
        if result.ok:
            return result
        cut_short = result.timed_out and within < policy.timeout
        if last_error is None or not cut_short:
            last_error = result
        remaining = deadline - loop.time()
        if remaining <= 0:
            return ProbeResult(
                False,
                f"never answered GET {path or '/'} within {startup_timeout:g}s; "
                f"last error: {last_error.detail}",
            )
        await asyncio.sleep(min(policy.readiness_interval, remaining))
