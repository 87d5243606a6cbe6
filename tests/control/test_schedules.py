"""Schedules: next fires, coalesced missed fires, and fires queued exactly once.

Time is injected: `Scheduler.tick` takes ``now``, the store is the real one.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from clearway.control.schedules import Scheduler, due_fire, fire_key, next_fire
from clearway.control.store import InvocationKind, InvocationState, Store
from clearway.spec import AppSpec, FunctionSpec, ScheduleSpec

pytestmark = pytest.mark.timeout(30)


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


EVERY_10 = ScheduleSpec(every=10)
FIVE_MINUTES = ScheduleSpec(cron="*/5 * * * *")


def test_next_fire_of_an_interval_and_of_a_cron_expression_in_utc() -> None:
    assert next_fire(EVERY_10, 100.0) == 110.0
    assert next_fire(FIVE_MINUTES, at("2024-01-01T12:00:00")) == at("2024-01-01T12:05:00")
    assert next_fire(FIVE_MINUTES, at("2024-01-01T12:03:59")) == at("2024-01-01T12:05:00")
    assert next_fire(ScheduleSpec(cron="0 3 * * mon"), at("2024-01-01T12:00:00")) == at("2024-01-08T03:00:00")


def test_nothing_is_due_before_the_next_fire() -> None:
    assert due_fire(EVERY_10, 100.0, 109.9) is None
    assert due_fire(FIVE_MINUTES, at("2024-01-01T12:00:00"), at("2024-01-01T12:04:59")) is None


def test_a_fire_is_due_at_its_time() -> None:
    assert due_fire(EVERY_10, 100.0, 110.0) == 110.0
    assert due_fire(FIVE_MINUTES, at("2024-01-01T12:00:00"), at("2024-01-01T12:05:00")) == at("2024-01-01T12:05:00")


def test_missed_fires_coalesce_into_the_latest() -> None:
    assert due_fire(EVERY_10, 100.0, 195.0) == 190.0
    assert due_fire(FIVE_MINUTES, at("2024-01-01T12:00:00"), at("2024-01-01T12:23:00")) == at("2024-01-01T12:20:00")
    # Even after a long stop it is one cheap computation, not one step per missed minute.
    assert due_fire(ScheduleSpec(cron="* * * * *"), at("2023-01-01T00:00:00"), at("2024-01-01T12:00:30")) == at(
        "2024-01-01T12:00:00"
    )


def test_fire_keys_name_the_fire_time() -> None:
    assert fire_key(at("2024-01-01T12:05:00")) == "schedule:2024-01-01T12:05:00.000+00:00"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db")


def deploy(store: Store, tmp_path: Path, *functions: FunctionSpec, app: str = "shop") -> None:
    revision = store.create_revision(AppSpec(name=app, components=list(functions)), code_dir=tmp_path, app_file="app.py", env={})
    store.activate(revision.id)


def cron_runs(store: Store, app: str = "shop") -> list[str | None]:
    """The idempotency keys of the app's schedule runs, oldest first."""
    return [i.idempotency_key for i in reversed(store.invocations(app)) if i.kind is InvocationKind.CRON]


T0 = at("2024-01-01T12:00:00")


def test_a_new_schedule_starts_from_now_without_back_fill(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="report", schedule=EVERY_10, retries=2))
    scheduler = Scheduler(store)
    assert scheduler.tick(T0) == T0 + 10
    assert cron_runs(store) == []

    pokes: list[None] = []
    scheduler = Scheduler(store, on_queued=lambda: pokes.append(None))
    assert scheduler.tick(T0 + 10) == T0 + 20
    [run] = store.invocations("shop")
    assert (run.function, run.kind, run.state, run.payload, run.max_attempts) == (
        "report", InvocationKind.CRON, InvocationState.QUEUED, "{}", 3
    )
    assert run.idempotency_key == fire_key(T0 + 10) and len(pokes) == 1
    assert scheduler.tick(T0 + 15) == T0 + 20
    assert len(cron_runs(store)) == 1


def test_fires_missed_during_downtime_run_once_after_a_restart(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="report", schedule=FIVE_MINUTES))
    Scheduler(store).tick(T0)
    Scheduler(store).tick(at("2024-01-01T12:05:00"))
    path = store.path
    store.close()  # down from 12:05:30 to 12:43:10: seven fires missed

    again = Store(path)
    restarted = Scheduler(again)
    assert restarted.tick(at("2024-01-01T12:43:10")) == at("2024-01-01T12:45:00")
    assert cron_runs(again) == [fire_key(at("2024-01-01T12:05:00")), fire_key(at("2024-01-01T12:40:00"))]
    # The same moment again (a second restart, a crash right after the fire): nothing new.
    assert Scheduler(again).tick(at("2024-01-01T12:43:10")) == at("2024-01-01T12:45:00")
    assert len(cron_runs(again)) == 2


def test_a_removed_schedule_is_forgotten_and_starts_afresh_when_it_comes_back(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="report", schedule=EVERY_10))
    scheduler = Scheduler(store)
    scheduler.tick(T0)
    deploy(store, tmp_path, FunctionSpec(name="report"))
    assert scheduler.tick(T0 + 100) is None
    assert store.schedule_marks() == {}

    deploy(store, tmp_path, FunctionSpec(name="report", schedule=EVERY_10))
    assert scheduler.tick(T0 + 500) == T0 + 510
    assert cron_runs(store) == []


def test_an_app_with_nothing_serving_keeps_its_marks(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="report", schedule=EVERY_10))
    scheduler = Scheduler(store)
    scheduler.tick(T0)
    [serving] = store.revisions("shop")
    store.fail(serving.id, "crashed")  # nothing serves now
    assert scheduler.tick(T0 + 100) is None
    assert store.schedule_marks() == {("shop", "report"): T0}
    store.restart_revision(serving.id)
    store.activate(serving.id)
    scheduler.tick(T0 + 105)
    assert cron_runs(store) == [fire_key(T0 + 100)]  # the missed fires, coalesced


def test_only_functions_with_a_schedule_of_the_serving_production_revision_fire(store: Store, tmp_path: Path) -> None:
    deploy(store, tmp_path, FunctionSpec(name="report", schedule=EVERY_10), FunctionSpec(name="resize"))
    preview = store.create_revision(
        AppSpec(name="shop", components=[FunctionSpec(name="nightly", schedule=EVERY_10)]),
        code_dir=tmp_path, app_file="app.py", env={}, branch="feature",
    )
    store.activate(preview.id)
    scheduler = Scheduler(store)
    scheduler.tick(T0)
    scheduler.tick(T0 + 10)
    assert [i.function for i in store.invocations("shop")] == ["report"]
