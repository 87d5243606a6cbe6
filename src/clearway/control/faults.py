"""Faults of the machine the control plane runs on, turned into clear states.

Two faults must never leave the platform stuck or lying (issue 5):

* **a full disk** — SQLite answers ``database or disk is full`` and writes of
  uploads or snapshots fail with ``ENOSPC``. Each becomes `StorageFull`, whose
  message names the filesystem, the bytes still free there and what to do; the
  API answers it with 507 and the reconciler logs it once per episode and keeps
  going, so the platform recovers by itself once space is freed;
* **state that lost committed transactions or fails SQLite's integrity check**
  at start-up becomes `StateIntegrityError` naming the recovery command, so
  the platform never silently starts empty (see ``control.integrity``).

Both are ``ClearwayError`` so the CLI prints them as one line saying what to do.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from clearway.exceptions import ClearwayError

#: errno values that mean "no room left" (a quota is a full disk to the user).
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class StorageFull(ClearwayError):
    """The filesystem holding the platform's state has no room left."""

    def __init__(self, path: Path, *, what: str) -> None:
        self.path = path
        self.mount_point = mount_point(path)
        self.free_bytes = free_bytes(path)
        self.message = (
            f"no space left on {self.mount_point} (holding {path}; {self.free_bytes} bytes free) "
            f"while {what}: free space on that filesystem (old logs, unused code snapshots, other "
            "files) and retry; apps keep serving meanwhile"
        )
        super().__init__(self.message)


class StateIntegrityError(ClearwayError):
    """The state database is damaged or lost committed changes; refused at start-up."""


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    current = path.resolve()
    while not current.exists() and current != current.parent:
        current = current.parent
    device = current.stat().st_dev
    while current != current.parent and current.parent.stat().st_dev == device:
        current = current.parent
    return current


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (-1 if unknown)."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    try:
        stat = os.statvfs(current)
    except OSError:
        return -1
    return stat.f_bavail * stat.f_frsize


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` means "the disk is full", from SQLite or from a plain write."""
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        # SQLITE_FULL; the text is stable across SQLite versions.
        return "database or disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS
