"""Routing by host, domain and prefix; revision split, pinning and holding."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import GatewayFactory, route, table, until
from .replica import Replica
from .token_issuer import TokenIssuer


async def test_routes_by_host_domain_and_longest_prefix(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(
        table(
            route("web", [replica.address]),
            route("api", [replica2.address], host="web", prefix="/api", strip_prefix=True),
            route("full", [replica2.address], host="full.example.org"),
            domains=("localhost", "apps.example.com"),
        )
    )

    async def get(host: str, path: str) -> httpx.Response:
        return await client.get(f"{gw.url}{path}", headers={"host": host})

    r = await get("web.localhost", "/x")
    assert r.json()["replica"] == "r1"
    r = await get("WEB.apps.example.com:8080", "/api/users?q=1")
    assert (r.json()["replica"], r.json()["path"], r.json()["query"]) == ("r2", "/users", "q=1")
    r = await get("web.localhost", "/api")
    assert (r.json()["replica"], r.json()["path"]) == ("r2", "/")
    r = await get("web.localhost", "/apix")  # not on a segment boundary: the "/" route
    assert (r.json()["replica"], r.json()["path"]) == ("r1", "/apix")
    r = await get("full.example.org", "/")
    assert r.json()["replica"] == "r2"
    r = await get("web", "/")  # the bare route host matches too
    assert r.json()["replica"] == "r1"

    r = await get("other.localhost", "/some/where")
    assert r.status_code == 404
    assert "no app is served at host other.localhost path /some/where" in r.text.lower()
    assert "clearway status" in r.text


async def test_weighted_split_and_header_pin(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    issuer = TokenIssuer()
    gw = await start_gateway(
        identity_key=issuer.write_public_key(tmp_path / "signing.pub.pem"),
        routes=table(
            {
                "app": "hello", "host": "hello",
                "targets": [
                    {"revision": "hello-1", "weight": 80, "endpoints": [replica.address]},
                    {"revision": "hello-2", "weight": 20, "endpoints": [replica2.address]},
                    {"revision": "hello-3", "weight": 0, "endpoints": [replica2.address]},
                ],
            }
        ),
    )
    seen: Counter[str] = Counter()
    for _ in range(200):
        r = await client.get(f"{gw.url}/", headers={"host": "hello.localhost"})
        seen[r.json()["replica"]] += 1
    assert 120 <= seen["r1"] <= 190, seen  # 160 expected: a split route is not sticky unless asked
    pin = {"x-clearway-revision": "hello-3", "x-clearway-pin-token": issuer.pin("hello", "hello-3")}
    for _ in range(5):
        r = await client.get(f"{gw.url}/", headers={"host": "hello.localhost", **pin})
        assert r.json()["replica"] == "r2"
        forwarded = {name for name, _ in r.json()["headers"]}
        assert not forwarded & {"x-clearway-revision", "x-clearway-pin-token"}


async def test_pins_to_a_weighted_revision_need_no_token(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A client may stay on either side of a split (a rollout's canary): it could land there anyway."""
    issuer = TokenIssuer()
    gw = await start_gateway(
        identity_key=issuer.write_public_key(tmp_path / "signing.pub.pem"),
        routes=table(
            {
                "app": "hello", "host": "hello",
                "targets": [
                    {"revision": "hello-1", "weight": 95, "endpoints": [replica.address]},
                    {"revision": "hello-2", "weight": 5, "endpoints": [replica2.address]},
                    {"revision": "hello-3", "weight": 0, "endpoints": [replica2.address]},
                ],
            }
        ),
    )

    async def get(**headers: str) -> httpx.Response:
        return await client.get(f"{gw.url}/", headers={"host": "hello.localhost", **headers})

    cookie = "theme=dark; clearway-revision=hello-2; session=abc"
    for _ in range(10):
        r = await get(**{"x-clearway-revision": "hello-2"})
        assert r.status_code == 200 and r.json()["replica"] == "r2"
        r = await get(cookie=cookie)
        assert r.status_code == 200 and r.json()["replica"] == "r2"
        assert ["cookie", cookie] in r.json()["headers"]  # the app gets its cookies as sent
    # Quoted, and the header wins over the cookie.
    r = await get(cookie='clearway-revision="hello-2"')
    assert r.json()["replica"] == "r2"
    r = await get(cookie="clearway-revision=hello-2", **{"x-clearway-revision": "hello-1"})
    assert r.json()["replica"] == "r1"

    # Outside the split a header pin still needs a pin token ...
    r = await get(**{"x-clearway-revision": "hello-3"})
    assert r.status_code == 403 and "needs a pin token" in r.text
    r = await get(**{"x-clearway-revision": "hello-9"})
    assert r.status_code == 403
    # ... and a cookie pin is not a way around it: it is ignored.
    served: Counter[str] = Counter()
    for _ in range(20):
        r = await get(cookie="clearway-revision=hello-3")
        assert r.status_code == 200
        served[r.json()["replica"]] += 1
    assert served["r1"] >= 15, served  # the normal 95/5 split, not the weight-0 revision


async def test_a_stale_cookie_falls_back_to_the_split(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    """After a rollback the canary has weight 0; browsers still sending its cookie get the stable."""
    gw = await start_gateway(
        table(
            {
                "app": "hello", "host": "hello",
                "targets": [
                    {"revision": "hello-1", "weight": 100, "endpoints": [replica.address]},
                    {"revision": "hello-2", "weight": 0, "endpoints": [replica2.address]},
                ],
            }
        )
    )
    for cookie in ("clearway-revision=hello-2", "clearway-revision=gone-7; a=b", "xclearway-revision=hello-2"):
        r = await client.get(f"{gw.url}/", headers={"host": "hello.localhost", "cookie": cookie})
        assert r.status_code == 200 and r.json()["replica"] == "r1", cookie
        assert ["cookie", cookie] in r.json()["headers"]
    assert replica2.control.requests == []


async def test_a_split_route_keeps_a_browser_on_the_revision_it_got(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A sticky rollout's answers set the pin cookie; a cookie jar then stays on one side."""
    issuer = TokenIssuer()
    split = {
        "app": "hello", "host": "hello", "sticky": True,
        "targets": [
            {"revision": "hello-1", "weight": 50, "endpoints": [replica.address]},
            {"revision": "hello-2", "weight": 50, "endpoints": [replica2.address]},
            {"revision": "hello-3", "weight": 0, "endpoints": [replica2.address]},
        ],
    }
    gw = await start_gateway(identity_key=issuer.write_public_key(tmp_path / "signing.pub.pem"), routes=table(split))
    revision_of = {"r1": "hello-1", "r2": "hello-2"}

    # Each new browser (cookie jar) is told the revision that answered it, and stays there.
    sides = set()
    for _ in range(20):
        async with httpx.AsyncClient(headers={"host": "hello.localhost"}) as browser:
            first = await browser.get(f"{gw.url}/")
            side = revision_of[first.json()["replica"]]
            assert first.headers.get_list("set-cookie") == [f"clearway-revision={side}; Path=/; HttpOnly; SameSite=Lax"]
            for _ in range(5):
                again = await browser.get(f"{gw.url}/")
                assert revision_of[again.json()["replica"]] == side
                assert "set-cookie" not in again.headers  # it already has it
            sides.add(side)
    assert sides == {"hello-1", "hello-2"}  # 20 browsers at 50/50: both sides (all on one: p = 2**-19)

    async with httpx.AsyncClient(headers={"host": "hello.localhost"}) as plain:
        # A stale cookie (a rolled-back canary) is replaced by the revision that answers now.
        stale = await plain.get(f"{gw.url}/", headers={"cookie": "clearway-revision=hello-3"})
        assert stale.headers["set-cookie"].startswith(f"clearway-revision={revision_of[stale.json()['replica']]};")
        # A header pin is the client's own choice: nothing is set.
        pinned = await plain.get(f"{gw.url}/", headers={"x-clearway-revision": "hello-2"})
        assert pinned.json()["replica"] == "r2" and "set-cookie" not in pinned.headers

        # Without a split there is nothing to stick to.
        gw.reload(table({**split, "targets": [{**split["targets"][0], "weight": 100}]}, generation=2))
        single = await plain.get(f"{gw.url}/")
        assert single.status_code == 200 and "set-cookie" not in single.headers


@pytest.mark.timeout(20)
async def test_held_request_is_released_by_a_reload(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True)
    pending = asyncio.create_task(client.get(f"{gw.url}/wake", headers={"host": "cold.localhost"}))
    await until(lambda: gw.held() == {"cold-1": 1})
    assert b'clearway_gateway_held_requests{app="cold",component="",revision="cold-1"} 1.0' in gw.metrics_text()
    gw.reload(table(route("cold", [replica.address]), generation=2))
    r = await pending
    assert r.status_code == 200 and r.json()["path"] == "/wake"
    assert gw.held() == {}


@pytest.mark.timeout(10)
async def test_hold_times_out_with_503(start_gateway: GatewayFactory, client: httpx.AsyncClient) -> None:
    gw = await start_gateway(table(route("cold", [])), hold_timeout=0.2)
    r = await client.get(f"{gw.url}/", headers={"host": "cold.localhost"})
    assert r.status_code == 503
    assert "became ready within 0.2 s" in r.text
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["retry-after"] == "1"


@pytest.mark.timeout(10)
async def test_a_flood_at_zero_replicas_is_bounded(start_gateway: GatewayFactory, client: httpx.AsyncClient) -> None:
    gw = await start_gateway(table(route("cold", [])), admin=True, max_held=2, hold_timeout=5)
    held = [asyncio.create_task(client.get(f"{gw.url}/", headers={"host": "cold.localhost"})) for _ in range(2)]
    await until(lambda: gw.held() == {"cold-1": 2})
    over = await client.get(f"{gw.url}/", headers={"host": "cold.localhost"})
    assert over.status_code == 503 and over.headers["retry-after"] == "1"
    assert "already has 2 requests waiting" in over.text
    for task in held:
        task.cancel()

