"""Waiting for the route table to change, for requests that cannot go anywhere yet.

A request whose revision has no ready replica is *held*: it waits until a
reload gives the revision endpoints (or the hold timeout passes).  This is the
foundation for scale-to-zero: the held count per revision, exposed on the admin
socket as ``GET /held`` and in metrics, is what will tell the control plane to
start a replica.

One future per table generation, replaced on every change, wakes every waiter
at once; each waiter then re-resolves its request against the new table.  That
is O(held requests) per reload, and reloads are rare.
"""

from __future__ import annotations

import asyncio

__all__ = ["TableChanges"]


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
