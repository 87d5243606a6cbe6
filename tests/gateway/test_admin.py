"""The admin socket (metrics, routes generation, held requests) and the access log."""

from __future__ import annotations

from pathlib import Path

import httpx

from clearway.gateway import Gateway

from .conftest import GatewayFactory, route, table
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
    assert 'clearway_gateway_requests_total{app="hello",code="2xx",revision="hello-1"} 3.0' in metrics
    assert 'clearway_gateway_requests_total{app="",code="4xx",revision=""} 1.0' in metrics
    assert 'clearway_gateway_request_duration_seconds_count{app="hello",revision="hello-1"} 3.0' in metrics
    assert 'clearway_gateway_request_duration_seconds_bucket{app="hello",le="+Inf",revision="hello-1"} 3.0' in metrics
    assert 'clearway_gateway_requests_in_flight{app="hello",revision="hello-1"} 0.0' in metrics
    assert 'clearway_gateway_held_requests{app="hello",revision="hello-1"} 0.0' in metrics

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
