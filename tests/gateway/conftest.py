"""Fixtures for the gateway tests: real replicas (uvicorn on Unix sockets), a real gateway, real clients."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clearway.gateway import Gateway, GatewaySettings, RouteTable

from .replica import Replica, run_replica, socket_dir


def table(*routes: dict[str, Any], domains: tuple[str, ...] = ("localhost",), generation: int = 1) -> RouteTable:
    """A RouteTable from route dicts in the routes-file format."""
    return RouteTable.from_json(
        {"version": 1, "generation": generation, "domains": list(domains), "routes": list(routes)}
    )


def route(app: str, endpoints: list[str], **extra: Any) -> dict[str, Any]:
    """A one-revision route for ``app`` at host ``app``."""
    data: dict[str, Any] = {
        "app": app,
        "host": app,
        "prefix": "/",
        "targets": [{"revision": f"{app}-1", "weight": 100, "endpoints": endpoints}],
    }
    data.update(extra)
    return data


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (pytest's tmp_path can exceed sun_path's 107 bytes)."""
    directory = socket_dir()
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def replica() -> AsyncIterator[Replica]:
    async with run_replica("r1") as r:
        yield r


@pytest.fixture
async def replica2() -> AsyncIterator[Replica]:
    async with run_replica("r2") as r:
        yield r


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start gateways (closed at teardown): ``await start_gateway(table, **settings)``."""
    gateways: list[Gateway] = []

    async def start(
        routes: RouteTable,
        *,
        admin: bool = False,
        access_log: bool = False,
        identity_key: Path | None = None,
        **settings: Any,
    ) -> Gateway:
        gw = Gateway(
            routes,
            port=0,
            admin_socket=tmp_path / f"gw{len(gateways)}.sock" if admin else None,
            access_log=tmp_path / f"access{len(gateways)}.log" if access_log else None,
            settings=GatewaySettings(**settings),
            rng=random.Random(1234),
            identity_key=identity_key,
        )
        await gw.start()
        gateways.append(gw)
        return gw

    yield start
    for gw in gateways:
        await gw.close(grace=2)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes to the gateway and return everything it answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await reader.read() if read_until_close else await reader.read(65536)
    finally:
        writer.close()
        await writer.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition()`` holds (bounded by the test timeout).

    This waits on a state change made by other tasks of the same loop; it is
    not a timed sleep.
    """
    while not condition():
        await asyncio.sleep(0)
