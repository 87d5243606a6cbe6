"""Coordination: leases, locks with fencing tokens (and on them, elections and shards).

The control plane holds one `Coordinator` (``clearway up --coordination
embedded|etcd://host:port``) and serves it to replicas on the replica channel;
apps use it through the SDK (``cw.Lock``, ``@app.singleton``, sharded workers)
and never see the backend. Two backends implement one contract, checked by one
conformance suite: `EmbeddedCoordinator` (SQLite held by the control plane) and
`clearway.coordination.etcd.EtcdCoordinator` (etcd v3 leases, revisions and
transactions; imported only when used, it brings in gRPC).

What is guaranteed
------------------
* **At most one holder.** The backend hands a lock to at most one live lease at
  a time, in FIFO order of arrival; a lease that has expired or been revoked
  never holds and never gets a lock, even if it was queued (etcd's own lock
  service gets this wrong: etcd issue 11456, see `clearway.coordination.etcd`).
* **Fencing tokens.** Each holding carries a token that strictly increases across
  all successive holders of a lock, across restarts of the backend. A resource
  that remembers the highest token it accepted and refuses lower ones can never
  be written by a holder whose turn is over.
* **Liveness.** A holder that stops renewing (crash, SIGKILL, partition, pause)
  loses the lock at most ``ttl`` (+ the backend's expiry granularity, 0.5 s on
  etcd) after its last renewal arrived; a graceful holder releases (or revokes)
  and the next waiter gets the lock at once.

Timing assumptions
------------------
A lease lives ``ttl`` seconds after its last renewal *arrived* at the backend,
measured on the backend's clock. A client computes its own deadline from the
moment it *sent* that renewal, on its own monotonic clock: ``sent + ttl -
margin``. Since the renewal arrives after it is sent, the client's deadline ends
before the backend can expire the lease, as long as the two clocks run at nearly
the same *rate* (the margin absorbs the drift, microseconds per second on real
machines): no synchronised clocks are needed. Use the granted ttl (`Lease.ttl`),
not the one asked for: etcd rounds up to whole seconds and has a minimum of 2 s
with its default settings. The embedded backend also assumes that the control
plane's wall clock is not stepped forward while leases are live (it persists
wall-clock expiry times so that a restart of the control plane shorter than the
TTL changes no holder); etcd assumes nothing of wall clocks.

What a paused process can and cannot do
---------------------------------------
A process paused (SIGSTOP, a GC pause, a VM migration, a swap storm) longer than
its TTL loses its lease while it cannot notice. When it resumes, it *cannot*
renew that lease (`LeaseGone`), hold or release anyone else's lock, or get a
token that is not older than its successor's. It *can* still believe for a
moment that it holds the lock, and act on that: a check of its own deadline
right before each write narrows this window but cannot close it (the pause can
fall between the check and the write). Only fencing closes it: every write
carries the token, and the resource refuses tokens lower than the highest it
has seen. Without fencing, a lock gives mutual exclusion only to processes that
are never paused longer than ``ttl - margin``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from clearway.coordination.base import Coordinator
from clearway.coordination.embedded import EmbeddedCoordinator
from clearway.coordination.model import (
    MAX_TTL,
    MIN_TTL,
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

__all__ = [
    "EMBEDDED_FILE",
    "MAX_TTL",
    "MIN_TTL",
    "CoordinationError",
    "CoordinationUnavailable",
    "Coordinator",
    "EmbeddedCoordinator",
    "Holding",
    "Lease",
    "LeaseGone",
    "check_lock_name",
    "check_owner",
    "check_ttl",
    "check_wait",
    "connect",
]

#: The file of the embedded backend, in the control plane's home.
EMBEDDED_FILE = "coordination.db"


def connect(url: str, *, home: Path) -> Coordinator:
    """The coordinator named by ``url``, not started yet (call ``start()``).

    ``embedded``: `EmbeddedCoordinator` on ``<home>/coordination.db``;
    ``etcd://host:port``: `EtcdCoordinator` on that etcd. ValueError otherwise.
    """
    if url == "embedded":
        return EmbeddedCoordinator(Path(home) / EMBEDDED_FILE)
    if url.startswith("etcd://"):
        parts = urlsplit(url)
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or not parts.hostname:
            raise ValueError(f"coordination backend {url!r} is not etcd://host:port (e.g. etcd://127.0.0.1:2379)")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            raise ValueError(f"coordination backend {url!r} names no valid port: use etcd://host:port")
        from clearway.coordination.etcd import EtcdCoordinator

        return EtcdCoordinator(parts.netloc)
    raise ValueError(
        f"unknown coordination backend {url!r}: use 'embedded' (held by the control plane) "
        "or 'etcd://host:port' (an etcd v3 server)"
    )
