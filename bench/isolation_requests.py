"""What the strict views cost a replica's requests: default isolation vs sandbox=True.

Run:  python bench/isolation_requests.py [--duration 5] [--connections 32] [--repeats 3]

A real platform (``clearway up --detach``, in a temporary ``--home``, on a free
port) runs three apps, each one replica of the same Starlette hello service:

  * ``iso-default``: default isolation (every replica's: bwrap with the host's
    ``/`` read-only, its own uid when the platform runs as root);
  * ``iso-sandbox``: ``sandbox=True`` (no host ``/``, only system directories);
  * ``iso-nonet``: ``sandbox=True, network=False`` (an empty network namespace
    as well; the replica still serves on the unix socket it inherits).

wrk drives each through clearway's real gateway (``wrk -t1 -c32 -d5s -H 'Host:
<app>.localhost'``), the three alternating ``--repeats`` times (the order
rotates from round to round) after a short untimed warm-up of each, and the
medians are compared with default isolation. Next to requests/s it prints the
replica's CPU µs per request (its whole process tree: bwrap, the interpreter),
which moves much less than requests/s with whatever else runs on the machine.
Nothing is pinned: wrk, the gateway and the replica share the CPUs, identically
for the three apps. The platform is brought down at the end whatever happens.

Namespaces and bind mounts cost at set-up, not per request, so the expected
ratios are about 1.0x; this benchmark is there to show it, and to catch a
change that would make the strict views cost something per request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from clearway.backends.local.backend import default_sockets_dir

# bench/ is not a package: share the helpers of the nginx comparison.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import WRK, cpu_seconds, free_port, wrk

#: App name -> (what it shows, the service decorator's isolation arguments).
APPS = {
    "iso-default": ("default isolation", ""),
    "iso-sandbox": ("sandbox=True", "sandbox=True"),
    "iso-nonet": ("sandbox=True, network=False", "sandbox=True, network=False"),
}

APP = textwrap.dedent(
    """\
    import clearway as cw

    app = cw.App({name!r})


    @app.service(public=True, health="/"{isolation})
    def web():
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("hello")

        return Starlette(routes=[Route("/", hello)])
    """
)


def clearway(home: Path, *args: str, timeout: float = 180) -> str:
    cmd = [sys.executable, "-m", "clearway.cli.main", "--home", str(home), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"`clearway {' '.join(args)}` failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def replica_pid(home: Path, app: str) -> int:
    view = json.loads(clearway(home, "status", app, "--json"))
    pids = [r["pid"] for r in view["replicas"] if r["state"] == "ready" and r["pid"]]
    if len(pids) != 1:
        raise RuntimeError(f"expected one ready replica of {app}, got {view['replicas']}")
    return int(pids[0])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per wrk run (default 5)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each app (default 3)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="untimed seconds of wrk per app first (default 1)"
    )
    args = parser.parse_args()
    if not Path(WRK).exists() or shutil.which("bwrap") is None:
        print("wrk or bwrap is missing: run scripts/system-packages --bench", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="cw-isoreq-"))
    home = tmp / "home"
    port = free_port()
    results: dict[str, list[dict[str, float]]] = {app: [] for app in APPS}
    try:
        print(f"clearway up on port {port} (home {home})", flush=True)
        clearway(home, "up", "--detach", "--port", str(port), timeout=120)
        pids: dict[str, int] = {}
        for app, (_, isolation) in APPS.items():
            source = tmp / "apps" / app
            source.mkdir(parents=True)
            (source / "app.py").write_text(
                APP.format(name=app, isolation=f", {isolation}" if isolation else "")
            )
            clearway(home, "deploy", str(source))
            pids[app] = replica_pid(home, app)
            print(f"  deployed {app} (replica pid {pids[app]})", flush=True)
        url = f"http://127.0.0.1:{port}/"
        order = list(APPS)
        if args.warmup > 0:
            for app in order:
                wrk(url, args.warmup, args.connections, headers=(f"Host: {app}.localhost",))
        for round_ in range(args.repeats):
            shift = round_ % len(order)
            for app in order[shift:] + order[:shift]:
                before = cpu_seconds(pids[app])
                result = wrk(
                    url, args.duration, args.connections, headers=(f"Host: {app}.localhost",)
                )
                result["cpu_us"] = (
                    (cpu_seconds(pids[app]) - before) / (result["rps"] * args.duration) * 1e6
                )
                results[app].append(result)
            print(
                f"  round {round_ + 1}/{args.repeats}: "
                + "  ".join(f"{app} {results[app][-1]['rps']:,.0f}/s" for app in order),
                flush=True,
            )
    finally:
        try:
            clearway(home, "down", timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"clearway down failed: {error}", file=sys.stderr)
        with contextlib.suppress(OSError):
            default_sockets_dir(home).rmdir()  # `down` leaves it, empty
        shutil.rmtree(tmp, ignore_errors=True)

    as_root = os.geteuid() == 0
    print()
    print("Requests/s through the gateway to one replica of a Starlette hello app")
    print(
        f"  wrk -t1 -c{args.connections} -d{args.duration:g}s, {args.repeats} alternating runs each, medians;"
        f" replicas {'under their own uids' if as_root else 'under our uid (not root)'}"
    )
    print(
        f"  {os.cpu_count()} CPU(s) shared by wrk, the gateway and the replica (not pinned);"
        f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"  {'':<30} {'req/s':>8} {'p50':>8} {'p99':>8} {'replica CPU/req':>16}   vs default: req/s  CPU/req"
    )
    base = results["iso-default"]
    for app, (label, _) in APPS.items():
        runs = results[app]
        rps = statistics.median(r["rps"] for r in runs)
        cpu = statistics.median(r["cpu_us"] for r in runs)
        p50 = statistics.median(r.get("p50_ms", float("nan")) for r in runs)
        p99 = statistics.median(r.get("p99_ms", float("nan")) for r in runs)
        rps_ratio = rps / statistics.median(r["rps"] for r in base)
        cpu_ratio = cpu / statistics.median(r["cpu_us"] for r in base)
        print(
            f"  {label:<30} {rps:8,.0f} {p50:6.2f}ms {p99:6.2f}ms {cpu:13.0f} µs"
            f"          {rps_ratio:4.2f}x    {cpu_ratio:4.2f}x"
        )
        print("      [" + " ".join(f"{r['rps']:,.0f}" for r in runs) + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
