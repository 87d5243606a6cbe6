"""``$CLEARWAY_HOME``: where one platform instance keeps everything.

    token            API token (mode 0600), created on first start
    keys/            the platform's signing key (0700; signing.pem 0600, signing.pub.pem)
    state.db         desired state + replica records (SQLite, WAL; 0600 with -wal/-shm)
    state.witness    commit counter of state.db, written after each commit (see control.integrity)
    control.json     how to reach the running control plane (pid, API URL, ports)
    control.lock     held (flock) by the running control plane: one per home
    platform.json    the settings of the last ``up`` (gateway host/port, domains), kept
                     outside state.db so a damaged or lost database cannot move the gateway
    code/<app>/<digest>/   immutable code snapshots (root:<app gid>, 0750/0640)
    envs/<digest>/   app environments built by uv, named by their resolved pins (0755:
                     public packages only); .inputs/ maps dependency-file digests to them,
                     .staging/ and .locks/ are where and how they are built
    uploads/         uploads being received (streamed to disk, then unpacked)
    git/<app>.git/   each app's bare git repository (control.git), with its pre-receive hook
    replicas/<id>/   each replica's own working directory
    logs/            control plane, gateway, access log, logs/<app>/<replica>.log, and
                     logs/builds/ (uv's output of each environment build)
    routes.json      the gateway's route table (written atomically)
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def default_home() -> Path:
    return Path(os.environ.get("CLEARWAY_HOME") or Path.home() / ".clearway").expanduser()


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls, root: Path | None = None) -> Home:
        return cls((root or default_home()).resolve())

    @property
    def token_path(self) -> Path:
        return self.root / "token"

    @property
    def db_path(self) -> Path:
        return self.root / "state.db"

    @property
    def control_path(self) -> Path:
        return self.root / "control.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "control.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def witness_path(self) -> Path:
        return self.root / "state.witness"

    @property
    def gateway_record_path(self) -> Path:
        """Written by the local backend for the gateway it runs (pid, host, port)."""
        return self.root / "gateway.json"

    @property
    def platform_path(self) -> Path:
        return self.root / "platform.json"

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def create(self) -> None:
        """Create the home with modes that keep it the platform's alone.

        The home is 0700 and the key directory 0700; ``code`` is 0711 so an
        app's uid can reach its own snapshot (``code/<app>`` carries the app's
        group) without listing anyone else's.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.logs.mkdir(exist_ok=True)
        self.keys.mkdir(mode=0o700, exist_ok=True)
        self.keys.chmod(0o700)
        self.code.mkdir(exist_ok=True)
        self.code.chmod(0o711)
        self.uploads.mkdir(mode=0o700, exist_ok=True)
        self.uploads.chmod(0o700)
        if self.token_path.exists():
            self.token_path.chmod(0o600)

    def token(self, *, create: bool = False) -> str | None:
        """The API token; with ``create``, made on first use with mode 0600."""
        try:
            return self.token_path.read_text().strip()
        except FileNotFoundError:
            if not create:
                return None
        value = secrets.token_urlsafe(32)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        return value

    def control_info(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.control_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_control_info(self, info: dict[str, Any]) -> None:
        _write_json(self.control_path, info)

    def last_gateway(self) -> tuple[str, int] | None:
        """Host and port of the running gateway, else of the last ``up``; None when unknown.

        Read from files kept outside ``state.db`` on purpose: whatever happens
        to the database, a restart keeps the gateway where clients expect it.
        """
        for path in (self.gateway_record_path, self.platform_path):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("port"), int) and isinstance(data.get("host"), str):
                return data["host"], data["port"]
        return None

    def platform_settings(self) -> dict[str, Any]:
        try:
            data = json.loads(self.platform_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_platform_settings(self, settings: dict[str, Any]) -> None:
        _write_json(self.platform_path, settings)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)
