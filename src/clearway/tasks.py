"""Supervised background tasks: named, watched, cancelled in order.

A bare ``asyncio.create_task`` whose result nobody awaits swallows its
exception until garbage collection, and nobody can cancel it on shutdown.
Every long-running coroutine of the control plane, the runtime and the gateway
is started through a `TaskSupervisor` instead (the idea of kopf's ``aiotasks``):

* each task has a name that says what it is (in logs and asyncio debugging);
* when one fails, the failure is logged with its traceback and handed to the
  task's ``on_failure`` callback, which acts on it (a replica is marked
  FAILED, a client gets a 502);
* `start_forever` restarts a loop that fails, after a growing delay, instead of
  letting it die silently;
* `close` cancels what is left, newest first (later tasks may depend on earlier
  ones, not the other way round), and waits for each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["FailureHandler", "TaskSupervisor"]

FailureHandler = Callable[[BaseException], None]


class TaskSupervisor:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._tasks: dict[asyncio.Task[Any], FailureHandler | None] = {}

    def start(
        self, name: str, coro: Coroutine[Any, Any, Any], *, on_failure: FailureHandler | None = None
    ) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = on_failure
        task.add_done_callback(self._finished)
        return task

    def start_forever(
        self, name: str, loop_body: Callable[[], Awaitable[None]], *, max_backoff: float = 10.0
    ) -> asyncio.Task[Any]:
        """Run ``loop_body()`` until it returns, restarting it whenever it raises."""

        async def guard() -> None:
            delay = 0.1
            while True:
                try:
                    await loop_body()
                    return
                except Exception:
                    self._logger.exception("background task %r failed; restarting in %.1fs", name, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, max_backoff)

        return self.start(name, guard())

    def _finished(self, task: asyncio.Task[Any]) -> None:
        on_failure = self._tasks.pop(task, None)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self._logger.error("background task %r failed", task.get_name(), exc_info=error)
        if on_failure is not None:
            try:
                on_failure(error)
            except Exception:
                self._logger.exception("handling the failure of background task %r failed", task.get_name())

    def get(self, name: str) -> asyncio.Task[Any] | None:
        """The newest running task called ``name``."""
        running: list[asyncio.Task[Any]] = list(self._tasks)
        return next((task for task in reversed(running) if task.get_name() == name), None)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task still running, newest first, and wait for each."""
        for task in reversed(list(self._tasks)):
            task.cancel()
            # wait() rather than `await task`: a task that already failed must not raise here.
            await asyncio.wait([task])
