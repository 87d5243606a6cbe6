"""An app's configuration: kept per app and scope, merged into each new revision, never shown when secret."""

from pathlib import Path

from clearway.control.store import ConfigScope, Store
from clearway.spec import AppSpec, ServiceSpec


def spec(name: str = "hello") -> AppSpec:
    return AppSpec(name=name, components=[ServiceSpec(name="web", public=True)])


def test_config_is_merged_under_the_deploy_env_into_each_new_revision(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.change_config("hello", set_={"GREETING": "hi", "MODE": "config"})
    store.change_config("hello", set_={"TOKEN": "s3cret"}, secret=True)
    first = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={"MODE": "deploy"})
    assert first.env == {"GREETING": "hi", "MODE": "deploy", "TOKEN": "s3cret"}
    assert first.deploy_env == {"MODE": "deploy"}

    # A revision is immutable: a later change reaches only later revisions.
    store.change_config("hello", unset=["GREETING"])
    assert store.revision(first.id).env["GREETING"] == "hi"  # type: ignore[union-attr]
    second = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env=first.deploy_env)
    assert second.env == {"MODE": "deploy", "TOKEN": "s3cret"}


def test_config_survives_reopening_and_is_per_app_and_scope(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.change_config("hello", set_={"A": "1"})
    store.change_config("other", set_={"B": "2"})
    store.close()
    again = Store(tmp_path / "state.db")
    assert [(e.key, e.value) for e in again.config("hello", ConfigScope.PRODUCTION)] == [("A", "1")]
    assert [(e.key, e.value) for e in again.config("other")] == [("B", "2")]
    assert again.create_revision(spec("other"), code_dir=tmp_path, app_file="app.py", env={}).env == {"B": "2"}


def test_a_secret_value_is_in_no_view_repr_or_event(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    store.change_config("hello", set_={"TOKEN": "s3cret-value"}, secret=True)
    store.change_config("hello", set_={"PLAIN": "shown"})
    [plain, token] = store.config("hello")
    assert plain.to_json()["value"] == "shown" and not plain.secret
    assert token.secret and token.value == "s3cret-value"
    assert token.to_json()["value"] is None
    assert "s3cret-value" not in repr(token)
    revision = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    assert revision.env["TOKEN"] == "s3cret-value"
    assert "s3cret-value" not in repr(revision) and "s3cret-value" not in str(revision.to_json())
    events = [e["message"] for e in store.events("hello")]
    assert "production config: set TOKEN (secret)" in events, events
    assert not any("s3cret-value" in m for m in events)


def test_setting_a_secret_key_again_without_secret_makes_it_plain(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.change_config("hello", set_={"K": "hidden"}, secret=True)
    store.change_config("hello", set_={"K": "visible"})
    [entry] = store.config("hello")
    assert (entry.value, entry.secret) == ("visible", False)


def test_destroying_an_app_forgets_its_config(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={})
    store.change_config("hello", set_={"TOKEN": "x"}, secret=True)
    store.delete_app("hello")
    assert store.config("hello") == []
    assert store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={}).env == {}


def test_revisions_from_before_config_keep_their_env_as_the_deploy_env(tmp_path: Path) -> None:
    import sqlite3

    store = Store(tmp_path / "state.db")
    old = store.create_revision(spec(), code_dir=tmp_path, app_file="app.py", env={"K": "v"})
    store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("UPDATE revisions SET deploy_env=NULL")  # as stored by schema 3
    db.commit()
    db.close()
    again = Store(tmp_path / "state.db")
    assert again.revision(old.id).deploy_env == {"K": "v"}  # type: ignore[union-attr]
