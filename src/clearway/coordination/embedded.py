"""The embedded backend: leases and lock queues in a SQLite file held by the control plane.

One machine, no extra server: the control plane owns ``<home>/coordination.db``
and replicas reach it through the replica channel. Why it is built this way:

* **Persisted, wall-clock expiry.** A lease row stores ``expires_at`` in wall-clock
  seconds (``clock``, `time.time` by default), so a control-plane restart shorter
  than the TTL changes nothing: the holder keeps its lock and its token, and its
  renewals simply resume against the new process. A monotonic clock would not
  survive the restart. The price: the control plane's wall clock must not be
  *stepped* forward while leases are live (NTP slewing is fine); a step of ``s``
  seconds shortens every live lease by ``s``, which the holders' safety margin
  covers only when small.
* **Expiry never waits for the reaper.** Every operation first deletes the leases
  whose ``expires_at`` has passed, with their queue entries, in the same
  transaction as the operation itself: nothing can see, renew or hold through a
  lease that is past its time. The supervised reaper task does the same thing on
  time (it sleeps until the next expiry), only so that waiters of the freed locks
  are woken without anyone calling.
* **Tokens from a persisted global counter.** Each queue entry takes the next
  value of an ``AUTOINCREMENT`` key, which SQLite never reuses, even after the
  newest rows are deleted; the holder of a lock is its entry with the smallest
  token, so tokens strictly increase across successive holders, across restarts.
* **Wake-ups in memory.** A waiter re-reads its lock after every change of that
  lock's queue (release, expiry, revoke, a timed-out waiter leaving), signalled by
  a per-lock `asyncio.Event`; a waiter whose own entry has disappeared reports
  LeaseGone (its lease ended) or None (the entry was released while it waited).
* **Durability.** WAL with ``synchronous=NORMAL``: durable against a crash of the
  control plane (the process), not against a power loss of the machine, which can
  lose the last commits; the leases involved are then at most a TTL away from
  expiring anyway, but a lost grant can hand a lock out twice. Use etcd when the
  machine itself must be survivable.

All SQLite calls run on the event loop: each is one short transaction on a
local file, and running them there makes every operation atomic with respect
to the others without any lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from clearway.coordination.model import (
    CoordinationUnavailable,
    Holding,
    Lease,
    LeaseGone,
    check_lock_name,
    check_owner,
    check_ttl,
    check_wait,
)
from clearway.tasks import TaskSupervisor

__all__ = ["EmbeddedCoordinator"]

logger = logging.getLogger("clearway.coordination.embedded")

#: The reaper looks at the clock at least this often, even with no lease due, so a
#: stepped clock (or an injected one) is noticed within a second.
_REAPER_MAX_SLEEP = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases(expires_at);
CREATE TABLE IF NOT EXISTS entries (
    token INTEGER PRIMARY KEY AUTOINCREMENT,
    lock TEXT NOT NULL,
    lease TEXT NOT NULL,
    owner TEXT NOT NULL,
    UNIQUE (lock, lease)
);
CREATE INDEX IF NOT EXISTS entries_lock ON entries(lock, token);
CREATE INDEX IF NOT EXISTS entries_lease ON entries(lease);
"""


class EmbeddedCoordinator:
    """The `Coordinator` on a SQLite file at ``path``; ``clock`` gives wall-clock seconds."""

    kind = "embedded"

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._tasks = TaskSupervisor(logger)
        #: lock -> the event its waiters wait on; set (and dropped) when its queue changes.
        self._wakeups: dict[str, asyncio.Event] = {}
        #: set when a lease is granted, so the reaper recomputes its next expiry.
        self._kick = asyncio.Event()

    # -- life cycle -----------------------------------------------------------------
    async def start(self) -> None:
        if self._db is not None:
            return
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise CoordinationUnavailable(f"cannot open the coordination store {self.path}: {exc}") from exc
        self._db = db
        self._expire()
        self._tasks.start_forever("coordination-reaper", self._reap)

    async def close(self) -> None:
        self._closed = True
        for event in self._wakeups.values():
            event.set()
        self._wakeups.clear()
        await self._tasks.close()
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- leases ---------------------------------------------------------------------
    async def grant(self, owner: str, ttl: float) -> Lease:
        owner = check_owner(owner)
        ttl = check_ttl(ttl)
        lease = Lease(id=secrets.token_hex(8), owner=owner, ttl=ttl)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO leases(id, owner, ttl, expires_at) VALUES (?, ?, ?, ?)",
                (lease.id, owner, ttl, self._clock() + ttl),
            )
        self._kick.set()
        return lease

    async def keepalive(self, lease: str) -> float:
        with self._transaction() as db:
            row = db.execute("SELECT ttl FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                raise _gone(lease)
            ttl = float(row[0])
            db.execute("UPDATE leases SET expires_at = ? WHERE id = ?", (self._clock() + ttl, lease))
        return ttl

    async def revoke(self, lease: str) -> None:
        with self._transaction() as db:
            locks = self._drop_leases(db, [lease])
        self._notify(locks)

    async def leases(self, owner_prefix: str) -> list[Lease]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, owner, ttl FROM leases WHERE substr(owner, 1, ?) = ? ORDER BY owner, id",
                (len(owner_prefix), owner_prefix),
            ).fetchall()
        return [Lease(id=str(r[0]), owner=str(r[1]), ttl=float(r[2])) for r in rows]

    # -- locks ----------------------------------------------------------------------
    async def acquire(self, lock: str, lease: str, *, wait: float, keep_queued: bool = False) -> Holding | None:
        lock = check_lock_name(lock)
        wait = check_wait(wait)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self._transaction() as db:
            row = db.execute("SELECT owner FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                raise _gone(lease)
            db.execute(
                "INSERT OR IGNORE INTO entries(lock, lease, owner) VALUES (?, ?, ?)", (lock, lease, str(row[0]))
            )
        try:
            while True:
                # Take the event before reading: a change after the read sets this one.
                event = self._wakeups.setdefault(lock, asyncio.Event())
                entries = self._queue(lock)
                mine = next((e for e in entries if e.lease == lease), None)
                if mine is None:
                    # Our entry went away while we waited: with the lease, or by a release.
                    if self._lease_alive(lease):
                        return None
                    raise _gone(lease)
                if entries[0] is mine:
                    return mine
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await event.wait()
                if self._closed:
                    raise CoordinationUnavailable("the embedded coordinator was closed while waiting for a lock")
        except asyncio.CancelledError:
            if not self._closed and not keep_queued:
                self._remove(lock, lease)
            raise
        # Not ours within `wait`: leave the queue, so no one waits behind a waiter that is gone
        # (unless it polls again: then its lease keeps its place).
        if not keep_queued:
            self._remove(lock, lease)
        return None

    async def release(self, lock: str, lease: str) -> bool:
        return self._remove(check_lock_name(lock), lease)

    async def holder(self, lock: str) -> Holding | None:
        entries = self._queue(check_lock_name(lock), limit=1)
        return entries[0] if entries else None

    async def holdings(self, prefix: str) -> list[Holding]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT e.lock, e.token, e.lease, e.owner FROM entries e JOIN "
                "(SELECT MIN(token) AS token FROM entries WHERE substr(lock, 1, ?) = ? GROUP BY lock) h "
                "ON e.token = h.token ORDER BY e.lock",
                (len(prefix), prefix),
            ).fetchall()
        return [_holding(r) for r in rows]

    async def queue(self, lock: str) -> list[Holding]:
        return self._queue(check_lock_name(lock))

    # -- internals ------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, expired leases removed first (and their waiters woken after)."""
        if self._closed or self._db is None:
            raise CoordinationUnavailable("the embedded coordinator is not running (closed or not started)")
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                freed = self._expire_in(db)
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise CoordinationUnavailable(f"the coordination store {self.path} failed: {exc}") from exc
        self._notify(freed)

    def _expire(self) -> None:
        with self._transaction():
            pass

    def _expire_in(self, db: sqlite3.Connection) -> set[str]:
        expired = [str(r[0]) for r in db.execute("SELECT id FROM leases WHERE expires_at <= ?", (self._clock(),))]
        return self._drop_leases(db, expired) if expired else set()

    @staticmethod
    def _drop_leases(db: sqlite3.Connection, leases: list[str]) -> set[str]:
        """Delete ``leases`` and their entries; the locks whose queue changed."""
        marks = ",".join("?" * len(leases))
        locks = {str(r[0]) for r in db.execute(f"SELECT DISTINCT lock FROM entries WHERE lease IN ({marks})", leases)}
        db.execute(f"DELETE FROM entries WHERE lease IN ({marks})", leases)
        db.execute(f"DELETE FROM leases WHERE id IN ({marks})", leases)
        return locks

    def _lease_alive(self, lease: str) -> bool:
        with self._transaction() as db:
            return db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is not None

    def _queue(self, lock: str, *, limit: int = -1) -> list[Holding]:
        with self._transaction() as db:
            rows = db.execute(
                "SELECT lock, token, lease, owner FROM entries WHERE lock = ? ORDER BY token LIMIT ?", (lock, limit)
            ).fetchall()
        return [_holding(r) for r in rows]

    def _remove(self, lock: str, lease: str) -> bool:
        with self._transaction() as db:
            removed = db.execute("DELETE FROM entries WHERE lock = ? AND lease = ?", (lock, lease)).rowcount > 0
        if removed:
            self._notify([lock])
        return removed

    def _notify(self, locks: Iterable[str]) -> None:
        for lock in locks:
            event = self._wakeups.pop(lock, None)
            if event is not None:
                event.set()

    async def _reap(self) -> None:
        """Expire leases on time, so that the waiters of what they held are woken."""
        while True:
            self._kick.clear()
            with self._transaction() as db:
                row = db.execute("SELECT MIN(expires_at) FROM leases").fetchone()
            delay = _REAPER_MAX_SLEEP
            if row is not None and row[0] is not None:
                delay = min(delay, max(float(row[0]) - self._clock(), 0.0) + 0.001)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._kick.wait()


def _holding(row: tuple[Any, ...]) -> Holding:
    return Holding(lock=str(row[0]), token=int(row[1]), lease=str(row[2]), owner=str(row[3]))


def _gone(lease: str) -> LeaseGone:
    return LeaseGone(f"lease {lease} is gone (expired, revoked or never granted): take a new lease")
