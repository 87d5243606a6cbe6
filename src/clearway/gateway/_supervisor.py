"""Named, supervised background tasks of one gateway.

Every coroutine the gateway runs outside a protocol callback - the access-log
flusher, the signal-driven reloads, and the slow path of a request (holding
for a replica, connecting, retrying) - is started here: it gets a name that
says what it is, its unexpected failure is logged with that name and reported
to an ``on_failure`` callback (a request's callback answers its client with a
502), and ``aclose()`` cancels what is left, in reverse start order, when the
gateway shuts down.  Nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["TaskSupervisor"]

logger = logging.getLogger("clearway.gateway")


class TaskSupervisor:
    """Owns a set of named tasks; see the module docstring."""

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[Any], Callable[[BaseException], None] | None] = {}

    def spawn(
        self,
        name: str,
        coro: Coroutine[Any, Any, None],
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks[task] = on_failure
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        on_failure = self._tasks.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        logger.error("gateway task %r failed", task.get_name(), exc_info=exc)
        if on_failure is not None:
            try:
                on_failure(exc)
            except Exception:
                logger.exception("handling the failure of gateway task %r failed", task.get_name())

    def __len__(self) -> int:
        return len(self._tasks)

    async def aclose(self) -> None:
        """Cancel every task still running, newest first, and wait for them."""
        tasks = list(self._tasks)[::-1]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                pass  # already logged by _done
