"""Coordination: lock latency and throughput, and singleton failover, on both backends.

Run:  python bench/coordination.py [--locks 300] [--kills 20]

For each backend (the control plane's embedded one, and a real etcd server
started for the run) one real platform runs an app whose replicas use the
SDK, exactly as an app does:

1. **Lock acquire + release**, uncontended, measured inside a replica (a
   function times ``with cw.Lock(...)`` — lease grant, acquire, and the
   revoke that releases the lock with the lease — ``--locks`` times): p50, p99 and holdings per second. Beside it,
   in the same run, a raw etcd put + get round trip with the same client
   library the etcd backend uses (aetcd) — the floor any etcd-based lock
   pays at least once.
2. **Failover**: the leader of a ``@app.singleton(lease_ttl=3)`` is killed
   with SIGKILL ``--kills`` times; the time from the kill until another
   replica holds the leadership (read through the API every 10 ms, so up to
   10 ms late). Goal: p99 at most TTL + 0.5 s = 3.5 s.
3. **Graceful hand-over**: the leader gets SIGTERM (it resigns); the time
   until the standby holds the leadership. Goal: at most 100 ms.

Nothing is asserted; the machine is shared and noisy (2 cores): read the
medians and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.coordination.etcd_server import EtcdServer
from tests.e2e.platform import Platform, free_port

TTL = 3.0

APP = """import os, time
import clearway as cw

app = cw.App("coordbench")


@app.function(timeout=600)
def locks(n: int) -> list:
    took = []
    for i in range(n):
        started = time.perf_counter()
        with cw.Lock("bench", ttl=10):
            pass
        took.append(time.perf_counter() - started)
    return took


@app.singleton(lease_ttl={ttl})
async def boss(leadership: cw.Leadership) -> None:
    await leadership.lost.wait()
""".replace("{ttl}", repr(TTL))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def leader(platform: Platform, client: Any) -> tuple[str, int] | None:
    found = client.get("/v1/apps/coordbench/locks").json()
    lock = next((entry for entry in found if entry["lock"] == "singleton/boss"), None)
    return (lock["replica"], lock["token"]) if lock else None


def pid_of(platform: Platform, replica: str) -> int:
    status = platform.status("coordbench")
    return int(next(r["pid"] for r in status["replicas"] if r["id"] == replica and r["pid"]))


def takeovers(platform: Platform, kills: int, sig: signal.Signals) -> list[float]:
    """Seconds from ``sig`` to the leader until another replica leads, ``kills`` times."""
    took = []
    with platform.api() as client:
        for _ in range(kills):
            current = None
            deadline = time.monotonic() + 60
            while current is None and time.monotonic() < deadline:
                current = leader(platform, client)
                # Both replicas up: the standby is queued, so the hand-over is what is measured.
                ready = [r for r in platform.status("coordbench")["replicas"] if r["component"] == "boss" and r["state"] == "ready"]
                if len(ready) < 2:
                    current = None
                    time.sleep(0.1)
            if current is None:
                raise SystemExit("no leader with a ready standby within 60 s")
            pid = pid_of(platform, current[0])
            started = time.perf_counter()
            os.killpg(pid, sig)
            while True:
                now = leader(platform, client)
                if now is not None and now[0] != current[0]:
                    took.append(time.perf_counter() - started)
                    break
                if time.perf_counter() - started > 60:
                    raise SystemExit("no takeover within 60 s")
                time.sleep(0.01)
    return took


async def raw_etcd(endpoint: str, rounds: int) -> list[float]:
    import aetcd

    host, port = endpoint.rsplit(":", 1)
    took = []
    async with aetcd.Client(host=host, port=int(port)) as client:
        for i in range(rounds):
            started = time.perf_counter()
            await client.put(b"/bench/key", str(i).encode())
            await client.get(b"/bench/key")
            took.append(time.perf_counter() - started)
    return took


def run(backend: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    etcd = EtcdServer(root / "etcd") if backend == "etcd" else None
    platform = Platform(home=root / "home", port=free_port())
    project = root / "coordbench"
    project.mkdir()
    (project / "app.py").write_text(APP)
    try:
        coordination = "embedded"
        if etcd is not None:
            etcd.start()
            coordination = f"etcd://{etcd.endpoint}"
        platform.cli("up", "--detach", "--port", str(platform.port), "--coordination", coordination)
        platform.cli("deploy", str(project))
        answer = json.loads(platform.cli("invoke", "coordbench", "locks", "--json", "--data", json.dumps({"n": args.locks}), timeout=600).stdout)
        lock_times = [float(t) for t in answer["body"]]
        raw = asyncio.run(raw_etcd(etcd.endpoint, args.locks)) if etcd is not None else None
        failover = takeovers(platform, args.kills, signal.SIGKILL)
        handover = takeovers(platform, max(5, args.kills // 2), signal.SIGTERM)
        return {"locks": lock_times, "raw": raw, "failover": failover, "handover": handover}
    finally:
        platform.down()
        if etcd is not None:
            etcd.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--locks", type=int, default=300)
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args()
    results = {}
    for backend in ("embedded", "etcd"):
        with tempfile.TemporaryDirectory(prefix=f"clearway-bench-{backend}-") as tmp:
            results[backend] = run(backend, Path(tmp), args)
    raw = results["etcd"]["raw"]
    print(f"lock acquire + release through the SDK from a replica (grant, acquire, revoke), {args.locks} rounds:")
    for backend, result in results.items():
        times = result["locks"]
        print(f"  {backend:<9} p50 {pct(times, 0.5) * 1000:6.2f} ms  p99 {pct(times, 0.99) * 1000:6.2f} ms  "
              f"{len(times) / sum(times):7.0f} holdings/s  ({statistics.median(times) / statistics.median(raw):.1f}x a raw etcd put+get)")
    print(f"  raw etcd put + get (aetcd, same run)  p50 {pct(raw, 0.5) * 1000:6.2f} ms  p99 {pct(raw, 0.99) * 1000:6.2f} ms")
    print(f"singleton failover after SIGKILL of the leader (lease_ttl {TTL:g} s; goal p99 <= {TTL + 0.5:g} s), {args.kills} kills:")
    for backend, result in results.items():
        took = result["failover"]
        print(f"  {backend:<9} p50 {pct(took, 0.5):5.2f} s  p99 {pct(took, 0.99):5.2f} s  max {max(took):5.2f} s")
    print("graceful hand-over after SIGTERM of the leader (goal <= 100 ms):")
    for backend, result in results.items():
        took = result["handover"]
        print(f"  {backend:<9} p50 {pct(took, 0.5) * 1000:6.0f} ms  p99 {pct(took, 0.99) * 1000:6.0f} ms  ({len(took)} hand-overs)")


if __name__ == "__main__":
    main()
