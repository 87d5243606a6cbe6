"""The etcd backend: leases, revisions and transactions of etcd v3 (through ``aetcd``).

Layout, under a key prefix (``/clearway`` by default):

* ``<prefix>/leases/<lease-hex>`` -> ``{"owner", "ttl"}``, attached to the lease
  itself: it exists exactly while the lease lives, and `leases` lists them.
* ``<prefix>/locks/<lock>/<lease-hex>`` -> ``{"owner"}``, attached to the lease:
  the lease's queue entry for ``<lock>``, put in a transaction only if absent.
  The holder is the entry with the lowest ``create_revision``, which is also its
  fencing token: etcd's revision is a global counter, so a later entry always has
  a higher one, and successive holders' tokens strictly increase (also across
  restarts of etcd: the revision is persisted). ``<lock>`` may contain ``/``: an
  entry is recognised by having no ``/`` after its lock's prefix, so ``a`` and
  ``a/b`` are distinct queues.

**Why not etcd's lock service** (``v3lock``, `aetcd.Client.lock`): in etcd 3.4 it
grants the lock to a waiter whose lease has already expired (etcd issue 11456,
reproduced on Debian's etcd 3.4.23): a waiter there only waits for the keys
before its own to be deleted and then returns, without checking that its own key
still exists. Here, a waiter watches *two* keys, the entry just before its own
and its own, and re-reads the queue after any deletion of either; it holds the
lock only if its own entry still exists and is the oldest. Since etcd deletes a
lease's keys atomically with the lease, a waiter whose lease ended finds its
entry gone and gets `LeaseGone`, and the next live waiter becomes the holder.
Watching the predecessor (not the whole queue) wakes one waiter per release.

**TTLs.** etcd leases have whole-second TTLs: the TTL asked for is rounded *up*,
and etcd raises it to its minimum (1.5 election timeouts rounded up: 2 s with
the default 1 s election timeout). `Lease.ttl` is the TTL etcd granted: deadlines
must use it. etcd expires leases on its leader's clock, checking every 500 ms, so
a lease lives between ``ttl`` and ``ttl + 0.5`` s after its last renewal arrived.
When etcd restarts, or its leader changes, the remaining TTL of every lease is
reset to its full TTL: a restart never shortens a lease (so a holder keeps its
lock across it), it can only lengthen it.

**Availability.** Every RPC has a deadline (``timeout``, 5 s by default) and the
gRPC channel reconnects quickly (backoff capped at 1 s), so a stopped etcd gives
`CoordinationUnavailable` within the deadline, never a hang, and a restarted one
is used again within about a second. A waiting `acquire` whose watch stream
breaks raises `CoordinationUnavailable` too; its entry stays until its lease
ends, or until an acquire or release with the same lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

# The control plane starts processes (git, uv, the isolated app inspector) with fork and
# exec after gRPC is loaded. gRPC's fork support (atfork handlers that try to carry its
# threads across a fork) is not needed for fork-then-exec and has crashed the child
# before its exec (SIGSEGV; grpc/grpc#29044): turn it off, before gRPC reads it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc

from clearway.coordination.model import (
    CoordinationError,
    CoordinationUnavailable,
    Holding,
    Lease,
    LeaseGone,
    check_lock_name,
    check_owner,
    check_ttl,
    check_wait,
)

__all__ = ["EtcdCoordinator", "parse_endpoint"]

T = TypeVar("T")

_LEASE_HEX = re.compile(r"[0-9a-f]{1,16}")

#: gRPC reconnects at once and at least every second: after an etcd restart the
#: channel must not sit in a long backoff (its default grows to 2 minutes).
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}

_UNAVAILABLE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ValueError with a clear message otherwise."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port (e.g. 127.0.0.1:2379)")
    return host, int(port)


class EtcdCoordinator:
    """The `Coordinator` on an etcd v3 server at ``endpoint`` ("host:port").

    ``prefix`` is where its keys live (several platforms can share one etcd with
    different prefixes); ``timeout`` bounds every single request, in seconds.
    """

    kind = "etcd"

    def __init__(self, endpoint: str, *, prefix: str = "/clearway", timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self._host, self._port = parse_endpoint(endpoint)
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"etcd key prefix {prefix!r} must start with '/' and not end with '/'")
        if not timeout > 0:
            raise ValueError(f"etcd request timeout {timeout!r} must be > 0 seconds")
        self.prefix = prefix
        self.timeout = timeout
        self._client: Any = None
        self._closed = False

    # -- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        if self._client is not None:
            return
        self._closed = False
        self._client = aetcd.Client(
            self._host, self._port, timeout=self.timeout, options=dict(_CHANNEL_OPTIONS)
        )
        try:
            await self._rpc("connecting", self._client.get(self._key("leases")))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    # -- keys -----------------------------------------------------------------------
    def _key(self, *parts: str) -> bytes:
        return "/".join((self.prefix, *parts)).encode()

    def _lease_key(self, hexid: str) -> bytes:
        return self._key("leases", hexid)

    def _lock_prefix(self, lock: str) -> bytes:
        return self._key("locks", lock) + b"/"

    # -- leases ---------------------------------------------------------------------
    async def grant(self, owner: str, ttl: float) -> Lease:
        owner = check_owner(owner)
        ttl = check_ttl(ttl)
        client = self._running()
        granted = await self._rpc("granting a lease", client.lease(math.ceil(ttl)))
        lease_id, lease_ttl = int(granted.id), float(granted.ttl)
        hexid = f"{lease_id:x}"
        record = json.dumps({"owner": owner, "ttl": lease_ttl}).encode()
        try:
            await self._rpc("recording a lease", client.put(self._lease_key(hexid), record, lease=lease_id))
        except BaseException:
            with contextlib.suppress(Exception):
                await client.revoke_lease(lease_id)  # else it expires on its own
            raise
        return Lease(id=hexid, owner=owner, ttl=lease_ttl)

    async def keepalive(self, lease: str) -> float:
        lease_id = _lease_id(lease)
        client = self._running()
        if lease_id is None:
            raise _gone(lease)
        reply = await self._rpc("renewing a lease", client.refresh_lease(lease_id))
        if reply is None:
            raise CoordinationUnavailable(f"etcd at {self.endpoint} closed the keepalive stream without an answer")
        ttl = int(reply.TTL)
        if ttl <= 0:
            raise _gone(lease)
        return float(ttl)

    async def revoke(self, lease: str) -> None:
        lease_id = _lease_id(lease)
        client = self._running()
        if lease_id is None:
            return
        with contextlib.suppress(LeaseGone):
            await self._rpc("revoking a lease", client.revoke_lease(lease_id))

    async def leases(self, owner_prefix: str) -> list[Lease]:
        client = self._running()
        found = await self._rpc("listing leases", client.get_prefix(self._key("leases") + b"/"))
        leases = []
        for kv in found:
            record = json.loads(kv.value)
            owner = str(record["owner"])
            if owner.startswith(owner_prefix):
                hexid = bytes(kv.key).decode().rpartition("/")[2]
                leases.append(Lease(id=hexid, owner=owner, ttl=float(record["ttl"])))
        return sorted(leases, key=lambda lease: (lease.owner, lease.id))

    async def _lease_alive(self, hexid: str) -> bool:
        client = self._running()
        return await self._rpc("reading a lease", client.get(self._lease_key(hexid))) is not None

    # -- locks ----------------------------------------------------------------------
    async def acquire(self, lock: str, lease: str, *, wait: float, keep_queued: bool = False) -> Holding | None:
        lock = check_lock_name(lock)
        wait = check_wait(wait)
        lease_id = _lease_id(lease)
        client = self._running()
        if lease_id is None:
            raise _gone(lease)
        hexid = f"{lease_id:x}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        record = await self._rpc("reading a lease", client.get(self._lease_key(hexid)))
        if record is None:
            raise _gone(lease)
        owner = str(json.loads(record.value)["owner"])
        key = self._lock_prefix(lock) + hexid.encode()
        txn = client.transactions
        # Create the entry only if absent: acquiring again keeps its create_revision (its token).
        # A put with a lease that is gone fails with NOT_FOUND -> LeaseGone.
        await self._rpc(
            "queueing for a lock",
            client.transaction(
                compare=[txn.create(key) == 0],
                success=[txn.put(key, json.dumps({"owner": owner}).encode(), lease=lease_id)],
                failure=[],
            ),
        )
        try:
            while True:
                entries, revision = await self._entries(lock)
                position = next((i for i, (k, _, _) in enumerate(entries) if k == key), None)
                if position is None:
                    # Our entry is gone: with the lease (LeaseGone), or released while we waited.
                    if await self._lease_alive(hexid):
                        return None
                    raise _gone(lease)
                if position == 0:
                    return Holding(lock=lock, token=entries[0][1], lease=hexid, owner=owner)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Wait for a deletion of the entry just before ours, or of ours, after what we read.
                await self._wait_for_delete([entries[position - 1][0], key], revision + 1, remaining)
        except asyncio.CancelledError:
            if not keep_queued:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout):
                        await client.delete(key)
            raise
        # Not ours within `wait`: leave the queue, so no one waits behind a waiter that is gone
        # (unless it polls again: then its lease keeps its place).
        if not keep_queued:
            await self._rpc("leaving a lock queue", client.delete(key))
        return None

    async def release(self, lock: str, lease: str) -> bool:
        lock = check_lock_name(lock)
        lease_id = _lease_id(lease)
        client = self._running()
        if lease_id is None:
            return False
        key = self._lock_prefix(lock) + f"{lease_id:x}".encode()
        return await self._rpc("releasing a lock", client.delete(key)) is not None

    async def holder(self, lock: str) -> Holding | None:
        entries = await self.queue(lock)
        return entries[0] if entries else None

    async def queue(self, lock: str) -> list[Holding]:
        lock = check_lock_name(lock)
        entries, _ = await self._entries(lock)
        return [
            Holding(lock=lock, token=token, lease=bytes(key).decode().rpartition("/")[2], owner=owner)
            for key, token, owner in entries
        ]

    async def holdings(self, prefix: str) -> list[Holding]:
        client = self._running()
        locks = self._key("locks") + b"/"
        found = await self._rpc(
            "listing locks", client.get_prefix(locks + prefix.encode(), sort_order="ascend", sort_target="create")
        )
        holders: dict[str, Holding] = {}
        for kv in found:
            lock, _, hexid = bytes(kv.key)[len(locks) :].decode().rpartition("/")
            if lock not in holders:  # sorted by creation: the first entry of a lock is its holder
                owner = str(json.loads(kv.value)["owner"])
                holders[lock] = Holding(lock=lock, token=int(kv.create_revision), lease=hexid, owner=owner)
        return [holders[lock] for lock in sorted(holders)]

    async def _entries(self, lock: str) -> tuple[list[tuple[bytes, int, str]], int]:
        """The entries of ``lock`` oldest first, as (key, create_revision, owner), and the revision read."""
        client = self._running()
        prefix = self._lock_prefix(lock)
        found = await self._rpc(
            "reading a lock queue", client.get_prefix(prefix, sort_order="ascend", sort_target="create")
        )
        entries = [
            (bytes(kv.key), int(kv.create_revision), str(json.loads(kv.value)["owner"]))
            for kv in found
            if b"/" not in bytes(kv.key)[len(prefix) :]  # not an entry of a lock below this one
        ]
        return entries, int(found.header.revision)

    async def _wait_for_delete(self, keys: list[bytes], start_revision: int, within: float) -> None:
        """Return when one of ``keys`` is deleted at or after ``start_revision``, or after ``within`` s."""
        client = self._running()
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        try:
            async with asyncio.timeout(within):
                for key in keys:
                    create = rpc.WatchCreateRequest(
                        key=key, start_revision=start_revision, filters=[rpc.WatchCreateRequest.FilterType.NOPUT]
                    )
                    await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise CoordinationUnavailable(f"etcd at {self.endpoint} ended a watch")
                    if response.events or response.canceled or response.compact_revision:
                        return  # the caller re-reads the queue in every case
        except TimeoutError:
            return
        except grpc.aio.AioRpcError as exc:
            self._translate(exc, "watching a lock queue")
        finally:
            call.cancel()

    # -- errors ---------------------------------------------------------------------
    def _running(self) -> Any:
        if self._closed or self._client is None:
            raise CoordinationUnavailable("the etcd coordinator is not running (closed or not started)")
        return self._client

    async def _rpc(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, TimeoutError) as exc:
            self._translate(exc, what)

    def _translate(self, exc: BaseException, what: str) -> NoReturn:
        cause = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
        code = cause.code() if isinstance(cause, grpc.aio.AioRpcError) else None
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in str(exc):
            raise LeaseGone(f"the lease is gone (expired, revoked or never granted): {exc}") from exc
        if (
            code in _UNAVAILABLE_CODES
            or isinstance(
                exc,
                aetcd.exceptions.ConnectionFailedError
                | aetcd.exceptions.ConnectionTimeoutError
                | aetcd.exceptions.WatchTimeoutError
                | TimeoutError,
            )
            or self._closed
        ):
            raise CoordinationUnavailable(f"etcd at {self.endpoint} does not answer ({what}): {exc}") from exc
        raise CoordinationError(f"etcd refused {what}: {exc}") from exc


def _lease_id(lease: str) -> int | None:
    """The etcd lease id of ``lease`` (hex), None when it cannot be one."""
    if not isinstance(lease, str) or not _LEASE_HEX.fullmatch(lease):
        return None
    value = int(lease, 16)
    # Only the canonical spelling: "0a" and "a" must not name two queue entries of one lease.
    return value if 0 < value < 2**63 and f"{value:x}" == lease else None


def _gone(lease: str) -> LeaseGone:
    return LeaseGone(f"lease {lease} is gone (expired, revoked or never granted): take a new lease")
