"""``python -m clearway.gateway``: the gateway as a process, the way the control plane runs it.

The contract with the control plane, kept exactly:

* exit code 3 and one line on stderr when the listen address is taken;
* ``READY`` on stdout once the listener and the admin socket are up;
* SIGHUP re-reads the routes file and the ``--identity-key`` file (a bad file
  is logged and the old table and key kept);
* exit code 2 and one line on stderr when the routes file or the identity key
  cannot be used at start-up;
* SIGTERM/SIGINT drain in-flight requests (up to ~10 s) and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import signal
import sys
from collections.abc import Sequence

from ._gateway import Gateway, ListenError
from ._identity import IdentityKeyError
from ._routes import RoutesError, load_routes
from ._settings import GatewaySettings

__all__ = ["main"]

logger = logging.getLogger("clearway.gateway")

EXIT_LISTEN_FAILED = 3
#: The routes file or the identity key is unusable at start-up.
EXIT_BAD_ROUTES = 2


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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="clearway gateway: %(levelname)s %(message)s")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        print(f"clearway gateway: --listen must be host:port, got {args.listen!r}", file=sys.stderr)
        return EXIT_LISTEN_FAILED
    try:
        table = load_routes(args.routes)
    except RoutesError as exc:
        print(f"clearway gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_ROUTES
    settings = GatewaySettings(hold_timeout=args.hold_timeout, shutdown_grace=args.shutdown_grace)
    try:
        gateway = Gateway(
            table,
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            admin_socket=args.admin_socket,
            access_log=args.access_log,
            settings=settings,
            identity_key=args.identity_key,
        )
    except IdentityKeyError as exc:
        print(f"clearway gateway: {exc}", file=sys.stderr)
        return EXIT_BAD_ROUTES
    return _run(_serve(gateway, args.routes, args.listen))


def _run(main_coro: asyncio.Future[int] | asyncio.Task[int] | object) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(main_coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_coro)  # type: ignore[arg-type]


async def _serve(gateway: Gateway, routes_path: str, listen: str) -> int:
    try:
        await gateway.start()
    except ListenError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(
                f"clearway gateway: cannot listen on {listen}: address already in use — "
                "stop the other program or choose another port with --port",
                file=sys.stderr,
            )
        else:
            print(f"clearway gateway: {exc}", file=sys.stderr)
        return EXIT_LISTEN_FAILED
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            table = load_routes(routes_path)
        except RoutesError as exc:
            logger.error("%s; keeping the routes of generation %d", exc, gateway.generation)
            return
        try:
            gateway.reload(table, reread_identity_key=True)
        except IdentityKeyError as exc:
            logger.error("%s; keeping the routes of generation %d and the old key", exc, gateway.generation)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
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
