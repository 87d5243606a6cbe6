"""The platform as a git remote, end to end: the real git client pushes to the
real control plane, which builds, tests (the test gate) and deploys: production
as a canary, every other branch as a preview. One platform serves the module;
each test has an app of its own."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from clearway.control import git, git_hook
from tests.e2e.platform import Platform, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: A service answering "<VERSION>|<revision>"; tests check `answer()`.
APP = """import clearway as cw

app = cw.App({name!r})
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

    def __init__(self, root: Path, platform: Platform, *, token: str | None, app: str = "gitapp") -> None:
        self.root = root
        self.app = app
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
        url = platform.cli("git-url", app).stdout.strip()
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
        source = APP.format(name=self.app, version=version, answer=answer)
        (self.root / "app.py").write_text(app if app is not None else source)
        (self.root / "tests").mkdir(exist_ok=True)
        (self.root / "tests" / "test_app.py").write_text(TESTS)
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", version)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def push(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.git("push", "clearway", *args, check=False)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    running = Platform(home=tmp_path_factory.mktemp("git") / "home", port=free_port())
    running.up()
    try:
        yield running
    finally:
        running.down()


def wait_until(condition: Callable[[], bool], *, within: float = 60, what: str = "the condition") -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {within:.0f}s")
        pause.wait(0.1)


def remote_sha(platform: Platform, ref: str = "refs/heads/main", app: str = "gitapp") -> str | None:
    result = subprocess.run(
        ["git", "--git-dir", str(platform.home / "git" / f"{app}.git"), "rev-parse", "--verify", "--quiet", ref],
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

    # A force push (history rewritten past the rejected commits) goes out as a
    # canary beside v1: the push is accepted once the rollout starts, with its plan.
    repo.git("reset", "-q", "--hard", first)
    fixed = repo.commit("v4")
    forced = repo.push("--force", "main")
    assert forced.returncode == 0, forced.stderr
    assert "goes out as a canary" in forced.stderr
    assert "canary rollout: 5% → 25% → 50% → 100%" in forced.stderr
    assert "promotes in 1m30s at the earliest" in forced.stderr
    assert "`clearway rollout status gitapp`" in forced.stderr
    assert f"remote:   http://{fixed[:7]}.gitapp.localhost:" in forced.stderr
    assert remote_sha(platform) == fixed
    canary = platform.get(f"{fixed[:7]}.gitapp").text
    assert canary.startswith("v4|"), canary
    assert platform.get("gitapp").text in ("v1|gitapp-1", canary)

    # A tag: stored, not built.
    repo.git("tag", "v4")
    tagged = repo.push("v4")
    assert tagged.returncode == 0, tagged.stderr
    assert "only branches (refs/heads/*) are built" in tagged.stderr
    assert remote_sha(platform, "refs/tags/v4") == fixed

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


def test_previews(platform: Platform, tmp_path: Path) -> None:
    token = (platform.home / "token").read_text().strip()
    repo = Repo(tmp_path / "work", platform, token=token, app="preview")
    repo.commit("p1")
    assert repo.push("main").returncode == 0
    assert platform.get("preview").text == "p1|preview-1"

    # A branch is built, tested and served as a preview at its branch and commit
    # hosts; production is not touched.
    repo.git("checkout", "-q", "-b", "feature-x")
    first = repo.commit("p2")
    pushed = repo.push("feature-x")
    assert pushed.returncode == 0, pushed.stderr
    assert "1 passed" in pushed.stderr
    assert "✓ preview-2 is serving preview feature-x" in pushed.stderr
    assert "remote:   http://feature-x.preview.localhost:" in pushed.stderr
    assert f"remote:   http://{first[:7]}.preview.localhost:" in pushed.stderr
    assert platform.get("feature-x.preview").text == "p2|preview-2"
    assert platform.get(f"{first[:7]}.preview").text == "p2|preview-2"
    assert platform.get("preview").text == "p1|preview-1"

    # Pushed again: the preview serves the new commit.
    second = repo.commit("p3")
    again = repo.push("feature-x")
    assert again.returncode == 0, again.stderr
    assert platform.get("feature-x.preview").text == "p3|preview-3"
    assert platform.get(f"{second[:7]}.preview").text == "p3|preview-3"
    assert platform.get("preview").text == "p1|preview-1"

    # Failing tests reject a preview like production: the preview stays as it was.
    repo.commit("p4", answer=41)
    failing = repo.push("feature-x")
    assert failing.returncode != 0
    assert "tests failed" in failing.stderr
    assert remote_sha(platform, "refs/heads/feature-x", app="preview") == second
    assert platform.get("feature-x.preview").text == "p3|preview-3"

    # Deleting the branch tears the preview down.
    deleted = repo.push(":feature-x")
    assert deleted.returncode == 0, deleted.stderr
    assert "its preview (preview-3) is torn down" in deleted.stderr
    assert remote_sha(platform, "refs/heads/feature-x", app="preview") is None
    wait_until(lambda: platform.get("feature-x.preview").status_code == 404, what="the preview host answering 404")
    assert platform.get("preview").text == "p1|preview-1"


def test_an_app_may_choose_its_production_branch(platform: Platform, tmp_path: Path) -> None:
    token = (platform.home / "token").read_text().strip()
    assert platform.cli("production-branch", "rel").stdout.strip() == "main"
    bad = platform.cli("production-branch", "rel", "no..dots", check=False)
    assert bad.returncode == 1 and "not a valid git branch name" in bad.stderr, bad
    # Chosen before the first push, like configuration.
    chosen = platform.cli("production-branch", "rel", "release")
    assert "pushes to release now go to rel's production (main pushes make previews)" in chosen.stdout, chosen
    assert platform.cli("production-branch", "rel").stdout.strip() == "release"

    repo = Repo(tmp_path / "work", platform, token=token, app="rel")
    repo.commit("r1")
    on_main = repo.push("main")
    assert on_main.returncode == 0, on_main.stderr
    assert "✓ rel-1 is serving preview main" in on_main.stderr, on_main.stderr
    assert platform.get("main.rel").text == "r1|rel-1"
    assert platform.get("rel").status_code == 404  # no production yet

    repo.git("checkout", "-q", "-b", "release")
    released = repo.push("release")
    assert released.returncode == 0, released.stderr
    assert platform.get("rel").text == "r1|rel-2"
    deleting = repo.push(":release")
    assert deleting.returncode != 0 and "refusing to delete release" in deleting.stderr
    # A clone checks out the production branch.
    head = subprocess.run(
        ["git", "--git-dir", str(platform.home / "git" / "rel.git"), "symbolic-ref", "HEAD"],
        capture_output=True, text=True, timeout=30,
    )
    assert head.stdout.strip() == "refs/heads/release", head
    assert "pushes to release go to production; other branches make previews" in platform.cli("status", "rel").stdout

    # Back to main: main's preview is torn down (main could never be deleted to end it);
    # production keeps serving until the next push of main, which goes out as a canary.
    back = platform.cli("production-branch", "rel", "main")
    assert "the preview of main (rel-1) is torn down" in back.stdout, back
    wait_until(lambda: platform.get("main.rel").status_code == 404, what="main's preview host answering 404")
    assert platform.get("rel").text == "r1|rel-2"
    repo.git("checkout", "-q", "main")
    repo.commit("r2")
    again = repo.push("main")
    assert again.returncode == 0, again.stderr
    assert "goes out as a canary" in again.stderr, again.stderr
    audit = platform.cli("audit", "--app", "rel", "--json").stdout
    assert "release -> main; ended preview rel-1" in audit and "main -> release" in audit


def test_hook_sends_what_the_control_plane_reads() -> None:
    """The hook (standard library only) keeps its own copy of the rule: they agree."""
    zero, sha = git.ZERO_SHA, "a" * 40
    for ref in ("refs/heads/main", "refs/heads/feature/x", "refs/heads/", "refs/tags/v1", "refs/notes/x", "HEAD"):
        for new in (zero, sha):
            assert git_hook.carries_archive(ref, new) == git.carries_archive(ref, new), (ref, new)
