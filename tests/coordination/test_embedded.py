"""What only the embedded backend has: a file that outlives the control plane."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from clearway.coordination import CoordinationUnavailable, EmbeddedCoordinator, LeaseGone

pytestmark = pytest.mark.timeout(30)


async def test_a_restart_within_the_ttl_keeps_the_holder_and_its_token(tmp_path: Path) -> None:
    path = tmp_path / "coordination.db"
    before = EmbeddedCoordinator(path)
    await before.start()
    lease = await before.grant("app/r#1", 10)
    held = await before.acquire("app/l", lease.id, wait=0)
    await before.close()

    after = EmbeddedCoordinator(path)
    await after.start()
    try:
        assert await after.holder("app/l") == held
        assert await after.leases("") == [lease]
        assert await after.keepalive(lease.id) == 10
        assert await after.acquire("app/l", lease.id, wait=0) == held  # the holder goes on, same token
        other = await after.grant("app/r#2", 10)
        assert await after.acquire("app/l", other.id, wait=0) is None
    finally:
        await after.close()


async def test_after_the_ttl_a_restarted_store_has_no_lease_and_tokens_go_on_growing(tmp_path: Path) -> None:
    path = tmp_path / "coordination.db"
    before = EmbeddedCoordinator(path)
    await before.start()
    lease = await before.grant("app/r#1", 5)
    held = await before.acquire("app/l", lease.id, wait=0)
    assert held is not None
    await before.close()

    # The control plane comes back 6 s later (its clock says so: no need to wait for it).
    after = EmbeddedCoordinator(path, clock=lambda: time.time() + 6)
    await after.start()
    try:
        assert await after.leases("") == []
        assert await after.holder("app/l") is None
        with pytest.raises(LeaseGone):
            await after.keepalive(lease.id)
        fresh = await after.grant("app/r#2", 5)
        again = await after.acquire("app/l", fresh.id, wait=0)
        assert again is not None and again.token > held.token  # the counter survived its rows
    finally:
        await after.close()
    with sqlite3.connect(path) as db:  # nothing of the expired lease is left in the file
        assert db.execute("SELECT COUNT(*) FROM leases WHERE id = ?", (lease.id,)).fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM entries WHERE lease = ?", (lease.id,)).fetchone() == (0,)


async def test_close_ends_waiting_acquires_and_later_calls(tmp_path: Path) -> None:
    coordinator = EmbeddedCoordinator(tmp_path / "coordination.db")
    await coordinator.start()
    a = await coordinator.grant("o/a", 10)
    b = await coordinator.grant("o/b", 10)
    await coordinator.acquire("l", a.id, wait=0)
    waiting = asyncio.create_task(coordinator.acquire("l", b.id, wait=20))

    async def queued() -> None:
        while len(await coordinator.queue("l")) < 2:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(queued(), 5)
    await coordinator.close()
    with pytest.raises(CoordinationUnavailable, match="closed"):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(CoordinationUnavailable, match="not running"):
        await coordinator.grant("o/c", 10)


async def test_an_unopenable_store_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "coordination.db").mkdir()  # a directory where the file should be
    with pytest.raises(CoordinationUnavailable, match="cannot open the coordination store"):
        await EmbeddedCoordinator(tmp_path / "coordination.db").start()
