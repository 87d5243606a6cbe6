"""Benchmark clearway's gateway against nginx as a reverse proxy, with wrk.

Run:  python bench/gateway.py [--duration 10] [--connections 64]

One backend (nginx ``return 200 "hello"``, 1 worker: the fastest thing we have,
so that the proxies are the bottleneck) is put behind
  (a) clearway's gateway  (``python -m clearway.gateway --workers 1``: one worker process,
      uvloop, under its idle master), and
  (b) nginx as a reverse proxy (``worker_processes 1``, keep-alive upstream pool),
so both proxies get exactly one process.  wrk drives the backend directly and
each proxy in the same run, all on 127.0.0.1.

Fairness and noise, on a small machine where wrk, the backend and the proxy
share the CPUs:
  * CPU pinning (``taskset``, when there are >= 2 CPUs and unless ``--no-pin``):
    the proxy under test - nginx or the gateway, identically - runs alone on
    one CPU; wrk and the backend share another.  Without pinning, the
    scheduler's placement of three busy processes on two CPUs decides much of
    the result and it differs from run to run.
  * Repeats: the saturation runs alternate direct / nginx / gateway
    ``--repeats`` times (3 by default) and the median of each is reported, so
    one unlucky run does not decide the ratio.

Two measurements per target:
  1. saturation: ``wrk -c N`` closed loop, requests/s;
  2. latency at half of *each proxy's* saturation rate: wrk with a Lua ``delay()``
     think-time per connection (wrk2 is not available), which approximates a
     constant request rate; the backend is measured directly at the same rate and
     its p50/p99 subtracted, giving the latency the proxy *adds*.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
LATENCY_CONNECTIONS = 32


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """``cmd`` run under ``taskset -c cpus`` (children, e.g. nginx's worker, inherit it)."""
    return [TASKSET, "-c", cpus, *cmd] if cpus is not None else cmd


def cpu_layout(pin: bool) -> tuple[str | None, str | None, str]:
    """(CPUs of the proxy under test, CPUs of wrk + backend, a description)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or not Path(TASKSET).exists():
        return None, None, f"not pinned ({len(cpus)} CPU(s) shared by wrk, the backend and the proxy)"
    proxy_cpu, load_cpu = str(cpus[-1]), str(cpus[0])
    return proxy_cpu, load_cpu, (
        f"pinned with taskset: proxy under test alone on CPU {proxy_cpu}, wrk + backend on CPU {load_cpu}"
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def nginx(
    tmp: Path, name: str, server_block: str, upstream: str = "", cpus: str | None = None, workers: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    prefix = tmp / name
    prefix.mkdir()
    (prefix / "logs").mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
user root;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    {upstream}
    server {{
        {server_block}
    }}
}}
"""
    )
    proc = subprocess.Popen(pinned([NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"], cpus))
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def run_gateway(
    tmp: Path,
    port: int,
    table: dict[str, object],
    cpus: str | None = None,
    extra_args: tuple[str, ...] = (),
    pure: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """clearway's gateway on ``port`` serving ``table`` (a routes.json document).

    ``pure``: run the pure-Python hot path even where a compiled one is built.
    """
    name = "gateway-py" if pure else "gateway"
    routes = tmp / f"{name}-routes.json"
    routes.write_text(json.dumps(table))
    env = {**os.environ, "CLEARWAY_PURE_PYTHON": "1"} if pure else None
    proc = subprocess.Popen(
        pinned(
            [sys.executable, "-m", "clearway.gateway", "--listen", f"127.0.0.1:{port}",
             "--routes", str(routes), "--admin-socket", str(tmp / f"{name}.sock"),
             # One worker, like nginx's worker_processes 1 (the default is one per core the
             # process may run on: pinned that is already 1, unpinned it would be 2).  The
             # master only binds the port and answers the admin socket; its CPU is counted too.
             "--workers", "1", *extra_args],
            cpus,
        ),
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    if proc.stdout.readline() != b"READY\n":
        raise RuntimeError("the gateway did not start")
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


@contextlib.contextmanager
def clearway_gateway(
    tmp: Path, port: int, backend_port: int, cpus: str | None = None, pure: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    table: dict[str, object] = {
        "version": 1, "generation": 1, "domains": ["localhost"],
        "routes": [{"app": "bench", "host": "bench", "prefix": "/",
                    "targets": [{"revision": "bench-1", "weight": 100,
                                 "endpoints": [f"127.0.0.1:{backend_port}"]}]}],
    }
    with run_gateway(tmp, port, table, cpus, pure=pure) as proc:
        yield proc


def wrk(
    url: str,
    duration: float,
    connections: int,
    script: Path | None = None,
    cpus: str | None = None,
    headers: tuple[str, ...] = ("Host: bench.localhost",),
) -> dict[str, float]:
    cmd = [*pinned([], cpus), WRK, "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency"]
    for header in headers:
        cmd += ["-H", header]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            result[f"p{pct}_ms"] = float(m.group(1)) * scale
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        result["errors"] = 1.0
        print(f"  wrk reported errors for {url}: {errors.group(0)}", file=sys.stderr)
    return result


def median_run(results: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median requests/s (its latencies are reported with it)."""
    ordered = sorted(results, key=lambda r: r["rps"])
    return ordered[len(ordered) // 2]


def delay_script(tmp: Path, rate: float, connections: int) -> Path:
    """A wrk script that paces each connection so all together send ~``rate`` req/s."""
    delay_ms = connections * 1000.0 / rate
    path = tmp / f"pace_{int(rate)}.lua"
    path.write_text(f"function delay()\n  return {delay_ms:.3f}\nend\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections for the saturation runs")
    parser.add_argument("--repeats", type=int, default=3, help="alternating saturation runs per target (median)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    parser.add_argument(
        "--pure-too", action="store_true",
        help="also run the gateway's pure-Python hot path (CLEARWAY_PURE_PYTHON=1) as 'gateway-py', alternating",
    )
    args = parser.parse_args()
    proxy_cpu, load_cpu, layout = cpu_layout(not args.no_pin)
    # Asked before the gateways start, as they will decide (a source edited later does not count).
    hot_path = subprocess.run(
        [sys.executable, "-c", "import clearway.gateway as g; print('compiled' if g.compiled else 'pure Python')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()

    with tempfile.TemporaryDirectory(prefix="clearway-bench-") as tmpdir:
        tmp = Path(tmpdir)
        backend_port, nginx_port, gateway_port, pure_port = free_port(), free_port(), free_port(), free_port()
        backend = f'listen 127.0.0.1:{backend_port} backlog=4096; location / {{ return 200 "hello"; }}'
        proxy = (
            f"listen 127.0.0.1:{nginx_port} backlog=4096;"
            " location / { proxy_pass http://backend; proxy_http_version 1.1;"
            ' proxy_set_header Connection ""; proxy_buffering on; }'
        )
        upstream = f"upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; keepalive_requests 1000000; }}"
        with (
            nginx(tmp, "backend", backend, cpus=load_cpu) as backend_proc,
            nginx(tmp, "proxy", proxy, upstream, cpus=proxy_cpu) as nginx_proc,
            clearway_gateway(tmp, gateway_port, backend_port, cpus=proxy_cpu) as gateway_proc,
            contextlib.ExitStack() as more,
        ):
            pids = {"direct": backend_proc.pid, "nginx": nginx_proc.pid, "gateway": gateway_proc.pid}
            targets = {
                "direct": f"http://127.0.0.1:{backend_port}/",
                "nginx": f"http://127.0.0.1:{nginx_port}/",
                "gateway": f"http://127.0.0.1:{gateway_port}/",
            }
            if args.pure_too:
                pure_proc = more.enter_context(clearway_gateway(tmp, pure_port, backend_port, proxy_cpu, pure=True))
                pids["gateway-py"] = pure_proc.pid
                targets["gateway-py"] = f"http://127.0.0.1:{pure_port}/"
            for url in targets.values():
                wait_for_port(int(url.rsplit(":", 1)[1].strip("/")))
            for url in targets.values():  # warm up pools and caches
                wrk(url, 1, args.connections, cpus=load_cpu)
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(max(1, args.repeats)):  # alternate, so slow drifts hit all targets alike
                for name, url in targets.items():
                    cpu_before = cpu_seconds(pids[name])
                    result = wrk(url, args.duration, args.connections, cpus=load_cpu)
                    # CPU time of the server under test per request: less sensitive than
                    # requests/s to whatever else the machine is running.
                    result["cpu_us"] = (cpu_seconds(pids[name]) - cpu_before) / (result["rps"] * args.duration) * 1e6
                    runs[name].append(result)
            saturation = {name: median_run(results) for name, results in runs.items()}
            latency: dict[str, dict[str, float]] = {}
            for proxy_name in ("nginx", "gateway"):
                rate = saturation[proxy_name]["rps"] / 2
                script = delay_script(tmp, rate, LATENCY_CONNECTIONS)
                latency[proxy_name] = wrk(targets[proxy_name], args.duration, LATENCY_CONNECTIONS, script, load_cpu)
                latency[f"direct@{proxy_name}"] = wrk(
                    targets["direct"], args.duration, LATENCY_CONNECTIONS, script, load_cpu
                )

    cpus = os.cpu_count()
    print(f"\nclearway gateway benchmark — {cpus} CPU(s), wrk -t1, {args.duration:g} s per run, all on 127.0.0.1")
    print(f"{layout}.")
    print(
        "backend: nginx 'return 200 \"hello\"' (1 worker); proxies: clearway gateway (--workers 1, uvloop,"
        f" hot path {hot_path})"
    )
    print("and nginx reverse proxy (worker_processes 1, upstream keepalive), both without access logs.\n")
    print(
        f"saturation (wrk -c{args.connections}, closed loop; median of {len(runs['nginx'])} alternating runs,"
        " all runs in brackets):"
    )
    for name in runs:
        s = saturation[name]
        every = ", ".join(f"{r['rps']:.0f}" for r in runs[name])
        print(
            f"  {name:8s} {s['rps']:>10.0f} req/s   p50 {s.get('p50_ms', 0):.3f} ms   p99 {s.get('p99_ms', 0):.3f} ms"
            f"   cpu {s['cpu_us']:.1f} us/req   [{every}]"
        )
    ratio = saturation["gateway"]["rps"] / saturation["nginx"]["rps"]
    print(f"  ratio gateway/nginx: {ratio:.2f}x  (goal >= 1.0x; CPU per request <= nginx's)")
    if "gateway-py" in saturation:
        pure = saturation["gateway-py"]
        print(
            f"  compiled vs pure-Python gateway: {saturation['gateway']['rps'] / pure['rps']:.2f}x req/s,"
            f" {saturation['gateway']['cpu_us'] / pure['cpu_us']:.2f}x CPU per request"
        )
    print()
    print(
        f"added latency at half of each proxy's saturation rate ({LATENCY_CONNECTIONS} connections paced\n"
        "with a wrk Lua delay() - an approximation of constant rate, not a true open loop;\n"
        "added = proxy percentile - backend-direct percentile at the same pacing):"
    )
    for name in ("nginx", "gateway"):
        p, d = latency[name], latency[f"direct@{name}"]
        print(
            f"  {name:8s} at {p['rps']:>8.0f} req/s: p50 {p['p50_ms']:.3f} ms (+{p['p50_ms'] - d['p50_ms']:.3f}),"
            f" p99 {p['p99_ms']:.3f} ms (+{p['p99_ms'] - d['p99_ms']:.3f})   direct p50 {d['p50_ms']:.3f} p99 {d['p99_ms']:.3f}"
        )
    print("  (goal: gateway adds <= 1 ms at p99)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
