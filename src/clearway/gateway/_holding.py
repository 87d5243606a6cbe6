"""Waiting for the route table to change, for requests that cannot go anywhere yet.

A request whose revision has no ready replica is *held*: it waits until a
reload gives the revision endpoints (or the hold timeout passes).  This is the
foundation for scale-to-zero: the held count per revision, exposed on the admin
socket as ``GET /held`` and in metrics, is what will tell the control plane to
start a replica.

One future per table generation, replaced on every change, wakes every waiter
at once; each waiter then re-resolves its request against the new table.  That
is O(held requests) per reload, and reloads are rare.

`HoldSequence` counts the requests that *began* to be held, and lets the
admin ``GET /holds`` long-poll wait for the next one: that is how a cold
start reaches the control plane in milliseconds.  A multi-process gateway's
master keeps one too, advanced by its workers' (``_workers.py``).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["HoldSequence", "TableChanges"]


class TableChanges:
    """Lets coroutines wait for the next route-table swap."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """Wake everyone waiting (called after each swap, and on shutdown)."""
        waiter, self._next = self._next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, within: float) -> bool:
        """Wait for the next change; False if ``within`` seconds passed first."""
        if within <= 0:
            return False
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self._next)
        except TimeoutError:
            return False
        return True


class HoldSequence:
    """A counter that only grows, and a wait for it to move."""

    def __init__(self) -> None:
        self.value = 0
        #: Resolved (and dropped) at the next bump; created by the first waiter.
        self._waiter: asyncio.Future[None] | None = None

    def bump(self, by: int = 1) -> None:
        """Add ``by`` and wake every waiter."""
        self.value += by
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, after: int, within: float) -> int:
        """``value`` once it differs from ``after``, or after ``within`` seconds (unchanged then).

        It answers at once when ``value != after``: the reader missed holds
        (or passed -1), or it is ahead (the gateway restarted and counts from
        0 again) and must resynchronise.  One future shared by all waiters, as
        in `TableChanges`: a bump costs one check when nobody waits.
        """
        if self.value != after or within <= 0:
            return self.value
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self._waiter)
        return self.value
