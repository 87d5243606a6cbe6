"""Time, injected.

The supervisor's decisions (how long to back off, whether crashes are a loop,
whether a replica has been ready long enough to forgive its past) depend on
time. Going through a `Clock` lets tests drive those decisions deterministically
with `ManualClock` instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; for durations."""
        ...

    def time(self) -> float:
        """Wall-clock Unix time; for timestamps shown to people."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to; `sleep` returns when `advance` passes its deadline."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, future))
        await future

    @property
    def sleepers(self) -> int:
        """How many coroutines are blocked in `sleep` (lets tests wait until one is)."""
        return sum(1 for _, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        self._now += seconds
        still_sleeping = []
        for deadline, future in self._sleepers:
            if future.done():
                continue
            if deadline <= self._now:
                future.set_result(None)
            else:
                still_sleeping.append((deadline, future))
        self._sleepers = still_sleeping
