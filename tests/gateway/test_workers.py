"""The gateway as a master and worker processes (``--workers 2``), as real processes.

* the workers share one port; the master's admin socket adds up what each
  worker's own socket reports (requests, held requests, hold sequence,
  Prometheus text), and reports the route generation every worker serves;
* requests held for a revision with no replica are answered, in whichever
  worker holds them, by the reload that gives the revision a replica;
* a killed worker takes only its own requests with it: a request in flight in
  the other worker is answered, new connections are served, and a new worker
  takes its place;
* a killed master takes its workers with it (they drain and free the port).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import raw_exchange, route, table
from .replica import Replica
from .test_cli import free_port

pytestmark = pytest.mark.timeout(60)


class Gateway:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, admin: Path, routes: Path) -> None:
        self.proc = proc
        self.port = port
        self.admin = admin
        self.routes = routes

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def ask(self, path: str, socket_path: Path | None = None) -> Any:
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path or self.admin))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as admin:
            response = await admin.get(path)
        response.raise_for_status()
        return response.text if path == "/metrics" else response.json()

    def workers(self) -> list[int]:
        """The pids of the master's children."""
        text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(pid) for pid in text.split()]

    def publish(self, data: dict[str, Any]) -> None:
        tmp = self.routes.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(self.routes)
        self.proc.send_signal(signal.SIGHUP)


@asynccontextmanager
async def gateway(tmp_path: Path, routes: dict[str, Any], workers: int = 2) -> AsyncIterator[Gateway]:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(routes))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clearway.gateway", "--listen", f"127.0.0.1:{port}", "--routes", str(path),
        "--admin-socket", str(tmp_path / "gw.sock"), "--workers", str(workers), "--hold-timeout", "20",
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"READY\n"
        yield Gateway(proc, port, tmp_path / "gw.sock", path)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0


async def until(what: str, check: Callable[[], Awaitable[Any]], within: float = 20.0) -> Any:
    """The first truthy answer of ``check``, polled until ``within`` seconds pass."""
    async with asyncio.timeout(within):
        while not (found := await check()):
            await asyncio.sleep(0.02)
    assert found, what
    return found


def answered(stats: dict[str, Any], revision: str) -> int:
    return sum(sum(entry["by_class"]) for entry in stats["revisions"] if entry["revision"] == revision)


async def test_workers_share_the_port_and_the_master_adds_up_their_counters(replica: Replica, tmp_path: Path) -> None:
    async with gateway(tmp_path, table(route("app", [replica.address]), generation=1).to_json()) as gw:
        assert len(gw.workers()) == 2
        fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request
        async with httpx.AsyncClient(limits=fresh) as client:
            for _ in range(30):
                assert (await client.get(gw.url("/echo"), headers={"host": "app.localhost"})).status_code == 200
        own = [await gw.ask("/stats", gw.admin.with_name(f"gw.sock.{index}")) for index in range(2)]
        assert sum(answered(stats, "app-1") for stats in own) == 30
        assert answered(await gw.ask("/stats"), "app-1") == 30
        metrics = await gw.ask("/metrics")
        assert 'clearway_gateway_requests_total{app="app",code="2xx",component="",revision="app-1"} 30.0' in metrics
        assert "clearway_gateway_workers 2.0" in metrics
        load = await gw.ask("/load")
        assert [(entry["revision"], entry["requests"]) for entry in load] == [("app-1", 30)]

        # A new table is applied once every worker serves it.
        gw.publish(table(route("new", [replica.address]), generation=2).to_json())
        await until("generation 2", lambda: _generation_is(gw, 2))
        for index in range(2):
            assert (await gw.ask("/routes", gw.admin.with_name(f"gw.sock.{index}")))["generation"] == 2


async def _generation_is(gw: Gateway, generation: int) -> bool:
    return bool((await gw.ask("/routes"))["generation"] == generation)


async def test_held_requests_are_answered_in_every_worker_by_the_reload(replica: Replica, tmp_path: Path) -> None:
    cold = route("cold", [])
    async with gateway(tmp_path, table(cold, generation=1).to_json()) as gw:
        seq = (await gw.ask("/holds?after=-1"))["seq"]
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=fresh, timeout=30) as client:
            requests = [
                asyncio.ensure_future(client.get(gw.url("/echo"), headers={"host": "cold.localhost"})) for _ in range(6)
            ]
            held = await until("6 held requests", lambda: _held(gw, "cold-1", 6))
            assert held == 6
            # The master's /holds long-poll saw every one of them, whichever worker held it.
            assert (await gw.ask(f"/holds?after={seq}&wait=5"))["seq"] == seq + 6
            gw.publish(table(route("cold", [replica.address]), generation=2).to_json())
            responses = await asyncio.gather(*requests)
        assert [r.status_code for r in responses] == [200] * 6


async def _held(gw: Gateway, revision: str, count: int) -> int:
    held = int((await gw.ask("/held")).get(revision, 0))
    return held if held == count else 0


async def test_a_killed_worker_takes_only_its_own_requests_and_is_replaced(replica: Replica, tmp_path: Path) -> None:
    async with gateway(tmp_path, table(route("app", [replica.address]), generation=1).to_json()) as gw:
        before = gw.workers()
        async with httpx.AsyncClient(timeout=30) as slow_client, httpx.AsyncClient(
            limits=httpx.Limits(max_keepalive_connections=0)
        ) as client:
            slow = asyncio.ensure_future(slow_client.get(gw.url("/slow"), headers={"host": "app.localhost"}))
            # Which worker has the slow request: the one whose own /load says it is in flight.
            busy = await until("the slow request in flight", lambda: _busy_worker(gw)) - 1
            victim = before[1 - busy]
            os.kill(victim, signal.SIGKILL)
            for _ in range(20):  # new connections are served all along
                assert (await client.get(gw.url("/echo"), headers={"host": "app.localhost"})).status_code == 200
            replica.control.release.set()
            assert (await slow).status_code == 200  # the other worker's request was not touched
            after = await until("a new worker", lambda: _replaced(gw, victim))
            assert len(after) == 2 and before[busy] in after
            assert "clearway_gateway_worker_restarts_total 1.0" in await gw.ask("/metrics")
            await until("both workers ready", lambda: _workers_ready(gw, 2))
            assert (await client.get(gw.url("/echo"), headers={"host": "app.localhost"})).status_code == 200


async def _busy_worker(gw: Gateway) -> int | None:
    for index in range(2):
        try:
            load = await gw.ask("/load", gw.admin.with_name(f"gw.sock.{index}"))
        except httpx.HTTPError:
            continue
        if any(entry["in_flight"] for entry in load):
            return index + 1  # truthy; the caller subtracts
    return None


async def _replaced(gw: Gateway, victim: int) -> list[int] | None:
    pids = gw.workers()
    return pids if len(pids) == 2 and victim not in pids else None


async def _workers_ready(gw: Gateway, count: int) -> bool:
    return f"clearway_gateway_workers {count}.0" in await gw.ask("/metrics")


async def test_a_killed_master_takes_its_workers_and_frees_the_port(replica: Replica, tmp_path: Path) -> None:
    async with gateway(tmp_path, table(route("app", [replica.address]), generation=1).to_json()) as gw:
        workers = gw.workers()
        gw.proc.kill()
        await gw.proc.wait()
        await until("the workers to exit", lambda: _all_gone(workers))
        with socket.socket() as again:
            again.bind(("127.0.0.1", gw.port))


async def _all_gone(pids: list[int]) -> bool:
    return _exited(pids)


def _exited(pids: list[int]) -> bool:
    """Every pid is gone or a zombie (exited, not yet reaped by its new parent)."""
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            continue
        return False
    return True


REFUSED = [
    (b"GARBAGE\r\n\r\n", b"not valid HTTP/1.1"),
    (b"GET / HTTP/1.1\r\n\r\n", b"no Host header"),
    (  # request smuggling: a body framed two ways
        b"POST /echo HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"",
    ),
]


async def test_every_worker_refuses_what_the_gateway_refuses(replica: Replica, tmp_path: Path) -> None:
    async with gateway(tmp_path, table(route("app", [replica.address]), generation=1).to_json()) as gw:
        workers = gw.workers()
        for stopped, serving in ((workers[0], 1), (workers[1], 0)):
            # With one worker stopped, the other accepts every connection from the shared queue.
            os.kill(stopped, signal.SIGSTOP)
            try:
                before = answered(await gw.ask("/stats", gw.admin.with_name(f"gw.sock.{serving}")), "app-1")
                for request, reason in REFUSED:
                    answer = await raw_exchange(gw.port, request)
                    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
                    assert reason in answer
                assert replica.control.requests == []  # nothing reached the replica
                async with httpx.AsyncClient() as client:
                    ok = await client.get(gw.url("/echo"), headers={"host": "app.localhost"})
                assert ok.status_code == 200
                replica.control.requests.clear()
                after = answered(await gw.ask("/stats", gw.admin.with_name(f"gw.sock.{serving}")), "app-1")
                assert after == before + 1  # served by this worker, the running one
            finally:
                os.kill(stopped, signal.SIGCONT)
