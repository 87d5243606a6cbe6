"""Revisions: snapshots owned by the app, read-only to it; the spec read in isolation."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest

from clearway.control.revisions import INSPECT_TIMEOUT, Ownership, RevisionBuilder
from clearway.control.store import Store
from clearway.exceptions import APIError
from tests.control.projects import archive, project

pytestmark = pytest.mark.timeout(60)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def builder(home: Path) -> RevisionBuilder:
    return RevisionBuilder(Store(home / "state.db"), home)


def processes_mentioning(*texts: str) -> list[int]:
    """Processes whose command line holds every one of ``texts`` (name the test's own paths:
    other tests, in parallel, run the same commands)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if all(text.encode() in cmdline for text in texts):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@root_only
async def test_a_snapshot_belongs_to_root_and_the_apps_group(tmp_path: Path, home: Path, builder: RevisionBuilder) -> None:
    src = project(tmp_path, files={"pkg/run.sh": "#!/bin/sh\n"})
    (src / "pkg" / "run.sh").chmod(0o755)
    rev = await builder.build(archive(src, tmp_path / "up.tgz"), app_file="app.py", env={})
    assert rev.uid == 400_000 and rev.code_dir.parent == home / "code" / "hello"
    assert len(rev.code_dir.name) == 64
    assert stat.S_IMODE((home / "code").stat().st_mode) == 0o711
    for path in [rev.code_dir.parent, rev.code_dir, *rev.code_dir.rglob("*")]:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (0, 400_000), path
        expected = 0o750 if path.is_dir() or path.name == "run.sh" else 0o640
        assert stat.S_IMODE(info.st_mode) == expected, path
    assert list((home / "code" / ".staging").iterdir()) == []


async def test_identical_concurrent_uploads_share_one_snapshot(tmp_path: Path, home: Path, builder: RevisionBuilder) -> None:
    src = project(tmp_path)
    one = archive(src, tmp_path / "one.tgz")
    two = archive(src, tmp_path / "two.tgz")
    first, second = await asyncio.gather(
        builder.build(one, app_file="app.py", env={}), builder.build(two, app_file="app.py", env={})
    )
    assert first.code_dir == second.code_dir and first.id != second.id
    assert (first.code_dir / "app.py").is_file()
    assert list((home / "code" / ".staging").iterdir()) == []


async def test_an_app_that_forks_at_import_neither_hangs_the_deploy_nor_leaks(tmp_path: Path, home: Path, builder: RevisionBuilder) -> None:
    src = project(
        tmp_path,
        extra="""
        import os, sys, time
        if os.fork() == 0:
            sys.stdout.write("child holding stdout\\n"); sys.stdout.flush()
            while True:
                time.sleep(3600)
        """,
    )
    started = time.monotonic()
    rev = await builder.build(archive(src, tmp_path / "up.tgz"), app_file="app.py", env={})
    assert rev.spec.name == "hello"
    assert time.monotonic() - started < INSPECT_TIMEOUT / 4
    assert processes_mentioning("clearway.sdk.inspect", str(home)) == [], "the forked child outlived the import"


async def test_the_import_sees_no_platform_files_and_a_minimal_environment(tmp_path: Path, home: Path, builder: RevisionBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTROL_PLANE_SECRET", "s3cret")
    (home / "token").write_text("operator-token")
    src = project(
        tmp_path,
        extra=f"""
        import os, pathlib
        seen = sorted(os.environ)
        token = pathlib.Path({str(home / "token")!r})
        problems = []
        if token.exists():
            problems.append("token visible")
        if "CONTROL_PLANE_SECRET" in os.environ:
            problems.append("secret visible")
        if set(seen) - {{"PATH", "HOME", "LANG", "PYTHONDONTWRITEBYTECODE", "PWD", "SHLVL", "_"}}:
            problems.append(f"env: {{seen}}")
        try:
            open(__file__, "a")
            problems.append("code writable")
        except OSError:
            pass
        if problems:
            raise SystemExit("; ".join(problems))
        """,
    )
    rev = await builder.build(archive(src, tmp_path / "up.tgz"), app_file="app.py", env={})
    assert rev.spec.name == "hello"


async def test_an_import_error_comes_back_with_the_users_traceback(tmp_path: Path, builder: RevisionBuilder) -> None:
    src = project(tmp_path, extra="raise RuntimeError('boom at import')\n")
    with pytest.raises(APIError) as caught:
        await builder.build(archive(src, tmp_path / "up.tgz"), app_file="app.py", env={})
    assert caught.value.status == 422 and "boom at import" in (caught.value.details or "")


@root_only
async def test_the_child_runs_as_the_inspect_uid(tmp_path: Path, home: Path) -> None:
    builder = RevisionBuilder(
        Store(home / "state.db", uid_base=500_000), home, ownership=Ownership(as_root=True, uid_base=500_000)
    )
    src = project(tmp_path, extra="import os\nassert os.getuid() == 499_999 and os.getgid() == 499_999, os.getuid()\n")
    rev = await builder.build(archive(src, tmp_path / "up.tgz"), app_file="app.py", env={})
    assert rev.uid == 500_000
