"""The store keeps desired state across restarts and keeps lifecycles consistent."""

from pathlib import Path

from clearway.control.store import BuildState, RevisionState, Store
from clearway.spec import AppSpec, ServiceSpec


def spec(name: str = "hello") -> AppSpec:
    return AppSpec(name=name, components=[ServiceSpec(name="web", public=True)])


def test_revisions_survive_reopening(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    first = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={"K": "v"})
    store.activate(first.id)
    store.set_scale("hello", "web", 4)
    store.close()

    again = Store(tmp_path / "state.db")
    [revision] = again.revisions("hello")
    assert (revision.id, revision.state, revision.env) == ("hello-1", RevisionState.ACTIVE, {"K": "v"})
    assert again.app("hello") is not None and again.app("hello").scale == {"web": 4}  # type: ignore[union-attr]


def test_activation_retires_the_previous_revision_and_supersedes_older_starts(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    one = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    store.activate(one.id)
    two = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    three = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    store.activate(three.id)
    states = {r.id: r.state for r in store.revisions("hello")}
    assert states == {
        one.id: RevisionState.RETIRED,
        two.id: RevisionState.FAILED,
        three.id: RevisionState.ACTIVE,
    }
    assert "superseded by hello-3" in (store.revision(two.id).error or "")  # type: ignore[union-attr]


def test_failure_keeps_the_active_revision(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    one = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    store.activate(one.id)
    two = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    store.fail(two.id, "Traceback ...\nImportError: nope")
    assert [r.state for r in store.revisions("hello")] == [RevisionState.ACTIVE, RevisionState.FAILED]
    assert any("failed: Traceback" in e["message"] for e in store.events("hello"))


def test_numbers_are_per_app_and_never_reused_after_delete(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_revision(spec("a"), code_dir=tmp_path, app_file="app.py", env={})
    second = store.create_revision(spec("a"), code_dir=tmp_path, app_file="app.py", env={})
    other = store.create_revision(spec("b"), code_dir=tmp_path, app_file="app.py", env={})
    assert (second.id, other.id) == ("a-2", "b-1")


def test_revisions_from_before_artifacts_are_migrated_and_keep_running_on_the_platform(tmp_path: Path) -> None:
    import json
    import sqlite3

    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE apps (name TEXT PRIMARY KEY, created_at REAL NOT NULL, scale TEXT NOT NULL DEFAULT '{}',
                           next_number INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE revisions (id TEXT PRIMARY KEY, app TEXT NOT NULL, number INTEGER NOT NULL, spec TEXT NOT NULL,
            code_dir TEXT NOT NULL, app_file TEXT NOT NULL, env TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL,
            error TEXT, created_at REAL NOT NULL, started_at REAL, activated_at REAL, UNIQUE (app, number));
        """
    )
    db.execute("INSERT INTO apps VALUES ('hello', 0, '{}', 2)")
    db.execute(
        "INSERT INTO revisions VALUES ('hello-1', 'hello', 1, ?, ?, 'app.py', '{}', 'active', NULL, 0, 0, 0)",
        (json.dumps(spec().model_dump(mode="json")), str(tmp_path / "code" / "hello" / ("ab" * 32))),
    )
    db.commit()
    db.close()
    store = Store(path)
    [old] = store.revisions("hello")
    assert (old.code_digest, old.env_digest, old.pruned_at) == ("ab" * 32, None, None)
    new = store.create_revision(
        spec(), code_dir=tmp_path / "cd", app_file="app.py", env={}, env_digest="sha256:ff", python="3.11.7"
    )
    assert (new.env_digest, new.python, new.code_digest) == ("sha256:ff", "3.11.7", "cd")
    store.mark_pruned([old.id])
    assert store.revision(old.id).pruned_at is not None  # type: ignore[union-attr]


def test_builds_cut_off_by_a_stop_are_failed_with_their_starting_revision(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    spec = AppSpec(name="demo", components=[])
    revision = store.create_revision(spec, code_dir=tmp_path, app_file="app.py", env={})
    deploying = store.create_build("demo", ref="refs/heads/main", old_sha="0" * 40, new_sha="1" * 40)
    store.update_build("demo", deploying.number, state=BuildState.DEPLOYING, revision=revision.id)
    testing = store.create_build("demo", ref="refs/heads/main", old_sha="1" * 40, new_sha="2" * 40)
    store.update_build("demo", testing.number, state=BuildState.TESTING)
    done = store.create_build("demo", ref="refs/heads/main", old_sha="2" * 40, new_sha="3" * 40)
    store.update_build("demo", done.number, state=BuildState.FAILED)

    assert store.abort_unfinished_builds("cut off") == 2
    states = {b.number: b.state for b in store.builds("demo")}
    assert states == {deploying.number: BuildState.FAILED, testing.number: BuildState.FAILED, done.number: BuildState.FAILED}
    after = store.revision(revision.id)
    assert after is not None and after.state is RevisionState.FAILED and after.error == "cut off"
    assert store.abort_unfinished_builds("again") == 0
