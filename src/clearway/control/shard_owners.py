"""Shard owners for key-affinity routing: the coordinator's shard locks -> the data plane.

A sharded service (``@app.service(shards=N, affinity=...)``) has its replicas
own shards the way a sharded worker's do (`clearway.sdk.sharding`): replica R
owns shard s while it holds lock ``<app>/shards/<service>/shard/<s>``. This
loop reads those holders every ``interval`` (0.5 s) for every sharded service
with affinity of the running revisions, and when a service's map changes
hands it to the backend (`Backend.set_shard_owners`), which republishes the
routes with each owner's endpoint; the gateway then sends a request with a
key to the replica owning its shard.

Only holders that are the replica process running now count (the incarnation
in the lock's owner matches the backend's): a replica restarted under the
same id, whose dead predecessor's lease has not expired yet, owns nothing
until it takes the lock itself. When the coordination backend does not answer,
the last map stays (the routes never fail on it: a key whose owner is not
ready goes to any replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from clearway.backends.base import Backend
from clearway.coordination import CoordinationUnavailable, Coordinator, Holding

log = logging.getLogger("clearway.control")

__all__ = ["POLL_INTERVAL", "ShardOwners", "owners_from"]

#: How often the shard locks are read.
POLL_INTERVAL = 0.5


def owners_from(
    app: str, service: str, holdings: Iterable[Holding], incarnation: Callable[[str], str | None]
) -> dict[int, str]:
    """Shard -> replica id, from the holders of ``<app>/shards/<service>/shard/*``.

    ``incarnation(replica)`` is the incarnation of the process running as that
    replica now (None: none runs); a holding by another one is left out."""
    prefix = f"{app}/shards/{service}/shard/"
    owners: dict[int, str] = {}
    for holding in holdings:
        index = holding.lock.removeprefix(prefix)
        if not holding.lock.startswith(prefix) or not (index.isascii() and index.isdigit()):
            continue
        replica, _, process = holding.owner.removeprefix(f"{app}/").partition("#")
        if process and incarnation(replica) == process:
            owners[int(index)] = replica
    return owners


class ShardOwners:
    """The supervised loop in the module docstring.

    ``services()`` names the sharded services with affinity to follow, as
    (app, service) pairs (the reconciler's `Reconciler.sharded_services`)."""

    def __init__(
        self,
        coordinator: Coordinator,
        backend: Backend,
        services: Callable[[], Iterable[tuple[str, str]]],
        *,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.coordinator = coordinator
        self.backend = backend
        self.services = services
        self.interval = interval
        #: What the backend was given last, by (app, service).
        self.owners: dict[tuple[str, str], dict[int, str]] = {}
        self._unavailable = False

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)

    async def poll_once(self) -> None:
        """Read the shard locks of every followed service; tell the backend what changed."""
        wanted = set(self.services())
        for app, service in sorted(wanted):
            try:
                holdings = await self.coordinator.holdings(f"{app}/shards/{service}/shard/")
            except CoordinationUnavailable as exc:
                if not self._unavailable:
                    log.warning("cannot read the shard owners (%s); the gateway keeps the last ones", exc)
                self._unavailable = True
                return
            owners = owners_from(app, service, holdings, self.backend.replica_incarnation)
            if owners != self.owners.get((app, service)):
                await self.backend.set_shard_owners(app, service, owners)
                self.owners[(app, service)] = owners
        if self._unavailable:
            log.info("reading the shard owners again")
            self._unavailable = False
        for app, service in sorted(set(self.owners) - wanted):
            await self.backend.set_shard_owners(app, service, {})
            del self.owners[(app, service)]
