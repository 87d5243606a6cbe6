"""Lifecycle: only a confirmed revision becomes active; one that never converges fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearway.control.faults import StorageFull
from clearway.control.reconciler import STARTUP_MARGIN, Reconciler
from clearway.control.store import RevisionState, Store
from clearway.spec import AppSpec, ServiceSpec
from tests.control.conftest import fill
from tests.control.fake_backend import FakeBackend

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec() -> AppSpec:
    return AppSpec(name="hello", components=[ServiceSpec(name="web", public=True, startup_timeout=10)])


async def test_a_ready_revision_that_the_data_plane_never_confirms_fails_and_the_old_one_serves(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    backend = FakeBackend()
    one = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    assert one.started_at is not None
    clock = Clock(one.started_at)
    reconciler = Reconciler(store, backend, clock=clock, assign_uids=True)
    backend.ready.add(one.id)
    await reconciler.reconcile_once()
    assert store.revision(one.id).state is RevisionState.ACTIVE  # type: ignore[union-attr]

    two = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    backend.ready.add(two.id)
    backend.confirms = False
    await reconciler.reconcile_once()
    assert store.revision(two.id).state is RevisionState.STARTING  # type: ignore[union-attr]
    assert backend.split("hello") == {one.id: 100, two.id: 0}

    clock.now = (two.started_at or 0) + 10 + STARTUP_MARGIN + 1
    await reconciler.reconcile_once()
    failed = store.revision(two.id)
    assert failed is not None and failed.state is RevisionState.FAILED
    assert "did not confirm serving it" in (failed.error or "")
    assert store.revision(one.id).state is RevisionState.ACTIVE  # type: ignore[union-attr]
    assert backend.split("hello") == {one.id: 100}


async def test_workloads_carry_the_apps_uid_only_when_uids_are_assigned(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", uid_base=450_000)
    store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    [with_uid] = Reconciler(store, FakeBackend(), assign_uids=True).desired_state().workloads
    [without] = Reconciler(store, FakeBackend(), assign_uids=False).desired_state().workloads
    assert (with_uid.uid, without.uid) == (450_000, None)
    other = AppSpec(name="other", components=[ServiceSpec(name="web")])
    store.create_revision(other, code_dir=tmp_path, app_file="app.py", env={})
    store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    assert (store.app_uid("hello"), store.app_uid("other")) == (450_000, 450_001)
    store.delete_app("hello")
    store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    assert store.app_uid("hello") == 450_000  # kept: a uid never moves to another app


async def test_a_full_disk_is_reported_once_and_the_loop_goes_on(
    tmp_path: Path, small_tmpfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(small_tmpfs / "state.db")
    backend = FakeBackend()
    rev = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    reconciler = Reconciler(store, backend)
    backend.ready.add(rev.id)
    filler = fill(small_tmpfs)
    with pytest.raises(StorageFull):  # use up what slack the WAL had
        for _ in range(10_000):
            store.add_event("hello", "x" * 1000)
    for _ in range(3):
        await reconciler.guarded_pass()
    assert reconciler.fault is not None and str(small_tmpfs) in reconciler.fault
    assert sum("reconciling is stuck" in r.message for r in caplog.records) == 1
    assert store.revision(rev.id).state is RevisionState.STARTING  # type: ignore[union-attr]
    filler.unlink()
    await reconciler.guarded_pass()
    assert reconciler.fault is None
    assert store.revision(rev.id).state is RevisionState.ACTIVE
