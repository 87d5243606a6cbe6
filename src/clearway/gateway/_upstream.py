"""Connections to replicas, and the keep-alive pool kept per replica endpoint.

An :class:`UpstreamConnection` is an asyncio Protocol with an httptools
response parser.  It has at most one *owner* at a time - the client connection
whose request it is carrying - and forwards parser events to it through the
:class:`UpstreamOwner` interface; between requests it sits, ownerless, in its
:class:`Endpoint`'s idle stack.

Protocols (not Streams) because this is the hot path: a pooled request costs
one ``transport.write`` for the request and one parser feed per chunk of
response, with no task switch and no intermediate buffering.

Why the pool looks the way it does:

* LIFO idle stack: the most recently used connection is the least likely to
  have been closed by the replica's own keep-alive timer.
* Connections idle for longer than ``upstream_idle_timeout`` (below uvicorn's
  5 s) are closed rather than reused, so that we rarely write a request into a
  socket the replica is closing; the proxy still retries idempotent requests
  that lose that race.
* Replicas listen on Unix sockets (``"unix:/path"`` endpoints) that only the
  platform's user can open, so the gateway is the only way in and its access
  checks cannot be walked around; ``host:port`` endpoints still work (tests,
  benchmarks).
* An endpoint dropped from the route table is *retired*: its idle connections
  are closed at once and busy ones are closed when their response ends, so a
  draining replica never gets a new request on a stale connection.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools

from ._settings import GatewaySettings

__all__ = ["Endpoint", "UpstreamConnection", "UpstreamOwner"]


class UpstreamOwner(Protocol):
    """What an :class:`UpstreamConnection` reports to the request using it."""

    def on_upstream_head(self, conn: UpstreamConnection) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_complete(self, conn: UpstreamConnection) -> None: ...
    def on_upstream_upgraded(self, conn: UpstreamConnection, data: bytes) -> None: ...
    def on_upstream_raw(self, data: bytes) -> None: ...
    def on_upstream_lost(self, conn: UpstreamConnection, reason: str) -> None: ...
    def on_upstream_buffer_full(self) -> None: ...
    def on_upstream_buffer_drained(self) -> None: ...
    def flush(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a replica."""

    __slots__ = (
        "closed",
        "endpoint",
        "headers",
        "idle_since",
        "interim",
        "keep_alive",
        "owner",
        "parser",
        "piping",
        "reading_paused",
        "reason",
        "received",
        "reused",
        "skip_message",
        "transport",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.owner: UpstreamOwner | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        #: True once the connection has carried a request before the current one.
        self.reused = False
        #: True once any byte of the current response arrived.
        self.received = False
        #: The current message is a 1xx interim response (dropped).
        self.interim = False
        #: Ignore the rest of the current message (a HEAD response's phantom body).
        self.skip_message = False
        self.keep_alive = True
        self.piping = False
        self.reading_paused = False
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the replica broke the protocol or is
            # closing it; either way it must not carry another request.
            self.close()
            return
        if self.piping:
            owner.on_upstream_raw(data)
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.piping = True
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            owner.on_upstream_upgraded(self, data[offset:])
        except httptools.HttpParserError as exc:
            self.keep_alive = False
            self.owner = None
            owner.on_upstream_lost(self, f"the replica sent an invalid HTTP response ({exc})")
            self.close()
        owner.flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.endpoint.forget(self)
        owner = self.owner
        if owner is not None:
            self.owner = None
            owner.on_upstream_lost(self, "the replica closed the connection")

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_buffer_full()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_buffer_drained()

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.headers = []
        self.reason = b""
        self.interim = False
        self.skip_message = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # 1xx interim responses are dropped (the gateway answers 100-continue
            # itself); for a 101 the pipe starts and its message end means nothing.
            self.interim = True
            if status != 101:
                return
        self.keep_alive = self.parser.should_keep_alive()
        if self.owner is not None:
            self.owner.on_upstream_head(self)

    def on_body(self, body: bytes) -> None:
        if not self.skip_message and self.owner is not None:
            self.owner.on_upstream_body(body)

    def on_message_complete(self) -> None:
        if self.interim or self.skip_message:
            return
        if self.owner is not None:
            self.owner.on_upstream_complete(self)

    # -- used by the proxy -----------------------------------------------------

    def end_message_at_head(self) -> None:
        """The response has no body even if its headers announce one (HEAD).

        httptools cannot be told that a response answers a HEAD request, so
        the parser would wait for the announced body; a fresh parser starts the
        next response cleanly and the old one's leftovers are ignored.
        """
        self.skip_message = True
        self.parser = httptools.HttpResponseParser(self)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(data)

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            if not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        """Close and forget; a request still owning it gets ``on_upstream_lost``."""
        if not self.closed:
            self.closed = True
            self.endpoint.forget(self)
            if self.transport is not None:
                self.transport.abort()

    def detach(self) -> None:
        """Drop the owner without telling it (the owner is the caller)."""
        self.owner = None


class Endpoint:
    """A replica's address, its idle connections and its in-flight count.

    ``address`` is ``"unix:/abs/path.sock"`` or ``"host:port"``.
    """

    __slots__ = ("_idle", "_loop", "_settings", "address", "host", "in_flight", "path", "port", "retired")

    def __init__(self, address: str, settings: GatewaySettings, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        #: The Unix socket path, or None for a TCP endpoint.
        self.path: str | None = None
        self.host = ""
        self.port = 0
        if address.startswith("unix:"):
            self.path = address[5:]
        else:
            host, _, port = address.rpartition(":")
            self.host = host.strip("[]")
            self.port = int(port)
        #: Requests currently sent to this endpoint (for load balancing).
        self.in_flight = 0
        self.retired = False
        self._idle: list[UpstreamConnection] = []
        self._settings = settings
        self._loop = loop

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection ready for a request, or None."""
        idle = self._idle
        if not idle:
            return None
        oldest_usable = self._loop.time() - self._settings.upstream_idle_timeout
        while idle:
            conn = idle.pop()
            if not conn.closed and conn.idle_since > oldest_usable:
                return conn
            conn.close()
        return None

    async def connect(self) -> UpstreamConnection:
        """Open a new connection (raises OSError or TimeoutError)."""
        async with asyncio.timeout(self._settings.connect_timeout):
            if self.path is not None:
                _, conn = await self._loop.create_unix_connection(lambda: UpstreamConnection(self), self.path)
            else:
                _, conn = await self._loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give back a connection whose exchange finished cleanly."""
        conn.owner = None
        if (
            conn.closed
            or not conn.keep_alive
            or self.retired
            or len(self._idle) >= self._settings.max_idle_per_endpoint
        ):
            conn.close()
            return
        conn.resume_reading()
        conn.reused = True
        conn.received = False
        conn.idle_since = self._loop.time()
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Remove a closed connection from the idle stack, if it is there."""
        if self._idle and conn in self._idle:
            self._idle.remove(conn)

    def retire(self) -> None:
        """The endpoint left the route table: close idle connections now."""
        self.retired = True
        self.close_idle()

    def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
