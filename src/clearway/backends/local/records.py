"""Replica records: the runtime facts a restarted control plane needs.

The control plane's store holds desired state; this table holds what the local
backend launched — each replica's spec, pid, pid start time and incarnation — written
on every status change. After a ``kill -9`` of the control plane, replicas keep
running (they are in their own sessions); on restart, each record is handed to
``Supervisor.adopt``, which checks the pid and its start time before trusting it.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from clearway.runtime import ReplicaSpec, ReplicaStatus

# v2: unix sockets and incarnations replaced TCP ports; v1 rows are not adoptable.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS local_replicas_v2 (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    pid INTEGER,
    pid_start_time INTEGER,
    incarnation TEXT,
    state TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ReplicaRecord:
    spec: ReplicaSpec
    pid: int | None
    pid_start_time: int | None
    incarnation: str | None


class ReplicaRecords:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def put_spec(self, spec: ReplicaSpec) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO local_replicas_v2(id, spec, state) VALUES(?,?,'starting') "
                "ON CONFLICT(id) DO UPDATE SET spec=excluded.spec",
                (spec.replica_id, spec.to_json()),
            )

    def put_status(self, status: ReplicaStatus) -> None:
        with self._lock:
            if status.state.is_terminal:
                self._db.execute("DELETE FROM local_replicas_v2 WHERE id=?", (status.replica_id,))
                return
            self._db.execute(
                "UPDATE local_replicas_v2 SET pid=?, pid_start_time=?, incarnation=?, state=? WHERE id=?",
                (status.pid, status.pid_start_time, status.incarnation, status.state.value, status.replica_id),
            )

    def delete(self, replica_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM local_replicas_v2 WHERE id=?", (replica_id,))

    def all(self) -> list[ReplicaRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT spec, pid, pid_start_time, incarnation FROM local_replicas_v2"
            ).fetchall()
        return [
            ReplicaRecord(spec=ReplicaSpec.from_json(r[0]), pid=r[1], pid_start_time=r[2], incarnation=r[3])
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
