"""Supervised background tasks: named, watched, and cancelled in order.

An ``asyncio.create_task`` whose result nobody awaits swallows its exception
until garbage collection, and nobody can cancel it on shutdown. Every
long-running task of the runtime goes through `BackgroundTasks` instead
(the idea of kopf's ``aiotasks``):

* each task has a name (shown by ``asyncio`` debugging tools and in our logs);
* when one fails, the failure is logged with its traceback and handed to the
  task's ``on_failure`` callback, which acts on it (the supervisor marks the
  replica FAILED rather than leaving it silently unsupervised);
* `close` cancels the tasks in the reverse order of their start (later tasks
  may depend on earlier ones, not the other way round) and awaits each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["BackgroundTasks"]

FailureHandler = Callable[[BaseException], None]


class BackgroundTasks:
    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def start(
        self,
        name: str,
        coro: Coroutine[Any, Any, Any],
        *,
        on_failure: FailureHandler | None = None,
    ) -> asyncio.Task[Any]:
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise RuntimeError(f"a background task named {name!r} is already running")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._finished(name, t, on_failure))
        return task

    def _finished(
        self, name: str, task: asyncio.Task[Any], on_failure: FailureHandler | None
    ) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self._logger.error("background task %s failed", name, exc_info=error)
        if on_failure is not None:
            try:
                on_failure(error)
            except Exception:
                self._logger.exception("handling the failure of background task %s failed", name)

    def get(self, name: str) -> asyncio.Task[Any] | None:
        return self._tasks.get(name)

    async def cancel(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is None:
            return
        task.cancel()
        # wait() rather than `await task`: a task that already failed must not raise here.
        await asyncio.wait([task])

    async def close(self) -> None:
        for name in reversed(list(self._tasks)):
            await self.cancel(name)
