"""The functions routes of the API (ASGI, a real store, a fake backend): who may
spawn, follow and post events for which app, and the answers to bad requests.

Nothing is delivered here (the dispatcher's loop does not run); delivery is
``tests/e2e/test_functions.py``.
"""

from __future__ import annotations

import asyncio
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
    reconciler: Reconciler

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
    reconciler = Reconciler(store, backend)
    api = create_api(
        store=store,
        backend=backend,
        reconciler=reconciler,
        builder=RevisionBuilder(store, home),
        token=TOKEN,
        signing=signing,
        on_shutdown=lambda: None,
        dispatcher=Dispatcher(store, caller),
    )
    deploy(store, tmp_path, "shop", FunctionSpec(name="resize", retries=2), FunctionSpec(name="on-order", events=["order.created"]))
    deploy(store, tmp_path, "blog", FunctionSpec(name="publish"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://control") as http:
        yield Platform(http, store, backend, signing, reconciler)
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


def binary(key: str, id_: str = "b1", type_: str = "order.created") -> dict[str, str]:
    """The headers of a binary-mode CloudEvent posted with ``key``."""
    return {
        "authorization": f"Bearer {key}",
        "ce-specversion": "1.0",
        "ce-type": type_,
        "ce-source": "/billing",
        "ce-id": id_,
        "content-type": "application/json",
    }


async def new_key(platform: Platform, app: str, name: str | None = None) -> dict[str, str]:
    created = await platform.http.post(f"/v1/apps/{app}/event-keys", json={"name": name} if name else None, headers=OPERATOR)
    assert created.status_code == 201, created.text
    answer: dict[str, str] = created.json()
    return answer


@pytest.mark.timeout(30)
async def test_an_event_key_posts_events_to_its_own_app(platform: Platform) -> None:
    created = await new_key(platform, "shop", "billing")
    assert created["key"].startswith(f"cwek_{created['id']}_") and created["name"] == "billing"
    assert created["url"] == "http://control/v1/apps/shop/events"

    posted = await platform.http.post("/v1/apps/shop/events", content=b'{"n": 1}', headers=binary(created["key"]))
    assert posted.status_code == 202, posted.text
    [queued] = platform.store.invocations("shop")
    assert (queued.function, queued.state, posted.json()["invocations"][0]["id"]) == ("on-order", InvocationState.QUEUED, queued.id)
    [listed] = (await platform.http.get("/v1/apps/shop/event-keys", headers=OPERATOR)).json()
    assert listed["last_used_at"] is not None
    # The audit log says which key posted (never the key itself).
    entries = (await platform.http.get("/v1/audit", params={"app": "shop"}, headers=OPERATOR)).json()
    post = next(e for e in entries if e["path"] == "/v1/apps/shop/events")
    assert post["principal"] == f"event key {created['id']}" and f"event key {created['id']} 'billing'" in post["detail"]
    secret = created["key"].split("_", 2)[2]  # cwek_<id>_<secret>; the secret may itself hold '_'
    assert len(secret) >= 16 and created["key"] not in repr(entries) and secret not in repr(entries)


@pytest.mark.timeout(30)
async def test_an_event_key_of_one_app_is_refused_by_another(platform: Platform) -> None:
    blogs = await new_key(platform, "blog")
    foreign = await platform.http.post("/v1/apps/shop/events", content=b"{}", headers=binary(blogs["key"]))
    assert foreign.status_code == 403 and "belongs to another app (blog)" in foreign.json()["error"]
    assert platform.store.invocations("shop") == []


@pytest.mark.timeout(30)
async def test_revoked_malformed_and_wrong_event_keys_are_refused(platform: Platform) -> None:
    created = await new_key(platform, "shop")
    revoked = await platform.http.delete(f"/v1/apps/shop/event-keys/{created['id']}", headers=OPERATOR)
    assert revoked.status_code == 204 and revoked.content == b""
    again = await platform.http.delete(f"/v1/apps/shop/event-keys/{created['id']}", headers=OPERATOR)
    assert again.status_code == 404 and "clearway events keys shop" in again.json()["error"]

    live = await new_key(platform, "shop")
    wrong_secret = f"cwek_{live['id']}_{'A' * 43}"
    for bad in (created["key"], wrong_secret, "cwek_not-hex_secret", "cwek_", live["key"] + "x"):
        refused = await platform.http.post("/v1/apps/shop/events", content=b"{}", headers=binary(bad))
        assert refused.status_code == 401, bad
        assert "`clearway events key shop`" in refused.json()["error"], refused.json()
    assert platform.store.invocations("shop") == []
    [still] = (await platform.http.get("/v1/apps/shop/event-keys", headers=OPERATOR)).json()
    assert (still["id"], still["last_used_at"]) == (live["id"], None)


@pytest.mark.timeout(30)
async def test_an_event_key_opens_nothing_but_the_events_ingress(platform: Platform) -> None:
    key = {"authorization": f"Bearer {(await new_key(platform, 'shop'))['key']}"}
    assert (await platform.http.get("/v1/apps", headers=key)).status_code == 401
    assert (await platform.http.get("/v1/apps/shop/event-keys", headers=key)).status_code == 401
    assert (await platform.http.post("/v1/apps/shop/event-keys", headers=key)).status_code == 401
    assert (await platform.http.post("/v1/apps/shop/functions/resize/spawn", json={}, headers=key)).status_code == 401
    assert (await platform.http.post("/v1/replica/invocations", json={"function": "resize"}, headers=key)).status_code == 401
    assert platform.store.invocations("shop") == []


@pytest.mark.timeout(30)
async def test_listing_event_keys_never_shows_a_secret(platform: Platform) -> None:
    first = await new_key(platform, "shop")
    second = await new_key(platform, "shop", "relay.v2")
    response = await platform.http.get("/v1/apps/shop/event-keys", headers=OPERATOR)
    listed = response.json()
    assert [(k["id"], k["name"]) for k in listed] == [(first["id"], "producer"), (second["id"], "relay.v2")]
    assert all(set(k) == {"id", "app", "name", "created_at", "last_used_at"} for k in listed)
    for created in (first, second):
        secret = created["key"].removeprefix(f"cwek_{created['id']}_")
        assert secret not in response.text and platform.store.event_key(created["id"]).secret_hash not in response.text  # type: ignore[union-attr]
    bad_name = await platform.http.post("/v1/apps/shop/event-keys", json={"name": "no spaces"}, headers=OPERATOR)
    assert bad_name.status_code == 422
    no_app = await platform.http.post("/v1/apps/nope/event-keys", headers=OPERATOR)
    assert no_app.status_code == 404


@pytest.mark.timeout(30)
async def test_destroying_the_app_removes_its_event_keys(platform: Platform) -> None:
    created = await new_key(platform, "shop")
    kept = await new_key(platform, "blog")
    loop = asyncio.create_task(platform.reconciler.run())  # the delete waits for a pass
    try:
        deleted = await platform.http.delete("/v1/apps/shop", headers=OPERATOR)
    finally:
        loop.cancel()
    assert deleted.status_code == 200, deleted.text
    assert platform.store.event_key(created["id"]) is None and platform.store.event_keys("shop") == []
    assert [k.id for k in platform.store.event_keys("blog")] == [kept["id"]]
    refused = await platform.http.post("/v1/apps/shop/events", content=b"{}", headers=binary(created["key"]))
    assert refused.status_code == 401
