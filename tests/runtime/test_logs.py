"""Replica logs: copytruncate rotation under a live writer, tail and follow."""

# Tests check small local files inline; a thread hop would only obscure them.
# ruff: noqa: ASYNC230, ASYNC240

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from clearway.runtime import ReplicaState, Supervisor, follow_log, rotate_log, tail_log
from tests.runtime.conditions import file_text, poll_until
from tests.runtime.conftest import FAST, SpecFactory, StatusLog

# Writes 50 lines of 100 bytes, then one more line each time the test touches a "next-<n>" file.
CHATTY_WORKER = """
import os, time
import clearway as cw

app = cw.App("t")

@app.worker()
def chatty():
    for i in range(50):
        print(f"line {i:03d} " + "x" * 90)
    n = 0
    while True:
        if os.path.exists(f"next-{n}"):
            print(f"after rotation {n}")
            n += 1
        time.sleep(0.01)
"""


async def test_supervisor_rotates_a_live_log_without_losing_appends(
    make_spec: SpecFactory, status_log: StatusLog
) -> None:
    config = dataclasses.replace(FAST, log_max_bytes=2000, log_keep=2)
    spec = make_spec(CHATTY_WORKER, component="chatty", kind="worker")
    log = spec.log_path
    async with Supervisor(on_change=status_log, config=config) as supervisor:
        await supervisor.start(spec)
        await poll_until(lambda: "line 049" in file_text(log), what="worker wrote its lines")

        assert supervisor.rotate_logs() == [log]
        first = Path(f"{log}.1")
        assert "line 049" in first.read_text()
        assert log.stat().st_size == 0

        (spec.workdir / "next-0").write_text("")
        await poll_until(lambda: "after rotation 0" in file_text(log), what="write after rotation")
        # O_APPEND: the writer continued at the new end, not at its old offset (no NUL hole).
        assert log.read_bytes().startswith(b"after rotation 0")
        assert supervisor.rotate_logs() == []  # small again

        # Follow sees new lines as they are written.
        follower = follow_log(log, lines=1, poll_interval=0.01)
        assert await anext(follower) == "after rotation 0"
        (spec.workdir / "next-1").write_text("")
        assert await asyncio.wait_for(anext(follower), 10) == "after rotation 1"
        await follower.aclose()
        await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)


def test_rotation_keeps_the_newest_copies(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    for generation in range(4):
        log.write_text(f"generation {generation}\n" * 20)
        assert rotate_log(log, max_bytes=10, keep=2)
    assert Path(f"{log}.1").read_text().startswith("generation 3")
    assert Path(f"{log}.2").read_text().startswith("generation 2")
    assert not Path(f"{log}.3").exists()
    assert not rotate_log(log, max_bytes=10, keep=2)  # empty now
    assert not rotate_log(tmp_path / "missing.log", max_bytes=10, keep=2)


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    log.write_text("".join(f"{i}\n" for i in range(1000)))
    assert tail_log(log, 3) == ["997", "998", "999"]
    assert tail_log(log, 0) == []
    assert tail_log(tmp_path / "missing.log") == []


async def test_follow_restarts_from_the_top_after_truncation(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    log.write_text("old line that is rather long\n")
    follower = follow_log(log, lines=0, poll_interval=0.01)
    pending = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)
    log.write_text("")  # truncated, as by rotation
    with open(log, "a") as writer:
        writer.write("new\n")
    assert await asyncio.wait_for(pending, 10) == "new"
    await follower.aclose()
