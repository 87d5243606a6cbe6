"""Which HTTP server a replica should run: uvicorn, granian (and gunicorn's sync worker for WSGI).

Run:  python bench/servers.py [--duration 10] [--connections 64] [--repeats 3] [--no-pin]

Needs ``wrk`` (``scripts/system-packages --bench``) and the ``bench`` extra
(gunicorn: ``scripts/install test,examples,bench``). One server process each,
serving a hello app on 127.0.0.1 (wrk speaks TCP only; every server gets the
same socket kind):

* **Flask** (WSGI): uvicorn through a2wsgi (what replicas ran before
  `clearway.runtime.servers`), granian's native WSGI (its thread pool sized as a
  replica's: ``WSGI_THREADS``, ``WSGI_BACKPRESSURE``), gunicorn ``sync``, one worker;
* **Starlette** (ASGI): uvicorn (uvloop, httptools), granian (ASGI).

Each server is started with its own command line, configured as the replica
configures it, with no access log; the runs alternate server by server
``--repeats`` times and the median requests/s is printed with every run in
brackets, and the ratio to uvicorn. With at least 2 CPUs the server runs alone
on CPU 0 and wrk on CPU 1 (``taskset``), so the scheduler does not decide the
result. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from clearway.runtime.servers import WSGI_BACKPRESSURE, WSGI_THREADS

APPS = {
    "flask_app.py": """\
        from flask import Flask
        app = Flask("bench")

        @app.get("/")
        def hello():
            return "hello"

        from a2wsgi import WSGIMiddleware
        asgi = WSGIMiddleware(app)
        """,
    "starlette_app.py": """\
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("hello")

        app = Starlette(routes=[Route("/", hello)])
        """,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def commands(port: int) -> dict[str, dict[str, list[str]]]:
    py = sys.executable
    bin_dir = Path(py).parent
    uvicorn = [py, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
               "--http", "httptools", "--no-access-log", "--log-level", "warning", "--lifespan", "auto"]  # fmt: skip
    granian = [str(bin_dir / "granian"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--loop", "uvloop", "--http", "1", "--log-level", "warning"]  # fmt: skip
    suites: dict[str, dict[str, list[str]]] = {
        "Flask (WSGI)": {
            "uvicorn + a2wsgi": [*uvicorn, "flask_app:asgi"],
            "granian": [
                *granian, "--interface", "wsgi", "--blocking-threads", str(WSGI_THREADS),
                "--backpressure", str(WSGI_BACKPRESSURE), "flask_app:app",
            ],
        },
        "Starlette (ASGI)": {
            "uvicorn": [*uvicorn, "starlette_app:app"],
            "granian": [*granian, "--interface", "asgi", "starlette_app:app"],
        },
    }
    if shutil.which("gunicorn", path=str(bin_dir)):
        suites["Flask (WSGI)"]["gunicorn sync"] = [
            str(bin_dir / "gunicorn"), "-w", "1", "-k", "sync", "-b", f"127.0.0.1:{port}",
            "--log-level", "warning", "flask_app:app",
        ]  # fmt: skip
    return suites


def _wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("the server did not listen in time")


def run_wrk(port: int, *, duration: int, connections: int, pin: bool) -> float:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", f"http://127.0.0.1:{port}/"]
    if pin:
        argv = ["taskset", "-c", "1", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        print(textwrap.indent(out, "    "), file=sys.stderr)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def measure(suite: str, server: str, workdir: Path, *, duration: int, connections: int, pin: bool) -> float:
    port = _free_port()
    argv = commands(port)[suite][server]
    if pin:
        argv = ["taskset", "-c", "0", *argv]
    process = subprocess.Popen(argv, cwd=workdir, start_new_session=True)
    try:
        _wait_listening(port, process)
        run_wrk(port, duration=1, connections=connections, pin=pin)  # warm-up
        return run_wrk(port, duration=duration, connections=connections, pin=pin)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: scripts/system-packages --bench")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    with tempfile.TemporaryDirectory(prefix="cw-bench-servers-") as scratch:
        workdir = Path(scratch)
        for name, source in APPS.items():
            (workdir / name).write_text(textwrap.dedent(source))
        print(f"{os.cpu_count()} CPUs; wrk -t1 -c{args.connections} -d{args.duration}s; "
              f"{'server on CPU 0, wrk on CPU 1' if pin else 'unpinned'}; median of {args.repeats}")  # fmt: skip
        for suite, servers in commands(0).items():  # (each run gets a fresh port)
            runs: dict[str, list[float]] = {server: [] for server in servers}
            for _ in range(args.repeats):
                for server in servers:
                    runs[server].append(
                        measure(suite, server, workdir, duration=args.duration, connections=args.connections, pin=pin)
                    )
            print(f"\n{suite}")
            base = statistics.median(next(iter(runs.values())))
            for server, values in runs.items():
                median = statistics.median(values)
                every = ", ".join(f"{v:,.0f}" for v in values)
                print(f"  {server:<18} {median:>9,.0f} req/s  x{median / base:4.2f}  [{every}]")


if __name__ == "__main__":
    main()
