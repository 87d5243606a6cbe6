"""The rollout state machine and the tracks, pass by pass, with the gateway's
counters set by the test (the e2e tests run the same against real replicas)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearway.backends.base import TrafficSample
from clearway.control.reconciler import Reconciler
from clearway.control.store import RevisionState, RolloutState, Store
from clearway.spec import AppSpec, ServiceSpec
from clearway.spec.model import CanaryPolicy, WorkerSpec
from tests.control.fake_backend import FakeBackend

pytestmark = pytest.mark.timeout(30)

BOUNDS = (0.01, 0.1, 1.0)
POLICY = CanaryPolicy(steps=[10, 50, 100], min_duration=5, min_requests=10)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(**kwargs: object) -> AppSpec:
    return AppSpec(name="shop", components=[ServiceSpec(name="web", public=True)], canary=POLICY, **kwargs)  # type: ignore[arg-type]


def sample(ok: int, errors: int = 0, slow: int = 0) -> TrafficSample:
    """Cumulative counters: ``ok`` fast 2xx, ``errors`` fast 5xx, ``slow`` 2xx taking ~0.5 s."""
    return TrafficSample((0, ok + slow, 0, 0, errors), (ok + errors, 0, slow, 0), BOUNDS)


async def start(tmp_path: Path) -> tuple[Store, FakeBackend, Reconciler, Clock, str, str]:
    """shop-1 serving, shop-2 ready as a canary at the first step."""
    store = Store(tmp_path / "state.db")
    backend = FakeBackend()
    stable = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    clock = Clock(stable.started_at or 0)
    reconciler = Reconciler(store, backend, clock=clock, assign_uids=False)
    backend.ready.add(stable.id)
    await reconciler.reconcile_once()
    canary = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={}, canary=True)
    backend.ready.add(canary.id)
    backend.samples = {stable.id: sample(100)}
    await reconciler.reconcile_once()
    return store, backend, reconciler, clock, stable.id, canary.id


async def test_a_ready_canary_takes_its_first_step_beside_the_stable(tmp_path: Path) -> None:
    store, backend, _, _, stable, canary = await start(tmp_path)
    assert store.revision(canary).state is RevisionState.CANARY  # type: ignore[union-attr]
    assert backend.split("shop") == {stable: 90, canary: 10}
    rollout = store.rollout("shop")
    assert rollout is not None and rollout.weight == 10 and rollout.stable == stable


async def test_steps_wait_for_data_then_pass_then_promote(tmp_path: Path) -> None:
    store, backend, reconciler, clock, stable, canary = await start(tmp_path)
    await reconciler.reconcile_once()  # the step's baseline
    rollout = store.rollout("shop")
    assert rollout is not None
    clock.now = rollout.step_started_at + 60
    backend.samples = {stable: sample(190), canary: sample(5)}  # enough time, too few requests
    await reconciler.reconcile_once()
    waiting = store.rollout("shop")
    assert waiting is not None and waiting.step == 0 and waiting.analysis is not None
    assert waiting.analysis["outcome"] == "waiting"

    backend.samples = {stable: sample(300), canary: sample(20)}
    await reconciler.reconcile_once()
    second = store.rollout("shop")
    assert second is not None and second.step == 1 and second.weight == 50
    assert backend.split("shop") == {stable: 50, canary: 50}

    await reconciler.reconcile_once()  # nothing new since the step began: waiting again
    assert store.rollout("shop").step == 1  # type: ignore[union-attr]
    clock.now = second.step_started_at + 60
    backend.samples = {stable: sample(400), canary: sample(120)}
    await reconciler.reconcile_once()
    assert store.rollout("shop") is None
    [done] = store.rollouts("shop", limit=1)
    assert done.state is RolloutState.PROMOTED
    assert store.revision(canary).state is RevisionState.ACTIVE  # type: ignore[union-attr]
    assert store.revision(stable).state is RevisionState.RETIRED  # type: ignore[union-attr]
    assert backend.split("shop") == {canary: 100}


async def test_errors_roll_back_in_the_pass_that_sees_them(tmp_path: Path) -> None:
    store, backend, reconciler, _, stable, canary = await start(tmp_path)
    await reconciler.reconcile_once()
    backend.samples = {stable: sample(200), canary: sample(8, errors=4)}
    await reconciler.reconcile_once()
    [done] = store.rollouts("shop", limit=1)
    assert done.state is RolloutState.ROLLED_BACK and "5xx" in (done.reason or "")
    assert store.revision(canary).state is RevisionState.ROLLED_BACK  # type: ignore[union-attr]
    assert backend.split("shop") == {stable: 100}  # the same pass applied it


async def test_latency_rolls_back(tmp_path: Path) -> None:
    store, backend, reconciler, _, stable, canary = await start(tmp_path)
    await reconciler.reconcile_once()
    backend.samples = {stable: sample(200), canary: sample(0, slow=12)}
    await reconciler.reconcile_once()
    [done] = store.rollouts("shop", limit=1)
    assert done.state is RolloutState.ROLLED_BACK and "p99" in (done.reason or ""), done.reason


async def test_a_gateway_restart_starts_the_window_over_rather_than_judging_a_torn_one(tmp_path: Path) -> None:
    store, backend, reconciler, _, stable, canary = await start(tmp_path)
    backend.samples = {stable: sample(500), canary: sample(5)}
    await reconciler.reconcile_once()  # waiting: too few canary requests
    backend.samples = {stable: sample(10), canary: sample(1, errors=1)}  # counters reset
    await reconciler.reconcile_once()
    rollout = store.rollout("shop")
    assert rollout is not None and rollout.timeline[-1]["event"] == "restarted step"


async def test_a_new_deploy_without_canary_ends_the_rollout(tmp_path: Path) -> None:
    store, backend, reconciler, _, _, canary = await start(tmp_path)
    hotfix = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    backend.ready.add(hotfix.id)
    await reconciler.reconcile_once()
    [done] = store.rollouts("shop", limit=1)
    assert done.state is RolloutState.ABORTED and hotfix.id in (done.reason or "")
    assert store.revision(canary).state is RevisionState.RETIRED  # type: ignore[union-attr]
    assert backend.split("shop") == {hotfix.id: 100}


async def test_the_first_canary_deploy_is_served_directly(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    backend = FakeBackend()
    first = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={}, canary=True)
    backend.ready.add(first.id)
    await Reconciler(store, backend, assign_uids=False).reconcile_once()
    assert store.revision(first.id).state is RevisionState.ACTIVE  # type: ignore[union-attr]
    assert store.rollouts("shop") == []


async def test_previews_activate_on_their_own_track_with_their_own_scale(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    backend = FakeBackend()
    reconciler = Reconciler(store, backend, assign_uids=False)
    many = AppSpec(
        name="shop",
        components=[ServiceSpec(name="web", public=True, replicas=3), WorkerSpec(name="off", replicas=0)],
    )
    prod = store.create_revision(many, code_dir=tmp_path, app_file="app.py", env={})
    sha = "ab12cd3" + "0" * 33
    preview = store.create_revision(many, code_dir=tmp_path, app_file="app.py", env={}, branch="feature/x", commit=sha)
    backend.ready |= {prod.id, preview.id}
    await reconciler.reconcile_once()
    assert store.active("shop") == store.revision(prod.id)
    assert store.active("shop", "feature/x") == store.revision(preview.id)
    desired = backend.applied[-1]
    replicas = {w.revision: dict(w.replicas) for w in desired.workloads}
    assert replicas == {prod.id: {"web": 3, "off": 0}, preview.id: {"web": 1, "off": 0}}
    assert {t.revision for t in desired.traffic["shop"]} == {prod.id}
    hosts = {(a.label, tuple((t.revision, t.weight) for t in a.targets)) for a in desired.aliases}
    assert hosts == {("feature-x-217d2b", ((preview.id, 100),)), ("ab12cd3", ((preview.id, 100),))}

    store.set_scale("shop", "web", 2, previews=True)
    await reconciler.reconcile_once()
    assert {w.revision: w.replicas["web"] for w in backend.applied[-1].workloads}[preview.id] == 2

    assert store.end_branch("shop", "feature/x") == [preview.id]
    await reconciler.reconcile_once()
    assert [w.revision for w in backend.applied[-1].workloads] == [prod.id]
    assert backend.applied[-1].aliases == []


async def test_a_rollback_to_a_revision_first_deployed_as_a_canary_takes_the_traffic_at_once(tmp_path: Path) -> None:
    store, backend, reconciler, _, _, canary = await start(tmp_path)
    assert reconciler.rollouts.promote("shop", reason="test") is not None
    await reconciler.reconcile_once()
    newer = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    backend.ready.add(newer.id)
    await reconciler.reconcile_once()
    assert store.active("shop") == store.revision(newer.id)

    store.restart_revision(canary)  # `clearway rollback shop` to the promoted canary
    await reconciler.reconcile_once()
    assert store.active("shop") == store.revision(canary)
    assert store.rollout("shop") is None
    assert backend.split("shop") == {canary: 100}
