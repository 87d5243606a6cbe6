"""The platform as a git remote, end to end: the real git client pushes to the
real control plane, which builds, tests (the test gate) and deploys."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.platform import Platform

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: A service answering "<VERSION>|<revision>"; tests check `answer()`.
APP = """import clearway as cw

app = cw.App("gitapp")
VERSION = {version!r}


def answer():
    return {answer!r}


@app.service(replicas=1, public=True, health="/healthz")
def web():
    import os

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b"ok" if scope["path"] == "/healthz" else f"{{VERSION}}|{{os.environ['CLEARWAY_REVISION']}}".encode()
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": body}})

    return asgi
"""

TESTS = """from app import answer


def test_answer():
    assert answer() == 42
"""


class Repo:
    """A working copy with the platform as its ``clearway`` remote."""

    def __init__(self, root: Path, platform: Platform, *, token: str | None) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.env = {
            **os.environ,
            "HOME": str(root.parent),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com",
        }
        url = platform.cli("git-url", "gitapp").stdout.strip()
        if token is not None:
            url = url.replace("http://", f"http://x:{token}@")
        self.git("init", "-q", "-b", "main")
        self.git("remote", "add", "clearway", url)

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["git", *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300
        )
        if check and result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def commit(self, version: str, *, answer: int = 42, app: str | None = None) -> str:
        (self.root / "app.py").write_text(app if app is not None else APP.format(version=version, answer=answer))
        (self.root / "tests").mkdir(exist_ok=True)
        (self.root / "tests" / "test_app.py").write_text(TESTS)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", version)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def push(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.git("push", "clearway", *args, check=False)


def remote_sha(platform: Platform, ref: str = "refs/heads/main") -> str | None:
    result = subprocess.run(
        ["git", "--git-dir", str(platform.home / "git" / "gitapp.git"), "rev-parse", "--verify", "--quiet", ref],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip() or None


def test_push_to_deploy(platform: Platform, tmp_path: Path) -> None:
    token = (platform.home / "token").read_text().strip()

    # Without the token: refused (401), nothing stored.
    anonymous = Repo(tmp_path / "anon" / "work", platform, token=None)
    anonymous.commit("v0")
    refused = anonymous.push("main")
    assert refused.returncode != 0
    assert "401" in refused.stderr or "Authentication failed" in refused.stderr or "could not read Username" in refused.stderr
    assert remote_sha(platform) is None

    repo = Repo(tmp_path / "me" / "work", platform, token=token)

    # A push to main builds, runs the tests, deploys and ends with the URL.
    first = repo.commit("v1")
    pushed = repo.push("main")
    assert pushed.returncode == 0, pushed.stderr
    assert "remote: build 1 of gitapp" in pushed.stderr
    assert "remote: running the tests" in pushed.stderr
    assert "1 passed" in pushed.stderr
    assert "remote:   http://gitapp.localhost:" in pushed.stderr
    assert remote_sha(platform) == first
    assert platform.get("gitapp").text == "v1|gitapp-1"

    # Failing tests: rejected, the ref stays, the old revision keeps serving.
    repo.commit("v2", answer=41)
    failing = repo.push("main")
    assert failing.returncode != 0
    assert "assert 41 == 42" in failing.stderr
    assert "tests failed" in failing.stderr
    assert "pre-receive hook declined" in failing.stderr
    assert remote_sha(platform) == first
    assert platform.get("gitapp").text == "v1|gitapp-1"

    # A broken app.py: rejected with the error.
    repo.commit("v3", app="import clearway as cw\napp = cw.App('gitapp')\nraise RuntimeError('boom at import')\n")
    broken = repo.push("main")
    assert broken.returncode != 0
    assert "boom at import" in broken.stderr
    assert remote_sha(platform) == first
    assert platform.get("gitapp").text == "v1|gitapp-1"

    # A force push (history rewritten past the rejected commits) deploys.
    repo.git("reset", "-q", "--hard", first)
    fixed = repo.commit("v4")
    forced = repo.push("--force", "main")
    assert forced.returncode == 0, forced.stderr
    assert remote_sha(platform) == fixed
    assert platform.get("gitapp").text.startswith("v4|")

    # Another branch: stored, not built.
    repo.git("checkout", "-q", "-b", "feature-x")
    feature = repo.commit("v5")
    branch = repo.push("feature-x")
    assert branch.returncode == 0, branch.stderr
    assert "previews are not built yet" in branch.stderr
    assert remote_sha(platform, "refs/heads/feature-x") == feature
    assert platform.get("gitapp").text.startswith("v4|")

    # Deleting the production branch is refused.
    deleting = repo.push(":main")
    assert deleting.returncode != 0
    assert "refusing to delete main" in deleting.stderr
    assert remote_sha(platform) == fixed

    # `clearway builds` lists every build with its status; --log shows one's output.
    listed = platform.cli("builds", "gitapp").stdout
    for status in ("deployed", "failed tests", "failed"):
        assert status in listed, listed
    builds = json.loads(platform.cli("builds", "gitapp", "--json").stdout)
    assert [b["state"] for b in builds] == ["deployed", "failed tests", "failed", "deployed"]
    assert "assert 41 == 42" in platform.cli("builds", "gitapp", "--log", "2").stdout

    # Pushes are audited as the operator's.
    audit = platform.cli("audit", "--app", "gitapp", "--json").stdout
    assert "push refs/heads/main" in audit
    assert '"principal": "operator"' in audit
