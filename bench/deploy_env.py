"""What a per-app environment costs ``clearway deploy``: cached dependencies vs none.

Run:  python bench/deploy_env.py [--rounds 5] [--offline]

Starts a real platform (``clearway up --detach``) in a temporary home and times
``clearway deploy`` end to end (upload, environment, spec, replicas ready,
traffic switched), alternating within every round:

  (a) **no dependencies**: an app with no requirements file; its environment
      holds only the replica runtime's packages (cached after the first deploy);
  (b) **cached dependencies**: an app whose ``requirements.txt`` names
      starlette, redeployed with a code change: the input digest finds its
      environment, so no resolver runs and nothing is downloaded.

The first deploy of (b), which resolves and builds its environment from uv's
cache, is printed separately. Each deploy changes the app's code (a fresh
revision every time). ``--offline`` sets ``UV_OFFLINE=1`` (resolve from uv's
cache only). Medians and minimums are printed, and the ratio (b)/(a); nothing
is asserted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = """import clearway as cw
app = cw.App({name!r})

@app.service(replicas=1, public=True, health="/healthz")
def web():
    {imports}
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": b"round {round}"}})
    return asgi
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clearway.cli.main", "--home", str(home), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )


def write(root: Path, name: str, round_: int, requirements: str | None) -> Path:
    project = root / name
    project.mkdir(parents=True, exist_ok=True)
    imports = "import starlette" if requirements else "pass"
    (project / "app.py").write_text(APP.format(name=name, imports=imports, round=round_))
    if requirements:
        (project / "requirements.txt").write_text(requirements)
    return project


def timed_deploy(home: Path, project: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = cli(home, "deploy", str(project))
    took = time.perf_counter() - started
    environment = next((line.strip() for line in result.stderr.splitlines() if "environment" in line), "")
    return took, environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--offline", action="store_true", help="UV_OFFLINE=1: resolve from uv's cache only")
    args = parser.parse_args()
    if args.offline:
        os.environ["UV_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory(prefix="clearway-bench-") as tmp:
        root = Path(tmp)
        home = root / "home"
        cli(home, "up", "--detach", "--port", str(free_port()))
        try:
            # Warm-up: the runtime-only environment, then the first (uncached) build of (b).
            timed_deploy(home, write(root, "plain", 0, None))
            first, first_log = timed_deploy(home, write(root, "deps", 0, "starlette>=0.37\n"))
            plain: list[float] = []
            cached: list[float] = []
            logs: set[str] = set()
            for round_ in range(1, args.rounds + 1):
                order = [("plain", None, plain), ("deps", "starlette>=0.37\n", cached)]
                if round_ % 2:
                    order.reverse()
                for name, requirements, samples in order:
                    took, log = timed_deploy(home, write(root, name, round_, requirements))
                    samples.append(took)
                    if requirements:
                        logs.add(log.split(" reused")[0].split(" built")[0] + (" reused" if "reused" in log else ""))
        finally:
            subprocess.run(
                [sys.executable, "-m", "clearway.cli.main", "--home", str(home), "down"],
                capture_output=True,
                timeout=180,
                check=False,
            )
    print(f"clearway deploy, {args.rounds} rounds, end to end (upload → serving), {os.cpu_count()} CPUs")
    print(f"  first deploy with dependencies (resolve + build): {first:6.2f} s   [{first_log}]")
    for label, samples in (("(a) no dependencies", plain), ("(b) cached dependencies", cached)):
        print(
            f"  {label:<26} median {statistics.median(samples):6.2f} s   min {min(samples):6.2f} s   "
            f"[{', '.join(f'{s:.2f}' for s in samples)}]"
        )
    print(f"  ratio (b)/(a), medians: {statistics.median(cached) / statistics.median(plain):.2f}")
    print(f"  (b)'s environment: {', '.join(sorted(logs))}")


if __name__ == "__main__":
    main()
