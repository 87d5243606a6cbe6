"""End to end: a hello app on clearway vs the same app behind nginx (issue 9).

Run:  python bench/endtoend.py [--duration 5] [--replicas 2] [--only starlette|flask]
                               [--server auto|uvicorn|granian] [--nginx-access-log]

Two benchmarks, each comparing, in one run, the same hello app (`bench/apps/`)
served with the same number of replica processes R:

  * **starlette**: clearway vs nginx + R uvicorn processes (uvloop, httptools),
    each on its own unix socket — goal: clearway >= 1.2x the requests/s;
  * **flask**: clearway vs nginx + gunicorn with R sync workers on one unix
    socket — goal: clearway >= 2x.

The clearway side is a real platform: ``clearway up --detach`` in a temporary
``--home`` on a free port, then ``clearway deploy`` of a generated app
(``replicas=R``, ``public=True``) whose service function returns the hello app;
wrk drives it through the platform's gateway with ``Host: <app>.localhost``.
The baseline is nginx with as many worker processes as the gateway has
(``--proxy-workers``, default: the number of cores, the gateway's default),
an upstream ``keepalive`` pool, no access log (the platform's gateway keeps
one, buffered; ``--nginx-access-log`` gives nginx a buffered one too) and the
request headers the gateway adds (``X-Request-ID``, ``X-Forwarded-*``), in front
of the same app served the way its community serves it. uvicorn runs with the
replicas' settings (uvloop, httptools, no access log).

Like `bench/gateway.py`: the variants alternate (the order flips every round),
the median of ``--repeats`` runs of ``wrk -t1 -cN`` is reported with every run
in brackets, and CPU time per request is read from ``/proc`` for each side's
process trees — the proxy (gateway / nginx), the app processes (replicas, with
their bwrap parents / uvicorn or gunicorn) and, on clearway's side, the rest of
the platform (control plane, log writers) — with wrk's own beside it.
Nothing is pinned: on a small machine wrk, the proxy and the replicas share
the CPUs, the same way for both sides, so CPU per request is the steadier
signal and requests/s depends on how the kernel places them.

``--server`` is passed to ``@app.service(server=...)`` when this clearway's
services have that field (and refused otherwise); without it the platform's
default server runs.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import inspect
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import clearway as cw
from clearway.backends.local.backend import default_sockets_dir

# bench/ is not a package: share the helpers of the gateway benchmark.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation_requests import clearway

from gateway import NGINX, WRK, cpu_seconds, free_port, median_run, nginx, wrk

APPS_DIR = Path(__file__).resolve().parent / "apps"


@dataclass(frozen=True)
class Benchmark:
    """One row of issue 9's table: a hello app, its baseline server and the goal."""

    #: The module in `bench/apps/` whose ``app`` both sides serve.
    module: str
    #: Its one requirement (the deployed app's ``requirements.txt``).
    requirement: str
    #: What serves it behind nginx.
    baseline: str
    #: clearway / baseline requests/s to reach.
    goal: float


BENCHMARKS = {
    "starlette": Benchmark("starlette_hello", "starlette>=0.37", "nginx + uvicorn", 1.2),
    "flask": Benchmark("flask_hello", "flask>=3", "nginx + gunicorn (sync)", 2.0),
}

APP = textwrap.dedent(
    """\
    import clearway as cw

    app = cw.App({name!r})


    @app.service(replicas={replicas}, public=True, health="/"{server})
    def web():
        from {module} import app as web_app

        return web_app
    """
)

#: The request headers clearway's gateway adds, set the same way by the nginx baseline.
NGINX_LOCATION = """
    location / {{
        proxy_pass http://app;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Request-ID $request_id;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_set_header X-Forwarded-Host $host;
        add_header X-Request-ID $request_id always;
        {access_log}
    }}
"""

#: A process tree's CPU seconds, by part ("proxy", "app", "platform").
CpuProbe = Callable[[], dict[str, float]]


@dataclass
class Variant:
    """One side of a benchmark: where wrk sends requests and how to read its CPU time."""

    label: str
    url: str
    host: str
    cpu: CpuProbe


def server_field_supported() -> bool:
    """Whether this clearway's ``@app.service`` takes ``server=`` (added on another branch)."""
    return "server" in inspect.signature(cw.App.service).parameters


def replica_pids(home: Path, app: str, replicas: int) -> list[int]:
    view = json.loads(clearway(home, "status", app, "--json"))
    pids = [int(r["pid"]) for r in view["replicas"] if r["state"] == "ready" and r["pid"]]
    if len(pids) != replicas:
        raise RuntimeError(f"expected {replicas} ready replicas of {app}, got {view['replicas']}")
    return pids


def wait_until_serving(port: int, host: str, timeout: float = 30.0) -> None:
    """Until ``GET /`` with ``Host: host`` on 127.0.0.1:port answers 200."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/", headers={"Host": host})
            response = connection.getresponse()
            if response.status == 200:
                return
            last = f"{response.status} {response.read()[:200]!r}"
        except OSError as error:
            last = repr(error)
        finally:
            connection.close()
        time.sleep(0.1)
    raise RuntimeError(
        f"{host} on 127.0.0.1:{port} does not answer 200 after {timeout:g} s: {last}"
    )


def wait_for_unix_socket(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path} after {timeout:g} s")


@contextlib.contextmanager
def processes(commands: list[list[str]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``commands``; terminate them (and wait) on the way out."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for command in commands:
            started.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        yield started
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def app_servers(name: str, tmp: Path, replicas: int) -> tuple[list[list[str]], list[Path]]:
    """The baseline's app server commands and the unix sockets nginx proxies to."""
    if name == "starlette":
        sockets = [tmp / f"uvicorn-{i}.sock" for i in range(replicas)]
        commands = [
            [sys.executable, "-m", "uvicorn", "starlette_hello:app", "--app-dir", str(APPS_DIR),
             "--uds", str(path), "--loop", "uvloop", "--http", "httptools", "--lifespan", "auto",
             "--no-access-log", "--log-level", "warning"]
            for path in sockets
        ]  # fmt: skip
        return commands, sockets
    # gunicorn's usual deployment: one master, R sync workers accepting on one socket.
    path = tmp / "gunicorn.sock"
    command = [
        sys.executable, "-m", "gunicorn", "--workers", str(replicas), "--worker-class", "sync",
        "--bind", f"unix:{path}", "--chdir", str(APPS_DIR), "--log-level", "warning",
        "flask_hello:app",
    ]  # fmt: skip
    return [command], [path]


@contextlib.contextmanager
def baseline(
    name: str, tmp: Path, replicas: int, access_log: bool, workers: int = 1
) -> Iterator[tuple[int, CpuProbe]]:
    """nginx in front of the app's own servers: (nginx's port, the CPU probe)."""
    base = tmp / f"baseline-{name}"
    base.mkdir()
    commands, sockets = app_servers(name, base, replicas)
    port = free_port()
    log = (
        f"access_log {base}/nginx/logs/access.log combined buffer=256k flush=1s;"
        if access_log
        else ""
    )
    upstream = (
        "upstream app { "
        + " ".join(f"server unix:{path};" for path in sockets)
        + " keepalive 256; keepalive_requests 1000000; }"
    )
    server = f"listen 127.0.0.1:{port} backlog=4096;" + NGINX_LOCATION.format(access_log=log)
    with (
        processes(commands) as servers,
        nginx(base, "nginx", server, upstream, workers=workers) as proxy,
    ):
        for path in sockets:
            wait_for_unix_socket(path)
        wait_until_serving(port, "localhost")

        def cpu() -> dict[str, float]:
            return {
                "proxy": cpu_seconds(proxy.pid),
                "app": sum(cpu_seconds(s.pid) for s in servers),
                "platform": 0.0,
            }

        yield port, cpu


@contextlib.contextmanager
def platform(tmp: Path, workers: int = 1) -> Iterator[tuple[Path, int]]:
    """A real clearway platform: (its home, the gateway's port); brought down whatever happens."""
    home = tmp / "home"
    port = free_port()
    try:
        clearway(home, "up", "--detach", "--port", str(port), "--gateway-workers", str(workers), timeout=120)
        yield home, port
    finally:
        try:
            clearway(home, "down", timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"clearway down failed: {error}", file=sys.stderr)
        with contextlib.suppress(OSError):
            default_sockets_dir(home).rmdir()  # `down` leaves it, empty


def deploy(
    home: Path, tmp: Path, name: str, replicas: int, server: str | None
) -> tuple[str, CpuProbe]:
    """Deploy the hello app of benchmark ``name``: (its host, the CPU probe)."""
    bench = BENCHMARKS[name]
    app = f"bench-{name}"
    source = tmp / "apps" / app
    source.mkdir(parents=True)
    shutil.copy(APPS_DIR / f"{bench.module}.py", source)
    (source / "requirements.txt").write_text(bench.requirement + "\n")
    (source / "app.py").write_text(
        APP.format(
            name=app,
            replicas=replicas,
            module=bench.module,
            server="" if server is None else f", server={server!r}",
        )
    )
    clearway(home, "deploy", str(source))
    replicas_ = replica_pids(home, app, replicas)
    gateway_pid = int(json.loads((home / "gateway.json").read_text())["pid"])
    control_pid = int(json.loads((home / "control.json").read_text())["pid"])

    def cpu() -> dict[str, float]:
        proxy = cpu_seconds(gateway_pid)
        app_cpu = sum(cpu_seconds(pid) for pid in replicas_)
        # The control plane's tree holds the gateway and every replica: the rest is the
        # control plane itself, the log writers (and the other benchmark's idle replicas).
        return {
            "proxy": proxy,
            "app": app_cpu,
            "platform": cpu_seconds(control_pid) - proxy - app_cpu,
        }

    return f"{app}.localhost", cpu


def wrk_cpu_seconds() -> float:
    """CPU time of our waited-for children so far: after a wrk run, wrk's is in the difference."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(variant: Variant, duration: float, connections: int) -> dict[str, float]:
    before, wrk_before = variant.cpu(), wrk_cpu_seconds()
    result = wrk(variant.url, duration, connections, headers=(f"Host: {variant.host}",))
    after, wrk_after = variant.cpu(), wrk_cpu_seconds()
    requests = result["rps"] * duration
    for part in ("proxy", "app", "platform"):
        result[f"{part}_us"] = (after[part] - before[part]) / requests * 1e6
    result["server_us"] = result["proxy_us"] + result["app_us"] + result["platform_us"]
    result["wrk_us"] = (wrk_after - wrk_before) / requests * 1e6
    return result


def run_benchmark(
    variants: list[Variant], args: argparse.Namespace
) -> dict[str, list[dict[str, float]]]:
    """Alternate the variants ``--repeats`` times (after a warm-up): every run of each."""
    for variant in variants:
        if args.warmup > 0:
            wrk(variant.url, args.warmup, args.connections, headers=(f"Host: {variant.host}",))
    runs: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
    for round_ in range(max(1, args.repeats)):
        order = variants if round_ % 2 == 0 else variants[::-1]
        for variant in order:
            runs[variant.label].append(measure(variant, args.duration, args.connections))
        print(
            f"  round {round_ + 1}/{args.repeats}: "
            + "  ".join(f"{v.label} {runs[v.label][-1]['rps']:,.0f}/s" for v in variants),
            flush=True,
        )
    return runs


def report(name: str, runs: dict[str, list[dict[str, float]]]) -> None:
    bench = BENCHMARKS[name]
    print(f"\n{name}: clearway vs {bench.baseline}")
    print(
        f"  {'':<24} {'req/s':>8} {'p50':>8} {'p99':>8}   CPU µs per request:"
        f" {'proxy':>6} {'app':>6} {'platf.':>6} {'total':>6}  ({'wrk':>8})"
    )
    medians: dict[str, dict[str, float]] = {}
    for label, results in runs.items():
        m = {
            key: statistics.median(r.get(key, float("nan")) for r in results) for key in results[0]
        }
        m["rps"] = median_run(results)["rps"]
        medians[label] = m
        print(
            f"  {label:<24} {m['rps']:8,.0f} {m.get('p50_ms', float('nan')):6.2f}ms"
            f" {m.get('p99_ms', float('nan')):6.2f}ms                      {m['proxy_us']:6.1f}"
            f" {m['app_us']:6.1f} {m['platform_us']:6.1f} {m['server_us']:6.1f}  (wrk {m['wrk_us']:4.1f})"
        )
        print("      [" + " ".join(f"{r['rps']:,.0f}" for r in results) + "]")
    ours, theirs = medians["clearway"], medians[bench.baseline]
    ratio = ours["rps"] / theirs["rps"]
    print(
        f"  clearway / {bench.baseline}: {ratio:.2f}x req/s (goal >= {bench.goal:g}x:"
        f" {'met' if ratio >= bench.goal else 'not met'}),"
        f" {ours['server_us'] / theirs['server_us']:.2f}x CPU per request"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per wrk run (default 5)"
    )
    parser.add_argument(
        "--replicas", type=int, default=2, help="replica processes per side (default 2)"
    )
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark only")
    parser.add_argument(
        "--server", help="passed as @app.service(server=...) when services have that field"
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument(
        "--proxy-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="gateway workers and nginx worker processes (default: the number of cores)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs per variant (default 3)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed whole seconds of wrk per variant first (default 1)",
    )
    parser.add_argument(
        "--nginx-access-log",
        action="store_true",
        help="give nginx a buffered access log, as the platform's gateway has",
    )
    args = parser.parse_args()
    if not Path(WRK).exists() or not Path(NGINX).exists():
        print("wrk or nginx is missing: run scripts/system-packages --bench", file=sys.stderr)
        return 1
    if args.server is not None and not server_field_supported():
        print(
            "--server: this clearway's @app.service has no server= field; run without it",
            file=sys.stderr,
        )
        return 2
    names = [args.only] if args.only else list(BENCHMARKS)
    load_before = os.getloadavg()

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="cw-endtoend-") as tmpdir:
        tmp = Path(tmpdir)
        with platform(tmp, args.proxy_workers) as (home, port):
            print(f"clearway up on port {port} (home {home})", flush=True)
            for name in names:
                bench = BENCHMARKS[name]
                host, clearway_cpu = deploy(home, tmp, name, args.replicas, args.server)
                wait_until_serving(port, host)
                print(f"deployed bench-{name} ({args.replicas} replicas)", flush=True)
                with baseline(name, tmp, args.replicas, args.nginx_access_log, args.proxy_workers) as (
                    nginx_port,
                    nginx_cpu,
                ):
                    variants = [
                        Variant("clearway", f"http://127.0.0.1:{port}/", host, clearway_cpu),
                        Variant(
                            bench.baseline,
                            f"http://127.0.0.1:{nginx_port}/",
                            "localhost",
                            nginx_cpu,
                        ),
                    ]
                    results[name] = run_benchmark(variants, args)

    server = (
        args.server or "the platform's default"
        if server_field_supported()
        else "uvicorn (services have no server= field)"
    )
    print(
        f"\nend-to-end benchmarks — {os.cpu_count()} CPU(s) shared by wrk, the proxy and the replicas"
        f" (not pinned); load average before {' '.join(f'{x:.2f}' for x in load_before)}"
    )
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s, median of {args.repeats} alternating runs"
        f" (all in brackets); {args.replicas} replica processes per side; clearway's server: {server};"
        f" nginx: {args.proxy_workers} worker(s) and as many gateway workers, upstream keepalive, {'buffered' if args.nginx_access_log else 'no'} access log"
    )
    print(
        "CPU per request: proxy = gateway / nginx; app = replicas (with bwrap) / uvicorn, gunicorn;"
        " platf. = control plane + log writers"
    )
    for name, runs in results.items():
        report(name, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
