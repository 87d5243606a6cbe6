"""Sharding (issue 8), the pure parts: the assignment of shards to members (rendezvous
hashing with bounded load), keys to shards, the spec of a sharded worker, and how
`clearway status` shows shard locks. The replicas themselves: tests/e2e/test_coordination.py."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections import Counter

import pytest

import clearway as cw
from clearway.cli import render
from clearway.exceptions import ClearwayError, SpecError
from clearway.sdk import sharding
from clearway.sdk.sharding import assign, capacity, shard_of
from tests.cli.test_render import app_view, text

pytestmark = pytest.mark.timeout(30)


def members(count: int, revision: str = "shop-1") -> list[str]:
    return [f"{revision}.consume.{i}" for i in range(count)]


def moved(before: list[str], after: list[str]) -> int:
    return sum(a != b for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize(("shards", "count"), [(1, 1), (1, 3), (8, 2), (64, 4), (64, 5), (7, 10), (4096, 7)])
def test_every_shard_has_exactly_one_member_and_none_is_over_capacity(shards: int, count: int) -> None:
    names = members(count)
    owners = assign(shards, names)
    assert len(owners) == shards and set(owners) <= set(names)
    load = Counter(owners)
    assert max(load.values()) <= capacity(shards, count) == -(-shards * 5 // (count * 4))
    assert sum(load.values()) == shards


def test_the_assignment_depends_only_on_the_set_of_members() -> None:
    names = members(5)
    assert assign(64, names) == assign(64, list(reversed(names))) == assign(64, [*names, names[0]])
    assert assign(64, names[:1]) == [names[0]] * 64
    assert assign(3, members(10)) == assign(3, members(10))  # more members than shards: some get none


def test_the_assignment_is_the_same_in_every_process() -> None:
    # blake2b, never hash(): another process with another hash seed computes the same.
    code = "from clearway.sdk.sharding import assign, shard_of; print(assign(16, ['a', 'b', 'c']), shard_of('customer-42', 64))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True, timeout=20
        ).stdout
        for seed in ("1", "2")
    }
    assert seen == {f"{assign(16, ['a', 'b', 'c'])} {shard_of('customer-42', 64)}\n"}


def test_a_join_or_a_leave_moves_about_one_in_n_of_the_shards() -> None:
    # 64 shards, 4 -> 5 members: the newcomer's fair share is 64/5 = 12.8 shards, the least any
    # balanced assignment must move; 5 -> 4 likewise moves the leaver's 12.8. Over many sets of
    # member names (a single scale-up moves what the newcomer wins in the rendezvous draw,
    # binomial around 12.8) the mean is within 10% of that: 13.5 here, where a tighter bound
    # (1.0) would move 15.5 and plain modulo hashing 51 (80%).
    ideal = 64 / 5
    ups, downs, between_old = [], [], []
    for trial in range(1, 201):
        names = members(5, f"shop-{trial}")
        four, five = assign(64, names[:4]), assign(64, names)
        ups.append(moved(four, five))
        # Shards moving from one old member to another (the load bound pushing them on).
        between_old.append(sum(1 for a, b in zip(four, five, strict=True) if a != b and b != names[4]))
        leaver = trial % 5
        downs.append(moved(five, assign(64, names[:leaver] + names[leaver + 1 :])))
    assert abs(statistics.mean(ups) - ideal) <= 0.1 * ideal, statistics.mean(ups)
    assert statistics.mean(between_old) < 1, statistics.mean(between_old)
    assert abs(statistics.mean(downs) - ideal) <= 0.1 * ideal, statistics.mean(downs)
    assert max(ups) <= 2 * ideal and max(downs) <= 2 * ideal


def test_bad_shard_counts_and_no_members_are_refused_clearly() -> None:
    for bad in (0, 4097, 2.5, True):
        with pytest.raises(ValueError, match="1 to 4096 shards"):
            assign(bad, ["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one member"):
        assign(8, [])
    with pytest.raises(TypeError, match="str or bytes"):
        shard_of(42, 8)  # type: ignore[arg-type]


def test_keys_spread_evenly_and_stably_over_the_shards() -> None:
    spread = Counter(shard_of(f"customer-{i}", 8) for i in range(8000))
    assert set(spread) == set(range(8)) and all(900 <= n <= 1100 for n in spread.values()), spread
    assert shard_of("customer-42", 8) == shard_of("customer-42", 8)
    assert shard_of(b"\x00\x01", 8) == shard_of(b"\x00\x01", 8)


# -- the spec of a sharded worker ----------------------------------------------------------


def test_a_sharded_worker_records_its_shards_and_lease() -> None:
    app = cw.App("shop")

    @app.worker(replicas=4, shards=64, lease_ttl=5)
    async def consume(shard: cw.Shard) -> None: ...

    spec = app.spec().component("consume")
    assert isinstance(spec, cw.WorkerSpec)
    assert (spec.replicas, spec.shards, spec.lease_ttl, spec.singleton) == (4, 64, 5.0, False)
    assert cw.WorkerSpec(name="plain").shards is None


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"shards": 0}, "shards"),
        ({"shards": 5000}, "shards"),
        ({"shards": 8, "replicas": 0}, "needs replicas >= 1"),
        ({"shards": 8, "lease_ttl": 0.5}, "lease_ttl"),
    ],
)
def test_bad_sharded_workers_are_refused_at_the_decorator(kwargs: dict[str, float], says: str) -> None:
    app = cw.App("shop")
    with pytest.raises(SpecError, match=says) as info:
        @app.worker(**kwargs)  # type: ignore[arg-type]
        async def consume(shard: cw.Shard) -> None: ...
    assert info.value.location is not None and "test_sharding.py" in info.value.location


def test_a_sync_sharded_worker_and_a_sharded_singleton_are_refused() -> None:
    app = cw.App("shop")
    with pytest.raises(SpecError, match="must be `async def`"):
        @app.worker(shards=8)
        def consume(shard: cw.Shard) -> None: ...
    with pytest.raises(ValueError, match=r"either a singleton .* or sharded"):
        cw.WorkerSpec(name="boss", singleton=True, shards=8)


def test_the_shard_count_of_shard_for_comes_from_the_loaded_app(monkeypatch: pytest.MonkeyPatch) -> None:
    app = cw.App("shardshop")

    @app.worker(shards=12)
    async def consume_orders(shard: cw.Shard) -> None: ...

    @app.worker()
    async def plain() -> None: ...

    monkeypatch.setenv("CLEARWAY_APP", "shardshop")
    assert sharding._shard_count("consume-orders") == 12
    with pytest.raises(ClearwayError, match="not a sharded worker"):
        sharding._shard_count("plain")
    with pytest.raises(ClearwayError, match="pass shards=N"):
        sharding._shard_count("nothing")
    assert sharding.shard_lock("consume_orders", 3) == "shards/consume-orders/shard/3"


# -- the spec of a sharded service (key-affinity routing) --------------------------------------


def test_a_sharded_service_records_its_shards_and_where_its_key_is(monkeypatch: pytest.MonkeyPatch) -> None:
    app = cw.App("affinityshop")

    @app.service(replicas=2, shards=8, affinity="header:X-Customer", lease_ttl=5)
    def api() -> object: ...

    @app.service(path="/v1", shards=16, affinity="path:02")
    def orders() -> object: ...

    spec = app.spec().component("api")
    assert isinstance(spec, cw.ServiceSpec)
    assert (spec.shards, spec.affinity, spec.lease_ttl) == (8, "header:x-customer", 5.0)
    assert app.spec().component("orders").affinity == "path:2"  # type: ignore[union-attr]
    assert cw.ServiceSpec(name="plain").shards is None and cw.ServiceSpec(name="plain").affinity is None
    monkeypatch.setenv("CLEARWAY_APP", "affinityshop")
    assert sharding._shard_count("orders") == 16  # cw.shard_for(key, worker="orders") works for it too


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"affinity": "header:x-customer"}, r"needs shards=N"),
        ({"shards": 8, "affinity": "cookie:session"}, r"must be 'header:<name>' .* or 'path:<n>'"),
        ({"shards": 8, "affinity": "header:"}, "must be 'header:<name>'"),
        ({"shards": 8, "affinity": "header:x customer"}, "must be 'header:<name>'"),
        ({"shards": 8, "affinity": "path:64"}, "from 0 to 63"),
        ({"shards": 8, "affinity": "path:-1"}, "from 0 to 63"),
        ({"shards": 0, "affinity": "path:1"}, "shards"),
        ({"shards": 8, "replicas": 0}, "needs replicas >= 1"),
    ],
)
def test_bad_sharded_services_are_refused_at_the_decorator(kwargs: dict[str, object], says: str) -> None:
    app = cw.App("shop")
    with pytest.raises(SpecError, match=says) as info:
        @app.service(**kwargs)  # type: ignore[arg-type]
        def api() -> object: ...
    assert info.value.location is not None and "test_sharding.py" in info.value.location


# -- clearway status ------------------------------------------------------------------------


def test_status_shows_shard_owners_in_shard_order() -> None:
    locks = [
        {"lock": f"shards/consume/shard/{i}", "token": 100 + i, "replica": f"shop-1.consume.{i % 2}", "incarnation": "x"}
        for i in (10, 2, 1)
    ] + [{"lock": "shards/consume/members/shop-1.consume.0", "token": 5, "replica": "shop-1.consume.0", "incarnation": "x"}]
    lines = text(render.app_detail(app_view("shop", "serving", locks=locks))).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("LOCK"))
    assert [line.split() for line in lines[at + 1 : at + 5]] == [
        ["consume", "shards", "member", "shop-1.consume.0", "5"],
        ["consume", "shard", "1", "shop-1.consume.1", "101"],
        ["consume", "shard", "2", "shop-1.consume.0", "102"],
        ["consume", "shard", "10", "shop-1.consume.0", "110"],
    ], lines
