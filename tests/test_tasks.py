"""Supervised tasks: failures are acted on, loops restart, close cancels in order."""

import asyncio
import logging

import pytest

from clearway.tasks import TaskSupervisor

pytestmark = pytest.mark.timeout(30)


async def test_a_failure_is_logged_and_handed_to_on_failure(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSupervisor(logging.getLogger("test"))
    seen: list[BaseException] = []

    async def boom() -> None:
        raise ValueError("broken")

    task = tasks.start("boom", boom(), on_failure=seen.append)
    await asyncio.wait([task])
    assert [str(e) for e in seen] == ["broken"]
    assert "background task 'boom' failed" in caplog.text
    assert len(tasks) == 0


async def test_start_forever_restarts_a_failing_loop() -> None:
    tasks = TaskSupervisor(logging.getLogger("test"))
    runs: list[int] = []
    done = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("not yet")
        done.set()

    tasks.start_forever("flaky", flaky, max_backoff=0.01)
    await done.wait()
    assert len(runs) == 3
    await tasks.close()


async def test_close_cancels_newest_first_and_get_finds_by_name() -> None:
    tasks = TaskSupervisor(logging.getLogger("test"))
    order: list[str] = []
    started = {"first": asyncio.Event(), "second": asyncio.Event()}

    async def wait_forever(name: str) -> None:
        try:
            started[name].set()
            await asyncio.Event().wait()
        finally:
            order.append(name)

    tasks.start("first", wait_forever("first"))
    tasks.start("second", wait_forever("second"))
    for event in started.values():
        await event.wait()
    assert tasks.get("second") is not None and tasks.get("missing") is None
    await tasks.close()
    assert order == ["second", "first"]
