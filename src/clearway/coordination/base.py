"""The one interface every coordination backend implements (embedded, etcd; Kubernetes later).

The control plane holds one `Coordinator` and serves it to replicas on the
replica channel; app code never sees it. All names here are *full* names: the
control plane prefixes lock names with ``<app>/`` and owners are
``<app>/<replica>#<incarnation>``.

The contract, identical on every backend (one conformance suite checks it,
``tests/coordination``):

* A lease lives ``ttl`` seconds (as granted: `Lease.ttl`) after its grant or
  its last successful `keepalive`. The backend never expires it earlier than
  that, measured from when the renewal *arrived*; it may expire it a little
  later (etcd checks every 500 ms; the embedded reaper runs on the event loop).
* A lock has one FIFO queue of entries, one per lease; the holder is the oldest
  live entry. An entry is created by `acquire`, removed by `release`, by an
  acquire whose ``wait`` ends, or with its lease (expiry or `revoke`), atomically
  with the lease: a dead lease never holds and never gets a lock (unlike etcd's
  own lock service, etcd issue 11456).
* The fencing token of a holding is the creation revision of its entry: a
  global counter, so tokens strictly increase across successive holders of a
  lock and never repeat, across restarts of the control plane and of etcd.
* `acquire` again with the same lease is idempotent (same holding, same token);
  an acquire whose entry is released while it waits returns None; one whose
  lease ends while it waits raises `LeaseGone`.
* Every call is bounded in time: a backend that does not answer raises
  `CoordinationUnavailable`, never hangs.
"""

from __future__ import annotations

from typing import Protocol

from clearway.coordination.model import Holding, Lease

__all__ = ["Coordinator"]


class Coordinator(Protocol):
    #: "embedded" | "etcd"
    kind: str

    async def start(self) -> None:
        """Open the backend (CoordinationUnavailable when it does not answer)."""
        ...

    async def close(self) -> None:
        """Stop: pending acquires raise CoordinationUnavailable; leases stay (they expire on their own)."""
        ...

    async def grant(self, owner: str, ttl: float) -> Lease:
        """A new lease of ``owner`` living ``ttl`` seconds (1 to 300; ValueError otherwise)."""
        ...

    async def keepalive(self, lease: str) -> float:
        """Renew ``lease``: it lives its ttl from now on. The ttl now left; LeaseGone if it is gone."""
        ...

    async def revoke(self, lease: str) -> None:
        """End ``lease`` now with every queue entry and holding of it. Idempotent."""
        ...

    async def acquire(self, lock: str, lease: str, *, wait: float, keep_queued: bool = False) -> Holding | None:
        """Queue for ``lock`` (FIFO by arrival) and wait up to ``wait`` s for it.

        The Holding when held (again with the same lease: the same Holding); None
        when not held within ``wait`` or when the entry was released while waiting.
        Not held within ``wait``, the entry is removed — unless ``keep_queued``: a
        client that long-polls keeps its place in the queue between polls (the
        lease still bounds it: when the client goes, its lease and entry go).
        LeaseGone if the lease is gone, or goes while queued: a dead waiter is
        never granted the lock.
        """
        ...

    async def release(self, lock: str, lease: str) -> bool:
        """Remove ``lease``'s entry of ``lock``: True if it held or was queued for it."""
        ...

    async def holder(self, lock: str) -> Holding | None:
        """Who holds ``lock`` now."""
        ...

    async def holdings(self, prefix: str) -> list[Holding]:
        """The holders of every lock whose name starts with ``prefix``, sorted by lock name."""
        ...

    async def queue(self, lock: str) -> list[Holding]:
        """Every entry of ``lock`` in FIFO order: the holder first, then the waiters.

        (An addition to the contract: `clearway status` shows waiters, and tests wait
        on it. A waiter's ``token`` is the one it will hold with.)
        """
        ...

    async def leases(self, owner_prefix: str) -> list[Lease]:
        """The live leases whose owner starts with ``owner_prefix``, sorted by owner then id."""
        ...
