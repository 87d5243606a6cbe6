"""The gateway as an object: start it in a running event loop, reload it, close it.

This is what the CLI entry point (``python -m clearway.gateway``) drives and
what tests and the platform use in-process.  It wires together the parts -
router, endpoint pools, metrics, access log, admin socket, supervised tasks -
and owns their lifecycle, so that every part can stay ignorant of the others'
startup and shutdown order.

Access control needs the platform's public signing key (``identity_key``, a
PEM file): without it internal routes answer 401 to everyone and pins to
revisions outside the traffic split get 403, since nothing can be verified.  A reload hands the new table's
``identities`` to the verifier in the same step as the new routes, so a
replica removed from the table loses access with the reload that removes it.

Shutdown is graceful by design: stop accepting, close idle keep-alive
connections, let in-flight requests finish (held requests get a 503 at once),
then cut whatever is left when the grace period ends.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import random
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from clearway.exceptions import RuntimeStartError
from clearway.tasks import TaskSupervisor

from ._access_log import AccessLog
from ._admin import AdminServer
from ._identity import IdentityVerifier, load_public_key
from ._metrics import Metrics
from ._proxy import ClientConnection, ProxyContext
from ._router import EndpointRegistry, Router
from ._routes import RouteTable
from ._settings import GatewaySettings

__all__ = ["Gateway", "GatewayState", "ListenError"]

logger = logging.getLogger("clearway.gateway")


class ListenError(RuntimeStartError):
    """The gateway could not listen on its address (``errno`` says why)."""

    def __init__(self, message: str, *, address: str, errno: int | None) -> None:
        super().__init__(message)
        self.address = address
        self.errno = errno


class GatewayState(enum.Enum):
    """Lifecycle of a :class:`Gateway`."""

    #: Constructed; nothing is bound yet.
    CREATED = "created"
    #: ``start()`` is binding the listener and the admin socket.
    STARTING = "starting"
    #: Listening and proxying.
    SERVING = "serving"
    #: ``close()`` was called: no new connections, in-flight requests finishing.
    CLOSING = "closing"
    #: Everything is closed; the object cannot be restarted.
    CLOSED = "closed"


class Gateway:
    """The HTTP gateway: one listener proxying to replicas per a :class:`RouteTable`.

    ::

        async with Gateway(table, port=0) as gw:
            ...  # http://127.0.0.1:{gw.port}/
            gw.reload(new_table)
    """

    def __init__(
        self,
        routes: RouteTable | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_socket: str | Path | None = None,
        access_log: str | Path | None = None,
        settings: GatewaySettings | None = None,
        rng: random.Random | None = None,
        identity_key: str | Path | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._table = routes if routes is not None else RouteTable()
        self._host = host
        self._requested_port = port
        self._admin_path = admin_socket
        self._access_log_path = access_log
        self.settings = settings if settings is not None else GatewaySettings()
        self._rng = rng if rng is not None else random.Random()
        self._identity_key = identity_key
        #: A listening socket to serve on instead of binding ``host:port`` (a worker's, shared).
        self._sock = sock
        # Read now, so that a bad key fails the constructor (IdentityKeyError), not a request.
        self._verifier = IdentityVerifier(
            load_public_key(identity_key) if identity_key is not None else None,
            identities=self._table.identities,
        )
        self.state = GatewayState.CREATED
        self._metrics = Metrics()
        self._supervisor = TaskSupervisor(logging.getLogger("clearway.gateway"))
        self._server: asyncio.AbstractServer | None = None
        self._admin: AdminServer | None = None
        self._access_log: AccessLog | None = None
        self._ctx: ProxyContext | None = None
        self._endpoints: EndpointRegistry | None = None
        self._port = 0

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener (and admin socket); raise :class:`ListenError` if the port is taken."""
        if self.state is not GatewayState.CREATED:
            raise RuntimeError(f"a gateway can be started once; this one is {self.state.value}")
        self.state = GatewayState.STARTING
        loop = asyncio.get_running_loop()
        self._endpoints = EndpointRegistry(self.settings, loop)
        router = Router(self._table, self._endpoints, self._metrics, self._rng)
        if self._access_log_path is not None:
            self._access_log = AccessLog(self._access_log_path)
        ctx = self._ctx = ProxyContext(
            loop=loop,
            settings=self.settings,
            router=router,
            metrics=self._metrics,
            supervisor=self._supervisor,
            access_log=self._access_log,
            verifier=self._verifier,
        )
        address = f"{self._host}:{self._requested_port}"
        try:
            if self._sock is not None:
                self._server = await loop.create_server(lambda: ClientConnection(ctx), sock=self._sock, backlog=4096)
            else:
                self._server = await loop.create_server(
                    lambda: ClientConnection(ctx),
                    self._host,
                    self._requested_port,
                    reuse_address=True,
                    backlog=4096,
                )
        except OSError as exc:
            self.state = GatewayState.CLOSED
            if self._access_log is not None:
                self._access_log.close()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ListenError(
                f"cannot listen on {address}: {reason}", address=address, errno=exc.errno
            ) from exc
        sockets = self._server.sockets
        self._port = sockets[0].getsockname()[1] if sockets else self._requested_port
        if self._admin_path is not None:
            self._admin = AdminServer(self._admin_path, _OwnState(self))
            await self._admin.start()
        self._supervisor.start("gateway timeout watchdog", ctx.run_watchdog())
        if self._access_log is not None:
            self._supervisor.start("gateway access-log flusher", self._access_log.run_flusher())
        self.state = GatewayState.SERVING

    async def close(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish for ``grace`` seconds, close."""
        if self.state in (GatewayState.CLOSING, GatewayState.CLOSED):
            return
        if self.state is GatewayState.CREATED:
            self.state = GatewayState.CLOSED
            return
        self.state = GatewayState.CLOSING
        grace = self.settings.shutdown_grace if grace is None else grace
        ctx = self._ctx
        assert ctx is not None and self._server is not None
        self._server.close()
        ctx.closing = True
        ctx.changes.notify()  # held requests answer 503 now
        for conn in list(ctx.connections):
            conn.close_if_idle()
        if ctx.connections:
            try:
                await asyncio.wait_for(ctx.all_closed.wait(), timeout=grace)
            except TimeoutError:
                logger.warning(
                    "%d client connection(s) still busy after %g s; closing them", len(ctx.connections), grace
                )
                for conn in list(ctx.connections):
                    conn.abort()
        await self._server.wait_closed()
        await self._supervisor.close()
        if self._endpoints is not None:
            self._endpoints.close_all()
        if self._admin is not None:
            await self._admin.close()
        if self._access_log is not None:
            self._access_log.close()
        self.state = GatewayState.CLOSED

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- routes ---------------------------------------------------------------------

    def reload(self, table: RouteTable, *, reread_identity_key: bool = False) -> None:
        """Swap in a new route table; idle connections to dropped replicas are closed.

        With ``reread_identity_key`` the key file is read again too (key
        rotation); if it cannot be read, :class:`IdentityKeyError` is raised
        and nothing changes.
        """
        if reread_identity_key and self._identity_key is not None:
            self._verifier.set_key(load_public_key(self._identity_key))
        self._table = table
        self._verifier.set_identities(table.identities)
        if self._ctx is None or self._endpoints is None:
            return  # not started: the table is used by start()
        router = Router(table, self._endpoints, self._metrics, self._rng)
        self._ctx.router = router
        self._endpoints.keep_only(router.addresses())
        self._ctx.changes.notify()
        logger.info("gateway routes reloaded (generation %d)", table.generation)

    @property
    def table(self) -> RouteTable:
        return self._table

    @property
    def generation(self) -> int:
        return self._table.generation

    # -- introspection ----------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    def held(self) -> dict[str, int]:
        """Requests currently held per revision (waiting for a ready replica)."""
        return self._metrics.held()

    def load(self) -> list[dict[str, Any]]:
        """Requests in flight, held and answered so far per (app, revision, component) (``GET /load``)."""
        return self._metrics.load()

    @property
    def hold_seq(self) -> int:
        """Requests that began to be held since the gateway started (``GET /holds``)."""
        return self._metrics.holds.value

    def metrics_text(self) -> bytes:
        """The metrics in the Prometheus text format (as served by ``GET /metrics``)."""
        return self._metrics.exposition()


class _OwnState:
    """What the admin socket of a single gateway process reports: its own counters."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._metrics = gateway._metrics

    async def generation(self) -> int:
        return self._gateway.generation

    async def held(self) -> dict[str, int]:
        return self._metrics.held()

    async def load(self) -> list[dict[str, Any]]:
        return self._metrics.load()

    async def metrics(self) -> bytes:
        return self._metrics.exposition()

    async def stats(self) -> dict[str, Any]:
        return self._metrics.traffic()

    async def holds(self, after: int, within: float) -> int:
        return await self._metrics.holds.wait(after, within)
