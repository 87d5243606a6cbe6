"""Waiting for conditions that nothing announces (a file appearing, a log line).

Processes do not tell the test when they wrote a file; the only honest way to
wait is to re-check, within a bounded time. This is the one place that polls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path


async def poll_until(condition: Callable[[], bool], *, within: float = 10.0, what: str) -> None:
    """Re-check ``condition`` every 10 ms until it holds; fail after ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"{what}: still not true after {within:g}s") from None


def file_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
