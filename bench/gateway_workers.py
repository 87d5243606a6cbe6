"""How the gateway scales with its worker processes, beside nginx and HAProxy with as many.

Run:  python bench/gateway_workers.py [--duration 5] [--repeats 3] [--max-workers N]

The same fast backend as ``bench/gateway.py`` (nginx ``return 200``) behind
clearway's gateway with ``--workers 1, 2, ... N``, nginx with
``worker_processes 1, 2, ... N`` and, when it is installed, HAProxy with
``nbthread 1, 2, ... N`` (default N: the cores this machine has; HAProxy is
the "proven proxy in the data path" the gateway's design is weighed against,
see the README). For each worker count the proxies alternate ``--repeats`` saturation runs
(``wrk -t2 -c128``); the median is reported with the proxy's CPU time per
request (its whole process tree) and the speed-up over one worker.

Nothing is pinned: the point is to let the proxy use every core. On a small
machine wrk and the backend use the same cores, so the speed-up measured is a
lower bound of what the proxy alone would do; the number of cores is printed
with the figures for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import (  # the sibling benchmark's helpers
    WRK,
    cpu_seconds,
    free_port,
    median_run,
    nginx,
    run_gateway,
    wait_for_port,
    wrk,
)

CONNECTIONS = 128
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@contextlib.contextmanager
def haproxy(
    tmp: Path, port: int, backend_port: int, threads: int
) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy in HTTP mode with ``threads`` threads and upstream connection reuse, no logs."""
    conf = tmp / "haproxy.cfg"
    conf.write_text(
        f"""
global
    nbthread {threads}
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend bench
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    server backend 127.0.0.1:{backend_port}
"""
    )
    proc = subprocess.Popen([HAPROXY, "-f", str(conf), "-db"], stdout=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def wrk2(url: str, duration: float) -> dict[str, float]:
    """``wrk`` with two threads (one cannot load a proxy on several cores)."""
    out = subprocess.run(
        [WRK, "-t2", f"-c{CONNECTIONS}", f"-d{duration:g}s", "-H", "Host: bench.localhost", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  wrk reported errors for {url}", file=sys.stderr)
    return {"rps": float(found.group(1))}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs per proxy and worker count"
    )
    parser.add_argument(
        "--max-workers", type=int, default=os.cpu_count() or 1, help="largest worker count"
    )
    args = parser.parse_args()
    with_haproxy = Path(HAPROXY).exists()
    names = ["nginx", "gateway", *(["haproxy"] if with_haproxy else [])]
    rows: list[tuple[int, dict[str, dict[str, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="clearway-bench-") as tmpdir:
        tmp = Path(tmpdir)
        backend_port = free_port()
        backend = (
            f'listen 127.0.0.1:{backend_port} backlog=4096; location / {{ return 200 "hello"; }}'
        )
        upstream = f"upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; keepalive_requests 1000000; }}"
        table: dict[str, object] = {
            "version": 1, "generation": 1, "domains": ["localhost"],
            "routes": [{"app": "bench", "host": "bench", "prefix": "/",
                        "targets": [{"revision": "bench-1", "weight": 100,
                                     "endpoints": [f"127.0.0.1:{backend_port}"]}]}],
        }  # fmt: skip
        with nginx(tmp, "backend", backend):
            wait_for_port(backend_port)
            for workers in range(1, args.max_workers + 1):
                nginx_port, gateway_port, haproxy_port = free_port(), free_port(), free_port()
                proxy = (
                    f"listen 127.0.0.1:{nginx_port} backlog=4096;"
                    " location / { proxy_pass http://backend; proxy_http_version 1.1;"
                    ' proxy_set_header Connection ""; }'
                )
                run_dir = tmp / f"w{workers}"
                run_dir.mkdir()
                with contextlib.ExitStack() as stack:
                    procs = {
                        "nginx": stack.enter_context(
                            nginx(run_dir, "proxy", proxy, upstream, workers=workers)
                        ),
                        "gateway": stack.enter_context(
                            run_gateway(
                                run_dir, gateway_port, table, extra_args=("--workers", str(workers))
                            )
                        ),
                    }
                    ports = {"nginx": nginx_port, "gateway": gateway_port}
                    if with_haproxy:
                        procs["haproxy"] = stack.enter_context(
                            haproxy(run_dir, haproxy_port, backend_port, workers)
                        )
                        ports["haproxy"] = haproxy_port
                    for port in ports.values():
                        wait_for_port(port)
                    urls = {name: f"http://127.0.0.1:{port}/" for name, port in ports.items()}
                    for url in urls.values():
                        wrk(url, 1, CONNECTIONS)  # warm up
                    runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
                    for _ in range(max(1, args.repeats)):
                        for name, url in urls.items():
                            before = cpu_seconds(procs[name].pid)
                            result = wrk2(url, args.duration)
                            used = cpu_seconds(procs[name].pid) - before
                            result["cpu_us"] = used / (result["rps"] * args.duration) * 1e6
                            runs[name].append(result)
                    rows.append(
                        (workers, {name: median_run(found) for name, found in runs.items()})
                    )

    print(
        f"\ngateway workers vs nginx workers — {os.cpu_count()} core(s), wrk -t2 -c{CONNECTIONS}, "
        f"{args.duration:g} s runs, median of {args.repeats}, nothing pinned (wrk and the backend share the cores)\n"
    )
    print(f"{'workers':>7}  " + "  ".join(f"{name + ' req/s':>14}  {'cpu/req':>8}" for name in names)
          + f"  {'gateway/nginx':>13}  {'gateway speed-up':>16}")  # fmt: skip
    base = rows[0][1]["gateway"]["rps"]
    for workers, found in rows:
        cells = "  ".join(
            f"{found[name]['rps']:>14.0f}  {found[name]['cpu_us']:>6.1f}µs" for name in names
        )
        ratio = found["gateway"]["rps"] / found["nginx"]["rps"]
        print(f"{workers:>7}  {cells}  {ratio:>12.2f}x  {found['gateway']['rps'] / base:>15.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
