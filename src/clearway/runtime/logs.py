"""Log files: tail, follow, read since a position; copytruncate rotation for the platform's.

A replica's log is written by its log writer (`clearway.runtime.logwriter`),
which rotates by *rename*: ``PATH`` becomes ``PATH.1`` and a new ``PATH`` is
started. The readers here therefore never trust a byte offset alone:
`follow_log` keeps the file it is reading open and, when ``PATH`` names a new
file, drains the old one before moving on; `read_log_since` takes a
`LogPosition` (inode and offset) and finds the text written since in
``PATH.1`` and ``PATH``; `tail_log` reaches into ``PATH.1`` when ``PATH`` was
just started.

`rotate_log` is the older copy-and-truncate rotation, still used for the
gateway's own logs, which the gateway appends to with ``O_APPEND`` itself.
Copying needs free space, so it is no use on a full disk; replica logs do not
use it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO, NamedTuple

__all__ = [
    "LogPosition",
    "follow_log",
    "log_position",
    "read_log_since",
    "rotate_log",
    "tail_log",
]


class LogPosition(NamedTuple):
    """A point in a log that survives rotation by rename: which file, and where in it."""

    inode: int
    offset: int


def log_position(path: Path) -> LogPosition:
    """The current end of ``path`` (inode 0, offset 0 when it does not exist yet)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return LogPosition(0, 0)
    return LogPosition(info.st_ino, info.st_size)


def _rotated(path: Path, n: int = 1) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_log(path: Path, *, max_bytes: int, keep: int) -> bool:
    """Rotate ``path`` if it is larger than ``max_bytes``; returns whether it did."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size <= max_bytes:
        return False
    if keep > 0:
        for n in range(keep - 1, 0, -1):
            older = path.with_name(f"{path.name}.{n}")
            if older.exists():
                older.replace(path.with_name(f"{path.name}.{n + 1}"))
        shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    with open(path, "r+b") as log:
        log.truncate(0)
    return True


def _read_tail_bytes(path: Path, max_bytes: int, start: int = 0) -> bytes:
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            if start > size:  # rotated since `start` was taken
                start = 0
            log.seek(max(start, size - max_bytes))
            return log.read()
    except FileNotFoundError:
        return b""


def tail_log(path: Path, lines: int = 100, *, max_bytes: int = 1024 * 1024) -> list[str]:
    """The last ``lines`` lines of the log (looking at most at its last ``max_bytes``),
    reaching into ``PATH.1`` when ``PATH`` holds fewer."""
    if lines <= 0:
        return []
    data = _read_tail_bytes(path, max_bytes)
    if data.count(b"\n") < lines and len(data) < max_bytes:
        data = _read_tail_bytes(_rotated(path), max_bytes - len(data)) + data
    return data.decode("utf-8", "replace").splitlines()[-lines:]


def read_log_since(
    path: Path, since: LogPosition, *, lines: int = 40, max_bytes: int = 16384
) -> str:
    """The last ``lines`` lines written after ``since`` (e.g. by one process), across a
    rotation: from ``since`` in the file that was ``PATH`` then, and all of ``PATH`` now."""
    data = b""
    try:
        current = os.stat(path).st_ino
    except FileNotFoundError:
        current = 0
    if since.inode == current:
        data = _read_tail_bytes(path, max_bytes, start=since.offset)
    else:
        older = _rotated(path)
        try:
            older_inode = os.stat(older).st_ino
        except FileNotFoundError:
            older_inode = 0
        if since.inode and older_inode == since.inode:
            data = _read_tail_bytes(older, max_bytes, start=since.offset)
        data += _read_tail_bytes(path, max_bytes)
    text = data[-max_bytes:].decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _open_log(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


async def follow_log(
    path: Path, *, lines: int = 10, poll_interval: float = 0.2
) -> AsyncGenerator[str, None]:
    """Yield the last ``lines`` lines, then every new line as it is written, forever.

    Polls (no inotify in the standard library). Keeps the file it reads open, so
    a rotation by rename loses nothing: when ``PATH`` names another file, the
    rest of the old one is read first. A file that shrinks in place (copytruncate)
    is read again from the top. The reads are synchronous: a local file read of
    what was just appended is cheaper than a trip to a thread.
    """
    for line in tail_log(path, lines):
        yield line
    log = _open_log(path)
    if log is not None:
        log.seek(0, os.SEEK_END)
    pending = b""
    try:
        while True:
            if log is None:
                log = _open_log(path)
                if log is None:
                    await asyncio.sleep(poll_interval)
                    continue
            if os.fstat(log.fileno()).st_size < log.tell():  # truncated in place
                log.seek(0)
                pending = b""
            chunk = log.read()
            if chunk:
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    yield raw.decode("utf-8", "replace")
                continue
            if _inode(path) != os.fstat(log.fileno()).st_ino:
                # Rotated. Every write to the old file happened before the rename we
                # just observed, so one more read drains it.
                rest = log.read()
                log.close()
                log = None
                if rest:
                    *complete, pending = (pending + rest).split(b"\n")
                    for raw in complete:
                        yield raw.decode("utf-8", "replace")
                continue  # a line split across the two files continues in `pending`
            await asyncio.sleep(poll_interval)
    finally:
        if log is not None:
            log.close()
