"""Key-affinity routing (issue 8): a request carrying a key goes to the replica owning its shard.

The shard is ``shard_of(key, shards)``, the SDK's own function; the route's
``owners`` say which endpoint owns each shard. With no key, no owner, or an
owner that is not one of the revision's endpoints (not ready) or does not
answer, the gateway balances as usual: affinity never fails a request.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from clearway.gateway import Affinity, RoutesError, RouteTable
from clearway.sdk.sharding import shard_of

from .conftest import GatewayFactory, route, table
from .replica import Replica

pytestmark = pytest.mark.timeout(30)

KEYS = [f"customer-{n}" for n in range(24)]


def sharded(
    app: str, endpoints: list[str], owners: dict[int, str], *, shards: int = 8, **extra: Any
) -> dict[str, Any]:
    affinity = extra.pop("affinity", {"header": "x-customer"})
    return route(
        app, endpoints, shards=shards, affinity=affinity, owners={str(s): e for s, e in owners.items()}, **extra
    )


async def test_a_key_goes_to_the_replica_owning_its_shard(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    by_name = {"r1": replica.address, "r2": replica2.address}
    owner = {s: "r1" if s % 2 else "r2" for s in range(8)}
    gw = await start_gateway(table(sharded("shop", list(by_name.values()), {s: by_name[n] for s, n in owner.items()})))
    for key in KEYS:
        for header in ("x-customer", "X-Customer"):
            r = await client.get(f"{gw.url}/cart", headers={"host": "shop.localhost", header: key})
            assert r.status_code == 200
            assert r.json()["replica"] == owner[shard_of(key, 8)], key
            assert r.headers["x-clearway-shard"] == str(shard_of(key, 8))
            assert [key] == [v for k, v in r.json()["headers"] if k == "x-customer"]  # passed on as it came

    # No key: the usual balancing over both replicas, and no shard header.
    seen: Counter[str] = Counter()
    for _ in range(40):
        r = await client.get(f"{gw.url}/cart", headers={"host": "shop.localhost"})
        assert r.status_code == 200 and "x-clearway-shard" not in r.headers
        seen[r.json()["replica"]] += 1
    assert set(seen) == {"r1", "r2"}, seen

    # New owners in a reload are followed at once.
    gw.reload(table(sharded("shop", list(by_name.values()), dict.fromkeys(range(8), replica.address)), generation=2))
    for key in KEYS[:8]:
        r = await client.get(f"{gw.url}/cart", headers={"host": "shop.localhost", "x-customer": key})
        assert r.json()["replica"] == "r1"


async def test_a_shard_without_a_ready_owner_goes_to_any_replica(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, sock_dir: Path
) -> None:
    not_ready = f"unix:{sock_dir}/not-ready.sock"  # owns shards, but is no endpoint of the revision
    dead = f"unix:{sock_dir}/dead.sock"  # an endpoint nobody listens on
    key = KEYS[0]
    shard = shard_of(key, 8)
    gw = await start_gateway(
        table(
            sharded("noowner", [replica.address, replica2.address], {}),
            sharded("unready", [replica.address, replica2.address], {shard: not_ready}),
            sharded("dead", [replica.address, dead], dict.fromkeys(range(8), dead)),
        )
    )
    for app in ("noowner", "unready"):
        seen: Counter[str] = Counter()
        for _ in range(40):
            r = await client.get(f"{gw.url}/", headers={"host": f"{app}.localhost", "x-customer": key})
            assert r.status_code == 200 and r.headers["x-clearway-shard"] == str(shard)
            seen[r.json()["replica"]] += 1
        assert set(seen) == {"r1", "r2"}, (app, seen)
    # The owner does not answer: the request is retried on another replica, as any other.
    for key in KEYS[:5]:
        r = await client.get(f"{gw.url}/", headers={"host": "dead.localhost", "x-customer": key})
        assert (r.status_code, r.json()["replica"]) == (200, "r1")


async def test_the_key_can_be_a_path_segment_after_the_services_path(
    replica: Replica, replica2: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    owners = {s: replica.address if s % 2 else replica2.address for s in range(16)}
    names = {replica.address: "r1", replica2.address: "r2"}
    affinity = {"path": 1, "under": "/api"}
    endpoints = [replica.address, replica2.address]
    gw = await start_gateway(
        table(
            sharded("shop", endpoints, owners, shards=16, affinity=affinity, prefix="/api"),
            # An internal route: its prefix is stripped, then the service's path.
            sharded(
                "shop", endpoints, owners, shards=16, affinity=affinity, host="internal",
                prefix="/_services/shop-1/web", strip_prefix=True,
            ),
        )
    )
    for key in [*KEYS, "café", "a b"]:
        quoted = httpx.URL(f"http://x/api/customers/{key}/orders").raw_path.decode()
        for host, path in (("shop.localhost", quoted), ("internal", f"/_services/shop-1/web{quoted}")):
            r = await client.get(f"{gw.url}{path}", headers={"host": host})
            assert r.status_code == 200
            assert r.json()["path"] == f"/api/customers/{key}/orders"
            assert r.headers["x-clearway-shard"] == str(shard_of(key, 16)), (host, key)
            assert r.json()["replica"] == names[owners[shard_of(key, 16)]]
    # Too short a path, an empty segment, or not under the service's path: no key.
    for path in ("/api", "/api/customers", "/api/customers/", "/api/x//y"):
        r = await client.get(f"{gw.url}{path}", headers={"host": "shop.localhost"})
        assert r.status_code == 200 and "x-clearway-shard" not in r.headers, path


def test_the_routes_file_carries_affinity_and_refuses_what_it_cannot_use() -> None:
    data = {
        "version": 1,
        "routes": [
            sharded("shop", ["unix:/run/a.sock"], {3: "unix:/run/a.sock"}),
            sharded("api", [], {}, affinity={"path": 2, "under": "/v1/"}),
            route("plain", []),
        ],
    }
    parsed = RouteTable.from_json(data)
    shop, api, plain = parsed.routes
    assert (shop.shards, shop.affinity, dict(shop.owners)) == (8, Affinity(header="x-customer"), {3: "unix:/run/a.sock"})
    assert api.affinity == Affinity(segment=2, under="/v1")
    assert (plain.shards, plain.affinity, dict(plain.owners)) == (0, None, {})
    assert RouteTable.from_json(parsed.to_json()) == parsed
    assert "shards" not in parsed.to_json()["routes"][2]

    bad = [
        ({"affinity": {"header": "x-customer"}}, "need routes\\[0\\].shards"),
        ({"shards": 0}, "shards must be 1 to 4096"),
        ({"shards": 8, "affinity": {"header": "bad header"}}, "a header name"),
        ({"shards": 8, "affinity": {"path": -1}}, "a segment from 0"),
        ({"shards": 8, "affinity": {"cookie": "x"}}, "a \"header\" or a \"path\""),
        ({"shards": 8, "owners": {"8": "unix:/run/a.sock"}}, "not a shard of 0 to 7"),
        ({"shards": 8, "owners": {"1": "nowhere"}}, "must look like"),
    ]
    for extra, says in bad:
        with pytest.raises(RoutesError, match=says):
            RouteTable.from_json({"version": 1, "routes": [route("shop", [], **extra)]})
