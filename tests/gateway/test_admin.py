"""The admin socket (metrics, routes generation, held requests, load) and the access log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from clearway.gateway import Gateway
from clearway.gateway._admin import _holds_query

from .conftest import GatewayFactory, route, table, until
from .replica import Replica

#: The cold-start fields of a ``/load`` entry that never had a held request released.
_NO_COLD = {"cold_hold_sum": 0.0, "cold_count": 0}


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
        {"app": "fn", "revision": "fn-1", "component": "", "in_flight": 0, "held": 0, "requests": 1, **_NO_COLD},
        {"app": "fn", "revision": "fn-1", "component": "report", "in_flight": 1, "held": 1, "requests": 0, **_NO_COLD},
        {"app": "fn", "revision": "fn-1", "component": "resize", "in_flight": 1, "held": 0, "requests": 3, **_NO_COLD},
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
    assert [
        (loads[c]["in_flight"], loads[c]["held"], loads[c]["requests"], loads[c]["cold_count"])
        for c in ("resize", "report")
    ] == [(0, 0, 4, 0), (0, 0, 1, 1)]
    assert loads["report"]["cold_hold_sum"] > 0
    entries = (await admin_get(gw, "/stats", sock)).json()["revisions"]
    assert {e["component"]: e["by_class"] for e in entries} == {
        "": [0, 1, 0, 0, 0],
        "report": [0, 1, 0, 0, 0],
        "resize": [0, 3, 0, 0, 1],
    }


# -- GET /holds: the cold-start long-poll -------------------------------------------------


async def holds(sock: str, query: str) -> int:
    """``GET /holds?<query>``'s seq (the answer must be a 200 with JSON)."""
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock), timeout=40) as admin:
        r = await admin.get(f"http://gateway/holds?{query}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    seq = r.json()["seq"]
    assert isinstance(seq, int)
    return seq


def polls_waiting(gw: Gateway) -> int:
    """``/holds`` requests parked in the admin server (to sequence a test, not to sleep)."""
    assert gw._admin is not None
    return len(gw._admin._polls)


@pytest.mark.timeout(10)
async def test_holds_answers_at_once_unless_the_reader_is_up_to_date(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    # wait=30 everywhere: an answer that waited would overrun the test's timeout.
    assert await holds(sock, "after=-1&wait=30") == 0  # the first call: where the count is
    cold = asyncio.create_task(client.get(f"{gw.url}/", headers={"host": "cold.localhost"}))
    await until(lambda: gw.held() == {"cold-1": 1})
    assert gw.hold_seq == 1
    assert await holds(sock, "after=0&wait=30") == 1  # a hold the reader has not seen
    assert await holds(sock, "after=7&wait=30") == 1  # ahead: a restarted gateway; resynchronise
    gw.reload(table(route("cold", [replica.address]), generation=2))
    assert (await cold).status_code == 200


@pytest.mark.timeout(10)
async def test_holds_wakes_when_a_request_is_held_without_blocking_other_admin_requests(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    poll = asyncio.create_task(holds(sock, "after=0&wait=30"))
    await until(lambda: polls_waiting(gw) == 1)
    assert (await admin_get(gw, "/healthz", sock)).text == "ok\n"  # answered while /holds waits
    assert (await admin_get(gw, "/held", sock)).json() == {}
    assert not poll.done()

    cold = asyncio.create_task(client.get(f"{gw.url}/wake", headers={"host": "cold.localhost"}))
    assert await poll == 1
    gw.reload(table(route("cold", [replica.address]), generation=2))
    assert (await cold).status_code == 200


@pytest.mark.timeout(10)
async def test_holds_answers_the_same_seq_when_nothing_is_held_within_wait(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await holds(sock, "after=0&wait=0.2") == 0
    assert loop.time() - started >= 0.19  # it did wait
    assert gw.hold_seq == 0


@pytest.mark.timeout(10)
async def test_holds_with_bad_query_values_answers_at_once(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    # A missing or unreadable `after` is -1 (answer now); a bad `wait` is 0 (do not wait).
    for query in ("", "after=abc&wait=30", "after=0&wait=xyz", "after=0&wait=-5", "after=0&wait=nan", "after=0"):
        assert await holds(sock, query) == 0, query
    assert polls_waiting(gw) == 0


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (-1, 0.0)),
        (b"after=3&wait=1.5", (3, 1.5)),
        (b"after=3&wait=1e9", (3, 30.0)),  # clamped
        (b"after=3&wait=inf", (3, 30.0)),
        (b"after=3&wait=-1", (3, 0.0)),
        (b"after=3&wait=nan", (3, 0.0)),
        (b"after=1.5&wait=x", (-1, 0.0)),
        (b"after=%ff&wait=", (-1, 0.0)),
    ],
)
@pytest.mark.timeout(5)
def test_holds_query_values_are_read_leniently(query: bytes, expected: tuple[int, float]) -> None:
    assert _holds_query(query) == expected


@pytest.mark.timeout(10)
async def test_closing_the_gateway_answers_a_waiting_holds(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    poll = asyncio.create_task(holds(sock, "after=0&wait=30"))
    await until(lambda: polls_waiting(gw) == 1)
    await gw.close()  # does not wait for the 30 s
    assert await poll == 0


# -- cold-start metrics -------------------------------------------------------------------


@pytest.mark.timeout(20)
async def test_a_released_held_request_is_counted_as_a_cold_start(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    sock = str(tmp_path / "gw0.sock")
    cold = asyncio.create_task(client.get(f"{gw.url}/wake", headers={"host": "cold.localhost"}))
    await until(lambda: gw.held() == {"cold-1": 1})
    assert b"clearway_gateway_hold_seconds_count" not in gw.metrics_text()  # none released yet

    # A reload that still gives it no replica: the request waits on, counted once.
    gw.reload(table(route("cold", [], component="fn"), generation=2))
    await until(lambda: any(e["component"] == "fn" and e["held"] == 1 for e in gw.load()))
    gw.reload(table(route("cold", [replica.address], component="fn"), generation=3))
    r = await cold
    assert r.status_code == 200 and r.json()["path"] == "/wake"
    assert gw.hold_seq == 1
    await client.get(f"{gw.url}/echo", headers={"host": "cold.localhost"})  # hot: no cold start

    metrics = (await admin_get(gw, "/metrics", sock)).text
    labels = 'app="cold",component="fn",revision="cold-1"'
    for family in ("clearway_gateway_hold_seconds", "clearway_gateway_held_first_response_seconds"):
        assert f"# TYPE {family} histogram" in metrics
        assert f"{family}_count{{{labels}}} 1.0" in metrics
        assert f'{family}_bucket{{app="cold",component="fn",le="+Inf",revision="cold-1"}} 1.0' in metrics
        assert f'{family}_bucket{{app="cold",component="fn",le="0.001",revision="cold-1"}}' in metrics
    hold_sum = float(metrics.split(f"clearway_gateway_hold_seconds_sum{{{labels}}} ")[1].split()[0])
    assert hold_sum > 0
    # The request was held under the first table's component ("") and released under "fn".
    assert 'clearway_gateway_hold_seconds_count{app="cold",component="",revision="cold-1"}' not in metrics
    [entry] = [e for e in (await admin_get(gw, "/load", sock)).json() if e["component"] == "fn"]
    assert (entry["cold_count"], entry["requests"]) == (1, 2)
    assert entry["cold_hold_sum"] == pytest.approx(hold_sum)


@pytest.mark.timeout(10)
async def test_a_hold_that_times_out_is_no_cold_start(
    start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True, hold_timeout=0.1)
    r = await client.get(f"{gw.url}/", headers={"host": "cold.localhost"})
    assert r.status_code == 503
    assert gw.hold_seq == 1  # it was held...
    metrics = gw.metrics_text()
    assert b"clearway_gateway_hold_seconds_count" not in metrics  # ...but never released to a replica
    assert b"clearway_gateway_held_first_response_seconds_count" not in metrics
    [entry] = gw.load()
    assert (entry["cold_count"], entry["cold_hold_sum"]) == (0, 0.0)
