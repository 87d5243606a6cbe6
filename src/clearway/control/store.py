"""Durable desired state: SQLite in WAL mode.

Everything a restart needs lives here — apps, revisions (spec, code location,
environment, lifecycle state), scale overrides, traffic — and is written in one
transaction per change, so a ``kill -9`` of the control plane at any instant
leaves a consistent database. WAL mode lets readers (the API) run while the
reconciler writes; ``synchronous=NORMAL`` is durable against process crashes
(only an OS crash can lose the last transaction), which is the failure we own.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearway.spec.model import AppSpec

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    scale TEXT NOT NULL DEFAULT '{}',
    next_number INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS revisions (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    spec TEXT NOT NULL,
    code_dir TEXT NOT NULL,
    app_file TEXT NOT NULL,
    env TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    activated_at REAL,
    UNIQUE (app, number)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    at REAL NOT NULL,
    message TEXT NOT NULL
);
"""


class RevisionState(enum.StrEnum):
    """Lifecycle of a revision. Only ``STARTING`` and ``ACTIVE`` run replicas."""

    #: Accepted and stored; its replicas are being started. Gets no traffic yet.
    STARTING = "starting"
    #: Every replica became ready; it serves the app's traffic.
    ACTIVE = "active"
    #: Replaced by a newer revision; kept on disk so ``rollback`` can bring it back.
    RETIRED = "retired"
    #: Could not start (import error, crash, never ready); ``error`` says why.
    FAILED = "failed"


@dataclass(frozen=True)
class Revision:
    id: str
    app: str
    number: int
    spec: AppSpec
    code_dir: Path
    app_file: str
    env: dict[str, str]
    state: RevisionState
    error: str | None
    created_at: float
    started_at: float | None
    activated_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "number": self.number,
            "state": self.state.value,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "activated_at": self.activated_at,
            "spec": self.spec.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class AppRecord:
    name: str
    created_at: float
    scale: dict[str, int] = field(default_factory=dict)


class Store:
    """All durable state. Thread-safe: one connection guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self.set_meta("schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    # -- apps ---------------------------------------------------------------
    def apps(self) -> list[AppRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM apps ORDER BY name").fetchall()
        return [self._app(r) for r in rows]

    def app(self, name: str) -> AppRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM apps WHERE name=?", (name,)).fetchone()
        return None if row is None else self._app(row)

    @staticmethod
    def _app(row: sqlite3.Row) -> AppRecord:
        return AppRecord(name=row["name"], created_at=row["created_at"], scale=json.loads(row["scale"]))

    def set_scale(self, app: str, component: str, replicas: int) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT scale FROM apps WHERE name=?", (app,)).fetchone()
            scale = json.loads(row["scale"])
            scale[component] = replicas
            db.execute("UPDATE apps SET scale=? WHERE name=?", (json.dumps(scale), app))

    def delete_app(self, app: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM revisions WHERE app=?", (app,))
            db.execute("DELETE FROM events WHERE app=?", (app,))
            db.execute("DELETE FROM apps WHERE name=?", (app,))

    # -- revisions ----------------------------------------------------------
    def create_revision(
        self, spec: AppSpec, *, code_dir: Path, app_file: str, env: dict[str, str]
    ) -> Revision:
        """Record a new revision in ``STARTING`` (creating the app on first deploy)."""
        now = time.time()
        with self.transaction() as db:
            db.execute(
                "INSERT INTO apps(name, created_at) VALUES(?, ?) ON CONFLICT(name) DO NOTHING",
                (spec.name, now),
            )
            number = int(
                db.execute("SELECT next_number FROM apps WHERE name=?", (spec.name,)).fetchone()[0]
            )
            db.execute("UPDATE apps SET next_number=? WHERE name=?", (number + 1, spec.name))
            rev_id = f"{spec.name}-{number}"
            db.execute(
                "INSERT INTO revisions(id, app, number, spec, code_dir, app_file, env, state,"
                " created_at, started_at) VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    rev_id,
                    spec.name,
                    number,
                    spec.model_dump_json(),
                    str(code_dir),
                    app_file,
                    json.dumps(env),
                    RevisionState.STARTING.value,
                    now,
                    now,
                ),
            )
            self._event(db, spec.name, f"revision {rev_id} created")
        revision = self.revision(rev_id)
        assert revision is not None
        return revision

    def revision(self, rev_id: str) -> Revision | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM revisions WHERE id=?", (rev_id,)).fetchone()
        return None if row is None else self._revision(row)

    def revisions(self, app: str | None = None, *, states: set[RevisionState] | None = None) -> list[Revision]:
        query, args = "SELECT * FROM revisions", []
        if app is not None:
            query += " WHERE app=?"
            args.append(app)
        query += " ORDER BY app, number"
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        revs = [self._revision(r) for r in rows]
        return [r for r in revs if states is None or r.state in states]

    @staticmethod
    def _revision(row: sqlite3.Row) -> Revision:
        return Revision(
            id=row["id"],
            app=row["app"],
            number=row["number"],
            spec=AppSpec.model_validate_json(row["spec"]),
            code_dir=Path(row["code_dir"]),
            app_file=row["app_file"],
            env=json.loads(row["env"]),
            state=RevisionState(row["state"]),
            error=row["error"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            activated_at=row["activated_at"],
        )

    def restart_revision(self, rev_id: str) -> None:
        """Move a retired (or failed) revision back to ``STARTING`` (rollback)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE revisions SET state=?, error=NULL, started_at=? WHERE id=?",
                (RevisionState.STARTING.value, time.time(), rev_id),
            )
            app = db.execute("SELECT app FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
            self._event(db, app, f"revision {rev_id} restarted (rollback)")

    def activate(self, rev_id: str) -> None:
        """Make ``rev_id`` the app's serving revision; the previous one retires. Atomic."""
        with self.transaction() as db:
            app = db.execute("SELECT app FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
            db.execute(
                "UPDATE revisions SET state=? WHERE app=? AND state=? AND id<>?",
                (RevisionState.RETIRED.value, app, RevisionState.ACTIVE.value, rev_id),
            )
            db.execute(
                "UPDATE revisions SET state=?, activated_at=?, error=NULL WHERE id=?",
                (RevisionState.ACTIVE.value, time.time(), rev_id),
            )
            # An older deploy still starting must not win later and roll the app back.
            number = db.execute("SELECT number FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
            db.execute(
                "UPDATE revisions SET state=?, error=? WHERE app=? AND state=? AND number<?",
                (
                    RevisionState.FAILED.value,
                    f"superseded by {rev_id}, which became ready first",
                    app,
                    RevisionState.STARTING.value,
                    number,
                ),
            )
            self._event(db, app, f"revision {rev_id} is serving")

    def fail(self, rev_id: str, error: str) -> None:
        with self.transaction() as db:
            app = db.execute("SELECT app FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
            db.execute(
                "UPDATE revisions SET state=?, error=? WHERE id=?",
                (RevisionState.FAILED.value, error, rev_id),
            )
            self._event(db, app, f"revision {rev_id} failed: {error.splitlines()[0] if error else ''}")

    # -- events -------------------------------------------------------------
    @staticmethod
    def _event(db: sqlite3.Connection, app: str, message: str) -> None:
        db.execute("INSERT INTO events(app, at, message) VALUES(?,?,?)", (app, time.time(), message))

    def add_event(self, app: str, message: str) -> None:
        with self.transaction() as db:
            self._event(db, app, message)

    def events(self, app: str, limit: int = 20) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT at, message FROM events WHERE app=? ORDER BY id DESC LIMIT ?", (app, limit)
            ).fetchall()
        return [{"at": r["at"], "message": r["message"]} for r in reversed(rows)]
