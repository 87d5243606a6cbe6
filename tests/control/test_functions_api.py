"""The functions routes of the API (ASGI, a real store, a fake backend): who may
spawn, follow and post events for which app, and the answers to bad requests.

Nothing is delivered here (the dispatcher's loop does not run); delivery is
``tests/e2e/test_functions.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clearway.control.api import create_api
from clearway.control.credentials import SigningKey
from clearway.control.invocations import MAX_PAYLOAD, Dispatcher, FunctionCaller
from clearway.control.reconciler import Reconciler
from clearway.control.revisions import RevisionBuilder
from clearway.control.store import InvocationState, Store
from clearway.spec import AppSpec, FunctionSpec
from tests.control.fake_backend import FakeBackend

pytestmark = pytest.mark.timeout(60)

TOKEN = "operator-token"
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
STRUCTURED = {"content-type": "application/cloudevents+json"}


@dataclass(frozen=True)
class _Replica:
    revision: str
    app: str
    replica_id: str
    component: str = "worker"


@dataclass
class Platform:
    http: httpx.AsyncClient
    store: Store
    backend: FakeBackend
    signing: SigningKey

    def replica(self, app: str) -> dict[str, str]:
        """The headers of a running replica of ``app``."""
        revision = self.store.active(app)
        assert revision is not None
        replica = _Replica(revision=revision.id, app=app, replica_id=f"{revision.id}.worker.0")
        self.backend.incarnations[replica.replica_id] = "inc"
        return {"authorization": f"Bearer {self.signing.mint_replica_token(replica, 'inc').token}"}


def deploy(store: Store, tmp_path: Path, app: str, *functions: FunctionSpec) -> None:
    revision = store.create_revision(AppSpec(name=app, components=list(functions)), code_dir=tmp_path, app_file="app.py", env={})
    store.activate(revision.id)


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    home = tmp_path / "home"
    home.mkdir()
    store = Store(home / "state.db")
    backend = FakeBackend()
    signing = SigningKey.load_or_create(home / "keys")
    caller = FunctionCaller("http://127.0.0.1:9", lambda: "platform")
    api = create_api(
        store=store,
        backend=backend,
        reconciler=Reconciler(store, backend),
        builder=RevisionBuilder(store, home),
        token=TOKEN,
        signing=signing,
        on_shutdown=lambda: None,
        dispatcher=Dispatcher(store, caller),
    )
    deploy(store, tmp_path, "shop", FunctionSpec(name="resize", retries=2), FunctionSpec(name="on-order", events=["order.created"]))
    deploy(store, tmp_path, "blog", FunctionSpec(name="publish"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://control") as http:
        yield Platform(http, store, backend, signing)
    await caller.aclose()
    store.close()


async def test_the_operator_spawns_once_per_key_and_follows_the_invocation(platform: Platform) -> None:
    body = {"kwargs": {"width": 3}, "idempotency_key": "k1"}
    first = await platform.http.post("/v1/apps/shop/functions/resize/spawn", json=body, headers=OPERATOR)
    again = await platform.http.post("/v1/apps/shop/functions/resize/spawn", json=body, headers=OPERATOR)
    assert first.status_code == again.status_code == 202
    assert (first.json()["created"], again.json()["created"], again.json()["id"]) == (True, False, first.json()["id"])

    found = (await platform.http.get(f"/v1/invocations/{first.json()['id']}", headers=OPERATOR)).json()
    assert (found["state"], found["max_attempts"], found["payload"], found["kind"]) == ("queued", 3, {"width": 3}, "spawn")
    listed = (await platform.http.get("/v1/apps/shop/invocations", headers=OPERATOR)).json()
    assert [i["id"] for i in listed] == [found["id"]] and "payload" not in listed[0]


async def test_spawning_what_does_not_exist_says_what_does(platform: Platform) -> None:
    missing = await platform.http.post("/v1/apps/shop/functions/nope/spawn", json={}, headers=OPERATOR)
    assert missing.status_code == 404 and "has no function 'nope' (functions: resize, on-order)" in missing.json()["error"]
    no_app = await platform.http.post("/v1/apps/nope/functions/resize/spawn", json={}, headers=OPERATOR)
    assert no_app.status_code == 404


async def test_oversized_arguments_are_refused_before_they_are_queued(platform: Platform) -> None:
    huge = {"kwargs": {"data": "x" * MAX_PAYLOAD}}
    refused = await platform.http.post("/v1/apps/shop/functions/resize/spawn", json=huge, headers=OPERATOR)
    assert refused.status_code == 413 and "by reference" in refused.json()["error"]
    assert platform.store.invocations("shop") == []


async def test_only_dead_invocations_are_retried(platform: Platform) -> None:
    queued = (await platform.http.post("/v1/apps/shop/functions/resize/spawn", json={}, headers=OPERATOR)).json()
    refused = await platform.http.post(f"/v1/invocations/{queued['id']}/retry", headers=OPERATOR)
    assert refused.status_code == 409 and "is queued: only dead invocations are retried" in refused.json()["error"]

    [claimed] = platform.store.claim_invocations(limit=1, lease=60)
    platform.store.finish_invocation(claimed, InvocationState.DEAD, error="422 Unprocessable Entity")
    dead = (await platform.http.get("/v1/apps/shop/invocations", params={"state": "dead"}, headers=OPERATOR)).json()
    assert [i["id"] for i in dead] == [queued["id"]]
    retried = await platform.http.post(f"/v1/invocations/{queued['id']}/retry", headers=OPERATOR)
    assert retried.status_code == 200 and (retried.json()["state"], retried.json()["attempts"]) == ("queued", 0)


async def test_a_replica_spawns_and_follows_its_own_apps_functions_only(platform: Platform) -> None:
    shop = platform.replica("shop")
    queued = await platform.http.post("/v1/replica/invocations", json={"function": "resize", "kwargs": {}}, headers=shop)
    assert queued.status_code == 202
    followed = await platform.http.get(f"/v1/replica/invocations/{queued.json()['id']}", headers=shop)
    assert followed.status_code == 200 and followed.json()["state"] == "queued"

    blog = platform.replica("blog")
    # Another app's replica sees no such invocation, and can name only its own app's functions.
    assert (await platform.http.get(f"/v1/replica/invocations/{queued.json()['id']}", headers=blog)).status_code == 404
    other = await platform.http.post("/v1/replica/invocations", json={"function": "resize"}, headers=blog)
    assert other.status_code == 404 and "has no function 'resize'" in other.json()["error"]
    # The replica routes take replica tokens only; the operator routes take no replica token.
    assert (await platform.http.post("/v1/replica/invocations", json={"function": "resize"}, headers=OPERATOR)).status_code == 401
    assert (await platform.http.post("/v1/apps/shop/functions/resize/spawn", json={}, headers=shop)).status_code == 401


def cloudevent(type_: str = "order.created", id_: str = "e1") -> bytes:
    return json.dumps({"specversion": "1.0", "id": id_, "source": "/orders", "type": type_, "data": {"n": 1}}).encode()


async def test_events_come_from_the_operator_or_the_apps_own_replicas(platform: Platform) -> None:
    by_operator = await platform.http.post("/v1/apps/shop/events", content=cloudevent(), headers=OPERATOR | STRUCTURED)
    assert by_operator.status_code == 202
    [queued] = by_operator.json()["invocations"]
    assert (queued["function"], queued["created"]) == ("on-order", True)

    by_replica = await platform.http.post(
        "/v1/apps/shop/events", content=cloudevent(id_="e2"), headers=platform.replica("shop") | STRUCTURED
    )
    assert by_replica.status_code == 202
    foreign = await platform.http.post(
        "/v1/apps/shop/events", content=cloudevent(id_="e3"), headers=platform.replica("blog") | STRUCTURED
    )
    assert foreign.status_code == 403 and "its own app only" in foreign.json()["error"]
    anonymous = await platform.http.post("/v1/apps/shop/events", content=cloudevent(id_="e4"), headers=STRUCTURED)
    assert anonymous.status_code == 401
    assert len(platform.store.invocations("shop")) == 2


async def test_bad_events_are_refused_and_nothing_is_queued(platform: Platform) -> None:
    malformed = await platform.http.post("/v1/apps/shop/events", content=b"{}", headers=OPERATOR | STRUCTURED)
    assert malformed.status_code == 400 and "not a valid CloudEvent" in malformed.json()["error"]
    batch = json.dumps([json.loads(cloudevent()), json.loads(cloudevent("order.unknown", "e2"))]).encode()
    unrouted = await platform.http.post(
        "/v1/apps/shop/events", content=batch, headers=OPERATOR | {"content-type": "application/cloudevents-batch+json"}
    )
    assert unrouted.status_code == 422 and "'order.unknown'" in unrouted.json()["error"]
    assert platform.store.invocations("shop") == []


async def test_the_functions_view_shows_triggers_and_invocations_per_state(platform: Platform) -> None:
    await platform.http.post("/v1/apps/shop/functions/resize/spawn", json={}, headers=OPERATOR)
    view = (await platform.http.get("/v1/apps/shop/functions", headers=OPERATOR)).json()
    assert view["revision"] == "shop-1"
    resize, on_order = view["functions"]
    assert resize["invocations"] == {"queued": 1, "running": 0, "succeeded": 0, "dead": 0}
    assert on_order["triggers"] == {"http": None, "events": ["order.created"], "schedule": None}


async def test_a_previews_replica_spawns_the_previews_function(platform: Platform, tmp_path: Path) -> None:
    preview = platform.store.create_revision(
        AppSpec(name="shop", components=[FunctionSpec(name="resize")]), code_dir=tmp_path, app_file="app.py", env={}, branch="feat"
    )
    platform.store.activate(preview.id)
    replica = _Replica(revision=preview.id, app="shop", replica_id=f"{preview.id}.worker.0")
    platform.backend.incarnations[replica.replica_id] = "inc"
    headers = {"authorization": f"Bearer {platform.signing.mint_replica_token(replica, 'inc').token}"}

    from_preview = await platform.http.post("/v1/replica/invocations", json={"function": "resize"}, headers=headers)
    from_production = await platform.http.post("/v1/replica/invocations", json={"function": "resize"}, headers=platform.replica("shop"))
    assert platform.store.invocation(from_preview.json()["id"]).revision == preview.id  # type: ignore[union-attr]
    assert platform.store.invocation(from_production.json()["id"]).revision is None  # type: ignore[union-attr]
