"""The gateway's own Python cost per proxied request, without sockets or a kernel.

Run:  python bench/gateway_micro.py [--requests 200000] [--profile]

``bench/gateway.py`` measures the whole system - kernel TCP, wrk, the backend -
where the proxy's Python work is one part of the cost and other processes on
the machine add noise.  This drives one :class:`ClientConnection` and one
pooled :class:`UpstreamConnection` with in-memory transports: request bytes
are fed to the client side, the response bytes to the upstream side, exactly
as uvloop would deliver them in one read each, and the writes are counted.
What is left is the interpreter's CPU time per request (process time, so
other busy processes on the machine matter less), stable to a few percent,
which makes it the number to watch while changing the hot path.

It prints whether the hot path ran compiled (``scripts/compile``) or as
Python; ``CLEARWAY_PURE_PYTHON=1`` forces the latter, for comparisons.

Two request shapes: ``wrk`` (request line and Host only) and ``browser``
(a dozen headers, as a real client sends).  The response is what nginx's
``return 200 "hello"`` sends.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import random
import time
from typing import Any

import uvloop

import clearway.gateway
from clearway.gateway import GatewaySettings, RouteTable
from clearway.gateway._metrics import Metrics
from clearway.gateway._proxy import ClientConnection, ProxyContext
from clearway.gateway._router import EndpointRegistry, Router
from clearway.gateway._upstream import UpstreamConnection
from clearway.tasks import TaskSupervisor

REQUESTS = {
    "wrk": b"GET / HTTP/1.1\r\nHost: bench.localhost\r\n\r\n",
    "browser": (
        b"GET /static/app.js?v=3 HTTP/1.1\r\n"
        b"Host: bench.localhost\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\n"
        b"Referer: http://bench.localhost/\r\n"
        b"Connection: keep-alive\r\n"
        b"Cookie: session=0123456789abcdef; theme=dark\r\n"
        b"Sec-Fetch-Dest: script\r\n"
        b"Sec-Fetch-Mode: no-cors\r\n"
        b"Sec-Fetch-Site: same-origin\r\n"
        b"\r\n"
    ),
}
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 22 Nov 2025 00:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
)


class CountingTransport:
    """Enough of a uvloop transport for the proxy: counts writes and their bytes."""

    def __init__(self) -> None:
        self.writes = 0
        self.written = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.written += len(data)
        self.last = data

    def writelines(self, data: list[bytes]) -> None:
        self.writes += 1
        self.last = b"".join(data)
        self.written += len(self.last)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def run(shape: str, count: int, profile: bool) -> float:
    loop = uvloop.new_event_loop()  # the gateway runs on uvloop (its loop.time() is C)
    settings = GatewaySettings()
    endpoints = EndpointRegistry(settings, loop)
    routes = RouteTable.from_json(
        {
            "version": 1, "generation": 1, "domains": ["localhost"],
            "routes": [{"app": "bench", "host": "bench", "prefix": "/",
                        "targets": [{"revision": "bench-1", "weight": 100, "endpoints": ["127.0.0.1:1"]}]}],
        }
    )
    metrics = Metrics()
    ctx = ProxyContext(
        loop=loop, settings=settings, router=Router(routes, endpoints, metrics, random.Random(1)),
        metrics=metrics, supervisor=TaskSupervisor(logging.getLogger("bench")), access_log=None,
    )
    endpoint = endpoints.get("127.0.0.1:1")
    upstream = UpstreamConnection(endpoint)
    upstream_transport = CountingTransport()
    upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
    endpoint.release(upstream)
    client = ClientConnection(ctx)
    client_transport = CountingTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    request = REQUESTS[shape]

    def loop_body(n: int) -> None:
        feed_request, feed_response = client.data_received, upstream.data_received
        for _ in range(n):
            feed_request(request)
            feed_response(RESPONSE)

    loop_body(1000)  # warm up
    profiler = cProfile.Profile() if profile else None
    start = time.process_time()
    if profiler is not None:
        profiler.runcall(loop_body, count)
    else:
        loop_body(count)
    elapsed = time.process_time() - start
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    assert client_transport.last.endswith(b"hello"), client_transport.last
    total = count + 1000
    print(
        f"  {shape:8s} {elapsed / count * 1e6:6.2f} us/request   writes/request: "
        f"client {client_transport.writes / total:.2f}, upstream {upstream_transport.writes / total:.2f}"
    )
    loop.close()
    return elapsed / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the run (slower)")
    args = parser.parse_args()
    hot_path = "compiled" if clearway.gateway.compiled else "pure Python"
    print(f"gateway Python cost per proxied request (hot path {hot_path}; in-memory transports, one read per message):")
    for shape in REQUESTS:
        run(shape, args.requests, args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
