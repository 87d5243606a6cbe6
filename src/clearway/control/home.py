"""``$CLEARWAY_HOME``: where one platform instance keeps everything.

    token            API token (mode 0600), created on first start
    state.db         desired state + replica records (SQLite, WAL)
    control.json     how to reach the running control plane (pid, API URL, ports)
    control.lock     held (flock) by the running control plane: one per home
    code/<digest>/   immutable code snapshots of revisions
    replicas/<id>/   each replica's own working directory
    logs/            control plane, gateway, access log, and logs/<app>/<replica>.log
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

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.logs.mkdir(exist_ok=True)

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
        tmp = self.control_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.control_path)
