"""State that lost commits or fails SQLite's check is refused at start, never started empty.

The WAL is corrupted for real: a copy of state.db and its WAL taken while the
store is open (what a ``kill -9`` leaves behind), with bytes flipped in a frame
in the middle. SQLite then silently drops every commit after that frame.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from clearway.control.faults import StateIntegrityError
from clearway.control.integrity import recover
from clearway.control.store import Store, read_witness
from clearway.spec import AppSpec, ServiceSpec

pytestmark = pytest.mark.timeout(30)


def spec(name: str) -> AppSpec:
    return AppSpec(name=name, components=[ServiceSpec(name="web", public=True)])


def crashed_copy(tmp_path: Path, deploys: int = 30) -> Path:
    """state.db + WAL + witness as a kill -9 leaves them, with ``deploys`` apps."""
    live = tmp_path / "live"
    live.mkdir()
    store = Store(live / "state.db")
    for i in range(deploys):
        store.create_revision(spec(f"app{i}"), code_dir=tmp_path, app_file="app.py", env={"K": "v"})
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("state.db", "state.db-wal", "state.witness"):
        shutil.copy(live / name, crashed / name)
    store.close()
    return crashed


def flip_middle_frame(wal: Path) -> None:
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    frame = 24 + page_size
    frames = (len(data) - 32) // frame
    assert frames > 10, "the WAL was checkpointed: nothing to corrupt"
    offset = 32 + (frames // 2) * frame + 24 + page_size // 2
    data[offset : offset + 16] = bytes(b ^ 0xFF for b in data[offset : offset + 16])
    wal.write_bytes(data)


def test_the_witness_follows_every_commit_and_files_are_private(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    before = store.commits()
    store.create_revision(spec("a"), code_dir=tmp_path, app_file="app.py", env={})
    assert store.commits() > before
    assert read_witness(tmp_path / "state.witness") == store.commits()
    for name in ("state.db", "state.db-wal", "state.db-shm", "state.witness"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_a_corrupted_wal_frame_is_refused_with_the_recovery_command(tmp_path: Path) -> None:
    crashed = crashed_copy(tmp_path)
    flip_middle_frame(crashed / "state.db-wal")
    with pytest.raises(StateIntegrityError, match=r"lost committed changes.*`clearway state recover`"):
        Store(crashed / "state.db")
    # Refusing wrote nothing: the evidence is intact for recovery.
    with pytest.raises(StateIntegrityError):
        Store(crashed / "state.db")


def test_recovery_salvages_what_survived_and_lets_the_store_open(tmp_path: Path) -> None:
    crashed = crashed_copy(tmp_path)
    flip_middle_frame(crashed / "state.db-wal")
    report = recover(crashed / "state.db")
    assert report.moved_to.is_dir() and (report.moved_to / "state.db").exists()
    assert report.commits_vouched is not None and report.commits_salvaged < report.commits_vouched
    store = Store(crashed / "state.db")
    apps = [a.name for a in store.apps()]
    assert 0 < len(apps) < 30, apps
    assert report.rows["apps"] == len(apps)
    assert all(store.revisions(a) for a in apps)
    # The store keeps working, and counting from where the salvage left off.
    store.create_revision(spec("after"), code_dir=tmp_path, app_file="app.py", env={})
    assert read_witness(crashed / "state.witness") == store.commits()


def test_an_intact_crash_copy_opens_with_everything(tmp_path: Path) -> None:
    crashed = crashed_copy(tmp_path, deploys=5)
    assert len(Store(crashed / "state.db").apps()) == 5


def test_a_lost_database_is_refused_rather_than_started_empty(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_revision(spec("a"), code_dir=tmp_path, app_file="app.py", env={})
    store.close()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(StateIntegrityError, match="is missing"):
        Store(tmp_path / "state.db")
    recover(tmp_path / "state.db")
    assert Store(tmp_path / "state.db").apps() == []


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StateIntegrityError, match="clearway state recover"):
        Store(tmp_path / "state.db")


def test_recovery_refuses_while_a_control_plane_holds_the_lock(tmp_path: Path) -> None:
    import fcntl

    Store(tmp_path / "state.db").close()
    with (tmp_path / "control.lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(StateIntegrityError, match="running"):
            recover(tmp_path / "state.db", lock_path=tmp_path / "control.lock")
