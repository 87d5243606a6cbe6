"""Per-app environments end to end: the real CLI, uv offline with local wheels, real replicas."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import write_app
from tests.e2e.platform import Platform, free_port
from tests.wheels import demo_wheelhouse

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

#: Answers with what the replica runs on: cwdemo's version, its interpreter, whether
#: the control plane's packages are in reach, and a text that changes with the code.
REPORTER = """
@app.service(public=True, health="/healthz")
def web():
    import importlib.util, json, sys
    import cwdemo

    report = json.dumps({{
        "cwdemo": cwdemo.__version__,
        "prefix": sys.prefix,
        "fastapi": importlib.util.find_spec("fastapi") is not None,
        "text": {text!r},
    }}).encode()

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": b"ok" if scope["path"] == "/healthz" else report}})
    return asgi
"""


def reporter(root: Path, name: str, requirements: str, text: str = "v1") -> Path:
    project = write_app(root, REPORTER.format(text=text), name=name)
    (project / "requirements.txt").write_text(requirements)
    return project


def envs(platform: Platform) -> set[str]:
    return {p.name for p in (platform.home / "envs").iterdir() if not p.name.startswith(".")}


def start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Platform:
    # The control plane hands its UV_* variables to uv: local wheels, no index.
    monkeypatch.setenv("UV_FIND_LINKS", str(demo_wheelhouse(tmp_path / "wheels")))
    running = Platform(home=tmp_path / "home", port=free_port())
    running.cli("up", "--detach", "--port", str(running.port), *args)
    return running


@pytest.fixture
def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Platform]:
    running = start(tmp_path, monkeypatch)
    try:
        yield running
    finally:
        running.down()


def test_apps_run_their_own_pins_side_by_side_and_code_changes_reuse_the_environment(
    platform: Platform, tmp_path: Path
) -> None:
    platform.cli("deploy", str(reporter(tmp_path / "one", "one", "cwdemo==1.0\n")))
    platform.cli("deploy", str(reporter(tmp_path / "two", "two", "cwdemo==2.0\n")))
    one, two = platform.get("one").json(), platform.get("two").json()
    assert (one["cwdemo"], two["cwdemo"]) == ("1.0", "2.0")
    assert one["prefix"] != two["prefix"] and one["prefix"].startswith(str(platform.home / "envs"))
    assert not one["fastapi"], "the app's environment must not hold the control plane's packages"
    built = envs(platform)
    assert len(built) == 2

    # A code-only change: same environment, no resolver run, new code serving.
    result = platform.cli("deploy", str(reporter(tmp_path / "one", "one", "cwdemo==1.0\n", text="v2")))
    assert "reused" in result.stderr and "no resolver run" in result.stderr, result.stderr
    assert envs(platform) == built
    assert platform.get("one").json()["text"] == "v2"
    revision = platform.status("one")["revisions"][-1]
    assert revision["artifact"]["env"] == "sha256:" + one["prefix"].rsplit("/", 1)[1]
    assert len(revision["artifact"]["code"]) == 64 and revision["artifact"]["python"].count(".") == 2

    # An unresolvable pin: uv's own message, nothing starts, the old revision serves on.
    failed = platform.cli("deploy", str(reporter(tmp_path / "one", "one", "cwdemo==9.9\n", text="v3")), check=False)
    assert failed.returncode == 1
    assert "fix the dependencies in requirements.txt" in failed.stderr and "cwdemo" in failed.stderr
    assert "9.9" in failed.stderr, failed.stderr
    assert platform.get("one").json()["text"] == "v2"
    assert [r["id"] for r in platform.status("one")["revisions"]] == ["one-1", "one-2"]


def test_impossible_environments_fail_before_anything_starts(platform: Platform, tmp_path: Path) -> None:
    project = write_app(tmp_path / "old", "", name="old")
    (project / "pyproject.toml").write_text('[project]\nname = "old"\nversion = "1"\nrequires-python = ">=3.99"\n')
    failed = platform.cli("deploy", str(project), check=False)
    assert failed.returncode == 1
    assert "requires-python '>=3.99'" in failed.stderr and "interpreters found" in failed.stderr, failed.stderr

    clash = reporter(tmp_path / "clash", "clash", "uvicorn==0.1.0\ncwdemo==1.0\n")
    failed = platform.cli("deploy", str(clash), check=False)
    assert failed.returncode == 1
    assert "clearway's replica runtime" in failed.stderr and "uvicorn>=0.29" in failed.stderr, failed.stderr

    apps = json.loads(platform.cli("status", "--json").stdout)
    assert apps == [] and not list((platform.home / "replicas").iterdir())


def test_old_snapshots_and_unused_environments_are_collected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    platform = start(tmp_path, monkeypatch, "--keep-revisions", "2")
    try:
        platform.cli("deploy", str(reporter(tmp_path / "a", "gc", "cwdemo==1.0\n", text="first")))
        first_env = envs(platform)
        platform.cli("deploy", str(reporter(tmp_path / "a", "gc", "cwdemo==2.0\n", text="second")))
        platform.cli("deploy", str(reporter(tmp_path / "a", "gc", "cwdemo==2.0\n", text="third")))
        # Collection runs after the activation; the deploy returns as soon as it is active.
        deadline = time.monotonic() + 60
        while True:
            revisions = {r["id"]: r for r in platform.status("gc")["revisions"]}
            if revisions["gc-1"]["pruned"]:
                break
            assert time.monotonic() < deadline, revisions
        assert not revisions["gc-2"]["pruned"] and not revisions["gc-3"]["pruned"]
        snapshots = {p.name for p in (platform.home / "code" / "gc").iterdir()}
        assert revisions["gc-1"]["artifact"]["code"] not in snapshots
        assert {revisions["gc-2"]["artifact"]["code"], revisions["gc-3"]["artifact"]["code"]} <= snapshots
        assert not first_env & envs(platform), "the environment no kept revision uses is gone"
        assert len(envs(platform)) == 1
        refused = platform.cli("rollback", "gc", "--to", "gc-1", check=False)
        assert refused.returncode == 1 and "was deleted to free space" in refused.stderr, refused.stderr
        assert platform.get("gc").json()["text"] == "third"
    finally:
        platform.down()
