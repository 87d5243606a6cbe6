"""The admin socket (metrics, routes generation, held requests, load) and the access log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from clearway.gateway import Gateway

from .conftest import GatewayFactory, route, table, until
from .replica import Replica


async def admin_get(gw: Gateway, path: str, sock: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock)) as admin:
        return await admin.get(f"http://gateway{path}")


async def test_admin_endpoints_and_metrics(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address]), generation=7), admin=True, access_log=True)
    sock = str(tmp_path / "gw0.sock")
    for _ in range(3):
        await client.get(f"{gw.url}/echo", headers={"host": "hello.localhost"})
    await client.get(f"{gw.url}/", headers={"host": "nope.localhost"})

    assert (await admin_get(gw, "/healthz", sock)).text == "ok\n"
    assert (await admin_get(gw, "/routes", sock)).json() == {"generation": 7}
    assert (await admin_get(gw, "/held", sock)).json() == {}
    metrics = (await admin_get(gw, "/metrics", sock)).text
    assert 'clearway_gateway_requests_total{app="hello",code="2xx",component="",revision="hello-1"} 3.0' in metrics
    assert 'clearway_gateway_requests_total{app="",code="4xx",component="",revision=""} 1.0' in metrics
    assert 'clearway_gateway_request_duration_seconds_count{app="hello",component="",revision="hello-1"} 3.0' in metrics
    assert 'clearway_gateway_request_duration_seconds_bucket{app="hello",component="",le="+Inf",revision="hello-1"} 3.0' in metrics
    assert 'clearway_gateway_requests_in_flight{app="hello",component="",revision="hello-1"} 0.0' in metrics
    assert 'clearway_gateway_held_requests{app="hello",component="",revision="hello-1"} 0.0' in metrics

    gw.reload(table(route("hello", [replica.address]), generation=8))
    assert (await admin_get(gw, "/routes", sock)).json() == {"generation": 8}

    await gw.close()
    lines = (tmp_path / "access0.log").read_text().splitlines()
    assert len(lines) == 4
    assert '"GET /echo HTTP/1.1" 200' in lines[0] and "app=hello revision=hello-1" in lines[0]
    assert f"upstream={replica.address} " in lines[0], lines[0]  # who answered, after release
    assert '"GET / HTTP/1.1" 404' in lines[3] and "upstream=- " in lines[3]


async def test_stats_has_each_revisions_raw_counters(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    host = {"host": "hello.localhost"}
    for path in ("/echo", "/echo", "/status/404", "/status/503"):
        await client.get(f"{gw.url}{path}", headers=host)
    await client.get(f"{gw.url}/", headers={"host": "nope.localhost"})  # unrouted: no revision's

    r = await admin_get(gw, "/stats", sock)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    stats = r.json()
    assert stats["bounds"] == [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    [hello] = stats["revisions"]
    assert (hello["app"], hello["revision"], hello["by_class"]) == ("hello", "hello-1", [0, 2, 0, 1, 1])
    assert len(hello["buckets"]) == len(stats["bounds"]) + 1  # the last is +Inf
    assert sum(hello["buckets"]) == 4  # non-cumulative: one count per request


@pytest.mark.timeout(20)
async def test_load_and_stats_count_each_component(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """One revision, three counted components: what the autoscaler reads on ``GET /load``."""
    gw = await start_gateway(
        table(
            route("fn", [replica.address], component="resize"),  # a function's public trigger
            route("fn", [replica.address], host="internal", component="resize"),  # its internal route
            route("fn", [], host="cold", component="report"),  # a function at zero replicas
            route("fn", [replica.address], host="web"),  # a route that names no component
        ),
        admin=True,
    )
    sock = str(tmp_path / "gw0.sock")
    for host, path in [("fn", "/echo"), ("fn", "/echo"), ("internal", "/status/500"), ("web", "/echo")]:
        await client.get(f"{gw.url}{path}", headers={"host": f"{host}.localhost"})
    slow = asyncio.create_task(client.get(f"{gw.url}/slow", headers={"host": "fn.localhost"}))
    cold = asyncio.create_task(client.get(f"{gw.url}/wake", headers={"host": "cold.localhost"}))
    await until(lambda: "GET /slow" in replica.control.requests and gw.held() == {"fn-1": 1})

    r = await admin_get(gw, "/load", sock)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    # A held request is in flight too: the gateway is answering it.
    assert sorted(r.json(), key=lambda e: e["component"]) == [
        {"app": "fn", "revision": "fn-1", "component": "", "in_flight": 0, "held": 0, "requests": 1},
        {"app": "fn", "revision": "fn-1", "component": "report", "in_flight": 1, "held": 1, "requests": 0},
        {"app": "fn", "revision": "fn-1", "component": "resize", "in_flight": 1, "held": 0, "requests": 3},
    ]
    assert (await admin_get(gw, "/held", sock)).json() == {"fn-1": 1}  # per revision, as before
    metrics = gw.metrics_text()
    assert b'clearway_gateway_requests_total{app="fn",code="2xx",component="resize",revision="fn-1"} 2.0' in metrics
    assert b'clearway_gateway_requests_in_flight{app="fn",component="resize",revision="fn-1"} 1.0' in metrics
    assert b'clearway_gateway_held_requests{app="fn",component="report",revision="fn-1"} 1.0' in metrics

    replica.control.release.set()
    gw.reload(
        table(
            route("fn", [replica.address], component="resize"),
            route("fn", [replica.address], host="cold", component="report"),
            generation=2,
        )
    )
    assert [(await slow).status_code, (await cold).status_code] == [200, 200]
    loads = {e["component"]: e for e in gw.load()}
    assert [(loads[c]["in_flight"], loads[c]["held"], loads[c]["requests"]) for c in ("resize", "report")] == [
        (0, 0, 4),
        (0, 0, 1),
    ]
    entries = (await admin_get(gw, "/stats", sock)).json()["revisions"]
    assert {e["component"]: e["by_class"] for e in entries} == {
        "": [0, 1, 0, 0, 0],
        "report": [0, 1, 0, 0, 0],
        "resize": [0, 3, 0, 0, 1],
    }
