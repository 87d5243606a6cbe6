"""``python -m clearway.gateway``: the gateway as a process, the way the control plane runs it.

The contract with the control plane, kept exactly:

* exit code 3 and one line on stderr when the listen address is taken;
* ``READY`` on stdout once the listener, every worker and the admin socket are up;
* SIGHUP re-reads the routes file and the ``--identity-key`` file in every
  worker (a bad file is logged and the old table and key kept);
* exit code 2 and one line on stderr when the routes file or the identity key
  cannot be used at start-up;
* SIGTERM/SIGINT drain in-flight requests (up to ~10 s) and exit 0.

The process started is the *master* (``_workers.py``): it binds the listener,
runs ``--workers`` worker processes on it and answers the admin socket for all
of them.  A worker is this same command with ``--worker-of MASTER_PID
--listen-fd FD`` and its own ``--admin-socket``; nobody else starts one.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import errno
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from ._admin import AdminServer
from ._gateway import Gateway, ListenError
from ._identity import IdentityKeyError, load_public_key
from ._routes import RoutesError, load_routes
from ._settings import GatewaySettings
from ._workers import WorkerExited, WorkerPool, default_workers, worker_argv

__all__ = ["main"]

logger = logging.getLogger("clearway.gateway")

EXIT_LISTEN_FAILED = 3
#: The routes file or the identity key is unusable at start-up.
EXIT_BAD_ROUTES = 2
#: How long the master retries a taken port: the workers of a master that was just killed
#: are closing their copies of the listener (they got SIGTERM from the kernel).
BIND_RETRY = 1.0
#: ``prctl(PR_SET_PDEATHSIG, ...)``: a signal for this process when its parent exits.
_PR_SET_PDEATHSIG = 1


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m clearway.gateway", description="clearway's HTTP gateway")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="host:port to serve HTTP on")
    parser.add_argument("--routes", required=True, help="routes.json written by the control plane")
    parser.add_argument("--admin-socket", required=True, help="Unix socket for /metrics, /routes, /held, /load, /stats, /healthz")
    parser.add_argument("--access-log", default=None, help="file to append one line per request to")
    parser.add_argument("--hold-timeout", type=float, default=30.0, help="seconds a request waits for a replica")
    parser.add_argument(
        "--identity-key",
        default=None,
        help="PEM Ed25519 public key verifying replica identities and pin tokens "
        "(without it internal routes answer 401 and pins 403)",
    )
    parser.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight requests get on SIGTERM")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: the number of cores)"
    )
    parser.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker_of is not None:
        logging.basicConfig(level=logging.INFO, format=f"clearway gateway[{os.getpid()}]: %(levelname)s %(message)s")
        return _run(_serve_worker(args))
    logging.basicConfig(level=logging.INFO, format="clearway gateway: %(levelname)s %(message)s")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        print(f"clearway gateway: --listen must be host:port, got {args.listen!r}", file=sys.stderr)
        return EXIT_LISTEN_FAILED
    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        print(f"clearway gateway: --workers must be at least 1, got {workers}", file=sys.stderr)
        return EXIT_BAD_ROUTES
    try:
        load_routes(args.routes)
        if args.identity_key is not None:
            load_public_key(args.identity_key)
    except (RoutesError, IdentityKeyError) as exc:
        print(f"clearway gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_ROUTES
    try:
        listener = _bind(host.strip("[]") or "127.0.0.1", int(port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"clearway gateway: cannot listen on {args.listen}: address already in use — "
                "stop the other program or choose another port with --port",
                file=sys.stderr,
            )
        else:
            print(f"clearway gateway: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_LISTEN_FAILED
    return _run(_serve_master(args, listener, workers))


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, retrying a taken port for `BIND_RETRY` seconds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + BIND_RETRY
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(4096)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        sock.setblocking(False)
        return sock


def _worker_options(args: argparse.Namespace) -> list[str]:
    """The options every worker gets from the master's."""
    options = ["--listen", args.listen, "--routes", args.routes, "--hold-timeout", repr(args.hold_timeout)]
    options += ["--shutdown-grace", repr(args.shutdown_grace)]
    if args.access_log is not None:
        options += ["--access-log", args.access_log]
    if args.identity_key is not None:
        options += ["--identity-key", args.identity_key]
    return options


async def _serve_master(args: argparse.Namespace, listener: socket.socket, workers: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    options = _worker_options(args)
    admin_path = Path(args.admin_socket)
    pool = WorkerPool(
        workers,
        listener,
        argv=lambda index: worker_argv(
            options, master=os.getpid(), listen_fd=listener.fileno(), admin=_worker_admin(admin_path, index)
        ),
        admin=lambda index: _worker_admin(admin_path, index),
    )
    loop.add_signal_handler(signal.SIGHUP, pool.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await pool.start()
    except WorkerExited as exc:
        if exc.code in (EXIT_BAD_ROUTES, EXIT_LISTEN_FAILED):
            return exc.code  # the worker said why on our stderr: its line stays the last one
        print(f"clearway gateway: {exc}; its errors are the lines above", file=sys.stderr)
        return 1
    except TimeoutError:
        print("clearway gateway: the workers did not start in time", file=sys.stderr)
        return 1
    admin = AdminServer(admin_path, pool)
    await admin.start()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await stop.wait()
    listener.close()
    await pool.close(args.shutdown_grace)
    await admin.close()
    return 0


def _worker_admin(admin: Path, index: int) -> Path:
    return admin.with_name(f"{admin.name}.{index}")


def _run(main_coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(main_coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_coro)


def _die_with_master(master: int) -> bool:
    """SIGTERM for us when the master exits; False if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == master


async def _serve_worker(args: argparse.Namespace) -> int:
    if not _die_with_master(args.worker_of):
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gateway: Gateway | None = None
    reload_wanted = False

    def reload() -> None:
        nonlocal reload_wanted
        if gateway is None:
            reload_wanted = True  # read below, before serving
            return
        _reload(gateway, args.routes)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Spawned with SIGHUP blocked (see _workers.py): from here a route change is never missed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    try:
        table = load_routes(args.routes)
        host = args.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        sock = socket.socket(fileno=args.listen_fd)
        gateway = Gateway(
            table,
            host=host,
            admin_socket=args.admin_socket,
            access_log=args.access_log,
            settings=GatewaySettings(hold_timeout=args.hold_timeout, shutdown_grace=args.shutdown_grace),
            identity_key=args.identity_key,
            sock=sock,
        )
    except (RoutesError, IdentityKeyError) as exc:
        print(f"clearway gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_ROUTES
    try:
        await gateway.start()
    except ListenError as exc:
        print(f"clearway gateway: {exc}", file=sys.stderr)
        return EXIT_LISTEN_FAILED
    if reload_wanted:
        _reload(gateway, args.routes)
    # Everything allocated so far lives as long as the process: move it out of
    # the collector's sight so that full collections stay short. (A larger
    # young generation measured worse: more CPU per request, no better tail.)
    gc.collect()
    gc.freeze()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await stop.wait()
    await gateway.close()
    return 0


def _reload(gateway: Gateway, routes_path: str) -> None:
    try:
        table = load_routes(routes_path)
    except RoutesError as exc:
        logger.error("%s; keeping the routes of generation %d", exc, gateway.generation)
        return
    try:
        gateway.reload(table, reread_identity_key=True)
    except IdentityKeyError as exc:
        logger.error("%s; keeping the routes of generation %d and the old key", exc, gateway.generation)
