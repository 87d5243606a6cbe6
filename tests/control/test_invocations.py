"""Durable invocations: the queue in the store and the dispatcher's decisions.

The store is the real SQLite store; time is passed in (``now=``) wherever the
outcome depends on it. Delivery through the real gateway to real function
replicas is tested end to end in ``tests/e2e/test_functions.py``; here one
test runs the dispatcher's loop against a small HTTP endpoint standing in for
the gateway's ``/_apps`` route, to check what only a running loop shows
(bounded concurrency, the headers of each attempt).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from clearway.control.invocations import (
    Delivered,
    Dispatcher,
    Failed,
    FunctionCaller,
    FunctionNotFound,
    NotServed,
    PlatformToken,
    RetryPolicy,
    Target,
    classify,
    decide,
    find_function,
)
from clearway.control.store import (
    Invocation,
    InvocationKind,
    InvocationState,
    NewInvocation,
    Store,
)
from clearway.spec import AppSpec, FunctionSpec

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0


def new(function: str = "resize", *, key: str | None = None, attempts: int = 4, app: str = "shop", **kwargs: Any) -> NewInvocation:
    return NewInvocation(
        app=app,
        function=function,
        kind=InvocationKind.SPAWN,
        payload=json.dumps(kwargs),
        max_attempts=attempts,
        idempotency_key=key,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db")


def deploy(store: Store, tmp_path: Path, *functions: FunctionSpec, app: str = "shop") -> None:
    revision = store.create_revision(
        AppSpec(name=app, components=list(functions)), code_dir=tmp_path, app_file="app.py", env={}
    )
    store.activate(revision.id)


# -- the store ---------------------------------------------------------------------
def test_queued_invocations_survive_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    queued, created = store.enqueue_invocation(new(width=3), now=T0)
    store.close()

    again = Store(tmp_path / "state.db")
    found = again.invocation(queued.id)
    assert created and found is not None
    assert (found.state, found.attempts, found.max_attempts, json.loads(found.payload)) == (
        InvocationState.QUEUED, 0, 4, {"width": 3}
    )


def test_an_idempotency_key_holds_one_invocation_per_function(store: Store) -> None:
    first, created = store.enqueue_invocation(new(key="order-7", width=1), now=T0)
    again, created_again = store.enqueue_invocation(new(key="order-7", width=2), now=T0 + 1)
    other_function, _ = store.enqueue_invocation(new("report", key="order-7"), now=T0)
    other_app, _ = store.enqueue_invocation(new(key="order-7", app="blog"), now=T0)
    unkeyed = {store.enqueue_invocation(new(), now=T0)[0].id for _ in range(2)}

    assert created and not created_again
    assert again.id == first.id and json.loads(again.payload) == {"width": 1}  # the first one wins
    assert len({first.id, other_function.id, other_app.id}) == 3
    assert len(unkeyed) == 2  # no key: no deduplication


def test_claiming_takes_due_invocations_oldest_first_up_to_the_limit(store: Store) -> None:
    late = store.enqueue_invocation(
        NewInvocation(app="shop", function="f", kind=InvocationKind.SPAWN, payload="{}", max_attempts=1, not_before=T0 + 10),
        now=T0,
    )[0]
    ids = [store.enqueue_invocation(new(), now=T0 + n)[0].id for n in range(3)]

    claimed = store.claim_invocations(limit=2, lease=60, now=T0 + 5)
    assert [c.id for c in claimed] == ids[:2]
    assert all(c.state is InvocationState.RUNNING and c.attempts == 1 and c.lease_until == T0 + 65 for c in claimed)
    assert [c.id for c in store.claim_invocations(limit=10, lease=60, now=T0 + 5)] == [ids[2]]
    assert store.claim_invocations(limit=10, lease=60, now=T0 + 5) == []
    assert store.next_invocation_due() == T0 + 10
    assert [c.id for c in store.claim_invocations(limit=10, lease=60, now=T0 + 10)] == [late.id]


def test_an_expired_lease_puts_the_invocation_back_and_its_late_answer_changes_nothing(store: Store) -> None:
    store.enqueue_invocation(new(), now=T0)
    [first] = store.claim_invocations(limit=1, lease=60, now=T0)
    store.renew_leases([first.id], until=T0 + 120)
    assert store.claim_invocations(limit=1, lease=60, now=T0 + 90) == []  # renewed: still held

    [second] = store.claim_invocations(limit=1, lease=60, now=T0 + 121)
    assert second.id == first.id and second.attempts == 2
    # The first delivery answers at last: its attempt is no longer the current one.
    assert not store.finish_invocation(first, InvocationState.SUCCEEDED, result="1", now=T0 + 122)
    assert store.invocation(first.id).state is InvocationState.RUNNING  # type: ignore[union-attr]
    assert store.finish_invocation(second, InvocationState.SUCCEEDED, result="2", now=T0 + 123)
    done = store.invocation(first.id)
    assert done is not None and (done.state, done.result, done.finished_at) == (InvocationState.SUCCEEDED, "2", T0 + 123)


def test_start_up_requeues_every_running_invocation(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for _ in range(3):
        store.enqueue_invocation(new(), now=T0)
    running = store.claim_invocations(limit=2, lease=3600, now=T0)
    store.close()  # the control plane died while these two ran

    again = Store(tmp_path / "state.db")
    assert again.requeue_running(now=T0 + 5) == 2
    claimed = again.claim_invocations(limit=10, lease=60, now=T0 + 5)
    assert len(claimed) == 3
    # The interrupted attempt counts: the next one is attempt 2.
    assert sorted(c.attempts for c in claimed if c.id in {r.id for r in running}) == [2, 2]


def test_a_retried_attempt_waits_and_a_dead_one_can_be_queued_again(store: Store) -> None:
    store.enqueue_invocation(new(attempts=2), now=T0)
    [claimed] = store.claim_invocations(limit=1, lease=60, now=T0)
    assert store.requeue_invocation(claimed, at=T0 + 2, error="500 Internal Server Error: boom")
    assert store.claim_invocations(limit=1, lease=60, now=T0 + 1) == []
    [second] = store.claim_invocations(limit=1, lease=60, now=T0 + 2)
    assert second.attempts == 2 and second.error == "500 Internal Server Error: boom"
    assert store.finish_invocation(second, InvocationState.DEAD, error="gave up", now=T0 + 3)

    assert [i.id for i in store.invocations("shop", state=InvocationState.DEAD)] == [second.id]
    assert store.retry_invocation(second.id, now=T0 + 10)
    assert not store.retry_invocation(second.id, now=T0 + 10)  # queued now, not dead
    assert not store.retry_invocation("no-such-id")
    requeued = store.invocation(second.id)
    assert requeued is not None and (requeued.state, requeued.attempts, requeued.finished_at) == (
        InvocationState.QUEUED, 0, None
    )


def test_an_undelivered_attempt_is_not_counted(store: Store) -> None:
    store.enqueue_invocation(new(), now=T0)
    [claimed] = store.claim_invocations(limit=1, lease=60, now=T0)
    assert store.requeue_invocation(claimed, at=T0 + 1, error="shop has no serving revision yet", count_attempt=False)
    [again] = store.claim_invocations(limit=1, lease=60, now=T0 + 1)
    assert again.attempts == 1


def test_counts_listing_and_pruning(store: Store) -> None:
    for function in ("a", "a", "b"):
        store.enqueue_invocation(new(function), now=T0)
    [done] = store.claim_invocations(limit=1, lease=60, now=T0)
    store.finish_invocation(done, InvocationState.SUCCEEDED, result="{}", now=T0)
    assert store.invocation_counts("shop") == {"a": {"queued": 1, "succeeded": 1}, "b": {"queued": 1}}
    assert len(store.invocations("shop", function="a")) == 2
    assert store.prune_invocations(finished_before=T0 + 1) == 1
    assert store.invocation(done.id) is None


def test_deleting_an_app_forgets_its_invocations(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="resize"))
    queued, _ = store.enqueue_invocation(new())
    store.delete_app("shop")
    assert store.invocation(queued.id) is None


# -- decisions (no I/O) -------------------------------------------------------------
def claimed(attempts: int, max_attempts: int = 4, created_at: float = T0) -> Invocation:
    return Invocation(
        id="abc",
        app="shop",
        function="resize",
        revision=None,
        kind=InvocationKind.SPAWN,
        payload="{}",
        idempotency_key=None,
        state=InvocationState.RUNNING,
        attempts=attempts,
        max_attempts=max_attempts,
        next_attempt_at=created_at,
        lease_until=created_at + 60,
        result=None,
        error=None,
        created_at=created_at,
        finished_at=None,
    )


JSON = {"content-type": "application/json"}


def test_2xx_succeeds_with_the_body() -> None:
    attempt = classify(200, b'{"ok": true}', JSON)
    assert attempt == Delivered('{"ok": true}')
    assert decide(claimed(1), attempt, now=T0).state is InvocationState.SUCCEEDED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_a_4xx_is_dead_at_once(status: int) -> None:
    body = json.dumps({"error": "width: Input should be a valid integer", "details": [{"loc": ["width"]}]}).encode()
    decision = decide(claimed(1), classify(status, body, JSON), now=T0)
    assert decision.state is InvocationState.DEAD
    assert decision.error is not None and decision.error.startswith(f"{status} ") and "width" in decision.error


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_5xx_408_and_429_are_retried(status: int) -> None:
    decision = decide(claimed(1), classify(status, b"later", {"content-type": "text/plain"}), now=T0, rng=lambda: 1.0)
    assert (decision.state, decision.delay, decision.counted) == (InvocationState.QUEUED, 1.0, True)


def test_the_gateways_own_404_is_retried_but_a_functions_is_not() -> None:
    gateway = classify(404, b"No app is served at host 127.0.0.1 path /_apps/shop/resize", {"content-type": "text/plain; charset=utf-8"})
    function = classify(404, b'{"error": "no such order"}', JSON)
    assert isinstance(gateway, Failed) and gateway.retryable
    assert isinstance(function, Failed) and not function.retryable


def test_a_function_error_keeps_its_message_and_error_id() -> None:
    attempt = classify(500, json.dumps({"error": "ZeroDivisionError: division by zero", "error_id": "e1f2"}).encode(), JSON)
    assert isinstance(attempt, Failed)
    assert attempt.error.startswith("500 Internal Server Error: ZeroDivisionError: division by zero (error id e1f2")


def test_the_last_attempt_failing_makes_it_dead_with_its_error() -> None:
    failure = Failed("500 Internal Server Error: boom", retryable=True)
    assert decide(claimed(3, max_attempts=4), failure, now=T0).state is InvocationState.QUEUED
    decision = decide(claimed(4, max_attempts=4), failure, now=T0)
    assert decision.state is InvocationState.DEAD
    assert decision.error == "500 Internal Server Error: boom (gave up after 4 attempts)"


def test_backoff_doubles_from_one_second_up_to_a_minute_with_jitter() -> None:
    policy = RetryPolicy()
    assert [policy.delay(n, rng=lambda: 1.0) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.delay(3, rng=lambda: 0.0) == 2.0  # never sooner than half
    assert policy.delay(1, retry_after=10, rng=lambda: 1.0) == 10.0  # Retry-After is honoured
    assert policy.delay(1, retry_after=600, rng=lambda: 1.0) == 60.0  # within the cap
    throttled = classify(429, b"", {"retry-after": "7"})
    assert decide(claimed(1), throttled, now=T0, rng=lambda: 1.0).delay == 7.0


def test_with_nothing_serving_it_waits_longer_as_it_ages_and_uses_no_attempt() -> None:
    young = decide(claimed(1, created_at=T0), NotServed("shop has no serving revision yet"), now=T0 + 1)
    old = decide(claimed(1, created_at=T0), NotServed("shop has no serving revision yet"), now=T0 + 3600)
    assert (young.state, young.counted, young.delay) == (InvocationState.QUEUED, False, 1.0)
    assert old.delay == 60.0


def test_the_platform_token_is_minted_again_near_its_end() -> None:
    class Issued:
        def __init__(self, n: int, expires_at: int) -> None:
            self.token, self.expires_at = f"t{n}", expires_at

    now = [T0]
    minted: list[Issued] = []

    def mint() -> Issued:
        minted.append(Issued(len(minted), int(now[0]) + 300))
        return minted[-1]

    token = PlatformToken(mint, margin=60, clock=lambda: now[0])
    assert [token.get(), token.get()] == ["t0", "t0"]
    now[0] += 241
    assert token.get() == "t1"


# -- the dispatcher's loop ----------------------------------------------------------
class StandInGateway:
    """An HTTP endpoint in place of the gateway's ``/_apps/<app>/<function>`` route:
    answers after ``hold`` is set, counts concurrent requests, records headers."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.seen: list[dict[str, str]] = []
        self.hold = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        self.seen.append({k.decode(): v.decode() for k, v in scope["headers"]} | {"path": scope["path"]})
        await self.hold.wait()
        self.in_flight -= 1
        fail = scope["path"].endswith("/broken")
        status, body = (422, b'{"error": "bad input"}') if fail else (200, b'{"ok": true}')
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def stand_in() -> AsyncIterator[tuple[StandInGateway, str]]:
    app = StandInGateway()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        app.hold.set()
        server.should_exit = True
        await task


async def wait_until(condition: Any, within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_the_dispatcher_delivers_with_bounded_concurrency_and_attempt_headers(
    store: Store, tmp_path: Path, stand_in: tuple[StandInGateway, str]
) -> None:
    gateway, url = stand_in
    deploy(store, tmp_path, FunctionSpec(name="resize"), FunctionSpec(name="broken"))
    ids = [store.enqueue_invocation(new(width=n))[0].id for n in range(20)]
    broken, _ = store.enqueue_invocation(new("broken"))
    caller = FunctionCaller(url, lambda: "platform-token")
    dispatcher = Dispatcher(store, caller, max_in_flight=5)
    loop = asyncio.create_task(dispatcher.run())
    try:
        await wait_until(lambda: gateway.in_flight == 5)
        assert dispatcher.in_flight == 5
        gateway.hold.set()
        await wait_until(lambda: store.invocation_counts("shop").get("resize") == {"succeeded": 20})
        await wait_until(lambda: store.invocation(broken.id).state is InvocationState.DEAD)  # type: ignore[union-attr]
    finally:
        loop.cancel()
        stopped, _ = await asyncio.wait([loop], timeout=10)
        await caller.aclose()
    assert stopped, "the dispatcher did not stop within 10 s of being cancelled"
    assert gateway.most == 5
    first = next(h for h in gateway.seen if h["x-clearway-invocation-id"] == ids[0])
    assert (first["path"], first["x-clearway-attempt"], first["x-clearway-identity"]) == ("/_apps/shop/resize", "1", "platform-token")
    dead = store.invocation(broken.id)
    assert dead is not None and dead.attempts == 1 and dead.error == "422 Unprocessable Entity: bad input"


async def test_a_function_the_serving_revision_lacks_is_dead_with_a_clear_error(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="resize"))
    queued, _ = store.enqueue_invocation(new("gone"))
    [claim] = store.claim_invocations(limit=1, lease=60)
    caller = FunctionCaller("http://127.0.0.1:9", lambda: "t")
    dispatcher = Dispatcher(store, caller)
    try:
        dispatcher.record(claim, await dispatcher.attempt(claim))
    finally:
        await caller.aclose()
    dead = store.invocation(queued.id)
    assert dead is not None and dead.state is InvocationState.DEAD
    assert dead.error == "shop-1, serving shop, has no function 'gone' (functions: resize)"


def test_a_previews_invocation_follows_its_branch(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="resize"))
    first = store.create_revision(
        AppSpec(name="shop", components=[FunctionSpec(name="resize")]), code_dir=tmp_path, app_file="app.py", env={}, branch="feat"
    )
    store.activate(first.id)
    assert find_function(store, "shop", "resize") == Target(FunctionSpec(name="resize"), None)
    assert find_function(store, "shop", "resize", revision=first.id).revision == first.id

    pushed = store.create_revision(
        AppSpec(name="shop", components=[FunctionSpec(name="resize")]), code_dir=tmp_path, app_file="app.py", env={}, branch="feat"
    )
    store.activate(pushed.id)  # the push replaced the first preview revision
    assert find_function(store, "shop", "resize", revision=first.id).revision == pushed.id

    store.end_branch("shop", "feat")
    with pytest.raises(FunctionNotFound, match=f"revision {first.id} of shop is retired and nothing replaced it") as ended:
        find_function(store, "shop", "resize", revision=first.id)
    assert not ended.value.waiting
