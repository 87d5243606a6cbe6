"""Durable invocations: spawned calls, CloudEvents and schedule fires, delivered
to functions through the gateway until they succeed or are given up on.

An invocation is a row of the store's ``invocations`` table before anything
else happens to it (``Function.spawn``, ``clearway invoke --async``, an event
posted to the ingress, a schedule's fire), so a ``kill -9`` of the control
plane loses none. The `Dispatcher`, a supervised loop of the control plane,
claims due ones (``queued`` -> ``running``, with a lease), POSTs each to the
function's app-level internal route through the gateway
(``/_apps/<app>/<function>``, events to ``.../_events`` as one structured
CloudEvent) with the platform's own identity, and records the outcome. Going
through the gateway rather than to a replica's socket means held requests,
scale from zero, the traffic split and the per-function counters apply to
these calls exactly as to any other. At most `MAX_IN_FLIGHT` are delivered at
once; each may take the function's ``timeout`` plus `TIMEOUT_MARGIN`.

**Delivery guarantee: at least once.** An invocation runs until one attempt
is answered 2xx, but an attempt can run and still be repeated: its answer
may be lost (a timeout, a dropped connection), or the control plane may stop
while it runs (a ``kill -9``, and also ``clearway down``, which does not wait
for deliveries); at start-up every invocation left ``running`` goes back to
the queue, because nobody knows whether it ran. Functions therefore get what
they need to make repeats harmless: every attempt carries
``x-clearway-invocation-id`` (the same for all attempts of one invocation)
and ``x-clearway-attempt`` (1, 2, ...), so a function with side effects can
record the id and skip work already done. Idempotency keys dedupe on the
way in: an (app, function) holds at most one invocation per key, and a
second spawn with the same key gets the first one back (its result, if it
has one). Events are keyed by their CloudEvents ``source`` and ``id`` (which
the CloudEvents spec makes unique per event), schedule fires by their fire
time, so a producer re-sending an event or a restarted scheduler does not
run anything twice.

**Retries.** An answer that says "try later" is retried: 5xx (the function
raised, a replica died, the gateway held the request past its deadline while
a replica started), 408, 429, a timeout or a connection error, and a 404 the
gateway gives itself (its route table may lag a deploy by a reload). Any
other 4xx is dead at once: the input does not fit the function (422), is too
large (413) or is refused, and sending it again cannot help. The n-th retry
waits 1 s * 2^(n-1), at most 60 s (`RetryPolicy`), at least what a
``Retry-After`` asks for, and is spread over the upper half of that delay
(jitter), so that a thousand invocations failing together (the function was
down) do not come back together. After ``retries + 1`` attempts (the
function's ``retries``) the invocation is dead, with the last error: the
dead-letter list, ``clearway invocations APP --dead``; ``clearway
invocations retry ID`` queues one again with all its attempts.

Production's invocations go to whatever serves the app when they run, so a
deploy between spawn and delivery is no failure. A preview's own code
spawning a function (or posting an event) runs the *preview's* function: the
invocation names the preview's revision and goes through that revision's own
route (``/_services/<revision>/<function>``), or, once a push replaced it,
through the route of the revision that serves the branch now.

An invocation whose app has no serving revision (the first deploy is still
starting) is not delivered and does not use up an attempt: it waits, longer
the older it gets. One whose function the serving revision no longer has (a
deploy removed it) or whose app was deleted is dead at once, saying so.

Leases: a claimed invocation is the dispatcher's until ``lease_until``,
which it renews while the delivery runs. If the dispatcher's loop fails (and
the supervisor restarts it) the deliveries it held are cancelled and their
rows go back to the queue when it starts again; a lease that runs out puts
an invocation back too. An answer that comes after its attempt was given up
on changes nothing (`Store.finish_invocation` checks the attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import httpx

from clearway.control.store import Invocation, InvocationKind, InvocationState, Store
from clearway.spec.model import FunctionSpec

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_PAYLOAD",
    "TIMEOUT_MARGIN",
    "Attempt",
    "Decision",
    "Delivered",
    "Dispatcher",
    "Failed",
    "FunctionCaller",
    "FunctionNotFound",
    "NotServed",
    "PlatformToken",
    "RetryPolicy",
    "Target",
    "classify",
    "decide",
    "find_function",
]

log = logging.getLogger("clearway.control.invocations")

#: Deliveries running at once.
MAX_IN_FLIGHT = 64
#: Added to a function's own ``timeout`` for one delivery: the function answers
#: 504 itself at its timeout, and the gateway may hold the request meanwhile.
TIMEOUT_MARGIN = 5.0
#: Largest payload (keyword arguments, or one event) accepted for a durable
#: invocation: what the function server accepts in one request.
MAX_PAYLOAD = 6 * 1024 * 1024
#: How long a claim holds an invocation before it goes back to the queue
#: (renewed every third of it while the delivery runs).
LEASE = 60.0
#: Succeeded invocations are kept this long, then forgotten (dead ones stay).
KEEP_SUCCEEDED = 7 * 24 * 3600.0
#: The most of an error body kept in an invocation's ``error``.
MAX_ERROR = 2000

#: Headers of every delivery.
INVOCATION_ID_HEADER = "x-clearway-invocation-id"
ATTEMPT_HEADER = "x-clearway-attempt"
IDENTITY_HEADER = "x-clearway-identity"
STRUCTURED_CLOUDEVENT = "application/cloudevents+json"


# -- policy (no I/O) -------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How long a failed attempt waits before the next one."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, *, retry_after: float | None = None, rng: Callable[[], float] = random.random) -> float:
        """The wait after attempt number ``attempt`` (1-based) failed: ``base * 2^(attempt-1)``,
        at least ``retry_after``, at most ``cap``, drawn from the upper half of that
        (equal jitter: never much sooner than planned, never in lockstep)."""
        planned = min(self.cap, self.base * 2.0 ** max(0, attempt - 1))
        if retry_after is not None:
            planned = min(self.cap, max(planned, retry_after))
        return planned * (0.5 + rng() / 2)


@dataclass(frozen=True)
class Delivered:
    """The function answered 2xx; ``result`` is its body."""

    result: str


@dataclass(frozen=True)
class Failed:
    """An attempt failed; ``retryable`` says whether another could do better."""

    error: str
    retryable: bool
    retry_after: float | None = None


@dataclass(frozen=True)
class NotServed:
    """Nothing serves the function yet (no serving revision): wait, without using up an attempt."""

    reason: str


Attempt = Delivered | Failed | NotServed


@dataclass(frozen=True)
class Decision:
    """What to store after an attempt: the new state, and for ``queued`` when it is due."""

    state: InvocationState
    result: str | None = None
    error: str | None = None
    delay: float = 0.0
    #: False: the attempt never reached a function and is not counted.
    counted: bool = True


def classify(status: int, body: bytes, headers: Mapping[str, str]) -> Delivered | Failed:
    """An answer of the gateway (or of the function behind it) as an attempt's outcome."""
    if 200 <= status < 300:
        return Delivered(body.decode("utf-8", "replace"))
    error = f"{status} {_phrase(status)}: {_error_text(body, headers)}"
    content_type = headers.get("content-type", "")
    if status in (408, 429) or status >= 500:
        return Failed(error, retryable=True, retry_after=_retry_after(headers.get("retry-after")))
    if status == 404 and content_type.startswith("text/plain"):
        # The gateway's own "no route" (its errors are text/plain; a function's are JSON):
        # its route table may not have caught up with the deploy that added the function yet.
        return Failed(error, retryable=True)
    return Failed(error, retryable=False)


def decide(
    invocation: Invocation,
    attempt: Attempt,
    *,
    policy: RetryPolicy = RetryPolicy(),
    now: float,
    rng: Callable[[], float] = random.random,
) -> Decision:
    """The outcome of attempt ``invocation.attempts`` of ``invocation`` (as claimed)."""
    if isinstance(attempt, Delivered):
        return Decision(InvocationState.SUCCEEDED, result=attempt.result)
    if isinstance(attempt, NotServed):
        # Wait longer the older it gets: a first deploy is usually seconds away,
        # an app left with nothing serving may stay so for a long time.
        age = max(0.0, now - invocation.created_at)
        return Decision(InvocationState.QUEUED, error=attempt.reason, delay=min(60.0, max(1.0, age / 4)), counted=False)
    if not attempt.retryable:
        return Decision(InvocationState.DEAD, error=attempt.error)
    if invocation.attempts >= invocation.max_attempts:
        tries = "attempt" if invocation.attempts == 1 else f"{invocation.attempts} attempts"
        return Decision(InvocationState.DEAD, error=f"{attempt.error} (gave up after {tries})")
    delay = policy.delay(invocation.attempts, retry_after=attempt.retry_after, rng=rng)
    return Decision(InvocationState.QUEUED, error=attempt.error, delay=delay)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "HTTP"


def _error_text(body: bytes, headers: Mapping[str, str]) -> str:
    """What an error answer says: a function's ``{"error", "error_id"}``, or the text."""
    text = body.decode("utf-8", "replace").strip()
    if "json" in headers.get("content-type", ""):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("error"):
            text = str(parsed["error"])
            if parsed.get("error_id"):
                text += f" (error id {parsed['error_id']}: `clearway logs APP | grep {parsed['error_id']}`)"
            elif parsed.get("details"):
                text += f": {json.dumps(parsed['details'])}"
    text = text or "(no body)"
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "…"


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the gateway never sends one


# -- which function serves ----------------------------------------------------------
class FunctionNotFound(Exception):
    """The function cannot be called: ``reason`` says why; ``waiting``: it may be later."""

    def __init__(self, reason: str, *, waiting: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.waiting = waiting


@dataclass(frozen=True)
class Target:
    """Where an invocation goes: the function's spec, and the route to take."""

    spec: FunctionSpec
    #: Deliver through this revision's own route; None: through the app's route,
    #: which follows the app's traffic (whatever serves production).
    revision: str | None = None


def find_function(store: Store, app: str, function: str, *, revision: str | None = None) -> Target:
    """The function as the app's serving revision has it, or (``revision``) as
    that revision has it: a preview's invocations run the preview's code, and
    follow its branch to the revision that serves it now.

    Raises `FunctionNotFound`: with ``waiting`` when the app has no serving
    revision yet, otherwise for good (no such app, revision or function).
    """
    if store.app(app) is None:
        raise FunctionNotFound(f"app {app!r} does not exist (any more)")
    if revision is None:
        rev = store.active(app)
        if rev is None:
            raise FunctionNotFound(f"{app} has no serving revision yet", waiting=True)
    else:
        pinned = store.revision(revision)
        if pinned is None:
            raise FunctionNotFound(f"revision {revision} of {app} does not exist (any more)")
        rev = pinned
        if not pinned.running:
            current = store.active(app, pinned.branch) if pinned.branch is not None else None
            if current is None:
                raise FunctionNotFound(f"revision {revision} of {app} is {pinned.state.value} and nothing replaced it")
            rev = current
    for spec in rev.spec.functions:
        if spec.name == function:
            return Target(spec, None if revision is None else rev.id)
    names = ", ".join(f.name for f in rev.spec.functions) or "none"
    serving = f"serving {app}" if revision is None else f"serving preview {rev.branch}" if rev.branch else f"of {app}"
    raise FunctionNotFound(f"{rev.id}, {serving}, has no function {function!r} (functions: {names})")


# -- calling through the gateway -----------------------------------------------------------
class IssuedTokenLike(Protocol):
    @property
    def token(self) -> str: ...
    @property
    def expires_at(self) -> int: ...


class PlatformToken:
    """The control plane's identity at the gateway, minted again when near its end.

    Kept in memory only (``control.credentials`` says why)."""

    def __init__(
        self, mint: Callable[[], IssuedTokenLike], *, margin: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._mint = mint
        self._margin = margin
        self._clock = clock
        self._issued: IssuedTokenLike | None = None

    def get(self) -> str:
        if self._issued is None or self._issued.expires_at - self._clock() < self._margin:
            self._issued = self._mint()
        return self._issued.token


class FunctionCaller:
    """POSTs to functions' internal routes through the gateway, as the platform.

    A function is at ``<gateway_url><apps_prefix>/<app>/<function>`` (the app's
    route, following its traffic), or at
    ``<gateway_url><revisions_prefix>/<revision>/<function>`` (one revision's).
    """

    def __init__(
        self,
        gateway_url: str,
        token: Callable[[], str],
        *,
        apps_prefix: str = "/_apps",
        revisions_prefix: str = "/_services",
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.apps_prefix = apps_prefix
        self.revisions_prefix = revisions_prefix
        self._token = token
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=4 * MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT),
            follow_redirects=False,
        )

    def url(self, app: str, function: str, *, revision: str | None = None, events: bool = False) -> str:
        route = f"{self.apps_prefix}/{app}" if revision is None else f"{self.revisions_prefix}/{revision}"
        return f"{self.gateway_url}{route}/{function}" + ("/_events" if events else "")

    async def call(
        self,
        app: str,
        function: str,
        *,
        body: bytes,
        content_type: str,
        time_limit: float,
        revision: str | None = None,
        events: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One POST, answered within ``time_limit`` seconds; transport errors and
        timeouts are httpx's exceptions."""
        sent = {"content-type": content_type, IDENTITY_HEADER: self._token(), **(headers or {})}
        url = self.url(app, function, revision=revision, events=events)
        return await self._http.post(url, content=body, headers=sent, timeout=time_limit)

    async def aclose(self) -> None:
        await self._http.aclose()


# -- the dispatcher ---------------------------------------------------------------------
class Dispatcher:
    """Delivers due invocations, at most ``max_in_flight`` at once (see the module docstring).

    `run` is the loop the control plane supervises; `poke` wakes it when
    something was queued (else it looks at least every ``poll`` seconds).
    """

    def __init__(
        self,
        store: Store,
        caller: FunctionCaller,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        policy: RetryPolicy = RetryPolicy(),
        lease: float = LEASE,
        poll: float = 1.0,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.caller = caller
        self.max_in_flight = max_in_flight
        self.policy = policy
        self.lease = lease
        self.poll = poll
        self._clock = clock
        self._rng = rng
        self._wake = asyncio.Event()
        self._in_flight: dict[str, Invocation] = {}

    def poke(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def run(self) -> None:
        requeued = self.store.requeue_running(now=self._clock())
        if requeued:
            log.warning(
                "%d invocation(s) were running when the dispatcher last stopped: queued again (at least once)",
                requeued,
            )
        self._in_flight.clear()
        # Deliveries are children of this loop: if it fails they are cancelled
        # with it, and the next run puts their rows back in the queue (above).
        async with asyncio.TaskGroup() as deliveries:
            deliveries.create_task(self._housekeeping(), name="invocation leases")
            while True:
                self._wake.clear()
                free = self.max_in_flight - len(self._in_flight)
                if free > 0:
                    for invocation in self.store.claim_invocations(limit=free, lease=self.lease, now=self._clock()):
                        self._in_flight[invocation.id] = invocation
                        deliveries.create_task(self._deliver(invocation), name=f"invocation {invocation.id}")
                await self._idle(full=len(self._in_flight) >= self.max_in_flight)

    async def _idle(self, *, full: bool) -> None:
        """Until a poke, a finished delivery, the next due invocation, or ``poll``."""
        wait = self.poll
        if not full:
            due = self.store.next_invocation_due()
            if due is not None:
                wait = min(wait, max(0.0, due - self._clock()))
        if wait <= 0:
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
        # that arrives as the event is set, and the dispatcher would then never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def _housekeeping(self) -> None:
        """Renew the leases of running deliveries; now and then forget old successes."""
        pruned_at = 0.0
        while True:
            await asyncio.sleep(self.lease / 3)
            now = self._clock()
            self.store.renew_leases(list(self._in_flight), until=now + self.lease)
            if now - pruned_at > 3600:
                pruned_at = now
                forgotten = self.store.prune_invocations(finished_before=now - KEEP_SUCCEEDED)
                if forgotten:
                    log.info("forgot %d invocation(s) that succeeded over a week ago", forgotten)

    async def _deliver(self, invocation: Invocation) -> None:
        try:
            attempt = await self.attempt(invocation)
        except Exception as exc:  # a fault of ours, not of the function: log it, retry later
            log.exception("delivering invocation %s failed", invocation.id)
            attempt = Failed(f"the platform could not deliver it: {exc!r}", retryable=True)
        finally:
            self._in_flight.pop(invocation.id, None)
            self._wake.set()
        self.record(invocation, attempt)

    async def attempt(self, invocation: Invocation) -> Attempt:
        """One delivery of ``invocation`` (as claimed) through the gateway."""
        try:
            target = find_function(self.store, invocation.app, invocation.function, revision=invocation.revision)
        except FunctionNotFound as exc:
            return NotServed(exc.reason) if exc.waiting else Failed(exc.reason, retryable=False)
        spec = target.spec
        events = invocation.kind is InvocationKind.EVENT
        if events:
            event_type = json.loads(invocation.payload).get("type")
            if event_type not in spec.events:
                return Failed(
                    f"function {invocation.function} of {invocation.app} no longer receives events of type "
                    f"{event_type!r} (a deploy changed its events=)",
                    retryable=False,
                )
        headers = {INVOCATION_ID_HEADER: invocation.id, ATTEMPT_HEADER: str(invocation.attempts)}
        timeout = spec.timeout + TIMEOUT_MARGIN
        try:
            response = await self.caller.call(
                invocation.app,
                invocation.function,
                body=invocation.payload.encode(),
                content_type=STRUCTURED_CLOUDEVENT if events else "application/json",
                time_limit=timeout,
                revision=target.revision,
                events=events,
                headers=headers,
            )
        except httpx.TimeoutException:
            return Failed(f"no answer within {timeout:g} s (the function's timeout + {TIMEOUT_MARGIN:g} s)", retryable=True)
        except httpx.TransportError as exc:
            return Failed(f"could not reach the gateway at {self.caller.gateway_url}: {exc!r}", retryable=True)
        return classify(response.status_code, response.content, response.headers)

    def record(self, invocation: Invocation, attempt: Attempt) -> Decision:
        """Store the outcome of one attempt; what was decided."""
        now = self._clock()
        decision = decide(invocation, attempt, policy=self.policy, now=now, rng=self._rng)
        if decision.state is InvocationState.QUEUED:
            current = self.store.requeue_invocation(
                invocation, at=now + decision.delay, error=decision.error or "", count_attempt=decision.counted
            )
            if current and decision.counted:
                log.info(
                    "invocation %s of %s/%s: attempt %d failed, retrying in %.1f s: %s",
                    invocation.id, invocation.app, invocation.function, invocation.attempts, decision.delay,
                    decision.error,
                )
        else:
            current = self.store.finish_invocation(
                invocation, decision.state, result=decision.result, error=decision.error, now=now
            )
            if current and decision.state is InvocationState.DEAD:
                log.warning(
                    "invocation %s of %s/%s is dead: %s", invocation.id, invocation.app, invocation.function,
                    decision.error,
                )
        if not current:
            log.info("invocation %s: attempt %d answered after it was given up on; ignored", invocation.id, invocation.attempts)
        return decision
