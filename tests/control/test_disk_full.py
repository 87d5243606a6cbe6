"""A full disk gives a clear error naming the filesystem, and the store recovers with space."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearway.control.faults import StorageFull
from clearway.control.store import Store
from clearway.spec import AppSpec, ServiceSpec
from tests.control.conftest import fill

pytestmark = pytest.mark.timeout(60)


def spec(name: str) -> AppSpec:
    return AppSpec(name=name, components=[ServiceSpec(name="web", public=True, env={"X": "y" * 2000})])


def test_a_full_disk_is_storage_full_naming_the_filesystem_and_free_bytes(small_tmpfs: Path) -> None:
    store = Store(small_tmpfs / "state.db")
    store.create_revision(spec("before"), code_dir=small_tmpfs, app_file="app.py", env={})
    filler = fill(small_tmpfs)
    with pytest.raises(StorageFull) as caught:
        for i in range(200):  # the WAL may have a little room left
            store.create_revision(spec(f"app{i}"), code_dir=small_tmpfs, app_file="app.py", env={})
    message = str(caught.value)
    assert str(small_tmpfs) in message and "bytes free" in message and "free space" in message
    assert caught.value.mount_point == small_tmpfs
    # Nothing half-done, and the store works again once there is room.
    filler.unlink()
    store.create_revision(spec("after"), code_dir=small_tmpfs, app_file="app.py", env={})
    assert {"before", "after"} <= {a.name for a in store.apps()}
    store.close()
    assert Store(small_tmpfs / "state.db").app("after") is not None
