"""Both coordination backends behind one fixture: ``coordinator`` is parametrized.

* embedded: an `EmbeddedCoordinator` on a fresh SQLite file in ``tmp_path``;
* etcd: an `EtcdCoordinator` on one real etcd server started once per session,
  each test under its own key prefix (so each sees an empty store).

After each test every lease still alive is revoked, so nothing leaks into the
next one; the tests that check that nothing is left behind check it themselves.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from clearway.coordination import Coordinator, EmbeddedCoordinator, Lease, LeaseGone
from clearway.coordination.etcd import EtcdCoordinator
from tests.coordination.etcd_server import EtcdServer, etcd_binary

BACKENDS = ["embedded", "etcd"]
_prefixes = itertools.count()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the whole session."""
    yield from _etcd(tmp_path_factory.mktemp("etcd"))


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """An etcd of the test's own, for tests that stop or restart it."""
    yield from _etcd(tmp_path)


def _etcd(parent: Path) -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.fail("etcd is not installed: run scripts/system-packages (it installs Debian's etcd-server)")
    server = EtcdServer(parent / "data")
    server.start()
    try:
        yield server
    finally:
        server.close()


def make_coordinator(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Coordinator:
    if kind == "embedded":
        return EmbeddedCoordinator(tmp_path / "coordination.db")
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return EtcdCoordinator(server.endpoint, prefix=f"/clearway-test/{next(_prefixes)}", timeout=5)


@pytest.fixture(params=BACKENDS)
async def coordinator(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Coordinator]:
    coordinator = make_coordinator(request.param, request, tmp_path)
    await coordinator.start()
    try:
        yield coordinator
    finally:
        for lease in await coordinator.leases(""):
            await coordinator.revoke(lease.id)
        await coordinator.close()


# -- helpers -------------------------------------------------------------------------------

async def wait_until(condition: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Poll ``condition`` (briefly) until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


async def queued(coordinator: Coordinator, lock: str, count: int) -> None:
    """Wait until ``lock`` has ``count`` entries (holder included)."""

    async def enough() -> bool:
        return len(await coordinator.queue(lock)) == count

    await wait_until(enough, within=5, what=f"{count} entries in the queue of {lock}")


def renew(coordinator: Coordinator, lease: Lease, on_sent: Callable[[float], None] | None = None) -> asyncio.Task[None]:
    """Keep ``lease`` alive in the background (a renewal every ttl/4) until cancelled or gone.

    ``on_sent(t)`` is told the send time of every *successful* renewal.
    """

    async def loop() -> None:
        while True:
            sent = time.monotonic()
            try:
                await coordinator.keepalive(lease.id)
            except LeaseGone:
                return
            if on_sent is not None:
                on_sent(sent)
            await asyncio.sleep(lease.ttl / 4)

    return asyncio.get_running_loop().create_task(loop(), name=f"renew {lease.id}")


async def stop(*tasks: asyncio.Task[object]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
