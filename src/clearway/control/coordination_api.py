"""The coordination routes: leases and locks for replicas, on the replica channel.

Replicas reach the platform's `Coordinator` (embedded or etcd, chosen with
``clearway up --coordination``) only through these routes, with their
replica token, never directly: so the backend needs no credentials in app
environments, and the names are the app's own. Every lock name is
namespaced here as ``<app>/<name>``, and every lease is owned by
``<app>/<replica>#<incarnation>``: a replica can renew, revoke and use only
the leases it was granted, in the process it was granted to (the token of a
stopped process is already refused by ``replica_identity``).

    POST   /v1/replica/leases                {"ttl"}            -> {"id", "ttl"}
    POST   /v1/replica/leases/{id}/keepalive                    -> {"ttl"}    404: gone
    DELETE /v1/replica/leases/{id}                              -> {"revoked": true}
    POST   /v1/replica/locks/{name}          {"lease", "wait"}  -> {"lock", "token"}
                                                                   409: not had within wait
    DELETE /v1/replica/locks/{name}?lease=                      -> {"released": bool}
    GET    /v1/replica/locks/{name}                             -> {"lock", "holder"}
    GET    /v1/replica/locks?prefix=P                           -> {"holders": [{"lock", "token",
                                                                   "replica", "incarnation"}]}
    GET    /v1/apps/{app}/locks          (operator)             -> [{"lock", "token", "replica"}]

An acquire is a long poll (``wait`` up to 60 s). The SDK (`clearway.sdk.coordination`)
loops over it, renewing its lease between polls.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, Field

from clearway.control.credentials import ReplicaIdentity
from clearway.coordination import (
    CoordinationUnavailable,
    Coordinator,
    Holding,
    LeaseGone,
    check_lock_name,
)
from clearway.exceptions import APIError

__all__ = ["coordination_api"]

#: The longest single wait of an acquire (the SDK polls again).
MAX_WAIT = 60.0


class LeaseRequest(BaseModel):
    ttl: float = Field(default=10.0, ge=1, le=300, description="Seconds the lease lives without a renewal.")


class AcquireRequest(BaseModel):
    lease: str = Field(min_length=1, max_length=100)
    wait: float = Field(default=0.0, ge=0, le=MAX_WAIT, description="Seconds to wait for the lock.")


class LeaseOwners:
    """Which replica process owns each lease granted through this control plane, so the
    checks before every lock call need no backend round trip.

    An entry lives as long as its lease could: the lease's TTL from its grant or last
    renewal. A lease whose replica was killed is never revoked or renewed here again,
    so without that bound its entry would stay for the life of the control plane. An
    entry that has run out is only a cache miss: `coordination_api` then asks the
    backend, which is the authority either way.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[str, float]] = {}  # lease -> (owner, expires at)
        self._next_sweep = 0.0

    def remember(self, lease: str, owner: str, ttl: float) -> None:
        now = self._clock()
        self._entries[lease] = (owner, now + ttl)
        if now >= self._next_sweep:  # at most once a second: O(entries) each time
            self._entries = {key: entry for key, entry in self._entries.items() if entry[1] > now}
            self._next_sweep = now + 1.0

    def owner(self, lease: str) -> str | None:
        entry = self._entries.get(lease)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def forget(self, lease: str) -> None:
        self._entries.pop(lease, None)

    def __len__(self) -> int:
        return len(self._entries)


def owner_of(identity: ReplicaIdentity) -> str:
    return f"{identity.app}/{identity.replica}#{identity.incarnation}"


def holder_view(app: str, holding: Holding) -> dict[str, Any]:
    """What a holding looks like from the app: its own name, the replica, the token."""
    owner = holding.owner.removeprefix(f"{app}/")
    replica, _, incarnation = owner.partition("#")
    return {
        "lock": holding.lock.removeprefix(f"{app}/"),
        "token": holding.token,
        "replica": replica,
        "incarnation": incarnation or None,
    }


async def app_holdings(coordinator: Coordinator, app: str) -> list[dict[str, Any]]:
    """Every lock of ``app`` held now; [] when the backend does not answer (a status view)."""
    try:
        holdings = await coordinator.holdings(f"{app}/")
    except CoordinationUnavailable:
        return []
    return [holder_view(app, h) for h in sorted(holdings, key=lambda h: h.lock)]


def coordination_api(
    api: FastAPI,
    *,
    coordinator: Coordinator,
    auth: list[Any],
    need_app: Callable[[str], None],
    replica_identity: Callable[[Request], Awaitable[ReplicaIdentity]],
) -> None:
    """Register the routes in the module docstring on ``api``."""
    owners = LeaseOwners()

    def lock_name(identity: ReplicaIdentity, name: str) -> str:
        try:
            check_lock_name(name)
        except ValueError as exc:
            raise APIError(422, str(exc)) from None
        return f"{identity.app}/{name}"

    async def own_lease(identity: ReplicaIdentity, lease: str) -> str:
        owner = owner_of(identity)
        known = owners.owner(lease)
        if known is None:
            found = next((found for found in await coordinator.leases(owner) if found.id == lease), None)
            if found is not None:
                owners.remember(lease, owner, found.ttl)
                known = owner
        if known != owner:
            raise APIError(
                404,
                f"lease {lease} is not a live lease of this replica process (expired, revoked, or "
                "another's): take a new one",
            )
        return lease

    def unavailable(exc: CoordinationUnavailable) -> APIError:
        return APIError(503, f"the coordination backend ({coordinator.kind}) does not answer: {exc}; retry shortly")

    replica = Depends(replica_identity)

    @api.post("/v1/replica/leases", tags=["coordination"])
    async def grant(body: LeaseRequest, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """A lease for this replica process, alive for ``ttl`` seconds unless renewed."""
        try:
            lease = await coordinator.grant(owner_of(identity), body.ttl)
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        owners.remember(lease.id, lease.owner, lease.ttl)
        return {"id": lease.id, "ttl": lease.ttl}

    @api.post("/v1/replica/leases/{lease}/keepalive", tags=["coordination"])
    async def keepalive(lease: str, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """Renew a lease: it lives ``ttl`` seconds from now. 404 when it is already gone."""
        owner = owner_of(identity)
        await own_lease(identity, lease)
        try:
            ttl = await coordinator.keepalive(lease)
        except LeaseGone as exc:
            owners.forget(lease)
            raise APIError(404, f"lease {lease} is gone: {exc}") from None
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        owners.remember(lease, owner, ttl)
        return {"ttl": ttl}

    @api.delete("/v1/replica/leases/{lease}", tags=["coordination"])
    async def revoke(lease: str, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """End a lease now: every lock it holds or waits for is released."""
        await own_lease(identity, lease)
        try:
            await coordinator.revoke(lease)
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        owners.forget(lease)
        return {"revoked": True}

    # Before the /v1/replica/locks/{name:path} routes (routes match in order).
    @api.get("/v1/replica/locks", tags=["coordination"])
    async def holders(prefix: str, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """The holders of this app's locks whose names start with ``prefix``: a lock name,
        or one ending with '/' (``shards/consume/members/``: the members of a sharded worker)."""
        lock_name(identity, prefix.removesuffix("/"))
        try:
            holdings = await coordinator.holdings(f"{identity.app}/{prefix}")
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        return {"holders": [holder_view(identity.app, h) for h in sorted(holdings, key=lambda h: h.lock)]}

    @api.post("/v1/replica/locks/{name:path}", tags=["coordination"])
    async def acquire(name: str, body: AcquireRequest, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """Take lock ``name`` with a lease, waiting up to ``wait`` s: its fencing token, or 409."""
        full = lock_name(identity, name)
        await own_lease(identity, body.lease)
        try:
            # The SDK polls again until it has the lock or gives up (then it revokes the lease):
            # its place in the queue is kept between polls.
            holding = await coordinator.acquire(full, body.lease, wait=body.wait, keep_queued=True)
        except LeaseGone as exc:
            owners.forget(body.lease)
            raise APIError(404, f"lease {body.lease} is gone: {exc}; take a new one") from None
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        if holding is None:
            raise APIError(
                409,
                f"lock {name!r} was not free within {body.wait:g}s; the lease keeps its place in the "
                "queue: ask again, or revoke the lease to give up",
            )
        return {"lock": name, "token": holding.token}

    @api.delete("/v1/replica/locks/{name:path}", tags=["coordination"])
    async def release(name: str, lease: str, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """Release lock ``name`` held (or waited for) with ``lease``; False when it was not."""
        full = lock_name(identity, name)
        await own_lease(identity, lease)
        try:
            return {"released": await coordinator.release(full, lease)}
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None

    @api.get("/v1/replica/locks/{name:path}", tags=["coordination"])
    async def holder(name: str, identity: ReplicaIdentity = replica) -> dict[str, Any]:
        """Who holds lock ``name`` now (a singleton's leader is the holder of ``singleton/<name>``)."""
        full = lock_name(identity, name)
        try:
            holding = await coordinator.holder(full)
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        return {"lock": name, "holder": holder_view(identity.app, holding) if holding else None}

    @api.get("/v1/apps/{app}/locks", dependencies=auth, tags=["coordination"])
    async def app_locks(app: str) -> list[dict[str, Any]]:
        """Every lock of the app that is held now, with its token and holder."""
        need_app(app)
        try:
            holdings = await coordinator.holdings(f"{app}/")
        except CoordinationUnavailable as exc:
            raise unavailable(exc) from None
        return [holder_view(app, h) for h in sorted(holdings, key=lambda h: h.lock)]
