"""Workers that run under coordination: singletons and sharded workers.

A replica of a ``@app.singleton`` runs its function only while it holds the
lock ``singleton/<name>`` (`lead`); a replica of a sharded worker runs one call
per shard it owns (`run_sharded`, the loop itself is
`clearway.sdk.sharding.ShardedWorker`). Both run in the replica process
(`clearway.runtime.replica` dispatches to them) and reach the coordination
backend through the SDK, over the replica channel, like app code does. They are
apart from the replica entry point because they are about who may act, not how
a process serves: the rules of resigning, losing and standing by live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from clearway.runtime.exit_codes import ExitCode
from clearway.sdk.coordination import Leadership, Lock, LockError
from clearway.sdk.sharding import ShardedWorker

__all__ = ["lead", "run_sharded"]


def _say(message: str) -> None:
    print(f"[clearway] {message}", file=sys.stderr, flush=True)


def lead(target: Callable[..., Any], name: str, *, ttl: float) -> int:
    """A singleton: run ``target`` only while this replica holds lock ``singleton/<name>``.

    The replica stands by (a queued acquire) until it leads, runs the function
    with a `Leadership`, and when leadership is lost stands by again: an async
    function is cancelled first; a sync one cannot be interrupted, so the
    process ends (exit code LEADERSHIP_LOST) and is restarted as a standby. On
    SIGTERM it resigns (releases the lock), so a standby takes over at once
    rather than after the lease's TTL. A function that returns resigns too, and
    its replica exits like any worker's.
    """
    lock = Lock(f"singleton/{name}", ttl=ttl)
    takes_leadership = bool(inspect.signature(target).parameters)
    try:
        while True:
            _say(f"standing by to lead {name}")
            try:
                lock.acquire()
            except LockError as error:  # the control plane is restarting, say: stand by again
                _say(f"{error}; retrying in 1s")
                time.sleep(1.0)
                continue
            _say(f"leading {name} (fencing token {lock.token})")
            try:
                if inspect.iscoroutinefunction(target):
                    lost = asyncio.run(_lead_async(target, lock, takes_leadership))
                else:
                    lost = _lead_sync(target, lock, takes_leadership)
            except SystemExit:
                raise
            except BaseException:
                _say(f"the singleton {name} raised:")
                traceback.print_exc()
                return ExitCode.APP_ERROR
            if not lost:
                _say(f"the singleton {name} returned; resigning")
                return ExitCode.OK
            _say(f"leadership of {name} lost (the lease expired or was revoked); standing by again")
            lock.release()
    finally:
        lock.release()


async def _lead_async(target: Callable[..., Any], lock: Lock, takes_leadership: bool) -> bool:
    """Run an async singleton until it returns (False) or leadership is lost (True)."""
    leadership = Leadership(lock, loop=asyncio.get_running_loop())
    if lock.lost.is_set():
        return True
    work = asyncio.ensure_future(target(leadership) if takes_leadership else target())
    lost = asyncio.ensure_future(leadership.lost.wait())
    await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        lost.cancel()
        work.result()
        return False
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work
    return True


def _lead_sync(target: Callable[..., Any], lock: Lock, takes_leadership: bool) -> bool:
    """Run a sync singleton; if leadership is lost meanwhile the process ends (see `lead`)."""

    def end_process() -> None:
        _say("leadership lost while the sync singleton runs; ending the process so it cannot act as leader")
        os._exit(ExitCode.LEADERSHIP_LOST)

    leadership = Leadership(lock)
    lock.on_lost(end_process)
    if lock.lost.is_set():
        end_process()
    target(leadership) if takes_leadership else target()
    return False


def run_sharded(sharded: ShardedWorker) -> int:
    """A sharded worker: own the shards assigned to this replica (`clearway.sdk.sharding`).

    SIGTERM is a graceful leave: every call is cancelled, then the lease is
    revoked, so the other replicas take the shards over at their next read of
    the membership (a third of the TTL), not after the TTL. A call that raises
    ends the replica the same way (it is restarted, and joins again)."""

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await sharded.run(stop)

    try:
        asyncio.run(run())
    except SystemExit:
        raise
    except BaseException:
        _say(f"a call of the sharded worker {sharded.worker} raised:")
        traceback.print_exc()
        return ExitCode.APP_ERROR
    _say(f"left the shards of {sharded.worker}")
    return ExitCode.OK
