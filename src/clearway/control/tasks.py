"""Supervised background tasks for the control plane.

Every long-running loop is started here, by name. A loop that raises is logged
with its traceback and restarted after a growing delay (capped), instead of
dying silently as a bare ``create_task`` would; ``close`` cancels the tasks in
the reverse order of their start and waits for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("clearway.control")


class TaskSupervisor:
    def __init__(self, *, max_backoff: float = 10.0) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._max_backoff = max_backoff

    def start(self, name: str, loop_body: Callable[[], Awaitable[None]]) -> None:
        """Run ``loop_body()`` forever under ``name``, restarting it when it fails."""
        self._tasks.append(asyncio.create_task(self._guard(name, loop_body), name=name))

    async def _guard(self, name: str, loop_body: Callable[[], Awaitable[None]]) -> None:
        delay = 0.1
        while True:
            try:
                await loop_body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %r failed; restarting in %.1fs", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)

    async def close(self) -> None:
        for task in reversed(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
