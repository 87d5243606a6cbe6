"""The control plane's cache of lease owners: bounded by the leases' lives."""

from __future__ import annotations

from clearway.control.coordination_api import LeaseOwners


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_owner_is_known_while_its_lease_can_live_and_renewal_extends_it() -> None:
    clock = Clock()
    owners = LeaseOwners(clock)
    owners.remember("l1", "shop/r1#1", ttl=10)
    clock.now += 9
    assert owners.owner("l1") == "shop/r1#1"
    owners.remember("l1", "shop/r1#1", ttl=10)  # a keepalive
    clock.now += 9
    assert owners.owner("l1") == "shop/r1#1"
    clock.now += 1
    assert owners.owner("l1") is None  # run out: a miss, and the backend is asked


def test_entries_of_leases_nobody_renews_are_swept_so_the_cache_does_not_grow() -> None:
    clock = Clock()
    owners = LeaseOwners(clock)
    for i in range(1000):  # replicas killed: their leases are never revoked through here
        owners.remember(f"dead{i}", f"shop/r{i}#1", ttl=5)
    assert len(owners) == 1000
    clock.now += 6
    owners.remember("live", "shop/r0#2", ttl=5)
    assert len(owners) == 1
    assert owners.owner("live") == "shop/r0#2"


def test_forget_drops_an_entry_at_once() -> None:
    owners = LeaseOwners(Clock())
    owners.remember("l1", "shop/r1#1", ttl=10)
    owners.forget("l1")
    owners.forget("l1")  # twice is fine
    assert owners.owner("l1") is None
