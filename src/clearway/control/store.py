"""Durable desired state: SQLite in WAL mode.

Everything a restart needs lives here — apps, revisions (spec, code location,
environment, lifecycle state), scale overrides, traffic — and is written in one
transaction per change, so a ``kill -9`` of the control plane at any instant
leaves a consistent database. WAL mode lets readers (the API) run while the
reconciler writes; ``synchronous=NORMAL`` is durable against process crashes
(only an OS crash can lose the last transaction), which is the failure we own.

Two faults get a clear state rather than a silent one:

* every transaction bumps a commit counter (``meta.commits``) and, once
  committed, writes it to a witness file next to the database. SQLite drops
  every commit after a corrupted WAL frame *without an error*; at open, a
  counter behind the witness reveals it, and the store refuses to open
  (``control.integrity`` has the recovery). ``PRAGMA quick_check`` catches the
  rest of the damage SQLite can see.
* ``database or disk is full`` becomes `StorageFull`, naming the filesystem.

Each app gets a uid (= gid) of its own, allocated here on its first deploy from
a counter that never goes back, so an uid is never handed to a second app, and
kept when the app is destroyed (a re-created app with the same name owns its
old files again). The audit log of state-changing API calls lives here too.

An app's configuration (``clearway config set``) is kept per app and per scope
(`ConfigScope`) and outlives deploys: each new revision stores, at its
creation, the merged environment ``config < the deploy's --env`` (the spec's
own ``env`` lies under both, merged by the reconciler), so a revision is still
immutable and a rollback brings back the configuration it was created with.
Secret values are stored like plain ones: ``state.db`` is 0600 and the
platform's alone, and nothing encrypts them at rest (out of scope for now);
what keeps them secret is that no API view, event or audit row ever holds a
configuration value (`ConfigEntry.to_json` leaves secrets out, events and
audit rows name keys only).

Durable function invocations (their queue, attempts, results and dead
letters) and the marks of schedules' last fires live here too, so that a
``kill -9`` of the control plane loses no queued invocation and fires no
schedule twice (``control.invocations``, ``control.schedules``).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearway.control.faults import StateIntegrityError, StorageFull, is_disk_full
from clearway.spec.model import AppSpec, CanaryPolicy

SCHEMA_VERSION = 6

#: First uid (= gid) handed to an app; the spec-reading child runs as the one below.
DEFAULT_UID_BASE = 400_000

#: How to get past a refused state database (printed in every integrity error).
RECOVER_COMMAND = "clearway state recover"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    scale TEXT NOT NULL DEFAULT '{}',
    next_number INTEGER NOT NULL DEFAULT 1,
    preview_scale TEXT NOT NULL DEFAULT '{}'
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
    code_digest TEXT,
    env_digest TEXT,
    python TEXT,
    pruned_at REAL,
    deploy_env TEXT,
    branch TEXT,
    commit_sha TEXT,
    canary INTEGER NOT NULL DEFAULT 0,
    UNIQUE (app, number)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    at REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS app_uids (
    name TEXT PRIMARY KEY,
    uid INTEGER NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    principal TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    app TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_app ON audit(app, id);
CREATE TABLE IF NOT EXISTS config (
    app TEXT NOT NULL,
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    secret INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (app, scope, key)
);
CREATE TABLE IF NOT EXISTS builds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    number INTEGER NOT NULL,
    ref TEXT NOT NULL,
    old_sha TEXT NOT NULL,
    new_sha TEXT NOT NULL,
    state TEXT NOT NULL,
    revision TEXT,
    log TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (app, number)
);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    canary TEXT NOT NULL,
    stable TEXT NOT NULL,
    policy TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT,
    started_at REAL NOT NULL,
    step_started_at REAL NOT NULL,
    finished_at REAL,
    baseline TEXT,
    analysis TEXT,
    smoke TEXT NOT NULL DEFAULT 'none',
    timeline TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS rollouts_app ON rollouts(app, id);
CREATE TABLE IF NOT EXISTS webhooks (
    app TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    repository TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS invocations (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    function TEXT NOT NULL,
    revision TEXT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    idempotency_key TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (app, function, idempotency_key)
);
CREATE INDEX IF NOT EXISTS invocations_due ON invocations(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS invocations_app ON invocations(app, created_at);
CREATE TABLE IF NOT EXISTS schedules (
    app TEXT NOT NULL,
    function TEXT NOT NULL,
    last_fire REAL NOT NULL,
    PRIMARY KEY (app, function)
);
CREATE TABLE IF NOT EXISTS event_keys (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL
);
CREATE INDEX IF NOT EXISTS event_keys_app ON event_keys(app, created_at);
CREATE TABLE IF NOT EXISTS production_branches (
    app TEXT PRIMARY KEY,
    branch TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

#: The branch whose pushes go to production when an app has not chosen another.
DEFAULT_PRODUCTION_BRANCH = "main"

#: Joined into every revision query so a revision carries its app's uid.
_REVISION_SELECT = (
    "SELECT revisions.*, app_uids.uid AS uid FROM revisions "
    "LEFT JOIN app_uids ON app_uids.name = revisions.app"
)


class RevisionState(enum.StrEnum):
    """Lifecycle of a revision. Only ``STARTING`` and ``ACTIVE`` run replicas."""

    #: Accepted and stored; its replicas are being started. Gets no traffic yet.
    STARTING = "starting"
    #: Every replica became ready; it serves the app's traffic.
    ACTIVE = "active"
    #: Ready, and getting a rollout's share of the app's traffic beside the
    #: active (stable) revision (``control.rollouts``).
    CANARY = "canary"
    #: Replaced by a newer revision; kept on disk so ``rollback`` can bring it back.
    RETIRED = "retired"
    #: Could not start (import error, crash, never ready); ``error`` says why.
    FAILED = "failed"
    #: A canary that its rollout's analysis (or an operator) sent back; ``error`` says why.
    ROLLED_BACK = "rolled back"


#: The states whose replicas run.
RUNNING_STATES = frozenset({RevisionState.STARTING, RevisionState.ACTIVE, RevisionState.CANARY})


class ConfigScope(enum.StrEnum):
    """Where an app's configuration applies."""

    #: The app's serving revisions: every ``clearway deploy`` and ``clearway config`` change.
    PRODUCTION = "production"
    #: Every preview (a pushed branch other than production): test databases, sandbox keys.
    PREVIEW = "preview"


class RolloutState(enum.StrEnum):
    """Lifecycle of a rollout (``control.rollouts``)."""

    #: The canary gets its step's share of traffic while the analysis watches.
    RUNNING = "running"
    #: The canary passed every step (or an operator promoted it): it is the active revision.
    PROMOTED = "promoted"
    #: The analysis failed: all traffic went back to the stable revision.
    ROLLED_BACK = "rolled back"
    #: An operator aborted it (``clearway rollout abort``), or the stable revision went away.
    ABORTED = "aborted"


class BuildState(enum.StrEnum):
    """Lifecycle of a build: a pushed branch (``control.git``) or a webhook delivery
    (``control.webhooks``), production's or a preview's."""

    #: The pushed commit is being exported, its environment built and its spec read.
    BUILDING = "building"
    #: The project's tests run in the built environment (the test gate).
    TESTING = "testing"
    #: Its revision is stored and starting; production is not touched until it is ready.
    DEPLOYING = "deploying"
    #: Its revision serves (a preview, the first revision) or its canary rollout started;
    #: ``revision`` names it. The push was accepted.
    DEPLOYED = "deployed"
    #: The tests failed: nothing was deployed and the push was rejected.
    TESTS_FAILED = "failed tests"
    #: The spec, the import, the dependencies or the start failed; the push was rejected.
    FAILED = "failed"


#: The most of a build's output kept (its tail).
MAX_BUILD_LOG = 256 * 1024


@dataclass(frozen=True)
class Build:
    app: str
    number: int
    ref: str
    old_sha: str
    new_sha: str
    state: BuildState
    revision: str | None
    log: str
    created_at: float
    finished_at: float | None

    def to_json(self, *, with_log: bool = False) -> dict[str, Any]:
        view: dict[str, Any] = {
            "app": self.app,
            "number": self.number,
            "ref": self.ref,
            "old_sha": self.old_sha,
            "new_sha": self.new_sha,
            "state": self.state.value,
            "revision": self.revision,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }
        if with_log:
            view["log"] = self.log
        return view


@dataclass(frozen=True)
class ConfigEntry:
    """One configuration variable of an app. The value never reaches a view of a secret."""

    key: str
    value: str = field(repr=False)
    secret: bool
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "value": None if self.secret else self.value,
            "secret": self.secret,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Revision:
    id: str
    app: str
    number: int
    spec: AppSpec
    code_dir: Path
    app_file: str
    #: The environment it runs with (above the spec's own ``env``): the app's
    #: configuration when it was created, overridden by ``deploy_env``. Holds
    #: secret values, hence is in no view.
    env: dict[str, str] = field(repr=False)
    state: RevisionState
    error: str | None
    created_at: float
    started_at: float | None
    activated_at: float | None
    #: The app's uid (= gid); None only for revisions stored before uids existed.
    uid: int | None = None
    #: The artifact: code snapshot digest (the snapshot directory's name), the
    #: environment's ``sha256:<hex>`` (None: stored before per-app environments,
    #: runs on the platform's interpreter) and the interpreter's version.
    code_digest: str = ""
    env_digest: str | None = None
    python: str | None = None
    #: When garbage collection deleted its code snapshot (rollback to it is refused).
    pruned_at: float | None = None
    #: The ``--env`` of the deploy that made its artifact: a configuration
    #: change carries it into the revision it makes, still above the configuration.
    deploy_env: dict[str, str] = field(default_factory=dict, repr=False)
    #: The git branch of a preview; None: a production revision.
    branch: str | None = None
    #: The pushed commit it was built from (git builds only).
    commit: str | None = None
    #: Goes out as a canary rollout when it becomes ready (if a stable revision serves).
    canary: bool = False

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "number": self.number,
            "branch": self.branch,
            "commit": self.commit,
            "canary": self.canary,
            "state": self.state.value,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "activated_at": self.activated_at,
            "uid": self.uid,
            "artifact": {"code": self.code_digest, "env": self.env_digest, "python": self.python},
            "pruned": self.pruned_at is not None,
            "spec": self.spec.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class AppRecord:
    name: str
    created_at: float
    scale: dict[str, int] = field(default_factory=dict)
    uid: int | None = None
    #: Replicas per component of every preview (default 1 each, whatever the spec says).
    preview_scale: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Rollout:
    """One canary rollout of a production revision, with its timeline."""

    id: int
    app: str
    canary: str
    stable: str
    policy: CanaryPolicy
    step: int
    state: RolloutState
    reason: str | None
    started_at: float
    step_started_at: float
    finished_at: float | None
    #: The gateway's counters of both revisions when the step began: {"canary": .., "stable": ..}.
    baseline: dict[str, Any] | None
    #: The latest analysis (``control.analysis.Analysis.to_json``).
    analysis: dict[str, Any] | None
    timeline: list[dict[str, Any]]
    #: The smoke checks: "none" (the app has none), "pending" (not passed yet: no traffic) or "passed".
    smoke: str = "none"

    @property
    def weight(self) -> int:
        """The canary's percent of traffic now."""
        if self.state is RolloutState.PROMOTED:
            return 100
        if self.state is not RolloutState.RUNNING or self.smoke == "pending":
            return 0
        return self.policy.steps[min(self.step, len(self.policy.steps) - 1)]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "canary": self.canary,
            "stable": self.stable,
            "steps": list(self.policy.steps),
            "step": self.step,
            "weight": self.weight,
            "state": self.state.value,
            "reason": self.reason,
            "started_at": self.started_at,
            "step_started_at": self.step_started_at,
            "finished_at": self.finished_at,
            "analysis": self.analysis,
            "smoke": self.smoke,
            "timeline": self.timeline,
            "policy": self.policy.model_dump(mode="json"),
            "minimum_seconds": self.policy.minimum_seconds,
        }


@dataclass(frozen=True)
class AuditEntry:
    """One state-changing API call, allowed or refused. Never holds tokens or env values."""

    at: float
    principal: str
    method: str
    path: str
    status: int
    app: str | None
    detail: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "principal": self.principal,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "app": self.app,
            "detail": self.detail,
        }


def witness_path_for(db_path: Path) -> Path:
    """``state.db`` -> ``state.witness``."""
    return db_path.with_suffix(".witness")


def read_witness(path: Path) -> int | None:
    """The commit count the witness file vouches for; None when there is none."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text or "0")
    except ValueError:
        raise StateIntegrityError(
            f"{path} is not a commit count ({text[:40]!r}); if state.db is fine, delete {path}, "
            f"otherwise run `{RECOVER_COMMAND}`"
        ) from None


def write_witness(path: Path, commits: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        _put_witness(fd, commits)
    finally:
        os.close(fd)


def _put_witness(fd: int, commits: int) -> None:
    # Fixed width, in place: one small write that needs no new block, so it
    # still works on a full disk, and is never seen half-written.
    os.pwrite(fd, f"{commits:020d}\n".encode(), 0)


def secure_db_files(path: Path) -> None:
    """state.db and its -wal/-shm are the platform's alone (0600)."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        with contextlib.suppress(FileNotFoundError):
            (path.parent / name).chmod(0o600)


class Store:
    """All durable state. Thread-safe: one connection guarded by a lock.

    Opening refuses (`StateIntegrityError`) a database that fails
    ``PRAGMA quick_check``, that is missing while the witness says commits were
    made, or whose commit counter is behind the witness: it lost committed
    transactions, and starting from it would silently forget apps.
    """

    def __init__(
        self,
        path: Path,
        *,
        uid_base: int = DEFAULT_UID_BASE,
        witness: Path | None = None,
    ) -> None:
        self.path = path
        self.uid_base = uid_base
        self.witness = witness or witness_path_for(path)
        self._lock = threading.RLock()
        vouched = read_witness(self.witness)
        if not path.exists() and vouched:
            raise StateIntegrityError(
                f"{path} is missing, but {self.witness} records {vouched} committed changes: "
                f"restore it from a backup, or run `{RECOVER_COMMAND}` to start over with what is left"
            )
        if path.exists():
            commits = self._verify(vouched)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            commits = 0
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc):
                raise StorageFull(path, what="opening the state database") from exc
            raise
        secure_db_files(path)
        self._witness_fd = os.open(self.witness, os.O_WRONLY | os.O_CREAT, 0o600)
        if vouched is None or commits > vouched:
            _put_witness(self._witness_fd, commits)
        if self.get_meta("schema_version") != str(SCHEMA_VERSION):
            self.set_meta("schema_version", str(SCHEMA_VERSION))

    def _verify(self, vouched: int | None) -> int:
        """Check an existing database before anything writes to it; its commit count.

        Read-only on purpose: a read-write connection would checkpoint on
        close and overwrite the evidence (the damaged WAL) that recovery and
        a human may need.
        """
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True)
        except sqlite3.DatabaseError as exc:
            raise StateIntegrityError(
                f"{self.path} cannot be opened ({exc}); run `{RECOVER_COMMAND}` to move it aside "
                "and salvage what it holds"
            ) from None
        try:
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise StateIntegrityError(
                    f"{self.path} fails SQLite's integrity check ({'; '.join(problems[:3])}); "
                    f"run `{RECOVER_COMMAND}` to move it aside and salvage what it holds"
                )
            has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            row = db.execute("SELECT value FROM meta WHERE key='commits'").fetchone() if has_meta else None
        except sqlite3.DatabaseError as exc:
            raise StateIntegrityError(
                f"{self.path} cannot be read ({exc}); run `{RECOVER_COMMAND}` to move it aside "
                "and salvage what it holds"
            ) from None
        finally:
            db.close()
        commits = int(row[0]) if row else 0
        if vouched is not None and commits < vouched:
            raise StateIntegrityError(
                f"{self.path} lost committed changes: it holds {commits} commits, but {self.witness} "
                f"records {vouched} (a damaged write-ahead log makes SQLite drop every commit after "
                "the damage). Starting from it would silently forget apps or revisions. Run "
                f"`{RECOVER_COMMAND}` to move the damaged database aside and salvage what it holds, "
                "then `clearway up` again"
            )
        return commits

    def _migrate(self) -> None:
        """Bring a database from an older clearway up to this schema (idempotent)."""
        self._db.execute("INSERT INTO meta(key, value) VALUES('commits', '0') ON CONFLICT(key) DO NOTHING")
        # Revisions became artifacts (code digest, environment, interpreter) in schema 3.
        have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(revisions)").fetchall()}
        # ... and kept the deploy's own --env apart from the app's configuration in schema 4.
        for column, kind in (
            ("code_digest", "TEXT"),
            ("env_digest", "TEXT"),
            ("python", "TEXT"),
            ("pruned_at", "REAL"),
            ("deploy_env", "TEXT"),
            # Previews and canaries came in schema 6.
            ("branch", "TEXT"),
            ("commit_sha", "TEXT"),
            ("canary", "INTEGER NOT NULL DEFAULT 0"),
        ):
            if column not in have:
                self._db.execute(f"ALTER TABLE revisions ADD COLUMN {column} {kind}")
        app_columns = {str(r[1]) for r in self._db.execute("PRAGMA table_info(apps)").fetchall()}
        if "preview_scale" not in app_columns:
            self._db.execute("ALTER TABLE apps ADD COLUMN preview_scale TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        with self._lock:
            self._db.close()
            with contextlib.suppress(OSError, AttributeError):
                os.close(self._witness_fd)

    def commits(self) -> int:
        """How many transactions this database has committed (the witness's counterpart)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='commits'").fetchone()
        return 0 if row is None else int(row[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; bumps the commit counter and, once committed, the witness."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='commits'")
                    commits = int(self._db.execute("SELECT value FROM meta WHERE key='commits'").fetchone()[0])
                except BaseException:
                    # After SQLITE_FULL SQLite may have rolled back already.
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
                try:
                    self._db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if is_disk_full(exc):
                    raise StorageFull(self.path, what="saving the platform's state") from exc
                raise
            # A failed witness write only weakens the lost-commit check until the next commit.
            with contextlib.suppress(OSError):
                _put_witness(self._witness_fd, commits)

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

    def _app(self, row: sqlite3.Row) -> AppRecord:
        return AppRecord(
            name=row["name"],
            created_at=row["created_at"],
            scale=json.loads(row["scale"]),
            uid=self.app_uid(row["name"]),
            preview_scale=json.loads(row["preview_scale"]),
        )

    # -- uids -------------------------------------------------------------------
    def app_uid(self, app: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT uid FROM app_uids WHERE name=?", (app,)).fetchone()
        return None if row is None else int(row[0])

    def allocate_uid(self, app: str) -> int:
        """The app's uid (= gid), allocated on first use and kept forever after."""
        existing = self.app_uid(app)
        if existing is not None:
            return existing
        with self.transaction() as db:
            row = db.execute("SELECT uid FROM app_uids WHERE name=?", (app,)).fetchone()
            if row is not None:
                return int(row[0])
            counter = db.execute("SELECT value FROM meta WHERE key='next_uid'").fetchone()
            uid = max(int(counter[0]) if counter else self.uid_base, self.uid_base)
            db.execute("INSERT INTO app_uids(name, uid) VALUES(?, ?)", (app, uid))
            db.execute(
                "INSERT INTO meta(key, value) VALUES('next_uid', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(uid + 1),),
            )
        return uid

    # -- audit --------------------------------------------------------------------
    def add_audit(
        self,
        *,
        principal: str,
        method: str,
        path: str,
        status: int,
        app: str | None,
        detail: str | None,
        at: float | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO audit(at, principal, method, path, status, app, detail) VALUES(?,?,?,?,?,?,?)",
                (time.time() if at is None else at, principal, method, path, status, app, detail),
            )

    def audit(self, *, limit: int = 100, app: str | None = None) -> list[AuditEntry]:
        """The newest ``limit`` entries (optionally of one app), oldest first."""
        query = "SELECT * FROM audit"
        args: list[Any] = []
        if app is not None:
            query += " WHERE app=?"
            args.append(app)
        query += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [
            AuditEntry(
                at=r["at"],
                principal=r["principal"],
                method=r["method"],
                path=r["path"],
                status=r["status"],
                app=r["app"],
                detail=r["detail"],
            )
            for r in reversed(rows)
        ]

    def set_scale(self, app: str, component: str, replicas: int, *, previews: bool = False) -> None:
        """Set a component's replica count, of production or (``previews``) of every preview."""
        column = "preview_scale" if previews else "scale"
        with self.transaction() as db:
            row = db.execute(f"SELECT {column} FROM apps WHERE name=?", (app,)).fetchone()
            scale = json.loads(row[0])
            scale[component] = replicas
            db.execute(f"UPDATE apps SET {column}=? WHERE name=?", (json.dumps(scale), app))

    def production_branch(self, app: str) -> str:
        """The branch whose pushes go to ``app``'s production (`DEFAULT_PRODUCTION_BRANCH` unless set)."""
        with self._lock:
            row = self._db.execute("SELECT branch FROM production_branches WHERE app=?", (app,)).fetchone()
        return DEFAULT_PRODUCTION_BRANCH if row is None else str(row["branch"])

    def set_production_branch(self, app: str, branch: str) -> None:
        """Choose ``app``'s production branch (also before its first push, like configuration)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO production_branches(app, branch, updated_at) VALUES(?, ?, ?) "
                "ON CONFLICT(app) DO UPDATE SET branch=excluded.branch, updated_at=excluded.updated_at",
                (app, branch, time.time()),
            )

    def delete_app(self, app: str) -> None:
        """Forget the app: its revisions, rollouts, builds, events, webhook, event keys, invocations, schedules, production branch and configuration (secrets included)."""
        with self.transaction() as db:
            db.execute("DELETE FROM config WHERE app=?", (app,))
            db.execute("DELETE FROM production_branches WHERE app=?", (app,))
            db.execute("DELETE FROM revisions WHERE app=?", (app,))
            db.execute("DELETE FROM events WHERE app=?", (app,))
            db.execute("DELETE FROM builds WHERE app=?", (app,))
            db.execute("DELETE FROM rollouts WHERE app=?", (app,))
            db.execute("DELETE FROM webhooks WHERE app=?", (app,))
            db.execute("DELETE FROM event_keys WHERE app=?", (app,))
            db.execute("DELETE FROM invocations WHERE app=?", (app,))
            db.execute("DELETE FROM schedules WHERE app=?", (app,))
            db.execute("DELETE FROM apps WHERE name=?", (app,))

    # -- configuration ------------------------------------------------------------
    def config(self, app: str, scope: ConfigScope = ConfigScope.PRODUCTION) -> list[ConfigEntry]:
        """The app's configuration in ``scope``, by key."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value, secret, updated_at FROM config WHERE app=? AND scope=? ORDER BY key",
                (app, scope.value),
            ).fetchall()
        return [
            ConfigEntry(key=r["key"], value=r["value"], secret=bool(r["secret"]), updated_at=r["updated_at"])
            for r in rows
        ]

    def change_config(
        self,
        app: str,
        *,
        set_: dict[str, str] | None = None,
        unset: list[str] | None = None,
        secret: bool = False,
        scope: ConfigScope = ConfigScope.PRODUCTION,
    ) -> None:
        """Set (every value plain, or every one secret) and unset keys, in one transaction.

        Keys and values are checked by the caller. Unsetting a key that is not
        set is no error here. The event recorded names keys, never values.
        """
        set_ = set_ or {}
        unset = unset or []
        now = time.time()
        with self.transaction() as db:
            for key, value in set_.items():
                db.execute(
                    "INSERT INTO config(app, scope, key, value, secret, updated_at) VALUES(?,?,?,?,?,?) "
                    "ON CONFLICT(app, scope, key) DO UPDATE SET value=excluded.value, "
                    "secret=excluded.secret, updated_at=excluded.updated_at",
                    (app, scope.value, key, value, int(secret), now),
                )
            for key in unset:
                db.execute("DELETE FROM config WHERE app=? AND scope=? AND key=?", (app, scope.value, key))
            parts = []
            if set_:
                parts.append(f"set {', '.join(sorted(set_))}" + (" (secret)" if secret else ""))
            if unset:
                parts.append(f"unset {', '.join(sorted(unset))}")
            if parts and db.execute("SELECT 1 FROM apps WHERE name=?", (app,)).fetchone():
                self._event(db, app, f"{scope.value} config: {'; '.join(parts)}")

    @staticmethod
    def _config_env(db: sqlite3.Connection, app: str, scope: ConfigScope) -> dict[str, str]:
        rows = db.execute("SELECT key, value FROM config WHERE app=? AND scope=?", (app, scope.value)).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    # -- revisions ----------------------------------------------------------
    def create_revision(
        self,
        spec: AppSpec,
        *,
        code_dir: Path,
        app_file: str,
        env: dict[str, str],
        env_digest: str | None = None,
        python: str | None = None,
        branch: str | None = None,
        commit: str | None = None,
        canary: bool = False,
    ) -> Revision:
        """Record a new revision in ``STARTING`` (creating the app and its uid on first deploy).

        ``env`` is the deploy's own ``--env``; the revision runs with the app's
        configuration (production's, or for a preview ``branch`` the previews')
        as it is in this very transaction, under it. ``canary``: when it becomes
        ready while another production revision serves, it goes out as a rollout.
        """
        self.allocate_uid(spec.name)
        now = time.time()
        scope = ConfigScope.PRODUCTION if branch is None else ConfigScope.PREVIEW
        with self.transaction() as db:
            merged = {**self._config_env(db, spec.name, scope), **env}
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
                " created_at, started_at, code_digest, env_digest, python, deploy_env, branch, commit_sha, canary)"
                " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rev_id,
                    spec.name,
                    number,
                    spec.model_dump_json(),
                    str(code_dir),
                    app_file,
                    json.dumps(merged),
                    RevisionState.STARTING.value,
                    now,
                    now,
                    code_dir.name,
                    env_digest,
                    python,
                    json.dumps(env),
                    branch,
                    commit,
                    int(canary),
                ),
            )
            where = f" for preview {branch}" if branch is not None else ""
            self._event(db, spec.name, f"revision {rev_id} created{where}")
        revision = self.revision(rev_id)
        assert revision is not None
        return revision

    def revision(self, rev_id: str) -> Revision | None:
        with self._lock:
            row = self._db.execute(f"{_REVISION_SELECT} WHERE revisions.id=?", (rev_id,)).fetchone()
        return None if row is None else self._revision(row)

    def revisions(self, app: str | None = None, *, states: set[RevisionState] | None = None) -> list[Revision]:
        query, args = _REVISION_SELECT, []
        if app is not None:
            query += " WHERE revisions.app=?"
            args.append(app)
        query += " ORDER BY revisions.app, revisions.number"
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
            uid=row["uid"],
            # Revisions from before schema 3: the snapshot directory is named by its digest.
            code_digest=row["code_digest"] or Path(row["code_dir"]).name,
            env_digest=row["env_digest"],
            python=row["python"],
            pruned_at=row["pruned_at"],
            # Before schema 4 there was no configuration: all of env came from --env.
            deploy_env=json.loads(row["deploy_env"] if row["deploy_env"] is not None else row["env"]),
            branch=row["branch"],
            commit=row["commit_sha"],
            canary=bool(row["canary"]),
        )

    def mark_pruned(self, rev_ids: list[str]) -> None:
        """Record that these revisions' code snapshots were deleted (GC)."""
        if not rev_ids:
            return
        now = time.time()
        with self.transaction() as db:
            for rev_id in rev_ids:
                db.execute("UPDATE revisions SET pruned_at=? WHERE id=? AND pruned_at IS NULL", (now, rev_id))

    def restart_revision(self, rev_id: str) -> None:
        """Move a retired (or failed) revision back to ``STARTING`` (rollback).

        A rollback takes the traffic as soon as the revision is ready: never as a
        canary, whatever the revision was first deployed as."""
        with self.transaction() as db:
            db.execute(
                "UPDATE revisions SET state=?, error=NULL, started_at=?, canary=0 WHERE id=?",
                (RevisionState.STARTING.value, time.time(), rev_id),
            )
            app = db.execute("SELECT app FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
            self._event(db, app, f"revision {rev_id} restarted (rollback)")

    def activate(self, rev_id: str) -> None:
        """Make ``rev_id`` the serving revision of its app (or of its preview
        branch); the previous one retires. Atomic."""
        with self.transaction() as db:
            self._activate(db, rev_id)

    def _activate(self, db: sqlite3.Connection, rev_id: str) -> None:
        row = db.execute("SELECT app, branch FROM revisions WHERE id=?", (rev_id,)).fetchone()
        app, branch = row[0], row[1]
        # "branch IS ?" matches NULL to NULL: production and each preview are separate tracks.
        same_track = "app=? AND branch IS ?"
        db.execute(
            f"UPDATE revisions SET state=? WHERE {same_track} AND state IN (?, ?) AND id<>?",
            (
                RevisionState.RETIRED.value,
                app,
                branch,
                RevisionState.ACTIVE.value,
                RevisionState.CANARY.value,
                rev_id,
            ),
        )
        db.execute(
            "UPDATE revisions SET state=?, activated_at=?, error=NULL WHERE id=?",
            (RevisionState.ACTIVE.value, time.time(), rev_id),
        )
        # An older deploy still starting must not win later and roll the app back.
        number = db.execute("SELECT number FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
        db.execute(
            f"UPDATE revisions SET state=?, error=? WHERE {same_track} AND state=? AND number<?",
            (
                RevisionState.FAILED.value,
                f"superseded by {rev_id}, which became ready first",
                app,
                branch,
                RevisionState.STARTING.value,
                number,
            ),
        )
        where = f" (preview {branch})" if branch is not None else ""
        self._event(db, app, f"revision {rev_id} is serving{where}")

    def fail(self, rev_id: str, error: str) -> None:
        with self.transaction() as db:
            app = db.execute("SELECT app FROM revisions WHERE id=?", (rev_id,)).fetchone()[0]
            db.execute(
                "UPDATE revisions SET state=?, error=? WHERE id=?",
                (RevisionState.FAILED.value, error, rev_id),
            )
            self._event(db, app, f"revision {rev_id} failed: {error.splitlines()[0] if error else ''}")

    def active(self, app: str, branch: str | None = None) -> Revision | None:
        """The serving revision of ``app`` (production, or the preview ``branch``)."""
        for rev in self.revisions(app, states={RevisionState.ACTIVE}):
            if rev.branch == branch:
                return rev
        return None

    def end_branch(self, app: str, branch: str, *, reason: str | None = None) -> list[str]:
        """Tear a preview down: retire every running revision of ``branch``; their ids.
        ``reason`` is their error (default: the branch was deleted)."""
        states = tuple(s.value for s in RUNNING_STATES)
        with self.transaction() as db:
            rows = db.execute(
                "SELECT id FROM revisions WHERE app=? AND branch=? AND state IN (?, ?, ?)",
                (app, branch, *states),
            ).fetchall()
            ids = [str(r[0]) for r in rows]
            for rev_id in ids:
                db.execute(
                    "UPDATE revisions SET state=?, error=? WHERE id=?",
                    (RevisionState.RETIRED.value, reason or f"preview {branch} was deleted", rev_id),
                )
            if ids:
                self._event(db, app, f"preview {branch} torn down ({', '.join(ids)})")
        return ids

    # -- rollouts -------------------------------------------------------------
    def start_rollout(
        self, canary: str, stable: str, policy: CanaryPolicy, *, detail: str, smoke: bool = False
    ) -> Rollout:
        """The canary is ready: it becomes ``CANARY`` and a rollout starts at its first step. Atomic."""
        now = time.time()
        with self.transaction() as db:
            app = db.execute("SELECT app FROM revisions WHERE id=?", (canary,)).fetchone()[0]
            db.execute(
                "UPDATE revisions SET state=?, error=NULL WHERE id=?", (RevisionState.CANARY.value, canary)
            )
            timeline = [{"at": now, "event": "started", "detail": detail}]
            cursor = db.execute(
                "INSERT INTO rollouts(app, canary, stable, policy, step, state, started_at, step_started_at,"
                " timeline, smoke) VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    app,
                    canary,
                    stable,
                    policy.model_dump_json(),
                    0,
                    RolloutState.RUNNING.value,
                    now,
                    now,
                    json.dumps(timeline),
                    "pending" if smoke else "none",
                ),
            )
            rollout_id = int(cursor.lastrowid or 0)
            self._event(db, app, f"rollout of {canary} started: {detail}")
        found = self.rollout_by_id(rollout_id)
        assert found is not None
        return found

    def rollout_by_id(self, rollout_id: int) -> Rollout | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
        return None if row is None else self._rollout(row)

    def rollout(self, app: str) -> Rollout | None:
        """The app's running rollout, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM rollouts WHERE app=? AND state=? ORDER BY id DESC LIMIT 1",
                (app, RolloutState.RUNNING.value),
            ).fetchone()
        return None if row is None else self._rollout(row)

    def running_rollouts(self) -> list[Rollout]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rollouts WHERE state=? ORDER BY id", (RolloutState.RUNNING.value,)
            ).fetchall()
        return [self._rollout(r) for r in rows]

    def rollouts(self, app: str, *, limit: int = 10) -> list[Rollout]:
        """The app's newest rollouts, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rollouts WHERE app=? ORDER BY id DESC LIMIT ?", (app, limit)
            ).fetchall()
        return [self._rollout(r) for r in rows]

    def update_rollout(
        self,
        rollout_id: int,
        *,
        analysis: dict[str, Any] | None = None,
        baseline: dict[str, Any] | None = None,
        step: int | None = None,
        event: tuple[str, str] | None = None,
        smoke: str | None = None,
    ) -> None:
        """Record the latest analysis, a new step (with its baseline) or a timeline event."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT timeline FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
            if row is None:
                return
            if analysis is not None:
                db.execute("UPDATE rollouts SET analysis=? WHERE id=?", (json.dumps(analysis), rollout_id))
            if baseline is not None:
                db.execute("UPDATE rollouts SET baseline=? WHERE id=?", (json.dumps(baseline), rollout_id))
            if step is not None:
                db.execute(
                    "UPDATE rollouts SET step=?, step_started_at=? WHERE id=?", (step, now, rollout_id)
                )
            if smoke is not None:
                # The first step's clock and window start when the smoke checks have passed
                # (their own requests to the canary are not the step's).
                db.execute(
                    "UPDATE rollouts SET smoke=?, step_started_at=?, baseline=NULL WHERE id=?",
                    (smoke, now, rollout_id),
                )
            if event is not None:
                timeline = json.loads(row[0])
                timeline.append({"at": now, "event": event[0], "detail": event[1]})
                db.execute("UPDATE rollouts SET timeline=? WHERE id=?", (json.dumps(timeline), rollout_id))

    def finish_rollout(
        self,
        rollout_id: int,
        state: RolloutState,
        reason: str,
        *,
        canary_state: RevisionState = RevisionState.ROLLED_BACK,
    ) -> None:
        """End a rollout. Promoted: the canary becomes active and the stable retires;
        otherwise the canary is ``canary_state`` (rolled back; retired when a newer
        revision superseded it) and the stable keeps (or gets back) all traffic.
        One transaction, so a crash leaves either the rollout running or its outcome whole."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM rollouts WHERE id=?", (rollout_id,)).fetchone()
            if row is None or row["state"] != RolloutState.RUNNING.value:
                return
            timeline = json.loads(row["timeline"])
            timeline.append({"at": now, "event": state.value, "detail": reason})
            db.execute(
                "UPDATE rollouts SET state=?, reason=?, finished_at=?, timeline=? WHERE id=?",
                (state.value, reason, now, json.dumps(timeline), rollout_id),
            )
            canary = row["canary"]
            current = db.execute("SELECT state FROM revisions WHERE id=?", (canary,)).fetchone()
            if state is RolloutState.PROMOTED:
                self._activate(db, canary)
            elif current is not None and current[0] in (RevisionState.CANARY.value, RevisionState.STARTING.value):
                db.execute(
                    "UPDATE revisions SET state=?, error=? WHERE id=?",
                    (canary_state.value, reason, canary),
                )
            self._event(db, row["app"], f"rollout of {canary} {state.value}: {reason}")

    @staticmethod
    def _rollout(row: sqlite3.Row) -> Rollout:
        return Rollout(
            id=row["id"],
            app=row["app"],
            canary=row["canary"],
            stable=row["stable"],
            policy=CanaryPolicy.model_validate_json(row["policy"]),
            step=row["step"],
            state=RolloutState(row["state"]),
            reason=row["reason"],
            started_at=row["started_at"],
            step_started_at=row["step_started_at"],
            finished_at=row["finished_at"],
            baseline=json.loads(row["baseline"]) if row["baseline"] else None,
            analysis=json.loads(row["analysis"]) if row["analysis"] else None,
            timeline=json.loads(row["timeline"]),
            smoke=row["smoke"],
        )

    # -- builds -------------------------------------------------------------
    def create_build(self, app: str, *, ref: str, old_sha: str, new_sha: str) -> Build:
        """A new build of ``app`` (numbered per app, from 1), in state ``building``."""
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT MAX(number) FROM builds WHERE app=?", (app,)).fetchone()
            number = int(row[0] or 0) + 1
            db.execute(
                "INSERT INTO builds(app, number, ref, old_sha, new_sha, state, created_at) VALUES(?,?,?,?,?,?,?)",
                (app, number, ref, old_sha, new_sha, BuildState.BUILDING.value, now),
            )
        build = self.build(app, number)
        assert build is not None
        return build

    def update_build(
        self,
        app: str,
        number: int,
        *,
        state: BuildState | None = None,
        revision: str | None = None,
        log: str | None = None,
    ) -> None:
        """Move a build on; ``log`` is appended (the tail of `MAX_BUILD_LOG` is kept)."""
        finished = state in (BuildState.DEPLOYED, BuildState.TESTS_FAILED, BuildState.FAILED)
        with self.transaction() as db:
            if state is not None:
                db.execute(
                    "UPDATE builds SET state=?, finished_at=? WHERE app=? AND number=?",
                    (state.value, time.time() if finished else None, app, number),
                )
            if revision is not None:
                db.execute("UPDATE builds SET revision=? WHERE app=? AND number=?", (revision, app, number))
            if log:
                db.execute(
                    "UPDATE builds SET log=substr(log || ?, -?) WHERE app=? AND number=?",
                    (log, MAX_BUILD_LOG, app, number),
                )

    def abort_unfinished_builds(self, reason: str) -> int:
        """Fail every build still running, at start-up: none can be, its push ended
        with the control plane, and git did not move the ref. A revision such a
        build had already created is failed too while still starting, so a
        rejected push never reaches production. Returns how many were failed."""
        unfinished = (BuildState.BUILDING.value, BuildState.TESTING.value, BuildState.DEPLOYING.value)
        marks = ",".join("?" * len(unfinished))
        with self.transaction() as db:
            revisions = [
                row[0]
                for row in db.execute(
                    f"SELECT revision FROM builds WHERE state IN ({marks}) AND revision IS NOT NULL", unfinished
                )
            ]
            for rev_id in revisions:
                db.execute(
                    "UPDATE revisions SET state=?, error=? WHERE id=? AND state=?",
                    (RevisionState.FAILED.value, reason, rev_id, RevisionState.STARTING.value),
                )
            cursor = db.execute(
                f"UPDATE builds SET state=?, finished_at=?, log=substr(log || ?, -?) WHERE state IN ({marks})",
                (BuildState.FAILED.value, time.time(), f"\n{reason}\n", MAX_BUILD_LOG, *unfinished),
            )
            return cursor.rowcount

    def build(self, app: str, number: int) -> Build | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM builds WHERE app=? AND number=?", (app, number)).fetchone()
        return None if row is None else self._build(row)

    def builds(self, app: str, *, limit: int = 20) -> list[Build]:
        """The newest ``limit`` builds of ``app``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM builds WHERE app=? ORDER BY number DESC LIMIT ?", (app, limit)
            ).fetchall()
        return [self._build(r) for r in reversed(rows)]

    @staticmethod
    def _build(row: sqlite3.Row) -> Build:
        return Build(
            app=row["app"],
            number=row["number"],
            ref=row["ref"],
            old_sha=row["old_sha"],
            new_sha=row["new_sha"],
            state=BuildState(row["state"]),
            revision=row["revision"],
            log=row["log"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
        )

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

    # -- webhooks -------------------------------------------------------------
    def set_webhook(self, app: str, *, secret: str, repository: str | None) -> None:
        """Create or replace the app's GitHub webhook (``control.webhooks``)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO webhooks(app, secret, repository, created_at) VALUES(?,?,?,?) "
                "ON CONFLICT(app) DO UPDATE SET secret=excluded.secret, repository=excluded.repository,"
                " created_at=excluded.created_at",
                (app, secret, repository, time.time()),
            )
            # Not the repository: its URL may carry a read token.
            self._event(db, app, "GitHub webhook set (a new secret)")

    def webhook(self, app: str) -> dict[str, Any] | None:
        """The app's webhook ({"app", "secret", "repository", "created_at"}), if it has one."""
        with self._lock:
            row = self._db.execute(
                "SELECT app, secret, repository, created_at FROM webhooks WHERE app=?", (app,)
            ).fetchone()
        return None if row is None else dict(row)

    # -- invocations ----------------------------------------------------------
    # Durable function invocations and schedule marks (``control.invocations``,
    # ``control.schedules``): the queue itself lives here, so that a kill -9
    # loses none of it. Every change is one transaction, guarded by the state
    # it expects, so a late answer of a delivery that was given up on cannot
    # overwrite a newer attempt.
    def enqueue_invocations(
        self, new: Sequence[NewInvocation], *, now: float | None = None
    ) -> list[tuple[Invocation, bool]]:
        """Queue invocations, all or none (one transaction); each with whether it was added.

        One whose idempotency key its (app, function) already holds is not added
        again: the stored one comes back, with ``False``, whatever its payload.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            return [self._insert_invocation(db, item, now) for item in new]

    def _insert_invocation(self, db: sqlite3.Connection, item: NewInvocation, now: float) -> tuple[Invocation, bool]:
        cursor = db.execute(
            "INSERT INTO invocations(id, app, function, revision, kind, payload, idempotency_key, state,"
            " attempts, max_attempts, next_attempt_at, created_at) VALUES(?,?,?,?,?,?,?,?,0,?,?,?)"
            " ON CONFLICT(app, function, idempotency_key) DO NOTHING",
            (
                uuid.uuid4().hex,
                item.app,
                item.function,
                item.revision,
                item.kind.value,
                item.payload,
                item.idempotency_key,
                InvocationState.QUEUED.value,
                item.max_attempts,
                now if item.not_before is None else item.not_before,
                now,
            ),
        )
        if cursor.rowcount:
            row = db.execute("SELECT * FROM invocations WHERE rowid=?", (cursor.lastrowid,)).fetchone()
        else:
            row = db.execute(
                "SELECT * FROM invocations WHERE app=? AND function=? AND idempotency_key=?",
                (item.app, item.function, item.idempotency_key),
            ).fetchone()
        return self._invocation(row), bool(cursor.rowcount)

    def enqueue_invocation(self, new: NewInvocation, *, now: float | None = None) -> tuple[Invocation, bool]:
        return self.enqueue_invocations([new], now=now)[0]

    def invocation(self, invocation_id: str) -> Invocation | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM invocations WHERE id=?", (invocation_id,)).fetchone()
        return None if row is None else self._invocation(row)

    def invocations(
        self,
        app: str,
        *,
        state: InvocationState | None = None,
        function: str | None = None,
        limit: int = 50,
    ) -> list[Invocation]:
        """The app's newest invocations (optionally in one state, of one function), newest first."""
        query, args = "SELECT * FROM invocations WHERE app=?", [app]
        if state is not None:
            query += " AND state=?"
            args.append(state.value)
        if function is not None:
            query += " AND function=?"
            args.append(function)
        query += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [self._invocation(r) for r in rows]

    def invocation_counts(self, app: str) -> dict[str, dict[str, int]]:
        """How many invocations of each of the app's functions are in each state."""
        with self._lock:
            rows = self._db.execute(
                "SELECT function, state, COUNT(*) FROM invocations WHERE app=? GROUP BY function, state", (app,)
            ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for function, state, count in rows:
            counts.setdefault(str(function), {})[str(state)] = int(count)
        return counts

    def claim_invocations(self, *, limit: int, lease: float, now: float | None = None) -> list[Invocation]:
        """Up to ``limit`` due queued invocations, the longest due first, moved to
        ``running`` with one more attempt and a lease until ``now + lease``.

        Running invocations whose lease ran out go back to the queue first:
        whoever delivered them stopped renewing (their delivery was lost).
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            db.execute(
                "UPDATE invocations SET state=?, lease_until=NULL, next_attempt_at=? WHERE state=? AND lease_until<?",
                (InvocationState.QUEUED.value, now, InvocationState.RUNNING.value, now),
            )
            rows = db.execute(
                "SELECT id FROM invocations WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at LIMIT ?",
                (InvocationState.QUEUED.value, now, limit),
            ).fetchall()
            ids = [str(r[0]) for r in rows]
            claimed = []
            for invocation_id in ids:
                db.execute(
                    "UPDATE invocations SET state=?, attempts=attempts+1, lease_until=? WHERE id=?",
                    (InvocationState.RUNNING.value, now + lease, invocation_id),
                )
                row = db.execute("SELECT * FROM invocations WHERE id=?", (invocation_id,)).fetchone()
                claimed.append(self._invocation(row))
        return claimed

    def next_invocation_due(self) -> float | None:
        """When the earliest queued invocation is due (None: the queue is empty)."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM invocations WHERE state=?", (InvocationState.QUEUED.value,)
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def renew_leases(self, invocation_ids: Sequence[str], *, until: float) -> None:
        """Extend the leases of invocations still being delivered."""
        if not invocation_ids:
            return
        with self.transaction() as db:
            db.executemany(
                "UPDATE invocations SET lease_until=? WHERE id=? AND state=?",
                [(until, i, InvocationState.RUNNING.value) for i in invocation_ids],
            )

    def finish_invocation(
        self,
        claimed: Invocation,
        state: InvocationState,
        *,
        result: str | None = None,
        error: str | None = None,
        now: float | None = None,
    ) -> bool:
        """The attempt ``claimed`` ended the invocation: ``succeeded`` (with the result)
        or ``dead`` (with the error). False when that attempt was no longer the
        current one (its lease ran out and it was claimed again), and nothing changed."""
        assert state in (InvocationState.SUCCEEDED, InvocationState.DEAD)
        now = time.time() if now is None else now
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE invocations SET state=?, result=?, error=?, finished_at=?, lease_until=NULL"
                " WHERE id=? AND state=? AND attempts=?",
                (state.value, result, error, now, claimed.id, InvocationState.RUNNING.value, claimed.attempts),
            )
            return cursor.rowcount > 0

    def requeue_invocation(self, claimed: Invocation, *, at: float, error: str, count_attempt: bool = True) -> bool:
        """The attempt ``claimed`` failed in a way worth retrying: queue it again, due
        ``at``. ``count_attempt=False``: it was never delivered (nothing to deliver
        to yet), so it does not use up an attempt. False when that attempt was no
        longer the current one."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE invocations SET state=?, next_attempt_at=?, error=?, lease_until=NULL,"
                " attempts=attempts-? WHERE id=? AND state=? AND attempts=?",
                (
                    InvocationState.QUEUED.value,
                    at,
                    error,
                    0 if count_attempt else 1,
                    claimed.id,
                    InvocationState.RUNNING.value,
                    claimed.attempts,
                ),
            )
            return cursor.rowcount > 0

    def requeue_running(self, *, now: float | None = None) -> int:
        """At start-up: every ``running`` invocation goes back to the queue, due now.
        The process delivering them is gone, and whether they ran is unknown, so they
        run again (at least once). Returns how many."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE invocations SET state=?, lease_until=NULL, next_attempt_at=? WHERE state=?",
                (InvocationState.QUEUED.value, now, InvocationState.RUNNING.value),
            )
            return cursor.rowcount

    def retry_invocation(self, invocation_id: str, *, now: float | None = None) -> bool:
        """A dead invocation goes back to the queue, due now, with all its attempts
        again. False when it is not dead (or unknown)."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE invocations SET state=?, attempts=0, next_attempt_at=?, finished_at=NULL"
                " WHERE id=? AND state=?",
                (InvocationState.QUEUED.value, now, invocation_id, InvocationState.DEAD.value),
            )
            return cursor.rowcount > 0

    def prune_invocations(self, *, finished_before: float) -> int:
        """Forget succeeded invocations finished before a time (dead ones stay: the
        dead-letter list is for people to read). Returns how many."""
        with self.transaction() as db:
            cursor = db.execute(
                "DELETE FROM invocations WHERE state=? AND finished_at<?",
                (InvocationState.SUCCEEDED.value, finished_before),
            )
            return cursor.rowcount

    # -- schedules --------------------------------------------------------------
    def schedule_marks(self) -> dict[tuple[str, str], float]:
        """(app, function) -> the time of its schedule's last fire (or first sighting)."""
        with self._lock:
            rows = self._db.execute("SELECT app, function, last_fire FROM schedules").fetchall()
        return {(str(r[0]), str(r[1])): float(r[2]) for r in rows}

    def mark_schedule(self, app: str, function: str, at: float) -> None:
        """A schedule seen for the first time: it fires next after ``at``."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO schedules(app, function, last_fire) VALUES(?,?,?)"
                " ON CONFLICT(app, function) DO UPDATE SET last_fire=excluded.last_fire",
                (app, function, at),
            )

    def fire_schedule(self, new: NewInvocation, *, fire_at: float, now: float | None = None) -> tuple[Invocation, bool]:
        """Queue a schedule's run for the fire time ``fire_at`` and record that fire,
        in one transaction: a crash leaves either both or neither."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            queued = self._insert_invocation(db, new, now)
            db.execute(
                "INSERT INTO schedules(app, function, last_fire) VALUES(?,?,?)"
                " ON CONFLICT(app, function) DO UPDATE SET last_fire=excluded.last_fire",
                (new.app, new.function, fire_at),
            )
        return queued

    def forget_schedules(self, keep: set[tuple[str, str]]) -> int:
        """Drop the marks of schedules no serving revision has any more (a schedule
        that comes back later starts afresh). Returns how many."""
        gone = [key for key in self.schedule_marks() if key not in keep]
        if not gone:
            return 0
        with self.transaction() as db:
            db.executemany("DELETE FROM schedules WHERE app=? AND function=?", gone)
        return len(gone)

    @staticmethod
    def _invocation(row: sqlite3.Row) -> Invocation:
        return Invocation(
            id=row["id"],
            app=row["app"],
            function=row["function"],
            revision=row["revision"],
            kind=InvocationKind(row["kind"]),
            payload=row["payload"],
            idempotency_key=row["idempotency_key"],
            state=InvocationState(row["state"]),
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            next_attempt_at=row["next_attempt_at"],
            lease_until=row["lease_until"],
            result=row["result"],
            error=row["error"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
        )

    # -- event keys -------------------------------------------------------------
    # Per-app credentials of outside producers of events (``control.api``): each
    # allows posting events to its one app. Only the SHA-256 of the secret is
    # kept; the key itself is shown once, when it is created.
    def create_event_key(self, app: str, *, name: str, secret_hash: str) -> str:
        """Store a new key of ``app`` with the hash of its secret; its id."""
        with self.transaction() as db:
            while True:
                key_id = secrets.token_hex(4)
                try:
                    db.execute(
                        "INSERT INTO event_keys(id, app, name, secret_hash, created_at) VALUES(?,?,?,?,?)",
                        (key_id, app, name, secret_hash, time.time()),
                    )
                except sqlite3.IntegrityError:
                    continue  # the id is taken (1 in 4 billion): draw another
                break
            self._event(db, app, f"event key {key_id} ({name}) created")
        return key_id

    def event_keys(self, app: str) -> list[EventKey]:
        """The app's event keys, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM event_keys WHERE app=? ORDER BY created_at, id", (app,)
            ).fetchall()
        return [EventKey(**dict(r)) for r in rows]

    def event_key(self, key_id: str) -> EventKey | None:
        """The key with this id, of whichever app (to verify a key posted with)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM event_keys WHERE id=?", (key_id,)).fetchone()
        return None if row is None else EventKey(**dict(row))

    def revoke_event_key(self, app: str, key_id: str) -> bool:
        """Delete the app's key ``key_id``; False when the app has no such key."""
        with self.transaction() as db:
            row = db.execute("SELECT name FROM event_keys WHERE app=? AND id=?", (app, key_id)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM event_keys WHERE id=?", (key_id,))
            self._event(db, app, f"event key {key_id} ({row['name']}) revoked")
        return True

    def touch_event_key(self, key_id: str, *, at: float | None = None) -> None:
        """Record a use of the key (``last_used_at``)."""
        with self.transaction() as db:
            db.execute("UPDATE event_keys SET last_used_at=? WHERE id=?", (time.time() if at is None else at, key_id))


@dataclass(frozen=True)
class EventKey:
    """A producer's credential to post events to one app (``Store.create_event_key``)."""

    id: str
    app: str
    #: Given by the operator, to tell keys apart ("producer" by default).
    name: str
    #: SHA-256 (hex) of the secret; the secret itself is never stored.
    secret_hash: str = field(repr=False)
    created_at: float
    last_used_at: float | None

    def to_json(self) -> dict[str, Any]:
        """The view of the API: never the secret, nor its hash."""
        return {
            "id": self.id,
            "app": self.app,
            "name": self.name,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


class InvocationState(enum.StrEnum):
    """Lifecycle of a durable invocation (``control.invocations``)."""

    #: Waiting for its (next) attempt, due at ``next_attempt_at``.
    QUEUED = "queued"
    #: An attempt is being delivered; the dispatcher holds it until ``lease_until``.
    RUNNING = "running"
    #: The function answered 2xx; ``result`` holds its answer.
    SUCCEEDED = "succeeded"
    #: Given up on (the dead-letter list): a 4xx, or every attempt failed; ``error`` says why.
    #: ``clearway invocations retry`` queues it again.
    DEAD = "dead"


class InvocationKind(enum.StrEnum):
    """What made an invocation."""

    #: ``Function.spawn`` from an app, or ``clearway invoke --async``: the payload is the keyword arguments.
    SPAWN = "spawn"
    #: A CloudEvent posted to the app's events ingress: the payload is the event, structured JSON.
    EVENT = "event"
    #: A fire of the function's schedule: the payload is ``{}``.
    CRON = "cron"


@dataclass(frozen=True)
class NewInvocation:
    """An invocation to queue (`Store.enqueue_invocations`)."""

    app: str
    function: str
    kind: InvocationKind
    #: JSON: the keyword arguments (spawn, cron) or the structured CloudEvent (event).
    payload: str
    max_attempts: int
    idempotency_key: str | None = None
    #: The revision to deliver to; None: whichever serves the app when it runs.
    revision: str | None = None
    #: Not due before this time (default: at once).
    not_before: float | None = None


@dataclass(frozen=True)
class Invocation:
    """One durable invocation of a function, as stored."""

    id: str
    app: str
    function: str
    revision: str | None
    kind: InvocationKind
    payload: str = field(repr=False)
    idempotency_key: str | None
    state: InvocationState
    #: Attempts made so far (the one running included); ``x-clearway-attempt`` of the current one.
    attempts: int
    max_attempts: int
    next_attempt_at: float
    lease_until: float | None
    result: str | None = field(repr=False)
    #: Why the last attempt failed (kept while retrying), or why it is dead.
    error: str | None
    created_at: float
    finished_at: float | None

    def to_json(self, *, with_payload: bool = True) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": self.id,
            "app": self.app,
            "function": self.function,
            "revision": self.revision,
            "kind": self.kind.value,
            "state": self.state.value,
            "idempotency_key": self.idempotency_key,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "next_attempt_at": self.next_attempt_at if self.state is InvocationState.QUEUED else None,
            "error": self.error,
            "result": _json_or_text(self.result),
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }
        if with_payload:
            view["payload"] = _json_or_text(self.payload)
        return view


def _json_or_text(text: str | None) -> Any:
    """A stored answer as the JSON it holds, or as text when it is not JSON."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
