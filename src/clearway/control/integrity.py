"""Recovering from a state database the store refused to open.

The store refuses a database that fails ``PRAGMA quick_check`` or lost
committed transactions (its commit counter is behind ``state.witness``; see
``control.store``). Refusing is only half of a clear state: the operator needs
one command that gets the platform going again without destroying evidence.
``clearway state recover`` (this module) therefore

1. moves the damaged ``state.db`` and its ``-wal`` aside, into
   ``state.damaged-<time>/`` (the ``-shm`` index is derived from the WAL and
   dropped, so a stale one cannot mislead the salvage);
2. copies every row SQLite can still read, table by table, into a fresh
   database with the current schema — a table that cannot be read is skipped
   and named in the report, the others still come through (a single
   ``iterdump`` stops at the first unreadable page);
3. sets the witness to the salvaged database's counter, so ``clearway up``
   starts from it;
4. stops the replica processes of this home that the salvaged replica records
   do not hold (matched by pid *and* start time). The commits a damaged WAL
   drops hold replica records too; a replica left running without one is never
   adopted, never stopped, and the next ``up`` would start a second one on its
   socket path — orphaned for good. ``up`` starts again whatever the salvaged
   state still wants.

It refuses to run while a control plane holds the home's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from clearway.backends.local.records import ReplicaRecords
from clearway.control.faults import StateIntegrityError
from clearway.control.store import Store, read_witness, witness_path_for, write_witness
from clearway.runtime import ReplicaSpec
from clearway.runtime.process import is_alive, read_start_time, signal_group

#: How long a stray replica gets to exit on SIGTERM before SIGKILL.
STRAY_GRACE = 10.0


@dataclass
class RecoveryReport:
    """What ``recover`` did, for the CLI to print."""

    moved_to: Path
    #: Rows copied per table.
    rows: dict[str, int] = field(default_factory=dict)
    #: Tables that could not be read, with SQLite's reason.
    lost_tables: dict[str, str] = field(default_factory=dict)
    commits_vouched: int | None = None
    commits_salvaged: int = 0
    #: Replicas that were running with no salvaged record, now stopped: replica id -> pid.
    stopped_strays: dict[str, int] = field(default_factory=dict)


def recover(db_path: Path, *, lock_path: Path | None = None, clock: float | None = None) -> RecoveryReport:
    """Move ``db_path`` aside and rebuild it from what can still be read."""
    lock = None
    if lock_path is not None:
        lock = lock_path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StateIntegrityError(
                "a control plane is running for this home: `clearway down` (or kill it) before recovering its state"
            ) from None
    try:
        return _recover(db_path, time.time() if clock is None else clock)
    finally:
        if lock is not None:
            lock.close()


def _recover(db_path: Path, now: float) -> RecoveryReport:
    witness = witness_path_for(db_path)
    vouched = read_witness(witness)
    base = f"{db_path.stem}.damaged-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"
    aside, suffix = db_path.parent / base, 0
    while aside.exists():
        suffix += 1
        aside = db_path.parent / f"{base}-{suffix}"
    aside.mkdir(mode=0o700)
    report = RecoveryReport(moved_to=aside, commits_vouched=vouched)
    for name in (db_path.name, f"{db_path.name}-wal"):
        with contextlib.suppress(FileNotFoundError):
            (db_path.parent / name).rename(aside / name)
    (db_path.parent / f"{db_path.name}-shm").unlink(missing_ok=True)
    if witness.exists():
        witness.rename(aside / witness.name)

    fresh = Store(db_path)
    fresh.close()
    damaged_path = aside / db_path.name
    if damaged_path.exists():
        _salvage(damaged_path, db_path, report)
    with sqlite3.connect(db_path) as db:
        row = db.execute("SELECT value FROM meta WHERE key='commits'").fetchone()
        report.commits_salvaged = int(row[0]) if row else 0
    db.close()
    write_witness(witness, report.commits_salvaged)
    report.stopped_strays = _stop_strays(db_path)
    return report


def _stop_strays(db_path: Path) -> dict[str, int]:
    """Stop this home's replica processes that no salvaged record holds (point 4 above)."""
    records = ReplicaRecords(db_path)
    try:
        known = {(r.pid, r.pid_start_time) for r in records.all() if r.pid is not None}
    finally:
        records.close()
    home = db_path.parent.resolve()
    strays: dict[str, int] = {}
    for pid, replica_id in _replica_leaders(home):
        if (pid, read_start_time(pid)) not in known:
            strays[replica_id] = pid
    started = {pid: read_start_time(pid) for pid in strays.values()}
    for pid in strays.values():
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + STRAY_GRACE
    while any(is_alive(pid, started[pid]) for pid in strays.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in strays.values():
        if is_alive(pid, started[pid]):
            signal_group(pid, signal.SIGKILL)
    return strays


def _replica_leaders(home: Path) -> list[tuple[int, str]]:
    """(pid, replica id) of every running replica of ``home``: each replica leads its own
    process group, and its spec (in its environment) hides the home it belongs to."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getpgid(pid) != pid:
                continue
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        variables = dict(item.partition(b"=")[::2] for item in environ.split(b"\0") if item)
        raw = variables.get(b"CLEARWAY_REPLICA_SPEC")
        if raw is None:
            continue
        try:
            spec = ReplicaSpec.from_json(raw.decode())
        except (ValueError, TypeError, KeyError):
            continue
        if any(hidden.resolve() == home for hidden in spec.hide):
            found.append((pid, spec.replica_id))
    return found


def _salvage(damaged_path: Path, target: Path, report: RecoveryReport) -> None:
    source = sqlite3.connect(damaged_path)
    dest = sqlite3.connect(target, isolation_level=None)
    try:
        try:
            tables = source.execute(
                "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            report.lost_tables["*"] = f"the schema itself is unreadable: {exc}"
            return
        dest.execute("PRAGMA foreign_keys=OFF")
        dest.execute("BEGIN")
        for name, sql in tables:
            exists = dest.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone()
            if not exists and sql:
                dest.execute(sql)
            quoted = '"' + name.replace('"', '""') + '"'
            copied = 0
            try:
                cursor = source.execute(f"SELECT * FROM {quoted}")
                columns = [d[0] for d in cursor.description]
                names = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
                marks = ", ".join("?" for _ in columns)
                for row in cursor:
                    dest.execute(f"INSERT OR REPLACE INTO {quoted} ({names}) VALUES ({marks})", row)
                    copied += 1
            except sqlite3.DatabaseError as exc:
                report.lost_tables[name] = f"{exc} (after {copied} rows)"
            report.rows[name] = copied
        dest.execute("COMMIT")
    finally:
        source.close()
        dest.close()
