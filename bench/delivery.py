"""Delivery: push to URL, deploy with a cached environment, and rollback latency.

Run:  python bench/delivery.py [--rounds 3]

One real platform (``clearway up`` in a temporary home, the real gateway), the
real ``git`` client and the real CLI. Three measurements, each beside its
baseline in the same run:

1. **Push to URL** (goal: at most 2 s). A small app whose dependencies are
   cached is pushed to a preview branch. ``git push`` returns only once the
   preview serves (the platform waits for it), so two figures: the whole
   push (build, test gate, start, route) and the time from the push
   returning to the preview's first 200 (what the goal is about). Beside
   them: the first, uncached push of a new app with a dependency (uv resolves
   and installs it; a local wheel, so no network), and ``clearway deploy`` of
   the same small app with its environment cached — the deploy path as it
   was before git and previews, run in the same round.
2. **Rollback** (goal: at most 1 s). A canary that answers 500 goes out
   (``deploy --canary``, two steps, ten requests to judge); a client sends
   requests back to back. The clock starts at the analysis that failed (the
   rollout's timeline records it, same machine clock) and stops at the start
   of the first request of the run of answers that are all the stable's; the
   reconciler's one-second period is printed beside it as the baseline — the
   rollback happens in the pass that judges, not on a later tick.

Nothing is asserted; the machine is shared and noisy: the medians, and their
ratio to the goals, are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.wheels import make_wheel  # noqa: E402

APP = """import clearway as cw

app = cw.App({name!r}, canary={{"steps": [50, 100], "min_duration": 0, "min_requests": 10}})
MODE = {mode!r}
{imports}

@app.service(replicas=1, public=True, health="/healthz")
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        status = 500 if MODE == "fail" and scope["path"] != "/healthz" else 200
        await send({{"type": "http.response.start", "status": status, "headers": []}})
        await send({{"type": "http.response.body", "body": {text!r}.encode()}})
    return asgi
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Platform:
    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home = home
        self.port = port
        self.env = env

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "clearway.cli.main", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
        )
        if result.returncode != 0:
            raise SystemExit(f"clearway {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def api(self) -> httpx.Client:
        info = json.loads((self.home / "control.json").read_text())
        token = (self.home / "token").read_text().strip()
        return httpx.Client(base_url=info["api_url"], headers={"authorization": f"Bearer {token}"}, timeout=30)

    def git_url(self, app: str) -> str:
        token = (self.home / "token").read_text().strip()
        url = self.cli("git-url", app).stdout.strip().splitlines()[-1]
        return url.replace("http://", f"http://x:{token}@")


def write(root: Path, name: str, text: str, *, mode: str = "ok", requirement: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    imports = f"import {requirement}" if requirement else ""
    (root / "app.py").write_text(APP.format(name=name, text=text, mode=mode, imports=imports))
    if requirement:
        (root / "requirements.txt").write_text(f"{requirement}\n")
    return root


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=600,
        env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
             "GIT_COMMITTER_EMAIL": "b@x"},
    )


def first_ok(port: int, host: str, within: float = 60) -> float:
    """Seconds until ``host`` answers 200 (polling back to back)."""
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        while time.monotonic() - started < within:
            try:
                if client.get(f"http://127.0.0.1:{port}/", headers={"host": host}).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
    return float("nan")


def push_to_url(platform: Platform, work: Path, app: str, rounds: int) -> tuple[list[float], list[float]]:
    write(work, app, "v0")
    git(work, "init", "-q", "-b", "main")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "v0")
    git(work, "remote", "add", "clearway", platform.git_url(app))
    git(work, "push", "-q", "clearway", "main")  # production exists; its environment is cached
    pushes, to_url = [], []
    for n in range(rounds):
        write(work, app, f"preview {n}")
        git(work, "commit", "-qam", f"preview {n}")
        started = time.monotonic()
        git(work, "push", "-q", "clearway", f"HEAD:refs/heads/feature-{n}")
        pushes.append(time.monotonic() - started)
        to_url.append(first_ok(platform.port, f"feature-{n}.{app}.localhost"))
        git(work, "push", "-q", "clearway", f":refs/heads/feature-{n}")  # tear the preview down
    return pushes, to_url


def uncached_push(platform: Platform, work: Path, app: str, wheels: Path) -> float:
    make_wheel(wheels, f"benchdep{app.replace('-', '')}", "1.0")
    write(work, app, "dep", requirement=f"benchdep{app.replace('-', '')}")
    git(work, "init", "-q", "-b", "main")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "v0")
    git(work, "remote", "add", "clearway", platform.git_url(app))
    started = time.monotonic()
    git(work, "push", "-q", "clearway", "main")
    return time.monotonic() - started


def deploys(platform: Platform, work: Path, app: str, rounds: int) -> list[float]:
    times = []
    for n in range(rounds):
        write(work, app, f"deploy {n}")
        started = time.monotonic()
        platform.cli("deploy", str(work))
        times.append(time.monotonic() - started)
    return times


def rollback(platform: Platform, work: Path, app: str, n: int) -> float:
    platform.cli("deploy", str(write(work / f"stable-{n}", app, "stable")))
    platform.cli("deploy", "--canary", str(write(work / f"canary-{n}", app, "canary", mode="fail")))
    answers: list[tuple[float, str]] = []
    with httpx.Client(timeout=10) as client, platform.api() as api:
        deadline = time.monotonic() + 120
        ended: dict[str, Any] | None = None
        tail_from = 0
        while time.monotonic() < deadline:
            sent = time.time()
            response = client.get(f"http://127.0.0.1:{platform.port}/", headers={"host": f"{app}.localhost"})
            answers.append((sent, response.text))
            if ended is None and len(answers) % 5 == 0:
                newest = api.get(f"/v1/apps/{app}/rollout").json()["history"][0]
                if newest["state"] == "rolled back":
                    ended = newest
                    tail_from = len(answers)
            if ended is not None and len(answers) >= tail_from + 50:
                break
    if ended is None:
        return float("nan")
    failed_at = next(e["at"] for e in reversed(ended["timeline"]) if e["event"] == "rolled back")
    last_canary = max((i for i, (_, text) in enumerate(answers) if text != "stable"), default=-1)
    cleared_at = answers[last_canary + 1][0] if last_canary + 1 < len(answers) else float("nan")
    return max(0.0, cleared_at - failed_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clearway-bench-") as tmp:
        root = Path(tmp)
        wheels = root / "wheels"
        wheels.mkdir()
        env = {**os.environ, "UV_FIND_LINKS": str(wheels), "COLUMNS": "200"}
        platform = Platform(root / "home", free_port(), env)
        platform.cli("up", "--detach", "--port", str(platform.port))
        try:
            pushes, to_url = push_to_url(platform, root / "push", "pushed", args.rounds)
            uncached = uncached_push(platform, root / "uncached", "fresh", wheels)
            deployed = deploys(platform, root / "deploy", "deployed", args.rounds)
            rollbacks = [rollback(platform, root / "rollback", "canary", n) for n in range(args.rounds)]
        finally:
            try:
                platform.cli("down")
            except SystemExit:
                info = root / "home" / "control.json"
                if info.exists():
                    os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGTERM)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"push to URL (preview, cached deps), {args.rounds} rounds:")
    print(f"  git push (build + tests + start + route)   median {med(pushes):6.2f} s  (min {min(pushes):.2f})")
    print(f"  push returned -> preview answers           median {med(to_url) * 1000:6.1f} ms  "
          f"goal 2 s: {med(to_url) / 2.0:.3f}x of the goal")
    print(f"  whole push against the goal                {med(pushes) / 2.0:6.2f}x of 2 s")
    print(f"  first push, uncached dependency (uv)       {uncached:6.2f} s  ({uncached / med(pushes):.1f}x a cached push)")
    print(f"  clearway deploy, cached environment        median {med(deployed):6.2f} s  "
          f"(push / deploy = {med(pushes) / med(deployed):.2f}x)")
    print(f"rollback, failing analysis -> all traffic on stable, {args.rounds} rounds:")
    print(f"  median {med(rollbacks) * 1000:6.1f} ms  (max {max(rollbacks) * 1000:.1f})  "
          f"goal 1 s: {med(rollbacks):.3f}x; reconciler period 1 s: {med(rollbacks) / 1.0:.3f}x")


if __name__ == "__main__":
    main()
