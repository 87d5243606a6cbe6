"""What only the etcd backend has: a server that can restart, stop, or hold leftovers."""

from __future__ import annotations

import asyncio
import time

import aetcd
import pytest

from clearway.coordination import CoordinationUnavailable, LeaseGone
from clearway.coordination.etcd import EtcdCoordinator
from tests.coordination.conftest import queued, wait_until
from tests.coordination.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(30)


async def test_an_etcd_restart_keeps_the_holder_and_its_token(private_etcd: EtcdServer) -> None:
    coordinator = EtcdCoordinator(private_etcd.endpoint, timeout=2)
    await coordinator.start()
    try:
        lease = await coordinator.grant("app/r#1", 10)
        held = await coordinator.acquire("app/l", lease.id, wait=0)
        assert held is not None
        private_etcd.stop()
        private_etcd.start()

        async def renewed() -> bool:
            try:
                return await coordinator.keepalive(lease.id) == lease.ttl
            except CoordinationUnavailable:
                return False

        await wait_until(renewed, within=10, what="the same client renews through the restarted etcd")
        assert await coordinator.holder("app/l") == held
        assert await coordinator.leases("") == [lease]
        other = await coordinator.grant("app/r#2", 10)
        assert await coordinator.acquire("app/l", other.id, wait=0) is None
        assert await coordinator.release("app/l", lease.id)
        after = await coordinator.acquire("app/l", other.id, wait=0)
        assert after is not None and after.token > held.token
    finally:
        await coordinator.close()


async def test_a_stopped_etcd_is_unavailable_within_bounded_time(private_etcd: EtcdServer) -> None:
    coordinator = EtcdCoordinator(private_etcd.endpoint, timeout=1)
    await coordinator.start()
    try:
        a = await coordinator.grant("o/a", 10)
        b = await coordinator.grant("o/b", 10)
        await coordinator.acquire("l", a.id, wait=0)
        waiting = asyncio.create_task(coordinator.acquire("l", b.id, wait=25))
        await queued(coordinator, "l", 2)
        private_etcd.stop()
        started = time.monotonic()
        with pytest.raises(CoordinationUnavailable, match="does not answer"):
            await asyncio.wait_for(waiting, 5)  # the waiter's watch breaks: it is told, not left hanging
        calls = [
            coordinator.grant("o/c", 10),
            coordinator.keepalive(a.id),
            coordinator.revoke(a.id),
            coordinator.acquire("l", a.id, wait=5),
            coordinator.release("l", a.id),
            coordinator.holder("l"),
            coordinator.queue("l"),
            coordinator.holdings(""),
            coordinator.leases(""),
        ]
        for call in calls:
            before = time.monotonic()
            with pytest.raises(CoordinationUnavailable):
                await asyncio.wait_for(call, 5)
            assert time.monotonic() - before < 2.5  # within the request timeout (1 s), with room
        assert time.monotonic() - started < 15
    finally:
        await coordinator.close()


async def test_start_against_no_etcd_is_unavailable() -> None:
    coordinator = EtcdCoordinator(f"127.0.0.1:{free_port()}", timeout=1)
    started = time.monotonic()
    with pytest.raises(CoordinationUnavailable, match="does not answer"):
        await coordinator.start()
    assert time.monotonic() - started < 3
    with pytest.raises(CoordinationUnavailable, match="not running"):
        await coordinator.grant("o/a", 10)


async def test_etcd_holds_no_key_and_no_lease_of_ours_after_teardown(etcd_server: EtcdServer) -> None:
    prefix = "/clearway-test/teardown"
    coordinator = EtcdCoordinator(etcd_server.endpoint, prefix=prefix)
    await coordinator.start()
    leases = [await coordinator.grant(f"app/r{i}#1", 10) for i in range(3)]
    await coordinator.acquire("app/a", leases[0].id, wait=0)
    await coordinator.acquire("app/a", leases[1].id, wait=0.05)
    await coordinator.acquire("app/b", leases[2].id, wait=0)
    await coordinator.release("app/b", leases[2].id)
    for lease in leases:
        await coordinator.revoke(lease.id)
    await coordinator.close()
    async with aetcd.Client("127.0.0.1", etcd_server.client_port, timeout=5) as raw:
        assert len(await raw.get_prefix(prefix.encode())) == 0
        for lease in leases:
            assert (await raw.get_lease_info(int(lease.id, 16), keys=False)).TTL == -1


async def test_a_lease_id_is_canonical_hex(etcd_server: EtcdServer) -> None:
    coordinator = EtcdCoordinator(etcd_server.endpoint, prefix="/clearway-test/hex")
    await coordinator.start()
    try:
        lease = await coordinator.grant("o/a", 10)
        assert lease.id == f"{int(lease.id, 16):x}"
        for other_spelling in (lease.id.upper(), "0" + lease.id, f"0x{lease.id}"):
            with pytest.raises(LeaseGone):
                await coordinator.acquire("l", other_spelling, wait=0)
        await coordinator.revoke(lease.id)
    finally:
        await coordinator.close()


def test_bad_endpoints_and_prefixes_are_refused() -> None:
    for endpoint in ("", "localhost", "host:", ":2379", "host:port", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="is not host:port"):
            EtcdCoordinator(endpoint)
    for prefix in ("clearway", "/clearway/", ""):
        with pytest.raises(ValueError, match="prefix"):
            EtcdCoordinator("127.0.0.1:2379", prefix=prefix)
