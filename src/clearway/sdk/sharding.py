"""Sharding: the work of a worker split in N shards, spread over its live replicas.

::

    @app.worker(replicas=4, shards=64)
    async def consume(shard: cw.Shard) -> None:
        ...                                   # the work of shard.index of shard.count

    index, owner = cw.shard_for("customer-42", worker="consume")   # its shard, and who owns it

Built on the locks of `clearway.sdk.coordination` (lock names are the app's):

* **Membership.** Each replica of a sharded worker opens one `Session` (one
  lease of ``lease_ttl`` seconds, renewed in the background) and holds lock
  ``shards/<worker>/members/<replica id>`` with it. The live members are the
  holders of the locks under ``shards/<worker>/members/``; a replica that dies
  stops being one when its lease expires, one that stops gracefully at once.
* **Assignment** (`assign`): rendezvous (highest-random-weight) hashing with
  bounded load, pure and deterministic, so every replica computes the same
  assignment from the same members. A join or a leave moves about 1/n of the
  shards (``bench/sharding.py`` measures it), and no member gets more than
  ``capacity`` shards.
* **Ownership.** A replica owns shard s only while it holds lock
  ``shards/<worker>/shard/<s>`` with its session: so **a shard has at most one
  owner at a time**, and ``shard.token`` is that lock's fencing token (it only
  grows across owners). For a shard newly assigned to it, a replica queues for
  its lock — it gets it the moment the previous owner releases it, or that
  owner's lease expires — then calls the function with a `Shard`. For a shard
  no longer assigned to it, it sets ``shard.lost``, cancels the call, waits
  for it to end, and only then releases the lock (so the new owner gets it at
  once).
* **Timing.** Every replica reads the membership right after joining and then
  every third of the TTL: a join or graceful leave is acted on within about
  ``ttl / 3``; a dead replica's shards are taken over within about
  ``ttl + ttl / 3``. When this replica's session is lost (the control plane
  unreachable past the deadline, or a pause past the TTL) every shard is lost at
  once: all calls are cancelled and the replica joins again with a new session.
  On SIGTERM it leaves gracefully: the calls are cancelled, then the lease is
  revoked, which releases everything at once.
* **Cancellation is cooperative**: a call stops at its next ``await``. Code
  that runs on between losing a shard and that point (or in a process paused
  past its TTL) can still act: pass ``shard.token`` to resources that refuse
  stale fencing tokens. A call that returns keeps its shard (nobody else starts
  it) until the shard moves; a call that raises stops the replica, which
  leaves (its shards move) and is restarted.

A sharded worker must be ``async def`` (`clearway.sdk.app.App.worker` refuses
others): a call is cancelled when its shard moves, and a thread cannot be.
Replicas of different revisions of one worker (during a rollout) share its
shards; keep ``shards`` the same across revisions (a shard's index would mean
other keys otherwise).

A sharded *service* (``@app.service(shards=N, affinity="header:x-customer")``)
runs the same loop with nothing to call per shard (`ShardOwnership`): the
control plane reads who holds each shard lock and the gateway sends a request
carrying a key to the replica owning ``shard_of(key, N)`` while that replica is
ready (key-affinity routing; any replica otherwise: affinity is for caches and
locality, never a guarantee: a request can reach a non-owner during a hand-over).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import math
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from clearway.exceptions import ClearwayError
from clearway.sdk.app import _APPS
from clearway.sdk.coordination import Lock, LockError, Session, _call, _error, _lock_path
from clearway.spec.ids import check_name
from clearway.spec.model import ServiceSpec, WorkerSpec

__all__ = [
    "LOAD_BOUND",
    "MAX_SHARDS",
    "Shard",
    "ShardOwnership",
    "ShardedWorker",
    "assign",
    "capacity",
    "member_lock",
    "shard_for",
    "shard_lock",
    "shard_of",
]

#: No member gets more than ``ceil(shards / members * LOAD_BOUND)`` shards.
LOAD_BOUND = 1.25
MAX_SHARDS = 4096

T = TypeVar("T")


# -- the assignment (pure) -----------------------------------------------------------------


def _check_shards(shards: int) -> int:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards={shards!r} is not valid: a worker has 1 to {MAX_SHARDS} shards")
    return shards


def _digest(text: str, person: bytes) -> int:
    """A stable 64-bit hash (never Python's ``hash()``, which differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest(), "big")


def capacity(shards: int, members: int) -> int:
    """The most shards one of ``members`` members may own."""
    return math.ceil(shards / members * LOAD_BOUND)


def assign(shards: int, members: Iterable[str]) -> list[str]:
    """The owner of every shard: ``assign(...)[s]`` is the member owning shard s.

    Rendezvous hashing with bounded load: shard s (in order 0, 1, ...) goes to
    the member with the highest weight ``blake2b(s, member)`` among those that
    own fewer than ``capacity(shards, len(members))`` shards so far. The same
    shards and members (in any order) always give the same answer.
    """
    unique = tuple(sorted(set(members)))
    if not unique:
        raise ValueError("a sharded worker needs at least one member to assign its shards to")
    return list(_assign(_check_shards(shards), unique))


@functools.lru_cache(maxsize=64)
def _assign(shards: int, members: tuple[str, ...]) -> tuple[str, ...]:
    cap = capacity(shards, len(members))
    load = dict.fromkeys(members, 0)
    owners = []
    for index in range(shards):
        ranked = sorted(members, key=lambda member: (_digest(f"{index}/{member}", b"clearway-shard"), member))
        owner = next(member for member in reversed(ranked) if load[member] < cap)
        load[owner] += 1
        owners.append(owner)
    return tuple(owners)


def shard_of(key: str | bytes, shards: int) -> int:
    """The shard of ``key`` among ``shards`` (stable across processes and machines)."""
    _check_shards(shards)
    if isinstance(key, bytes):
        key = key.hex()
    elif not isinstance(key, str):
        raise TypeError(f"a shard key is a str or bytes, not {type(key).__name__}")
    return _digest(key, b"clearway-key") % shards


# -- names --------------------------------------------------------------------------------


def _worker_name(worker: str) -> str:
    name = str(worker).replace("_", "-")
    check_name(name, "worker name")
    return name


def member_lock(worker: str, replica: str) -> str:
    """The lock a replica of ``worker`` holds while it is a member."""
    return f"shards/{_worker_name(worker)}/members/{replica}"


def shard_lock(worker: str, index: int) -> str:
    """The lock whose holder owns shard ``index`` of ``worker``."""
    return f"shards/{_worker_name(worker)}/shard/{index}"


# -- looking up a key's owner ---------------------------------------------------------------


def _shard_count(worker: str) -> int:
    app = _APPS.get(os.environ.get("CLEARWAY_APP", ""))
    if app is None and len(_APPS) == 1:
        app = next(iter(_APPS.values()))
    component = app.components.get(worker) if app is not None else None
    if component is None:
        raise ClearwayError(
            f"cw.shard_for: no sharded worker {worker!r} is declared in the app loaded in this process; "
            "pass shards=N (its shard count)"
        )
    spec = component.spec
    if not isinstance(spec, WorkerSpec | ServiceSpec) or spec.shards is None:
        raise ClearwayError(
            f"cw.shard_for: component {worker!r} is not a sharded worker or service (declare it with shards=N)"
        )
    return spec.shards


def shard_for(key: str | bytes, *, worker: str, shards: int | None = None) -> tuple[int, str | None]:
    """``(shard index, replica id owning it now or None)`` of ``key`` for ``worker``, a sharded
    worker or service.

    The shard count is the worker's, read from the app loaded in this process
    (a replica of the same app), or ``shards``. The owner is None while the
    shard is between owners (a hand-over, or a dead owner's lease not yet expired).
    """
    name = _worker_name(worker)
    index = shard_of(key, _shard_count(name) if shards is None else shards)
    status, answer = _call("GET", _lock_path(shard_lock(name, index)))
    if status != 200:
        raise _error(f"reading the owner of shard {index} of {name!r}", status, answer)
    holder = answer.get("holder") if isinstance(answer, dict) else None
    return index, str(holder["replica"]) if holder else None


# -- what a sharded worker's function is given ------------------------------------------------


class Shard:
    """One shard, while this replica owns it: ``index`` of ``count``, the fencing
    ``token`` of its ownership, ``deadline`` (monotonic) when this replica stops
    counting on it, and ``lost`` (an ``asyncio.Event``) set the moment the shard
    is lost or moves away (the call is then cancelled)."""

    def __init__(self, index: int, count: int, lock: Lock) -> None:
        self.index = index
        self.count = count
        self.token = lock.token
        self.lost = asyncio.Event()
        self._lock = lock

    def __repr__(self) -> str:
        return f"<Shard {self.index}/{self.count} token {self.token}{'' if self.held else ' lost'}>"

    @property
    def held(self) -> bool:
        """True while this replica owns the shard (its lease's deadline not passed)."""
        return not self.lost.is_set() and self._lock.held

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` at which this replica stops counting on owning the shard
        (read-only): its session's deadline (the last successful renewal's sending time,
        plus the TTL, minus the margin), moving forward with every renewal."""
        return self._lock.deadline


# -- the loop a replica of a sharded worker runs ----------------------------------------------


class _CallFailed(Exception):
    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"the call for shard {index} raised {error!r}")
        self.error = error


def _setter(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> Callable[[], None]:
    """A callback, for another thread, that sets ``event`` in ``loop``."""

    def set_event() -> None:
        loop.call_soon_threadsafe(event.set)

    return set_event


async def _settle(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, even if cancelled meanwhile (the caller re-raises)."""
    while not future.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({future})
    if not future.cancelled():
        future.exception()  # retrieved: it is reported (or not) by whoever owns it


class ShardedWorker:
    """Runs ``target`` for the shards of ``worker`` this replica owns (see the module docstring)."""

    def __init__(
        self,
        target: Callable[..., Any],
        worker: str,
        *,
        shards: int,
        ttl: float,
        replica: str,
        say: Callable[[str], None] = print,
    ) -> None:
        self.target = target
        self.worker = _worker_name(worker)
        self.shards = _check_shards(shards)
        self.ttl = float(ttl)
        self.replica = replica
        self.say = say
        #: How often the membership is read (and how long one wait for a lock polls).
        self.interval = max(0.1, self.ttl / 3)
        #: The members and the assignment last read.
        self.members: list[str] = []
        self.owners: list[str] = []
        self._takes_shard = bool(inspect.signature(target).parameters)
        self._owning: dict[int, asyncio.Task[None]] = {}
        self._leaving: dict[int, asyncio.Task[None]] = {}
        self._calls: set[asyncio.Future[Any]] = set()
        self._closing = False
        # Lock calls block (long polls): enough threads that one waiting shard never delays another.
        self._executor = ThreadPoolExecutor(max_workers=min(self.shards, 128) + 4, thread_name_prefix="clearway-shards")

    async def _blocking(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in a thread. A cancellation waits for the call to end before it
        propagates: a lock call never goes on behind the back of the code that made it."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await _settle(future)
            raise

    async def run(self, stop: asyncio.Event) -> None:
        """Join, own the assigned shards and follow the membership until ``stop`` is set.

        Raises what a call raised (after leaving)."""
        try:
            while not stop.is_set():
                session = Session(self.ttl, name=f"the shards of {self.worker}")
                try:
                    await self._blocking(session.open)
                except LockError as error:
                    self.say(f"{error}; trying again in 1s")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):  # not wait_for: it can swallow a cancel
                            await stop.wait()
                    continue
                failed: LockError | None = None
                try:
                    await self._serve(session, stop)
                except LockError as error:
                    failed = error
                except _CallFailed as call:
                    raise call.error from None
                finally:
                    await self._stop_all(session)
                if stop.is_set():
                    break
                if failed is not None:  # the control plane refused or did not answer
                    self.say(f"{failed}; every shard stopped; joining again in 1s")
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await stop.wait()
                else:
                    self.say(f"the lease of the shards of {self.worker} was lost: every shard stopped; joining again")
        finally:
            self._executor.shutdown(wait=False)

    async def _serve(self, session: Session, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        lost = asyncio.Event()
        session.on_lost(_setter(loop, lost))
        if session.lost.is_set():
            return
        member = Lock(member_lock(self.worker, self.replica), session=session)
        self.say(f"joining the {self.shards} shards of {self.worker} as {self.replica}")
        while not await self._blocking(member.acquire, self.interval):
            if stop.is_set():
                return
        stopped = asyncio.ensure_future(stop.wait())
        gone = asyncio.ensure_future(lost.wait())
        try:
            while not (stop.is_set() or lost.is_set()):
                try:
                    members = await self._blocking(self._read_members)
                except LockError as error:
                    self.say(f"could not read the members of {self.worker} ({error}); keeping the last assignment")
                else:
                    if self.replica in members:
                        self._reconcile(session, members)
                await asyncio.wait(
                    {stopped, gone, *self._owning.values()}, timeout=self.interval, return_when=asyncio.FIRST_COMPLETED
                )
                self._reap()
        finally:
            stopped.cancel()
            gone.cancel()

    def _read_members(self) -> list[str]:
        prefix = f"shards/{self.worker}/members/"
        status, answer = _call("GET", "/v1/replica/locks?prefix=" + urllib.parse.quote(prefix, safe="/"), timeout=10)
        if status != 200:
            raise _error(f"reading the members of {self.worker}", status, answer)
        return sorted(
            holder["lock"].removeprefix(prefix) for holder in answer["holders"] if holder["lock"].startswith(prefix)
        )

    def _reconcile(self, session: Session, members: list[str]) -> None:
        if members != self.members:
            self.say(f"members of {self.worker}: {', '.join(members)}")
        self.members = members
        self.owners = assign(self.shards, members)
        mine = {index for index, owner in enumerate(self.owners) if owner == self.replica}
        for index in sorted(set(self._owning) - mine):
            self.say(f"shard {index} of {self.worker} moves to {self.owners[index]}: stopping its call and releasing it")
            task = self._owning.pop(index)
            task.cancel()
            self._leaving[index] = task
            task.add_done_callback(functools.partial(self._left, index))
        for index in sorted(mine - set(self._owning)):
            self._owning[index] = asyncio.ensure_future(self._own(session, index))

    def _left(self, index: int, task: asyncio.Future[None]) -> None:
        if self._leaving.get(index) is task:
            del self._leaving[index]
        if not task.cancelled() and task.exception() is not None:
            self.say(f"shard {index} of {self.worker} ended with {task.exception()!r} while moving away")

    def _reap(self) -> None:
        """Forget ended shard tasks: a call that raised ends the replica; a lock error is retried."""
        for index, task in list(self._owning.items()):
            if not task.done():
                continue
            del self._owning[index]
            error = None if task.cancelled() else task.exception()
            if isinstance(error, LockError):
                self.say(f"shard {index} of {self.worker}: {error}; trying again")
            elif error is not None:
                raise error

    async def _own(self, session: Session, index: int) -> None:
        """Own shard ``index``: take its lock, run the call until the shard is lost or moves."""
        previous = self._leaving.get(index)
        if previous is not None:  # this replica's earlier ownership of it ends first
            await asyncio.wait({previous})
        lock = Lock(shard_lock(self.worker, index), session=session)
        call: asyncio.Future[Any] | None = None
        shard: Shard | None = None
        try:
            # Queued until the previous owner releases it (when it sees the new membership) or
            # its lease expires; each wait is one interval, then it is asked for again.
            while not await self._blocking(lock.acquire, self.interval):
                pass
            shard = Shard(index, self.shards, lock)
            lost = shard.lost
            loop = asyncio.get_running_loop()
            lock.on_lost(_setter(loop, lost))
            if lock.lost.is_set():
                return
            self.say(f"owning shard {index} of {self.worker} (fencing token {lock.token})")
            call = asyncio.ensure_future(self.target(shard) if self._takes_shard else self.target())
            self._calls.add(call)
            waiting = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({call, waiting}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
            if call.done():
                error = None if call.cancelled() else call.exception()
                if lost.is_set():  # it ended because the shard was lost: that is no failure of it
                    if error is not None:
                        self.say(f"the call for shard {index} of {self.worker} raised {error!r} as the shard was lost")
                    return
                if error is not None:
                    raise _CallFailed(index, error)
                self.say(f"the call for shard {index} of {self.worker} returned; it keeps the shard until it moves")
                await lost.wait()
        finally:
            if shard is not None:
                shard.lost.set()
            if call is not None:
                call.cancel()
                await _settle(call)
                self._calls.discard(call)
            if lock.token is not None and not self._closing:
                await self._blocking(lock.release)

    async def _stop_all(self, session: Session) -> None:
        """Stop every call, then revoke the lease (releasing every shard and the membership at once)."""
        self._closing = True
        try:
            tasks = [*self._owning.values(), *self._leaving.values()]
            self._owning.clear()
            for task in tasks:
                task.cancel()
            for call in list(self._calls):  # no call may run on once the lease is revoked
                await _settle(call)
            await self._blocking(session.close)
            for task in tasks:
                await _settle(task)
            self._leaving.clear()
        finally:
            self._closing = False


# -- the shards of a sharded service ------------------------------------------------------------


class ShardOwnership:
    """The shards of a sharded *service* (``@app.service(shards=N)``) owned by this replica.

    The membership and shard-lock loop of `ShardedWorker`, with no call per shard:
    owning a shard is holding its lock (``shards/<service>/shard/<n>``), which is
    what the control plane reads to tell the gateway where each shard's requests
    go (key-affinity routing). It runs in a daemon thread, with an event loop of
    its own, beside the replica's web server; `leave` (from any thread, or a
    signal handler) starts a graceful leave: the lease is revoked, so the other
    replicas own the shards at their next read of the membership.
    """

    def __init__(
        self, service: str, *, shards: int, ttl: float, replica: str, say: Callable[[str], None] = print
    ) -> None:
        self.worker = ShardedWorker(self._hold, service, shards=shards, ttl=ttl, replica=replica, say=say)
        self.say = say
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._leaving = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"clearway-shards-{self.worker.worker}", daemon=True)

    @staticmethod
    async def _hold(shard: Shard) -> None:
        await shard.lost.wait()

    def start(self) -> None:
        """Join in the background (returns once the thread's loop runs)."""
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            if self._leaving:
                self._stop.set()
            self._started.set()
            await self.worker.run(self._stop)

        try:
            asyncio.run(run())
        except Exception as error:  # nothing is called per shard: only a bug gets here
            self.say(f"owning the shards of {self.worker.worker} stopped: {error!r}")
        else:
            self.say(f"left the shards of {self.worker.worker}")
        finally:
            self._started.set()

    def leave(self) -> None:
        """Leave the shards gracefully (idempotent; safe in a signal handler)."""
        self._leaving = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the leave to end; True when it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
