"""The local backend's view of its gateway process: traffic counters and load over the admin socket."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clearway.backends.base import ComponentLoad
from clearway.backends.local.gateway import GatewayProcess

from ..gateway.conftest import route, table
from ..gateway.replica import Replica, run_replica, socket_dir
from ..gateway.test_cli import free_port


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayProcess]:
    home = Path(socket_dir())  # the admin socket's path must fit in sun_path
    process = GatewayProcess(home, host="127.0.0.1", port=free_port())
    try:
        yield process
    finally:
        await process.stop()
        await process.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(30)
async def test_stats_are_the_gateways_counters_per_revision(gateway: GatewayProcess) -> None:
    assert await gateway.stats() == {}  # not running: no counters, no exception
    assert await gateway.load() == []

    replica: Replica
    async with run_replica("r1") as replica:
        routes = table(
            route("hello", [replica.address]),
            # The same revision on a second route (as /_services routes are), counted for
            # one of its components: per revision, its counts add up.
            route("hello", [replica.address], host="alias", component="resize"),
            route("nothing", [], host="nothing", targets=[]),  # no revision to send requests to
        )
        await gateway.start_or_adopt(routes.to_json())
        async with httpx.AsyncClient(timeout=10) as client:
            for host, path in [("hello", "/"), ("hello", "/status/500"), ("alias", "/status/404"), ("nothing", "/")]:
                await client.get(f"http://127.0.0.1:{gateway.port}{path}", headers={"host": f"{host}.localhost"})

        stats = await gateway.stats()
        load = await gateway.load()
    assert list(stats) == ["hello-1"]
    sample = stats["hello-1"]
    assert (sample.by_class, sample.total, sample.errors) == ((0, 1, 0, 1, 1), 3, 1)
    assert sum(sample.buckets) == 3 and len(sample.buckets) == len(sample.bounds) + 1
    assert sample.bounds[0] == 0.001 and sample.bounds[-1] == 60.0
    assert sorted(load, key=lambda entry: entry.component) == [
        ComponentLoad("hello", "hello-1", "", in_flight=0, held=0, requests=2),
        ComponentLoad("hello", "hello-1", "resize", in_flight=0, held=0, requests=1),
    ]


@pytest.mark.timeout(30)
async def test_wait_held_long_polls_the_gateways_holds(gateway: GatewayProcess) -> None:
    assert await gateway.wait_held(-1, 0.05) is None  # not running: no answer (after `within`)

    await gateway.start_or_adopt(table(route("cold", [])).to_json())
    assert await gateway.wait_held(-1, 10) == 0  # at once: where the count is
    waiting = asyncio.create_task(gateway.wait_held(0, 20))
    async with httpx.AsyncClient(timeout=20) as client:
        cold = asyncio.create_task(
            client.get(f"http://127.0.0.1:{gateway.port}/", headers={"host": "cold.localhost"})
        )
        try:
            assert await waiting == 1  # woken by the hold, well before its 20 s
            assert await gateway.wait_held(1, 0.05) == 1  # nothing new within the wait
        finally:
            cold.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cold


@pytest.mark.parametrize(
    "entry",
    [
        {"app": "a", "revision": "a-1", "component": "f", "in_flight": 0, "held": 0},
        {"app": "a", "revision": "a-1", "component": None, "in_flight": 0, "held": 0, "requests": 0},
        {"app": "a", "revision": "a-1", "component": "f", "in_flight": -1, "held": 0, "requests": 0},
        {"app": "a", "revision": "a-1", "component": "f", "in_flight": 0, "held": True, "requests": 0},
        ["a", "a-1"],
    ],
)
def test_a_load_entry_is_read_strictly(entry: Any) -> None:
    with pytest.raises(ValueError):
        ComponentLoad.from_json(entry)
