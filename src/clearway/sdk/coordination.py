"""Locks with fencing tokens, and leadership, for the replicas of an app.

::

    with cw.Lock("inventory", ttl=10) as lock:
        db.write(row, fencing_token=lock.token)

    async with cw.Lock("inventory") as lock:      # the same, from async code
        ...

A lock is held through a **lease**: the control plane grants it with a TTL,
this process renews it in the background (a daemon thread, every third of the
TTL), and the lock is held for as long as the lease lives. Everything goes
through the replica channel (``$CLEARWAY_CONTROL_URL`` with
``$CLEARWAY_REPLICA_TOKEN``): lock names belong to the app (``inventory`` of
one app is not another app's), and the platform's coordination backend —
embedded in the control plane, or etcd — is invisible here.

A `Session` is one such lease with its renewal thread. A `Lock` takes its own
private session for each holding by default; many locks can share one
session instead (``Lock(name, session=s)``): one lease, one renewal thread,
and they are all lost together when it is lost (a sharded worker holds its
shards that way, `clearway.sdk.sharding`).

**What is guaranteed, and under which assumptions.**

* **Fencing token.** ``lock.token`` strictly increases across all successive
  holders of one lock. A resource that remembers the highest token it has seen
  and refuses smaller ones cannot be written by a holder that lost the lock
  while paused: pass the token with every write.
* **The holder's own deadline ends first.** ``lock.deadline`` (monotonic) is
  its session's deadline: the moment the last successful renewal of the lease
  was *sent*, plus the TTL, minus a safety margin (a tenth of the TTL, at
  least 0.2 s). The server's expiry is counted from when it *received* that
  renewal, which is later, so as long as the two clocks advance at the same
  rate (one machine; or drift within the margin) the holder stops believing
  it holds the lock before anyone else can get it. ``lock.held`` is False from
  the deadline on.
* **Loss is signalled at once**: ``lock.lost`` (a ``threading.Event``) is set,
  and the callbacks given to ``on_lost`` run, when a renewal of the lease is
  refused (the lease is gone) or the deadline passes without one — for every
  lock held (or being acquired) with that lease.
* **What a paused process can and cannot do.** A process stopped longer than
  its TTL (SIGSTOP, a GC pause, a swap storm) wakes up *believing* nothing
  happened until its code looks: ``lock.held`` is then False and ``lost`` is
  set by the renewal thread as soon as it runs. Code between the wake-up and
  that check can still act — that is what the fencing token is for. Nothing
  else (no timeout, no lease) can stop a paused process from acting; a
  resource that checks tokens can stop its writes from taking effect.

Leaving the ``with`` block releases the lock (and revokes its private lease),
so the next waiter gets it at once, not after the TTL. ``acquire(wait=...)``
returns False when the lock is not had within ``wait`` seconds; the queued
request is then withdrawn (and a private lease revoked), so nothing leaks when
a caller gives up. Closing a session revokes its lease: every lock held with
it is released at once.

Waiters are served first come, first served. A waiter keeps its place while
its lease lives, between polls and through a control-plane restart: a poll
that gets no answer is asked again with the same lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from types import TracebackType
from typing import Any

from clearway.exceptions import ClearwayError
from clearway.sdk.identity import _need
from clearway.spec.ids import check_lock_name

__all__ = ["Leadership", "Lock", "LockError", "LockTimeout", "Session", "leader"]

#: One long poll of an acquire asks the server to wait at most this long.
_POLL = 20.0
#: A poll that got no answer is asked again after this long (while the lease lives).
_RETRY = 0.5


class LockError(ClearwayError):
    """A lock or lease operation failed (the control plane refused it or did not answer)."""


class LockTimeout(LockError, TimeoutError):
    """The lock was not had within the time asked for."""


def _check_ttl(ttl: float) -> None:
    if not isinstance(ttl, (int, float)) or not 1 <= ttl <= 300:
        raise ValueError(f"ttl={ttl!r} is not valid: a lock's lease lives 1 to 300 seconds")


def _check(name: str, ttl: float) -> None:
    check_lock_name(name)
    _check_ttl(ttl)


def _call(method: str, path: str, body: Any | None = None, *, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, JSON answer) of one call on the replica channel; raises LockError on no answer."""
    url = _need("CLEARWAY_CONTROL_URL").rstrip("/") + path
    headers = {"Authorization": f"Bearer {_need('CLEARWAY_REPLICA_TOKEN')}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            status = int(response.status)
    except urllib.error.HTTPError as error:
        with error:
            raw, status = error.read(), error.code
    except (urllib.error.URLError, OSError) as error:
        raise LockError(f"the control plane did not answer {method} {path}: {getattr(error, 'reason', error)}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, {"error": raw[:300].decode("utf-8", "replace")}


def _error(what: str, status: int, answer: Any) -> LockError:
    message = answer.get("error") if isinstance(answer, dict) else answer
    return LockError(f"{what}: the control plane answered {status}: {message}")


def _lock_path(name: str) -> str:
    return "/v1/replica/locks/" + urllib.parse.quote(name, safe="/")


class Session:
    """One lease of this replica process, renewed by a daemon thread; any number of
    locks can be held with it (``Lock(name, session=session)``).

    ``open()`` takes the lease and starts the renewal (every third of the TTL);
    ``close()`` stops it and revokes the lease, which releases every lock held
    with it at once. ``deadline`` is when the last successful renewal was sent,
    plus the TTL, minus the margin (see the module docstring); ``lost`` (a
    ``threading.Event``) is set, and the ``on_lost`` callbacks run (from the
    renewal thread), when a renewal is refused or the deadline passes without
    one. A lost session stays lost: open a new one (or ``close()`` then
    ``open()`` this one again) for a new lease.
    """

    def __init__(self, ttl: float = 10.0, *, name: str = "a session") -> None:
        _check_ttl(ttl)
        self.ttl = float(ttl)
        self.margin = max(0.2, self.ttl / 10)
        #: Set when the lease is lost (a refused renewal, or the deadline passed without one).
        self.lost = threading.Event()
        #: The lease id while open.
        self.lease: str | None = None
        self._what = name
        self._deadline = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "lost" if self.lost.is_set() else "closed"
        return f"<Session ttl={self.ttl:g} {state}>"

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` at which this process stops counting on the lease."""
        return self._deadline

    @property
    def alive(self) -> bool:
        return self.lease is not None and not self.lost.is_set() and time.monotonic() < self._deadline

    def on_lost(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from the renewal thread) when the lease is lost.

        Returns a function that withdraws the callback."""
        with self._lock:
            self._callbacks.append(callback)

        def withdraw() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return withdraw

    def open(self) -> Session:
        """Take the lease and start renewing it."""
        if self.lease is not None:
            raise LockError(f"{self._what} is already open; close it first")
        self.lost.clear()
        self._stop.clear()
        sent = time.monotonic()
        status, answer = _call("POST", "/v1/replica/leases", {"ttl": self.ttl})
        if status != 200:
            raise _error(f"granting a lease for {self._what}", status, answer)
        self.lease, self._deadline = str(answer["id"]), sent + float(answer["ttl"]) - self.margin
        self._renewer = threading.Thread(target=self._renew_loop, name=f"clearway-lease-{self.lease}", daemon=True)
        self._renewer.start()
        return self

    def close(self) -> None:
        """Stop renewing and revoke the lease: every lock held with it is released now."""
        self._stop.set()
        renewer, self._renewer = self._renewer, None
        if renewer is not None and renewer is not threading.current_thread():
            renewer.join(timeout=5)
        lease, self.lease = self.lease, None
        self._deadline = 0.0
        if lease is not None:
            with contextlib.suppress(LockError):  # on no answer, it expires after its TTL
                _call("DELETE", f"/v1/replica/leases/{urllib.parse.quote(lease)}", timeout=10)

    # -- renewal --------------------------------------------------------------------------

    def _renew_once(self) -> bool:
        """One keepalive; True when the lease was renewed. Sets ``lost`` when it is gone."""
        lease = self.lease
        if lease is None:
            return False
        sent = time.monotonic()
        try:
            status, answer = _call("POST", f"/v1/replica/leases/{urllib.parse.quote(lease)}/keepalive", {}, timeout=self.ttl / 3)
        except LockError:
            return False
        if status == 200:
            with self._lock:
                self._deadline = max(self._deadline, sent + float(answer["ttl"]) - self.margin)
            return True
        if status == 404:
            self._lose()
        return False

    def _renew_loop(self) -> None:
        interval = max(0.1, self.ttl / 3)
        next_renewal = time.monotonic() + interval
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self._deadline:
                self._lose()
                return
            if self._stop.wait(max(0.0, min(next_renewal, self._deadline) - now)):
                return
            if time.monotonic() >= self._deadline:
                self._lose()
                return
            if self._renew_once():
                next_renewal = time.monotonic() + interval
            elif self.lost.is_set():
                return
            else:
                next_renewal = time.monotonic() + max(0.1, self.ttl / 10)  # retry soon

    def _lose(self) -> None:
        with self._lock:
            if self.lost.is_set():
                return
            self.lost.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception as error:  # a callback must not stop the others
                print(f"[clearway] a lease-lost callback failed: {error!r}", flush=True)

    # -- context managers -----------------------------------------------------------------

    def __enter__(self) -> Session:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def open_async(self) -> Session:
        return await asyncio.to_thread(self.open)

    async def close_async(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> Session:
        return await self.open_async()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close_async()


class Lock:
    """A lock shared by the replicas of this app (see the module docstring).

    ``ttl`` is the lease's (10 s by default). With ``session=``, the lock is
    held with that open `Session`'s lease (and its TTL): releasing the lock
    leaves the session open; losing the session loses the lock.
    """

    def __init__(
        self, name: str, *, ttl: float | None = None, wait: float | None = None, session: Session | None = None
    ) -> None:
        if ttl is None:
            ttl = session.ttl if session is not None else 10.0
        _check(name, ttl)
        if session is not None and float(ttl) != session.ttl:
            raise ValueError(
                f"ttl={ttl!r} differs from the session's ({session.ttl:g}): a lock held with a "
                "session lives as long as the session's lease; leave ttl out"
            )
        self.name = name
        self.ttl = float(ttl)
        #: How long ``with`` waits for the lock before raising `LockTimeout` (None: as long as it takes).
        self.wait = wait
        self.margin = max(0.2, self.ttl / 10)
        #: The fencing token of the current holding; None when not held.
        self.token: int | None = None
        #: Set when a holding is lost (a refused renewal, or the deadline passed without one).
        self.lost = threading.Event()
        #: The session given to the constructor, if any (else each holding has a private one).
        self.session = session
        self._session: Session | None = None  # the session of the current acquire or holding
        self._withdraw: Callable[[], None] | None = None
        self._callbacks: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = f"held, token {self.token}" if self.held else "not held"
        return f"<Lock {self.name!r} {state}>"

    # -- state ----------------------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` at which this process stops counting on the lock."""
        session = self._session
        return session.deadline if session is not None else 0.0

    @property
    def held(self) -> bool:
        return self.token is not None and not self.lost.is_set() and time.monotonic() < self.deadline

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the renewal thread) when the holding is lost."""
        self._callbacks.append(callback)

    # -- acquire and release --------------------------------------------------------------

    def acquire(self, wait: float | None = None) -> bool:
        """Take the lock, waiting at most ``wait`` seconds (None: for as long as it takes)."""
        if self.token is not None:
            raise LockError(f"lock {self.name!r} is already held by this Lock object; release it first")
        self.lost.clear()
        session = self.session
        if session is None:
            session = Session(self.ttl, name=f"lock {self.name!r}").open()
        elif not session.alive:
            raise LockError(f"the session of lock {self.name!r} is not open or its lease is lost: open a new one")
        self._session = session
        self._withdraw = session.on_lost(self._lose)
        give_up = None if wait is None else time.monotonic() + wait
        path = _lock_path(self.name)
        try:
            while True:
                # The lease must outlive each poll: a poll is at most a third of its TTL, and the
                # session's thread renews it meanwhile.
                poll = min(_POLL, self.ttl / 3)
                if give_up is not None:
                    poll = max(0.0, min(poll, give_up - time.monotonic()))
                if session.lost.is_set():
                    raise LockError(f"the lease for lock {self.name!r} expired while waiting; try again")
                try:
                    status, answer = _call("POST", path, {"lease": session.lease, "wait": poll}, timeout=poll + 30)
                except LockError:
                    # No answer (the control plane restarting, say). The place in the queue is
                    # the lease's, and lives as long as it: ask again with it. Giving it up now
                    # would not work either — the withdrawal cannot reach the control plane, so
                    # the old place would stay ahead of a new one until its lease expired.
                    if not session.alive:
                        raise
                    if give_up is not None and time.monotonic() >= give_up:
                        self._abandon()
                        return False
                    session.lost.wait(_RETRY)
                    continue
                if status == 200:
                    self.token = int(answer["token"])
                    return True
                if status == 404:
                    session._lose()  # the lease is gone: every lock held with it is lost
                if status != 409:
                    raise _error(f"acquiring lock {self.name!r}", status, answer)
                if give_up is not None and time.monotonic() >= give_up:
                    self._abandon()
                    return False
        except BaseException:
            self._abandon()
            raise

    def release(self) -> None:
        """Give the lock up now (the next waiter gets it at once); a private lease is revoked."""
        self._stop_watching()
        session = self._session
        # A private lease is revoked by _abandon, which releases the lock with it: one call, not
        # two. A shared session's lease stays, so the lock is released by name (on no answer it
        # is held until the session closes or its lease expires).
        if session is not None and session is self.session and session.lease is not None and self.token is not None:
            with contextlib.suppress(LockError):
                _call("DELETE", f"{_lock_path(self.name)}?lease={urllib.parse.quote(session.lease)}", timeout=10)
        self._abandon()

    def _stop_watching(self) -> None:
        withdraw, self._withdraw = self._withdraw, None
        if withdraw is not None:
            withdraw()

    def _abandon(self) -> None:
        """Forget the holding or queued request: withdraw it, or revoke the private lease."""
        self._stop_watching()
        session, self._session = self._session, None
        token, self.token = self.token, None
        if session is None:
            return
        if session is not self.session:
            session.close()
        elif token is None and session.lease is not None:
            with contextlib.suppress(LockError):  # give up the place in the queue
                _call("DELETE", f"{_lock_path(self.name)}?lease={urllib.parse.quote(session.lease)}", timeout=10)

    def _lose(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        for callback in self._callbacks:
            try:
                callback()
            except Exception as error:  # a callback must not stop the others
                print(f"[clearway] a lock-lost callback failed: {error!r}", flush=True)

    # -- context managers -----------------------------------------------------------------

    def __enter__(self) -> Lock:
        if not self.acquire(self.wait):
            raise LockTimeout(f"lock {self.name!r} was not free within {self.wait:g}s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    async def acquire_async(self, wait: float | None = None) -> bool:
        return await asyncio.to_thread(self.acquire, wait)

    async def release_async(self) -> None:
        await asyncio.to_thread(self.release)

    async def __aenter__(self) -> Lock:
        if not await self.acquire_async(self.wait):
            raise LockTimeout(f"lock {self.name!r} was not free within {self.wait:g}s")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release_async()


class Leadership:
    """What a ``@app.singleton`` function is given while it leads.

    ``lost`` is an ``asyncio.Event`` set the moment leadership is lost (an async
    singleton is then cancelled; a sync one's process ends, since a thread
    cannot be interrupted); ``token`` is the fencing token of this term;
    ``deadline`` (monotonic) is when this replica stops counting on leading.
    """

    def __init__(self, lock: Lock, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.lock = lock
        self.token = lock.token
        self.lost = asyncio.Event()
        self._loop = loop
        lock.on_lost(self._signal)

    def _signal(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.lost.set)

    @property
    def held(self) -> bool:
        return self.lock.held

    @property
    def deadline(self) -> float:
        """``time.monotonic()`` at which this replica stops counting on leading (read-only).

        The lock's deadline: the last successful renewal's sending time, plus the
        TTL, minus the margin; it moves forward with every renewal. Past it,
        ``held`` is False whether or not ``lost`` has been seen yet."""
        return self.lock.deadline


def leader(name: str) -> str | None:
    """The replica id holding lock (or singleton) ``name`` now, or None."""
    _check(name, 10)
    path = "/v1/replica/locks/" + urllib.parse.quote(name, safe="/")
    status, answer = _call("GET", path)
    if status != 200:
        raise _error(f"reading lock {name!r}", status, answer)
    holder = answer.get("holder") if isinstance(answer, dict) else None
    return str(holder["replica"]) if holder else None

