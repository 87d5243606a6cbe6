"""The HTTP server a replica runs its app with: granian or uvicorn, and which one ``auto`` means.

Measured one process each, hello apps, wrk on this project's 2-core machine
(``bench/servers.py``; figures in the README's Performance section):

* a WSGI app (Flask): granian, whose WSGI is native (Rust parses HTTP and
  calls the app from its own thread pool), answers about 2.5x what uvicorn
  does through ``a2wsgi`` (3.3k req/s) and 2.3x gunicorn's sync worker;
* an ASGI app (Starlette): granian about 1.3x uvicorn (uvloop, httptools).

Alone, pinned to a core, granian wins for both kinds. In a replica, end to
end behind the gateway on a machine whose cores are shared with the gateway,
the other replicas and the load (``bench/endtoend.py --server uvicorn|granian``,
2026-11-22), the figures split by interface:

* WSGI (Flask): granian's replicas took 151 µs of CPU per request where
  uvicorn + a2wsgi took 395-494 µs: **granian**, by far;
* ASGI (Starlette): granian's replicas took 67 µs per request where uvicorn's
  took 45 µs, and answered 0.78x the requests/s: its Rust runtime's threads
  and the hand-offs between them and the Python thread cost more than they
  save once they compete for the cores. **uvicorn**.

So ``server="auto"`` (the default) serves a **WSGI** service with granian when
the app's environment has it, and every other service (and every function)
with uvicorn; ``server="granian"`` is there for ASGI apps whose own
measurements say otherwise. Environments get
granian beside the replica runtime's packages unless the app's own pins rule
it out (`clearway.control.environments`, which says so in the deploy's
output); ``server="granian"`` fails the deploy when it cannot be installed, and
`choose` refuses it at run time with the same advice. ``server="uvicorn"``
keeps a service on uvicorn, whatever is installed.

Functions stay on uvicorn under ``auto``. A function replica is usually forked
from a warm parent (`clearway.runtime.warmparent`) that has built its server
before forking; that path, its start-up time (milliseconds) and its tests
are uvicorn's, and a function's own per-request cost (JSON in, pydantic
validation, JSON out) leaves the server less of the time to win back. A
function that asks for ``server="granian"`` gets it, prepared in the warm
parent like uvicorn (granian starts no thread before it serves, so the fork is
safe; that forked path has no test of its own yet).

What every server keeps, whichever is chosen:

* **the supervisor's socket.** The replica serves on the listening unix socket
  the supervisor bound and passed as fd 3; it never binds anything, so the
  path is known before it starts, stable across restarts and race-free.
  uvicorn takes it as ``Server.run(sockets=[...])``. granian has no public
  way to take an inherited descriptor: its ``Granian`` server binds its own
  socket in a main process and serves it from worker *processes*. Its Rust
  workers, though, serve any listening socket wrapped in a ``SocketHolder``
  (what the main process hands its workers), so this module runs one worker
  in the replica's own process on ``SocketHolder(3)``, the way granian's
  worker processes do (``granian/server/mp.py``) but without the main process:
  one process per replica, as with uvicorn, whose pid, cgroup and signals the
  supervisor already owns. That uses granian's internals, hence the narrow
  version range (`GRANIAN_REQUIREMENT`, ``granian>=2.8,<2.9``), each
  release to be checked by ``tests/runtime/test_servers.py`` before widening it.
* **graceful drain on SIGTERM.** Both stop accepting, let in-flight requests
  finish (idle keep-alive connections are closed), run the ASGI lifespan
  shutdown and exit 0, within the grace period: the drain gets at most
  `drain_timeout` (half the grace period, or all but a second of it), and the
  lifespan shutdown runs after it even when requests are still in flight,
  before the supervisor's SIGKILL.
* **lifespan** (``auto``: an app that does not support it is served without),
  **WebSocket** and **streaming** request and response bodies: ASGI on both;
  WSGI apps stream responses (an iterator is sent as it yields) and read
  ``wsgi.input`` as it arrives. (Both announce ASGI spec 2.3, under which
  Starlette's ``StreamingResponse`` also calls ``receive()`` to watch for a
  disconnect: a handler that streams its response while reading the request
  with ``request.stream()`` races it for body chunks. Under granian that race
  loses chunks; read the body first, or use plain ASGI, as the tests do.)
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Literal, Protocol

import uvicorn

from clearway.runtime.exit_codes import ExitCode
from clearway.runtime.interface import as_asgi, detect_interface
from clearway.spec.model import Interface, Server

__all__ = [
    "GRANIAN_REQUIREMENT",
    "GranianServer",
    "PreparedServer",
    "ServerName",
    "ServerUnavailable",
    "UvicornServer",
    "choose",
    "drain_timeout",
    "granian_installed",
    "prepare",
]

ServerName = Literal["uvicorn", "granian"]

#: The granian releases this module drives (it uses their internals): what app
#: environments get, and what ``auto`` accepts in one.
GRANIAN_REQUIREMENT = "granian>=2.8,<2.9"
GRANIAN_SERIES = (2, 8)

#: What granian's WSGI worker may run at once: threads calling the app, and requests
#: admitted (the rest wait in the socket's backlog, as with a sync worker pool).
WSGI_THREADS = 32
WSGI_BACKPRESSURE = 128
#: Requests an ASGI worker admits at once (granian's default for one worker).
ASGI_BACKPRESSURE = 1024


class ServerUnavailable(Exception):
    """The spec asks for a server the app's environment does not have."""


def _say(message: str) -> None:
    print(f"[clearway] {message}", file=sys.stderr, flush=True)


def granian_installed() -> bool:
    """Whether a granian this module can drive (`GRANIAN_SERIES`) is installed here, in the
    app's environment. An app may pin another granian for its own reasons: that one is
    left alone, and ``auto`` means uvicorn."""
    if importlib.util.find_spec("granian") is None:
        return False
    try:
        version = importlib.metadata.version("granian")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) == GRANIAN_SERIES


def choose(
    requested: Server, *, kind: Literal["service", "function"], interface: Literal["asgi", "wsgi"] = "asgi"
) -> ServerName:
    """The server to run: ``requested``, or what ``auto`` means for a ``kind`` of component
    whose app speaks ``interface`` (see the module docstring: granian for WSGI services).

    Raises `ServerUnavailable` for ``"granian"`` in an environment without it."""
    if requested == "uvicorn":
        return "uvicorn"
    if requested == "granian":
        if not granian_installed():
            raise ServerUnavailable(
                f"server='granian' was asked for, but the app's environment has no {GRANIAN_REQUIREMENT} "
                "(its dependencies exclude it): relax those pins, or use server='auto' to fall "
                "back to uvicorn"
            )
        return "granian"
    if kind == "function" or interface == "asgi":
        return "uvicorn"
    return "granian" if granian_installed() else "uvicorn"


def drain_timeout(grace: float) -> float:
    """How long in-flight requests may run after SIGTERM: what is left of ``grace`` then
    goes to the app's lifespan shutdown, before the supervisor's SIGKILL."""
    return max(grace * 0.5, grace - 1.0)


class PreparedServer(Protocol):
    """A server with the app loaded and every module it needs imported, not serving yet.

    A warm parent prepares one before it forks, so a forked replica imports
    nothing on its way to serving."""

    name: ServerName

    def serve(self, listen_fd: int, *, on_exit: Callable[[], None] | None = None) -> int:
        """Serve on the listening socket ``listen_fd`` until SIGTERM or SIGINT (``on_exit``
        is called as it arrives); the replica's exit code."""
        ...


def prepare(app: object, *, server: ServerName, interface: Interface, grace: float) -> PreparedServer:
    """``app`` (what a service function returned, or a function's ASGI app) ready to be
    served by ``server``. Raises `clearway.runtime.interface.BadAppObject` for non-apps."""
    if server == "uvicorn":
        return UvicornServer(as_asgi(app, interface), grace=grace)
    kind = detect_interface(app) if interface == "auto" else interface
    as_asgi(app, kind)  # the same refusals as uvicorn's path, before anything starts
    return GranianServer(app, wsgi=kind == "wsgi", grace=grace)


# -- uvicorn ----------------------------------------------------------------------------


class UvicornServer:
    """uvicorn (uvloop, httptools, lifespan ``auto``, no access log); WSGI through a2wsgi."""

    name: ServerName = "uvicorn"

    def __init__(self, asgi: Any, *, grace: float) -> None:
        self.config = uvicorn.Config(
            asgi,
            loop="uvloop",
            http="httptools",
            lifespan="auto",
            interface="asgi3",
            access_log=False,
            use_colors=False,
            # (uvicorn annotates this as int, but passes it straight to asyncio.wait_for.)
            timeout_graceful_shutdown=drain_timeout(grace),  # type: ignore[arg-type]
        )
        self.drain = drain_timeout(grace)
        self.config.load()
        self.config.get_loop_factory()  # imports uvloop; creates no loop

    def serve(self, listen_fd: int, *, on_exit: Callable[[], None] | None = None) -> int:
        # socket(fileno=...) detects the family (AF_UNIX) from the fd itself.
        sock = socket.socket(fileno=listen_fd)
        server = _NotifyingUvicorn(self.config, on_exit, drain=self.drain)
        _say(f"serving with uvicorn on unix:{sock.getsockname()}")
        # uvicorn handles SIGTERM while serving, then re-raises it to our handler: exit 0.
        server.run(sockets=[sock])
        if not server.started:
            _say("the server did not start (see the errors above)")
            return ExitCode.SERVER_START
        return ExitCode.OK


class _NotifyingUvicorn(uvicorn.Server):
    """uvicorn, saying it drains and calling ``on_exit`` the moment it is asked to stop."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None, *, drain: float) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            _say_draining(self._drain)
            if self._on_exit is not None:
                self._on_exit()
        super().handle_exit(sig, frame)


def _say_draining(seconds: float) -> None:
    _say(f"stopping: no new connections; draining in-flight requests for at most {seconds:g}s")


# -- granian ----------------------------------------------------------------------------


class GranianServer:
    """One granian worker in this process, on the inherited socket (see the module docstring)."""

    name: ServerName = "granian"

    def __init__(self, app: Any, *, wsgi: bool, grace: float) -> None:
        # Imported here, not at the top: environments without granian serve with uvicorn.
        from granian import _futures, _loops
        from granian import asgi as granian_asgi
        from granian import wsgi as granian_wsgi

        self.app = app
        self.wsgi = wsgi
        self.grace = grace
        # Its stub (_granian.pyi) lags the extension's real signatures: used untyped.
        self._granian: Any = importlib.import_module("granian._granian")
        self._new_scheduler = _futures._new_cbscheduler
        self._loop_factory = _loops.loops
        if wsgi:
            self._callback = granian_wsgi._callback_wrapper(app, {"url_path_prefix": None}, None)
            self._lifespan_class = None
        else:
            self._asgi_wrapper = granian_asgi._callback_wrapper
            self._watcher = _futures._future_watcher_wrapper
            self._lifespan_class = granian_asgi.LifespanProtocol

    def serve(self, listen_fd: int, *, on_exit: Callable[[], None] | None = None) -> int:
        listening = socket.socket(fileno=listen_fd)
        address = listening.getsockname()
        listening.detach()  # the worker serves the descriptor itself
        # (fd, is_uds, backlog): the backlog is the supervisor's, set when it listened.
        holder = (None, self._granian.SocketHolder(listen_fd, True, 1024))
        stop = self._granian.WorkerSignal()
        drained = threading.Event()
        # The worker calls this once it has stopped accepting and its requests are done.
        stop.add_cb(drained.set)
        stopping = threading.Event()

        def begin_stop(*_: object) -> None:
            if stopping.is_set():
                return
            stopping.set()
            _say_draining(drain_timeout(self.grace))
            if on_exit is not None:
                on_exit()
            stop.set()

        loop = self._loop_factory.get("uvloop")
        _say(f"serving with granian ({'WSGI' if self.wsgi else 'ASGI'}) on unix:{address}")
        try:
            if self.wsgi:
                return self._serve_wsgi(holder, stop, loop, begin_stop, drained, stopping)
            return self._serve_asgi(holder, stop, loop, begin_stop, drained, stopping)
        finally:
            loop.close()

    def _drain(self, drained: threading.Event) -> None:
        timeout = drain_timeout(self.grace)
        if not drained.wait(timeout):
            _say(f"requests still running after {timeout:g}s of draining; stopping anyway")

    def _serve_wsgi(
        self,
        holder: Any,
        stop: Any,
        loop: Any,
        begin_stop: Callable[..., None],
        drained: threading.Event,
        stopping: threading.Event,
    ) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, begin_stop)
        worker = self._granian.WSGIWorker(
            1, holder, None,
            1, 512, WSGI_THREADS, 30, WSGI_BACKPRESSURE,  # runtime threads, blocking, Python threads, idle, backpressure
            "1", None, None,  # HTTP/1.1 (what the gateway speaks), default settings
            None,  # no static files
            False, None, None, None, "tls1.3", None, [], False,  # no TLS
            (None, None),  # no metrics
        )  # fmt: skip
        worker.serve_mtr_uds(self._new_scheduler(loop, self._callback, impl_asyncio=True), loop, stop)
        stopping.wait()  # a signal interrupts the wait and runs begin_stop
        self._drain(drained)
        return ExitCode.OK

    def _serve_asgi(
        self,
        holder: Any,
        stop: Any,
        loop: Any,
        begin_stop: Callable[..., None],
        drained: threading.Event,
        stopping: threading.Event,
    ) -> int:
        assert self._lifespan_class is not None
        lifespan = self._lifespan_class(self.app)
        callback = self._watcher(self._asgi_wrapper(self.app, {"url_path_prefix": None}, lifespan.state, None))
        asked = asyncio.Event()

        def on_signal() -> None:
            begin_stop()
            asked.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
        loop.run_until_complete(lifespan.startup())
        if lifespan.interrupt:
            _say(f"the app's lifespan startup failed: {lifespan.exc!r}")
            _say("the server did not start (see the errors above)")
            return ExitCode.SERVER_START
        worker = self._granian.ASGIWorker(
            1, holder, None,
            1, 512, 1, 30, ASGI_BACKPRESSURE,
            "1", None, None,
            True,  # WebSockets
            None,
            False, None, None, None, "tls1.3", None, [], False,
            (None, None),
        )  # fmt: skip
        worker.serve_mtr_uds(self._new_scheduler(loop, callback, impl_asyncio=True), loop, stop)

        async def until_drained() -> None:
            await asked.wait()
            # The loop keeps running the app's requests meanwhile.
            await asyncio.to_thread(self._drain, drained)

        loop.run_until_complete(until_drained())
        loop.run_until_complete(lifespan.shutdown())
        if lifespan.interrupt:
            _say(f"the app's lifespan shutdown failed: {lifespan.exc!r}")
        return ExitCode.OK
