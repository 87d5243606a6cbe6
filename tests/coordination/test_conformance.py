"""The conformance suite: one contract, every backend (``coordinator`` is parametrized).

TTLs asked for are 1 s to keep the suite fast; etcd grants 2 s (its minimum with
the default election timeout), so every wait on an expiry uses the granted ttl.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

import pytest

from clearway.coordination import Coordinator, Holding, LeaseGone
from tests.coordination.conftest import queued, renew, stop, wait_until

pytestmark = pytest.mark.timeout(30)

#: Beyond a lease's ttl, how long a backend may take to notice it expired (etcd checks every 0.5 s).
EXPIRY_SLACK = 3.0


# -- leases ----------------------------------------------------------------------------------

async def test_grant_keepalive_revoke(coordinator: Coordinator) -> None:
    lease = await coordinator.grant("shop/web-1#1", 1)
    assert lease.owner == "shop/web-1#1"
    if coordinator.kind == "etcd":
        assert lease.ttl >= 1 and lease.ttl == math.ceil(lease.ttl)  # whole seconds, etcd's minimum
    else:
        assert lease.ttl == 1
    assert await coordinator.leases("shop/") == [lease]
    assert await coordinator.leases("other/") == []
    assert await coordinator.keepalive(lease.id) == lease.ttl

    await coordinator.revoke(lease.id)
    with pytest.raises(LeaseGone, match="gone"):
        await coordinator.keepalive(lease.id)
    assert await coordinator.leases("") == []
    await coordinator.revoke(lease.id)  # idempotent
    for unknown in ("nope", "", "ffffffffffff", "0" + lease.id):
        with pytest.raises(LeaseGone):
            await coordinator.keepalive(unknown)
        await coordinator.revoke(unknown)
        with pytest.raises(LeaseGone):
            await coordinator.acquire("l", unknown, wait=0)


async def test_a_lease_expires_ttl_after_its_last_renewal_not_before(coordinator: Coordinator) -> None:
    sent = time.monotonic()
    dropped = await coordinator.grant("o/dropped", 1)
    kept = await coordinator.grant("o/kept", 1)
    renewing = renew(coordinator, kept)
    try:

        async def dropped_is_gone() -> bool:
            return dropped.id not in {lease.id for lease in await coordinator.leases("o/")}

        await wait_until(dropped_is_gone, within=dropped.ttl + EXPIRY_SLACK, what="the unrenewed lease expired")
        assert time.monotonic() - sent >= dropped.ttl, "expired before its ttl"
        with pytest.raises(LeaseGone):
            await coordinator.keepalive(dropped.id)
        with pytest.raises(LeaseGone):
            await coordinator.acquire("l", dropped.id, wait=0)
        # The renewed one outlived its first ttl.
        assert time.monotonic() - sent > kept.ttl
        assert [lease.id for lease in await coordinator.leases("o/")] == [kept.id]
    finally:
        await stop(renewing)


# -- locks -----------------------------------------------------------------------------------

async def test_acquire_release(coordinator: Coordinator) -> None:
    lease = await coordinator.grant("o/a", 10)
    held = await coordinator.acquire("inventory", lease.id, wait=0)
    assert held is not None
    assert held == Holding(lock="inventory", token=held.token, lease=lease.id, owner="o/a") and held.token > 0
    assert await coordinator.holder("inventory") == held
    assert await coordinator.acquire("inventory", lease.id, wait=0) == held  # idempotent: same token
    assert await coordinator.queue("inventory") == [held]
    assert await coordinator.release("inventory", lease.id) is True
    assert await coordinator.holder("inventory") is None
    assert await coordinator.queue("inventory") == []


async def test_acquire_that_waits_in_vain_leaves_no_queue_entry(coordinator: Coordinator) -> None:
    a = await coordinator.grant("o/a", 10)
    b = await coordinator.grant("o/b", 10)
    held = await coordinator.acquire("l", a.id, wait=0)
    assert await coordinator.acquire("l", b.id, wait=0) is None
    started = time.monotonic()
    assert await coordinator.acquire("l", b.id, wait=0.3) is None
    assert 0.3 <= time.monotonic() - started < 3
    assert await coordinator.queue("l") == [held]
    assert await coordinator.release("l", a.id)
    assert await coordinator.holder("l") is None  # b is not queued behind: nobody holds it


async def test_a_long_polling_waiter_keeps_its_place_between_polls(coordinator: Coordinator) -> None:
    holder = await coordinator.grant("o/holder", 10)
    polling = await coordinator.grant("o/polling", 10)
    late = await coordinator.grant("o/late", 10)
    held = await coordinator.acquire("l", holder.id, wait=0)
    assert held is not None
    # Polls that time out keep the entry (the lease bounds it): a later arrival stays behind it.
    assert await coordinator.acquire("l", polling.id, wait=0.1, keep_queued=True) is None
    assert await coordinator.acquire("l", late.id, wait=0, keep_queued=True) is None
    assert [h.lease for h in await coordinator.queue("l")] == [holder.id, polling.id, late.id]
    assert await coordinator.release("l", holder.id)
    mine = await coordinator.acquire("l", polling.id, wait=5, keep_queued=True)
    assert mine is not None and mine.token > held.token
    # Giving up is revoking the lease: the place goes with it.
    await coordinator.revoke(polling.id)
    after = await coordinator.acquire("l", late.id, wait=5, keep_queued=True)
    assert after is not None and after.lease == late.id
    await coordinator.revoke(late.id)
    await coordinator.revoke(holder.id)


async def test_waiters_get_the_lock_in_arrival_order(coordinator: Coordinator) -> None:
    first = await coordinator.grant("o/first", 10)
    held = await coordinator.acquire("l", first.id, wait=0)
    assert held is not None
    waiters = [await coordinator.grant(f"o/w{i}", 10) for i in range(5)]
    order: list[tuple[str, int]] = []

    async def take(lease_id: str) -> None:
        holding = await coordinator.acquire("l", lease_id, wait=20)
        assert holding is not None
        order.append((lease_id, holding.token))
        assert await coordinator.release("l", lease_id)

    tasks = []
    for i, w in enumerate(waiters):
        tasks.append(asyncio.create_task(take(w.id)))
        await queued(coordinator, "l", i + 2)
    assert [e.lease for e in await coordinator.queue("l")] == [first.id] + [w.id for w in waiters]
    await coordinator.release("l", first.id)
    await asyncio.gather(*tasks)
    assert [lease for lease, _ in order] == [w.id for w in waiters]
    tokens = [held.token] + [token for _, token in order]
    assert tokens == sorted(set(tokens)), "tokens must strictly increase across holders"


async def test_many_waiters_none_starves(coordinator: Coordinator) -> None:
    clients, rounds = 16, 3
    leases = [await coordinator.grant(f"o/c{i}", 30) for i in range(clients)]
    grants: list[tuple[int, int]] = []

    async def client(i: int) -> None:
        for _ in range(rounds):
            holding = await coordinator.acquire("busy", leases[i].id, wait=20)
            assert holding is not None
            grants.append((i, holding.token))
            await asyncio.sleep(0)  # hold it across a turn of the loop
            assert await coordinator.release("busy", leases[i].id)

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 25)
    assert sorted(i for i, _ in grants) == sorted(list(range(clients)) * rounds)
    tokens = [t for _, t in grants]
    assert tokens == sorted(set(tokens)), "tokens must strictly increase across holders"
    # FIFO: between two turns of one client, each other client has at most about one turn.
    for i in range(clients):
        turns = [n for n, (c, _) in enumerate(grants) if c == i]
        assert all(b - a <= 2 * clients for a, b in itertools.pairwise(turns)), (i, turns)


async def test_tokens_strictly_increase_across_holders(coordinator: Coordinator) -> None:
    tokens = []
    same = await coordinator.grant("o/same", 10)
    for i in range(4):
        lease = same if i % 2 else await coordinator.grant(f"o/{i}", 10)
        holding = await coordinator.acquire("t", lease.id, wait=0)
        assert holding is not None
        tokens.append(holding.token)
        other = await coordinator.grant(f"o/other{i}", 10)  # activity on another lock in between
        await coordinator.acquire(f"t-other-{i}", other.id, wait=0)
        assert await coordinator.release("t", lease.id)
    assert tokens == sorted(set(tokens))


async def test_a_waiter_whose_lease_expires_never_gets_the_lock(coordinator: Coordinator) -> None:
    holder = await coordinator.grant("o/holder", 1)
    doomed = await coordinator.grant("o/doomed", 1)
    live = await coordinator.grant("o/live", 1)
    renewing = [renew(coordinator, holder), renew(coordinator, live)]
    try:
        held = await coordinator.acquire("l", holder.id, wait=0)
        assert held is not None
        doomed_wait = asyncio.create_task(coordinator.acquire("l", doomed.id, wait=20))
        await queued(coordinator, "l", 2)
        live_wait = asyncio.create_task(coordinator.acquire("l", live.id, wait=20))
        await queued(coordinator, "l", 3)
        # doomed is not renewed: it is told while still queued, and leaves the queue.
        with pytest.raises(LeaseGone):
            await asyncio.wait_for(doomed_wait, doomed.ttl + EXPIRY_SLACK)
        assert [e.lease for e in await coordinator.queue("l")] == [holder.id, live.id]
        assert await coordinator.release("l", holder.id)
        got = await asyncio.wait_for(live_wait, 5)
        assert got is not None and got.lease == live.id and got.token > held.token
        assert await coordinator.holder("l") == got
    finally:
        await stop(*renewing)


async def test_a_holder_that_stops_renewing_loses_the_lock_after_its_ttl(coordinator: Coordinator) -> None:
    sent = time.monotonic()
    stalled = await coordinator.grant("o/stalled", 1)
    waiter = await coordinator.grant("o/waiter", 1)
    renewing = renew(coordinator, waiter)
    try:
        first = await coordinator.acquire("l", stalled.id, wait=0)
        assert first is not None
        second = await coordinator.acquire("l", waiter.id, wait=stalled.ttl + EXPIRY_SLACK)
        assert second is not None and second.token > first.token
        assert time.monotonic() - sent >= stalled.ttl, "the lock moved before the holder's ttl ran out"
    finally:
        await stop(renewing)


async def test_release_by_a_non_owner_or_twice_changes_nothing(coordinator: Coordinator) -> None:
    a = await coordinator.grant("o/a", 10)
    b = await coordinator.grant("o/b", 10)
    held = await coordinator.acquire("l", a.id, wait=0)
    assert await coordinator.release("l", b.id) is False
    assert await coordinator.release("l", "no-such-lease") is False
    assert await coordinator.release("other", a.id) is False
    assert await coordinator.queue("l") == [held]
    assert await coordinator.release("l", a.id) is True
    assert await coordinator.release("l", a.id) is False
    assert await coordinator.holder("l") is None


async def test_release_while_queued_ends_the_wait(coordinator: Coordinator) -> None:
    a = await coordinator.grant("o/a", 10)
    b = await coordinator.grant("o/b", 10)
    await coordinator.acquire("l", a.id, wait=0)
    waiting = asyncio.create_task(coordinator.acquire("l", b.id, wait=20))
    await queued(coordinator, "l", 2)
    assert await coordinator.release("l", b.id) is True
    assert await asyncio.wait_for(waiting, 5) is None
    assert [e.lease for e in await coordinator.queue("l")] == [a.id]


async def test_holder_holdings_and_queue_views(coordinator: Coordinator) -> None:
    a = await coordinator.grant("app/a#1", 10)
    b = await coordinator.grant("app/b#1", 10)
    held = {
        "app/x": await coordinator.acquire("app/x", a.id, wait=0),
        "app/x/y": await coordinator.acquire("app/x/y", b.id, wait=0),  # a lock below another: its own queue
        "app/z": await coordinator.acquire("app/z", b.id, wait=0),
        "other/w": await coordinator.acquire("other/w", a.id, wait=0),
    }
    waiting = asyncio.create_task(coordinator.acquire("app/x", b.id, wait=20))
    await queued(coordinator, "app/x", 2)
    assert await coordinator.holdings("app/") == [held["app/x"], held["app/x/y"], held["app/z"]]
    assert await coordinator.holdings("other/") == [held["other/w"]]
    assert await coordinator.holdings("") == [held[k] for k in sorted(held)]
    assert await coordinator.holdings("none/") == []
    assert await coordinator.holder("app/x") == held["app/x"]
    assert await coordinator.holder("app/x/y") == held["app/x/y"]
    assert await coordinator.holder("app") is None
    queue = await coordinator.queue("app/x")
    assert [(e.lease, e.owner) for e in queue] == [(a.id, "app/a#1"), (b.id, "app/b#1")]
    assert queue[1].token > queue[0].token
    assert await coordinator.release("app/x", a.id)
    got = await asyncio.wait_for(waiting, 5)
    assert got == queue[1]  # the waiter holds with the token it queued with
    assert await coordinator.holdings("app/x") == [got, held["app/x/y"]]


async def test_revoke_drops_every_holding_and_queue_entry(coordinator: Coordinator) -> None:
    a = await coordinator.grant("o/a", 10)
    b = await coordinator.grant("o/b", 10)
    await coordinator.acquire("p/1", a.id, wait=0)
    await coordinator.acquire("p/2", a.id, wait=0)
    b3 = await coordinator.acquire("p/3", b.id, wait=0)
    waiting = asyncio.create_task(coordinator.acquire("p/3", a.id, wait=20))
    await queued(coordinator, "p/3", 2)
    await coordinator.revoke(a.id)
    with pytest.raises(LeaseGone):
        await asyncio.wait_for(waiting, 5)
    assert await coordinator.holdings("p/") == [b3]
    assert await coordinator.queue("p/3") == [b3]
    assert await coordinator.leases("") == [b]
    with pytest.raises(LeaseGone):
        await coordinator.acquire("p/1", a.id, wait=0)
    await coordinator.revoke(a.id)  # again: nothing happens


async def test_nothing_is_left_behind_after_teardown(coordinator: Coordinator) -> None:
    leases = [await coordinator.grant(f"app/r{i}#1", 10) for i in range(4)]
    await coordinator.acquire("app/a", leases[0].id, wait=0)
    await coordinator.acquire("app/b", leases[1].id, wait=0)
    assert await coordinator.acquire("app/a", leases[2].id, wait=0.05) is None
    waiting = asyncio.create_task(coordinator.acquire("app/b", leases[3].id, wait=20))
    await queued(coordinator, "app/b", 2)
    await coordinator.release("app/a", leases[0].id)
    for lease in reversed(leases):  # the waiter's first: it must not become the holder meanwhile
        await coordinator.revoke(lease.id)
    with pytest.raises(LeaseGone):
        await asyncio.wait_for(waiting, 5)
    assert await coordinator.leases("") == []
    assert await coordinator.holdings("") == []
    assert await coordinator.queue("app/a") == [] and await coordinator.queue("app/b") == []


async def test_invalid_names_ttls_and_waits_are_refused_clearly(coordinator: Coordinator) -> None:
    lease = await coordinator.grant("o/a", 10)
    bad_names = {
        "": "must not be empty",
        "/abs": "has an empty part",
        "a//b": "has an empty part",
        "a/b/": "has an empty part",
        "a b": "contains ' '",
        "café": "contains 'é'",
        "x" * 201: "201 characters long; the limit is 200",
    }
    for name, message in bad_names.items():
        with pytest.raises(ValueError, match=message):
            await coordinator.acquire(name, lease.id, wait=0)
        with pytest.raises(ValueError, match=message):
            await coordinator.release(name, lease.id)
        with pytest.raises(ValueError, match=message):
            await coordinator.holder(name)
    for ttl in (0, 0.5, 300.5, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="between 1 and 300 seconds"):
            await coordinator.grant("o/a", ttl)
    for not_a_number in (True, "10", None):
        with pytest.raises(ValueError, match="must be a number of seconds"):
            await coordinator.grant("o/a", not_a_number)  # type: ignore[arg-type]
    for wait in (-1, math.nan, math.inf):
        with pytest.raises(ValueError, match="wait"):
            await coordinator.acquire("l", lease.id, wait=wait)
    with pytest.raises(ValueError, match="owner"):
        await coordinator.grant("", 10)
    assert await coordinator.holdings("") == [] and await coordinator.leases("") == [lease]
