"""The replica process: ``python -m clearway.runtime.replica``.

This is what runs inside every replica. It reads its `ReplicaSpec` from the
``CLEARWAY_REPLICA_SPEC`` environment variable, imports the user's app from the
code snapshot and runs one component:

* a **service** function is called once to get the web app, which is served
  with uvicorn (uvloop, httptools, lifespan ``auto``, no access log) on the
  listening socket the supervisor created and passed as fd 3. Creating the
  socket in the supervisor means the port is known before the process starts,
  two replicas can never race for a port, and the port survives restarts. The
  socket is handed to ``uvicorn.Server.run(sockets=...)`` rather than through
  ``Config(fd=...)``, which assumes a unix socket for inherited fds.
  On SIGTERM uvicorn stops accepting, lets in-flight requests finish for most
  of the grace period, runs the app's lifespan shutdown and exits 0.
* a **worker** function is called (``async def`` ones under ``asyncio.run``);
  SIGTERM raises ``SystemExit(0)`` in it, so ``finally`` blocks and context
  managers run. A worker that returns has exited (code 0) and is restarted.

Everything goes to stdout/stderr, which the supervisor pointed at the log file,
so a traceback printed here is what the supervisor reports as the replica's
``last_error``. The exit code says which stage failed (`clearway.runtime.exit_codes.ExitCode`).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from clearway.exceptions import AppLoadError, SpecError
from clearway.runtime.exit_codes import ExitCode
from clearway.runtime.interface import BadAppObject, as_asgi
from clearway.runtime.spec import LISTEN_FD_ENV_VAR, SPEC_ENV_VAR, Interface, ReplicaSpec
from clearway.sdk.loader import load_app

__all__ = ["main"]


def _say(message: str) -> None:
    print(f"[clearway] {message}", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(ExitCode.OK)


def main() -> int:
    # The sandbox prologue starts us with SIGTERM ignored (see clearway.runtime.sandbox);
    # an ignored disposition is inherited across exec, so take SIGTERM back first.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    try:
        spec = ReplicaSpec.from_json(os.environ[SPEC_ENV_VAR])
    except (KeyError, ValueError, TypeError) as error:
        _say(f"cannot read the replica spec from ${SPEC_ENV_VAR}: {error!r}")
        return ExitCode.BAD_SPEC
    os.chdir(spec.workdir)
    sys.path.insert(0, str(spec.code_dir))
    _say(f"replica {spec.replica_id} (pid {os.getpid()}) loading {spec.app_file}")
    try:
        app = load_app(spec.code_dir / spec.app_file)
    except AppLoadError as error:
        _say(f"could not load the app: {error.message}")
        if error.details:
            print(error.details, file=sys.stderr, end="", flush=True)
        return ExitCode.APP_LOAD
    except SpecError as error:
        _say(f"could not load the app: {error}")
        return ExitCode.APP_LOAD
    component = app.components.get(spec.component)
    if component is None:
        _say(
            f"the app defines no component named {spec.component!r} "
            f"(it defines: {', '.join(sorted(app.components)) or 'none'})"
        )
        return ExitCode.BAD_COMPONENT
    if spec.kind == "service":
        listen_fd = int(os.environ[LISTEN_FD_ENV_VAR])
        return _serve(
            component.target, interface=spec.interface, grace=spec.grace_period, listen_fd=listen_fd
        )
    return _work(component.target)


def _serve(target: Callable[[], Any], *, interface: Interface, grace: float, listen_fd: int) -> int:
    try:
        returned = target()
    except Exception:
        _say("the service function raised:")
        traceback.print_exc()
        return ExitCode.APP_LOAD
    try:
        asgi = as_asgi(returned, interface)
    except BadAppObject as error:
        _say(str(error))
        return ExitCode.BAD_COMPONENT
    # socket(fileno=...) detects the family (AF_INET) from the fd itself.
    sock = socket.socket(fileno=listen_fd)
    config = uvicorn.Config(
        asgi,
        loop="uvloop",
        http="httptools",
        lifespan="auto",
        interface="asgi3",
        access_log=False,
        use_colors=False,
        # Leave the app time for its lifespan shutdown before the supervisor's SIGKILL.
        # (uvicorn annotates this as int, but passes it straight to asyncio.wait_for.)
        timeout_graceful_shutdown=max(grace * 0.5, grace - 1.0),  # type: ignore[arg-type]
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    _say(f"serving on http://{host}:{port}")
    # uvicorn handles SIGTERM while serving, then re-raises it to our handler: exit 0.
    server.run(sockets=[sock])
    if not server.started:
        _say("the server did not start (see the errors above)")
        return ExitCode.SERVER_START
    return ExitCode.OK


def _work(target: Callable[[], Any]) -> int:
    try:
        if inspect.iscoroutinefunction(target):
            asyncio.run(target())
        else:
            target()
    except SystemExit:
        raise
    except BaseException:
        _say("the worker raised:")
        traceback.print_exc()
        return ExitCode.APP_ERROR
    _say("the worker function returned")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
