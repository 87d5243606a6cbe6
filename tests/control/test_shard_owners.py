"""The shard owners of sharded services, from the coordinator's shard locks to the backend
(`clearway.control.shard_owners`), on a real embedded coordinator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clearway.control.shard_owners import ShardOwners
from clearway.coordination import EmbeddedCoordinator
from tests.control.fake_backend import FakeBackend

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[EmbeddedCoordinator]:
    coordinator = EmbeddedCoordinator(tmp_path / "coordination.db")
    await coordinator.start()
    try:
        yield coordinator
    finally:
        await coordinator.close()


async def own(coordinator: EmbeddedCoordinator, replica: str, incarnation: str, *shards: int, app: str = "shop") -> str:
    lease = await coordinator.grant(f"{app}/{replica}#{incarnation}", 10)
    for shard in shards:
        assert await coordinator.acquire(f"{app}/shards/api/shard/{shard}", lease.id, wait=0) is not None
    return lease.id


async def test_the_backend_gets_each_services_owners_when_they_change(coordinator: EmbeddedCoordinator) -> None:
    backend = FakeBackend(incarnations={"shop-1.api.0": "a", "shop-1.api.1": "b", "shop-2.api.0": "c"})
    services = {("shop", "api")}
    owners = ShardOwners(coordinator, backend, lambda: services)
    first = await own(coordinator, "shop-1.api.0", "a", 0, 2)
    await own(coordinator, "shop-1.api.1", "b", 1)
    await own(coordinator, "shop-2.api.0", "c", 3, app="other")  # another app's lock: not this service's
    # A holder that is not the process running as that replica now (a dead predecessor whose
    # lease has not expired yet) owns nothing.
    await own(coordinator, "shop-2.api.0", "old", 4)
    lease = await coordinator.grant("shop/shop-1.api.0#a", 10)
    await coordinator.acquire("shop/shards/api/members/shop-1.api.0", lease.id, wait=0)  # a member lock

    await owners.poll_once()
    assert backend.shard_owners == {("shop", "api"): {0: "shop-1.api.0", 1: "shop-1.api.1", 2: "shop-1.api.0"}}

    # A graceful leave (the lease revoked) drops its shards; nothing else is sent while nothing changes.
    await coordinator.revoke(first)
    await owners.poll_once()
    assert backend.shard_owners[("shop", "api")] == {1: "shop-1.api.1"}
    backend.shard_owners.clear()
    await owners.poll_once()
    assert backend.shard_owners == {}

    # A service no longer running gets an empty map, once.
    services.clear()
    await owners.poll_once()
    assert backend.shard_owners == {("shop", "api"): {}}
    assert owners.owners == {}

