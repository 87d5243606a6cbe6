"""GitHub webhooks, end to end: signed deliveries to the real control plane,
which fetches from a real repository (a local bare one stands in for GitHub,
registered as the webhook's repository), builds and deploys."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.platform import Platform, free_port
from tests.e2e.test_git import APP, TESTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    running = Platform(home=tmp_path_factory.mktemp("webhooks") / "home", port=free_port())
    running.up()
    try:
        yield running
    finally:
        running.down()


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"git {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.strip()


class GitHub:
    """A bare repository standing in for GitHub, and a working copy pushing to it."""

    def __init__(self, root: Path, app: str) -> None:
        self.app = app
        self.origin = root / "origin.git"
        self.work = root / "work"
        self.work.mkdir(parents=True)
        git(root, "init", "-q", "--bare", "-b", "main", str(self.origin))
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "remote", "add", "origin", str(self.origin))

    def commit(self, version: str, *, branch: str = "main") -> str:
        git(self.work, "checkout", "-q", "-B", branch)
        (self.work / "app.py").write_text(APP.format(name=self.app, version=version, answer=42))
        (self.work / "tests").mkdir(exist_ok=True)
        (self.work / "tests" / "test_app.py").write_text(TESTS)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", version)
        git(self.work, "push", "-q", "origin", branch)
        return git(self.work, "rev-parse", "HEAD")


class Hook:
    """Deliveries signed like GitHub's."""

    def __init__(self, platform: Platform, app: str, secret: str) -> None:
        self.platform = platform
        self.app = app
        self.secret = secret
        info = json.loads((platform.home / "control.json").read_text())
        self.api = info["api_url"]
        self.token = (platform.home / "token").read_text().strip()

    def send(self, event: str, payload: dict[str, Any], *, secret: str | None = None, app: str | None = None) -> httpx.Response:
        body = json.dumps(payload).encode()
        key = (self.secret if secret is None else secret).encode()
        headers = {
            "content-type": "application/json",
            "x-github-event": event,
            "x-hub-signature-256": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest(),
        }
        return httpx.post(f"{self.api}/v1/webhooks/github/{app or self.app}", content=body, headers=headers, timeout=30)

    def finished(self, number: int, *, within: float = 300) -> dict[str, Any]:
        """Build ``number`` once it has ended (deployed or failed)."""
        deadline = time.monotonic() + within
        pause = threading.Event()
        while True:
            build: dict[str, Any] = httpx.get(
                f"{self.api}/v1/apps/{self.app}/builds/{number}",
                headers={"authorization": f"Bearer {self.token}"},
                timeout=30,
            ).json()
            if build.get("finished_at") is not None:
                return build
            assert time.monotonic() < deadline, f"build {number} did not finish within {within:.0f}s: {build}"
            pause.wait(0.2)


def push_event(origin: Path, branch: str, sha: str, *, clone_url: str | None = None) -> dict[str, Any]:
    return {
        "ref": f"refs/heads/{branch}",
        "before": "0" * 40,
        "after": sha,
        "deleted": False,
        "repository": {"clone_url": clone_url or str(origin)},
    }


def pull_request_event(origin: Path, number: int, action: str, branch: str, sha: str, *, head_url: str | None = None) -> dict[str, Any]:
    return {
        "action": action,
        "number": number,
        "pull_request": {"head": {"ref": branch, "sha": sha, "repo": {"clone_url": head_url or str(origin)}}},
        "repository": {"clone_url": str(origin)},
    }


def test_github_webhook(platform: Platform, tmp_path: Path) -> None:
    github = GitHub(tmp_path, "hooked")
    first = github.commit("w1")
    created = json.loads(platform.cli("webhook", "hooked", "--repository", str(github.origin), "--json").stdout)
    assert created["url"].endswith("/v1/webhooks/github/hooked")
    hook = Hook(platform, "hooked", created["secret"])

    # Unsigned, wrongly signed or for an app without a webhook: refused, nothing built.
    unknown = hook.send("ping", {}, app="nohook")
    assert unknown.status_code == 404 and "clearway webhook nohook" in unknown.json()["error"]
    unsigned = httpx.post(f"{hook.api}/v1/webhooks/github/hooked", content=b"{}", headers={"x-github-event": "ping"})
    assert unsigned.status_code == 401 and "missing X-Hub-Signature-256" in unsigned.json()["error"]
    forged = hook.send("push", push_event(github.origin, "main", first), secret="not-the-secret")
    assert forged.status_code == 401 and "does not match" in forged.json()["error"]
    assert hook.send("ping", {"zen": "hi"}).status_code == 200
    huge = httpx.post(f"{hook.api}/v1/webhooks/github/hooked", content=b"x" * (2**20 + 1), headers={"x-github-event": "push"})
    assert huge.status_code == 413, huge.text

    # Another repository than the registered one (a fork's pull request too): refused.
    elsewhere = hook.send("push", push_event(github.origin, "main", first, clone_url="https://example.com/evil/repo.git"))
    assert elsewhere.status_code == 403 and "builds " in elsewhere.json()["error"], elsewhere.text
    fork = hook.send(
        "pull_request",
        pull_request_event(github.origin, 3, "opened", "main", first, head_url="https://example.com/fork/repo.git"),
    )
    assert fork.status_code == 403 and "forks are not built" in fork.json()["error"], fork.text
    assert hook.send("issues", {"action": "opened"}).status_code == 202
    assert json.loads(platform.cli("builds", "hooked", "--json").stdout) == []

    # A signed push to main: answered at once, built in the background, deployed,
    # and the app's repository mirrors it.
    accepted = hook.send("push", push_event(github.origin, "main", first))
    assert accepted.status_code == 202, accepted.text
    build = hook.finished(accepted.json()["build"])
    assert build["state"] == "deployed", build["log"]
    assert "1 passed" in build["log"]
    assert platform.get("hooked").text == "w1|hooked-1"
    mirror = platform.home / "git" / "hooked.git"
    assert git(tmp_path, "--git-dir", str(mirror), "rev-parse", "refs/heads/main") == first

    # A pull request opened from a branch of the repository: a preview at pr-<number>.
    feature = github.commit("w2", branch="feature")
    opened = hook.send("pull_request", pull_request_event(github.origin, 7, "opened", "feature", feature))
    assert opened.status_code == 202, opened.text
    build = hook.finished(opened.json()["build"])
    assert build["state"] == "deployed", build["log"]
    assert "http://pr-7.hooked.localhost:" in build["log"]
    assert platform.get("pr-7.hooked").text == "w2|hooked-2"
    assert platform.get(f"{feature[:7]}.hooked").text == "w2|hooked-2"
    assert platform.get("hooked").text == "w1|hooked-1"

    # A replayed (stale) event builds nothing: the branch has moved on.
    newer = github.commit("w3", branch="feature")
    stale = hook.send("pull_request", pull_request_event(github.origin, 7, "synchronize", "feature", feature))
    build = hook.finished(stale.json()["build"])
    assert build["state"] == "failed" and f"at {newer[:7]} now" in build["log"], build["log"]
    assert platform.get("pr-7.hooked").text == "w2|hooked-2"

    # Closed: the preview is torn down.
    closed = hook.send("pull_request", pull_request_event(github.origin, 7, "closed", "feature", newer))
    assert closed.status_code == 202, closed.text
    deadline = time.monotonic() + 60
    pause = threading.Event()
    while platform.get("pr-7.hooked").status_code != 404:
        assert time.monotonic() < deadline, "the preview of pr-7 still answers"
        pause.wait(0.1)
    assert platform.get("hooked").text == "w1|hooked-1"
