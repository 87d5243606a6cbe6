"""Functions: cold start from zero, throughput per process, 10,000 durable invocations.

Run:  python bench/functions.py [--rounds 10] [--invocations 10000] [--duration 5]

One real platform (``clearway up`` in a temporary home), the real gateway, the
real CLI and API. Three measurements, each beside its baseline:

1. **Cold start** (goal: p50 <= 10 ms, p99 <= 50 ms). A function whose module
   imports pydantic and uvicorn (what every function environment has; heavy
   enough to matter) is put to sleep (``clearway scale APP FUNCTION 0``, then
   its replica is gone), and one request is timed from the client: the
   gateway holds it, the autoscaler sees it, a replica is forked from the
   revision's warm parent and answers. Beside it, in the same rounds: a fresh
   ``python -c "import pydantic, uvicorn"`` with the same interpreter — what
   any platform that starts a new interpreter per cold start pays at least.
   Then the mean of each link of the chain, from the platform's own metrics
   (``GET /v1/metrics``): the wait at the gateway, the fork, the replica's
   initialisation until its probe passed, its first response.
2. **Throughput** (goal: >= 3x nuclio's published Python figure, about 1,570
   requests/s per worker process). ``wrk`` drives a trivial function pinned to
   one replica (min = max = 1) through the gateway for ``--duration`` seconds;
   requests/s of that one function process.
3. **10,000 spawned invocations** (goal: none lost). They are spawned through
   the API, the control plane is killed with ``kill -9`` while they drain and
   started again; the time to drain them all, and how many did not succeed.

Nothing is asserted; the machine is shared and noisy (2 cores): read the
medians and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
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

NUCLIO_PER_PROCESS = 56_509 / 36  # requests/s per Python worker process, nuclio's published figure

APP = """import clearway as cw
import pydantic, uvicorn  # noqa: F401  (a heavy import, as a real function has)

app = cw.App("bench")


@app.function(http="/cold", idle_timeout=600)
def cold() -> str:
    return "warm now"


@app.function(http="/fast", min_replicas=1, max_replicas=1, max_concurrency=1000)
async def fast() -> str:
    return "ok"


@app.function(max_replicas=4, max_concurrency=64, retries=5)
async def work(n: int) -> int:
    return n * 2
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Platform:
    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "clearway.cli.main", "--home", str(self.home), *args],
            capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
        )
        if check and result.returncode != 0:
            raise SystemExit(f"clearway {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def api(self) -> httpx.Client:
        info = json.loads((self.home / "control.json").read_text())
        token = (self.home / "token").read_text().strip()
        return httpx.Client(base_url=info["api_url"], headers={"authorization": f"Bearer {token}"}, timeout=60)

    def replicas(self, function: str) -> int:
        with self.api() as api:
            app = api.get("/v1/apps/bench").json()
        return sum(1 for r in app["replicas"] if r["component"] == function)


def wait(what: str, condition: Any, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def link_totals(platform: Platform) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds and counts so far of each link of the cold function's starts (its metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with platform.api() as api:
        text = api.get("/v1/metrics").text
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("component") != "cold":
                continue
            link = {
                "clearway_gateway_hold_seconds": "held at the gateway",
                "clearway_gateway_held_first_response_seconds": "first response",
            }.get(family.name) or (
                f"{labels.get('how')} {labels.get('phase')}" if family.name == "clearway_replica_start_seconds" else None
            )
            if link is None:
                continue
            if sample.name.endswith("_sum"):
                sums[link] = sums.get(link, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                counts[link] = counts.get(link, 0.0) + sample.value
    return sums, counts


def breakdown(before: tuple[dict[str, float], dict[str, float]], after: tuple[dict[str, float], dict[str, float]]) -> dict[str, float]:
    """Mean seconds of each link between two readings."""
    means = {}
    for link, total in after[0].items():
        count = after[1].get(link, 0.0) - before[1].get(link, 0.0)
        if count:
            means[link] = (total - before[0].get(link, 0.0)) / count
    return means


def cold_starts(platform: Platform, rounds: int) -> tuple[list[float], list[float]]:
    cold, fresh = [], []
    url = f"http://127.0.0.1:{platform.port}/cold"
    for _ in range(rounds):
        platform.cli("scale", "bench", "cold", "0")
        wait("the replica to stop", lambda: platform.replicas("cold") == 0)
        with httpx.Client(timeout=60) as client:
            started = time.perf_counter()
            response = client.get(url, headers={"host": "bench.localhost"})
            cold.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import pydantic, uvicorn"], check=True)
        fresh.append(time.perf_counter() - started)
    return cold, fresh


def throughput(platform: Platform, duration: float) -> float:
    wrk = shutil.which("wrk")
    if wrk is None:
        return float("nan")
    out = subprocess.run(
        [wrk, "-t1", "-c32", f"-d{duration:g}s", "-H", "host: bench.localhost", f"http://127.0.0.1:{platform.port}/fast"],
        capture_output=True, text=True, check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else float("nan")


async def _spawn_all(base: str, token: str, count: int) -> list[str]:
    ids: list[str] = []
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {token}"}, limits=limits, timeout=60) as api:
        sem = asyncio.Semaphore(16)

        async def one(n: int) -> None:
            async with sem:
                r = await api.post("/v1/apps/bench/functions/work/spawn", json={"kwargs": {"n": n}, "idempotency_key": f"b-{n}"})
                r.raise_for_status()
                ids.append(r.json()["id"])

        await asyncio.gather(*(one(n) for n in range(count)))
    return ids


def invocations(platform: Platform, count: int) -> tuple[float, float, int, int]:
    info = json.loads((platform.home / "control.json").read_text())
    token = (platform.home / "token").read_text().strip()
    started = time.monotonic()
    asyncio.run(_spawn_all(info["api_url"], token, count))
    spawned = time.monotonic() - started

    def counts() -> dict[str, int]:
        with platform.api() as api:
            view = api.get("/v1/apps/bench/functions").json()
        [work] = [f for f in view["functions"] if f["name"] == "work"]
        return dict(work["invocations"])

    # Kill the control plane while they drain, then start it again.
    wait("some invocations to finish", lambda: counts().get("succeeded", 0) >= count // 4, within=600)
    os.kill(int(info["pid"]), signal.SIGKILL)
    platform.cli("up", "--detach", "--port", str(platform.port))
    wait("every invocation to finish", lambda: sum(v for k, v in counts().items() if k in ("succeeded", "dead")) >= count, within=1200)
    drained = time.monotonic() - started
    final = counts()
    return spawned, drained, final.get("succeeded", 0), count - final.get("succeeded", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--invocations", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clearway-bench-") as tmp:
        root = Path(tmp)
        project = root / "bench"
        project.mkdir()
        (project / "app.py").write_text(APP)
        platform = Platform(root / "home", free_port())
        platform.cli("up", "--detach", "--port", str(platform.port))
        try:
            platform.cli("deploy", str(project))
            before = link_totals(platform)
            cold, fresh = cold_starts(platform, args.rounds)
            links = breakdown(before, link_totals(platform))
            rps = throughput(platform, args.duration)
            spawned, drained, succeeded, lost = invocations(platform, args.invocations)
        finally:
            platform.cli("down", check=False)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    print(f"cold start from zero, {args.rounds} rounds (request at the gateway -> response):")
    print(f"  clearway (forked replica)    p50 {pct(cold, 0.5) * 1000:7.1f} ms  p99 {pct(cold, 0.99) * 1000:7.1f} ms  "
          f"goal p50 10 ms: {pct(cold, 0.5) / 0.010:.1f}x")
    print(f"  fresh `python -c import`     p50 {pct(fresh, 0.5) * 1000:7.1f} ms  (cold / fresh = "
          f"{statistics.median(cold) / statistics.median(fresh):.2f}x)")
    print("  mean of each link over these rounds (from the platform's metrics):")
    for link, seconds in links.items():
        print(f"    {link:<22} {seconds * 1000:7.1f} ms")
    print(f"throughput, trivial async function, one replica process, wrk -c32 {args.duration:g}s:")
    print(f"  {rps:,.0f} requests/s  = {rps / NUCLIO_PER_PROCESS:.2f}x nuclio's {NUCLIO_PER_PROCESS:,.0f} per process (goal 3x)")
    print(f"{args.invocations:,} spawned invocations, control plane killed with -9 while draining:")
    print(f"  spawned in {spawned:.1f} s ({args.invocations / spawned:,.0f}/s); all finished after {drained:.1f} s; "
          f"succeeded {succeeded:,}; lost or failed {lost:,} (goal 0)")


if __name__ == "__main__":
    main()
