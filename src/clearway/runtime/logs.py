"""Replica log files: rotation, tail and follow.

A replica writes stdout and stderr straight into its log file through a
descriptor opened with ``O_APPEND`` (see `clearway.runtime.launcher`); nothing
sits in between, so a replica's output survives a crash of the control plane
and costs no copying. The price is that the replica, not us, holds the file
open, so rotation is "copytruncate": copy the file to ``.1`` (after shifting
``.1`` to ``.2`` and so on), then truncate it in place. Because every write
is an append, the replica's next write lands at the new end of the file rather
than re-creating a hole at its old offset. Lines written between the copy and
the truncation are lost; that window is a few milliseconds per rotation, the
usual trade of copytruncate.

`tail_log` and `follow_log` are what ``clearway logs [-f]`` needs; `follow_log`
notices rotation (the file shrinking) and starts again from the top.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path

__all__ = ["follow_log", "read_log_since", "rotate_log", "tail_log"]


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
    """The last ``lines`` lines of the log (looking at most at its last ``max_bytes``)."""
    if lines <= 0:
        return []
    text = _read_tail_bytes(path, max_bytes).decode("utf-8", "replace")
    return text.splitlines()[-lines:]


def read_log_since(path: Path, offset: int, *, lines: int = 40, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines written at or after byte ``offset`` (e.g. by one process)."""
    text = _read_tail_bytes(path, max_bytes, start=offset).decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _read_from(path: Path, position: int) -> tuple[int, bytes]:
    """(new position, bytes appended since ``position``); restarts at 0 after a rotation."""
    try:
        with open(path, "rb") as log:
            size = os.fstat(log.fileno()).st_size
            if size < position:
                position = 0
            log.seek(position)
            chunk = log.read(size - position)
    except FileNotFoundError:
        return 0, b""
    return position + len(chunk), chunk


async def follow_log(
    path: Path, *, lines: int = 10, poll_interval: float = 0.2
) -> AsyncGenerator[str, None]:
    """Yield the last ``lines`` lines, then every new line as it is written, forever.

    Polls the file (no inotify in the standard library); restarts from the top
    when the file shrinks (rotation) and waits when it does not exist yet. The
    reads are synchronous: a local file read of what was just appended is
    cheaper than a trip to a thread.
    """
    for line in tail_log(path, lines):
        yield line
    try:
        position = os.stat(path).st_size
    except FileNotFoundError:
        position = 0
    pending = b""
    while True:
        new_position, chunk = _read_from(path, position)
        if new_position < position:
            pending = b""
        position = new_position
        if not chunk:
            await asyncio.sleep(poll_interval)
            continue
        *complete, pending = (pending + chunk).split(b"\n")
        for raw in complete:
            yield raw.decode("utf-8", "replace")
