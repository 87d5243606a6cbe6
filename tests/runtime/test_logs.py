"""Replica logs: the writer's cap under a real flood, rename rotation, a full disk, readers."""

# Tests check small local files inline; a thread hop would only obscure them.

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clearway.runtime import ReplicaState, Supervisor, follow_log, tail_log
from clearway.runtime.logs import log_position, read_log_since, rotate_log
from clearway.runtime.logwriter import LogWriter
from tests.runtime.conditions import poll_until
from tests.runtime.conftest import FAST, SpecFactory, StatusLog

# Writes as fast as it can, forever.
FLOOD_WORKER = """
import os
import clearway as cw

app = cw.App("t")

@app.worker()
def flood():
    line = b"x" * 1023 + b"\\n"
    block = line * 64
    while True:
        os.write(1, block)
"""


def _disk_use(log: Path, keep: int) -> int:
    """Bytes held by the log and its rotated copies, each file counted once (by inode)."""
    seen: dict[int, int] = {}
    for path in [log, *(Path(f"{log}.{n}") for n in range(1, keep + 2))]:
        with contextlib.suppress(FileNotFoundError):
            info = path.stat()
            seen[info.st_ino] = info.st_blocks * 512
    return sum(seen.values())


async def test_the_writer_caps_a_flooding_replica(
    make_spec: SpecFactory, status_log: StatusLog
) -> None:
    max_bytes, keep = 256 * 1024, 2
    config = dataclasses.replace(FAST, log_max_bytes=max_bytes, log_keep=keep)
    spec = make_spec(FLOOD_WORKER, component="flood", kind="worker")
    log = spec.log_path
    # Rotations seen: each change of the inode behind ``log.1``. Not a set of
    # inodes: the file system reuses the freed ones (with keep=2 they cycle
    # through three), so distinct inodes would stop growing.
    rotations: list[int] = []
    peak = 0

    def rotated_several_times() -> bool:
        nonlocal peak
        peak = max(peak, _disk_use(log, keep))
        assert not Path(f"{log}.{keep + 1}").exists()
        with contextlib.suppress(FileNotFoundError):
            inode = Path(f"{log}.1").stat().st_ino
            if not rotations or rotations[-1] != inode:
                rotations.append(inode)
        return len(rotations) >= 10

    async with Supervisor(on_change=status_log, config=config) as supervisor:
        await supervisor.start(spec)
        await poll_until(rotated_several_times, within=60, what="the log rotated 10 times")
        await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    slack = 16 * 1024  # the supervisor's own lines, and file system block rounding
    print(
        f"peak disk use {peak} bytes over {len(rotations)} rotations; cap {(keep + 1) * max_bytes}"
    )
    assert peak <= (keep + 1) * max_bytes + slack
    assert _disk_use(log, keep) <= (keep + 1) * max_bytes + slack


def test_rotation_by_rename_keeps_the_newest_copies(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    writer = LogWriter(str(log), max_bytes=100, keep=2)
    for generation in range(5):
        writer.write(f"generation {generation}\n".encode() * 6)  # 78 bytes: one per file
    writer.close()
    assert log.read_text().startswith("generation 4")
    assert Path(f"{log}.1").read_text().startswith("generation 3")
    assert Path(f"{log}.2").read_text().startswith("generation 2")
    assert not Path(f"{log}.3").exists()
    assert all(p.stat().st_size <= 100 for p in tmp_path.iterdir())


def test_a_write_larger_than_the_cap_is_split(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    writer = LogWriter(str(log), max_bytes=10, keep=0)
    writer.write(b"0123456789abcdefghij!")
    writer.close()
    assert log.read_bytes() == b"!"  # keep=0: older pieces are deleted, never kept
    assert [p.name for p in tmp_path.iterdir()] == ["r.log"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_frees_rotated_copies_then_counts_what_it_drops(small_disk: Path) -> None:
    log = small_disk / "r.log"
    writer = LogWriter(str(log), max_bytes=300 * 1024, keep=3)
    chunk = b"y" * 1023 + b"\n"
    for _ in range(700):  # two rotated copies and most of a third file
        writer.write(chunk)
    assert Path(f"{log}.1").exists() and Path(f"{log}.2").exists()
    filler = small_disk / "filler"

    def fill_the_disk() -> None:
        with open(filler, "ab", buffering=0) as f:
            for size in (65536, 4096, 1):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)

    fill_the_disk()
    writer.write(chunk)  # no space: the rotated copies go first, then the write succeeds
    assert not Path(f"{log}.1").exists() and not Path(f"{log}.2").exists()
    assert writer.dropped == 0
    fill_the_disk()  # now the disk is full for real
    for _ in range(10):
        writer.write(chunk)
    dropped = writer.dropped
    assert dropped >= len(chunk)

    filler.unlink()  # space comes back
    writer.write(b"back\n")
    writer.close()
    assert log.read_text().endswith(
        f"[clearway log] disk full: {dropped} bytes of output were dropped\nback\n"
    )
    assert writer.dropped == 0


async def test_follow_reads_across_rename_rotation_without_losing_lines(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    writer = LogWriter(str(log), max_bytes=64, keep=1)
    follower = follow_log(log, lines=0, poll_interval=0.01)
    pending = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)  # let the follower open the (empty) file
    received: list[str] = []
    for i in range(40):  # 10-byte lines, 6 per file: many rotations
        writer.write(f"line {i:04d}\n".encode())
        received.append(await asyncio.wait_for(pending, 10))
        pending = asyncio.ensure_future(anext(follower))
    pending.cancel()
    await follower.aclose()
    writer.close()
    assert received == [f"line {i:04d}" for i in range(40)]


def test_tail_and_read_since_reach_into_the_rotated_copy(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    writer = LogWriter(str(log), max_bytes=100, keep=2)
    writer.write(b"".join(f"old {i}\n".encode() for i in range(5)))
    since = log_position(log)
    writer.write(b"".join(f"new {i:02d}\n".encode() for i in range(11)))  # rotates once
    writer.close()
    assert Path(f"{log}.1").read_text().startswith("old 0")
    assert log.read_text().startswith("new 00")
    assert tail_log(log, 13) == ["old 3", "old 4", *(f"new {i:02d}" for i in range(11))]
    assert read_log_since(log, since, lines=100).splitlines() == [f"new {i:02d}" for i in range(11)]
    assert tail_log(tmp_path / "missing.log") == []


def test_copytruncate_rotation_of_platform_logs(tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    for generation in range(4):
        log.write_text(f"generation {generation}\n" * 20)
        assert rotate_log(log, max_bytes=10, keep=2)
    assert Path(f"{log}.1").read_text().startswith("generation 3")
    assert Path(f"{log}.2").read_text().startswith("generation 2")
    assert not Path(f"{log}.3").exists()
    assert not rotate_log(log, max_bytes=10, keep=2)  # empty now
