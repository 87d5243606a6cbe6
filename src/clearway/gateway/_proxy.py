"""The client side of the proxy: one asyncio Protocol per client connection.

This module is the hot path, so it is written for speed first:

* Protocol callbacks, not Streams, and no task per request: a request whose
  replica has an idle pooled connection is parsed, routed and written upstream
  inside ``data_received``; the response is relayed inside the upstream
  connection's ``data_received``.  Only the slow path (holding for a replica,
  connecting, retrying) runs as a supervised coroutine.
* The request head is built with one ``join`` and sent with one write; the
  response head and the body bytes parsed from one upstream read are collected
  in ``_out`` and flushed with one (vectored) write.
* Bodies are streamed both ways, never buffered whole.  Backpressure: when the
  replica's socket buffer is full we pause reading from the client, and when
  the client's is full we pause reading from the replica.
* It is compiled with mypyc (with ``_upstream``, ``_router`` and ``_metrics``;
  ``scripts/compile``, and ``_compiled.py`` for when the ``.py`` runs instead):
  the classes become C structs, attribute reads and the calls between the
  client and upstream protocols direct C calls.  That took about 35% of the
  instructions per proxied request away (cachegrind: 93k → 58k for a wrk
  request, 144k → 94k for a browser-like one).  So keep this module plain,
  strictly typed Python that mypyc compiles: no attributes set from outside
  the class, no monkeypatching in tests (tests drive real sockets anyway).
* The request head is rebuilt from the parsed parts, never passed through as
  received.  Passing the client's header block through raw when nothing in
  it needs dropping was measured as an upper bound (the rebuild of ordinary
  headers simply left out): 0 instructions saved for a wrk request (its only
  header is Host, which is handled anyway) and 8% for the browser-like one
  (94k → 86k, compiled).  The parser's per-header callback still has to run
  to find Host, Transfer-Encoding, Connection and the trust headers; and
  forwarding bytes verbatim would forward what the parser tolerates but a
  replica may read differently (whitespace before the colon, bare LF line
  ends, obsolete line folding) - the very differences request smuggling is
  made of.  The rebuilt head is canonical by construction; 8% on some
  requests did not buy giving that up.

HTTP decisions worth knowing:

* ``Expect: 100-continue`` is answered by the gateway itself, once the request
  has a replica connection to go to, and is not forwarded.  So a client that
  would get a 404 or a 503 is told so before it uploads anything, and the
  interim response never has to be relayed across pooled connections and
  retries.  The cost: the app cannot refuse a body based on headers alone.
* Bodies are re-framed: Content-Length is passed through, chunked is
  re-chunked; a close-delimited response goes to HTTP/1.1 clients chunked.
* Hop-by-hop headers (and those named in ``Connection``) are dropped both
  ways; ``X-Forwarded-*``, ``Forwarded`` and ``X-Request-ID`` are added.
* Trust headers never reach an app: ``x-clearway-identity``,
  ``x-clearway-pin-token`` and the pin header are stripped, and
  ``x-clearway-caller`` is set by the gateway on internal routes (the verified
  caller: ``app/revision/component``, or ``platform`` for the control plane,
  which passes every allow rule) and removed on public ones.  Who may call what is decided in
  ``_identity.py``; this module only feeds it header values.
* Pins: a request may name its revision, with the pin header or a
  ``clearway-revision`` cookie.  A revision the route gives a share of its
  traffic (weight > 0) is honoured without more: the request could have been
  sent there by chance, so the pin opens nothing, and it is how a browser
  stays on the canary during a rollout.  A header pin to any other revision
  (weight 0, or unknown) needs a valid pin token or gets a 403; a cookie
  naming one is ignored (the normal split picks), so a stale cookie after a
  rollback never breaks browsing.  The Cookie header reaches the app
  unchanged, and costs a parse only when it contains ``clearway-revision=``.
  A public route may be ``sticky`` (a rollout whose policy asks for it):
  while it splits its traffic, an app's answer to a request that named no
  revision sets that cookie to the revision that answered, so a browser stays
  on one side for its session instead of flipping between versions on every
  click.  Clients without cookies keep the per-request split.
* A request with two ``Host`` headers (or two of the trust headers) gets a
  400: a proxy that routes by one while the app reads the other can be made
  to send a request where its checks did not look.
* Retries: when nothing can have reached the app - the connect failed, or a
  *reused* pooled connection closed before any response byte - and, as nginx
  does, when the replica closed a new connection without a byte of answer (it
  crashed or was killed while answering) and the request is idempotent and
  bodiless: it goes to another replica, so a replica crash fails no GET.  A
  request with a body, or a POST, is never sent twice.  At most
  ``max_attempts`` sends in all, so a request that kills every replica it
  reaches stops after a few.
* Pipelined requests are parsed as they arrive but their events are queued
  and replayed once the response in front of them is complete.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import Callable
from typing import Any, cast

import httptools

from clearway.tasks import TaskSupervisor

from ._access_log import AccessLog
from ._error_pages import error_response, printable
from ._holding import TableChanges
from ._identity import (
    CALLER_HEADER,
    IDENTITY_HEADER,
    PIN_TOKEN_HEADER,
    Denial,
    IdentityVerifier,
    check_caller,
    check_pin,
    cookie_pin,
)
from ._metrics import Metrics, RevisionStats
from ._router import BoundRoute, BoundTarget, Router
from ._settings import GatewaySettings
from ._upstream import Endpoint, UpstreamConnection

__all__ = ["ClientConnection", "ProxyContext"]


class ConnectionState(enum.Enum):
    """Where a client connection is in its request/response cycle."""

    #: Between requests; the keep-alive idle timer runs.
    IDLE = "idle"
    #: A request started; the header timer runs until its head is complete.
    READING_HEAD = "reading-head"
    #: The head is parsed; waiting for a replica connection (hold, connect).
    DISPATCHING = "dispatching"
    #: The request went to a replica; its body and the response are relayed.
    PROXYING = "proxying"
    #: A 101 switched the connection to a raw two-way byte pipe.
    UPGRADED = "upgraded"
    #: Closed or closing; every further event is ignored.
    CLOSED = "closed"


class _Paused(enum.IntFlag):
    """Reasons for not reading from the client (reading resumes when none is left)."""

    UPSTREAM_FULL = 1  # the replica's socket buffer is full
    BODY_BUFFERED = 2  # body arrived before the replica connection, buffer full
    PIPELINED = 4  # a pipelined request waits behind the current one


class _Body(enum.IntEnum):
    """How the response body is framed towards the client."""

    NONE = 0  # HEAD, 204, 304: no body at all
    PASS = 1  # Content-Length, or close-delimited to an HTTP/1.0 client: bytes as-is
    CHUNK = 2  # re-chunked (the replica sent chunked or close-delimited)


# Enum members as module constants, for the hot path.  On Python 3.11 reading
# ``ConnectionState.IDLE`` goes through EnumType's Python-level ``__getattr__``
# hook (about 1k machine instructions a time, measured with cachegrind); a
# proxied request read a dozen of them, ~10% of its cost.  A global is cheap.
_IDLE = ConnectionState.IDLE
_READING_HEAD = ConnectionState.READING_HEAD
_DISPATCHING = ConnectionState.DISPATCHING
_PROXYING = ConnectionState.PROXYING
_UPGRADED = ConnectionState.UPGRADED
_CLOSED = ConnectionState.CLOSED
_UPSTREAM_FULL = _Paused.UPSTREAM_FULL
_BODY_BUFFERED = _Paused.BODY_BUFFERED
_PIPELINED = _Paused.PIPELINED
_BODY_NONE = _Body.NONE
_BODY_PASS = _Body.PASS
_BODY_CHUNK = _Body.CHUNK

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_REQUEST_SPECIAL = frozenset(
    {
        b"host", b"cookie", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
        b"proxy-connection", b"te", b"trailer", b"upgrade", b"expect", b"x-request-id",
        b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
        IDENTITY_HEADER, PIN_TOKEN_HEADER, CALLER_HEADER, b"x-clearway-revision",
    }
)
#: On a 503 for a revision that is starting: when to try again (seconds).
_RETRY_SOON = b"retry-after: 1\r\n"

#: The default pin header; a route may name another (then it is removed separately).
_DEFAULT_PIN = b"x-clearway-revision"
#: What a Cookie header must contain to be parsed for a pin (most never are).
_PIN_COOKIE_MARK = b"clearway-revision="
#: Set on a sticky split route's answers to a request that named no revision: the
#: browser stays on the revision it got for the rest of its session (a session
#: cookie, HttpOnly: scripts have no use for it).
_STICKY_COOKIE = b"set-cookie: clearway-revision="
_STICKY_ATTRIBUTES = b"; Path=/; HttpOnly; SameSite=Lax\r\n"
_WWW_AUTHENTICATE = b'www-authenticate: Bearer realm="clearway"\r\n'
_RESPONSE_SPECIAL = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
        b"transfer-encoding", b"upgrade", b"x-request-id", b"content-length",
    }
)
_CONNECTION_TOKENS_KNOWN = frozenset({b"close", b"keep-alive", b"upgrade"})
# Connection values that name no other header (the common case: nothing to drop).
_CONNECTION_PLAIN = frozenset({b"close", b"keep-alive", b"upgrade"})
# Characters allowed in a client-supplied X-Request-ID (anything else: we make one).
_REQUEST_ID_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:+/="
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Status lines up to the reason, made once (formatting one costs ~1% of a request).
_STATUS_PREFIX = {status: b"HTTP/1.1 %d " % status for status in range(100, 600)}
_NEVER = float("inf")
#: How often the watchdog checks connection deadlines (timeouts fire up to this late).
WATCHDOG_INTERVAL = 0.05


class ProxyContext:
    """Everything the connections of one gateway share."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        settings: GatewaySettings,
        router: Router,
        metrics: Metrics,
        supervisor: TaskSupervisor,
        access_log: AccessLog | None,
        verifier: IdentityVerifier | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.router = router
        self.metrics = metrics
        self.supervisor = supervisor
        self.access_log = access_log
        self.verifier = verifier if verifier is not None else IdentityVerifier(None, identities=router.table.identities)
        self.changes = TableChanges()
        self.connections: set[ClientConnection] = set()
        #: Set by a graceful shutdown: finish in-flight requests, keep no connection alive.
        self.closing = False
        self.all_closed = asyncio.Event()
        self._id_prefix = os.urandom(6).hex().encode("ascii")
        self._id_counter = 0

    def new_request_id(self) -> bytes:
        """A request id unique for this process and, with its random prefix, beyond."""
        self._id_counter += 1
        return b"%s-%x" % (self._id_prefix, self._id_counter)

    async def run_watchdog(self) -> None:
        """Enforce every connection's timeouts (a supervised task).

        One sweep over the connections every ``WATCHDOG_INTERVAL`` replaces
        three timer handles created and cancelled per request.
        """
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.check_deadline(now)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self.closing and not self.connections:
            self.all_closed.set()


class ClientConnection(asyncio.Protocol):
    """Parses requests from one client and proxies each to a replica."""

    __slots__ = (
        "_attempts",
        "_body_chunked",
        "_body_expected",
        "_body_sent",
        "_client_full",
        "_ctx",
        "_deadline",
        "_deferred",
        "_early",
        "_endpoint",
        "_expect",
        "_fwd_for",
        "_head",
        "_head_bytes",
        "_headers",
        "_held_at",
        "_host",
        "_hostkey",
        "_identity",
        "_keep_alive",
        "_loop",
        "_method",
        "_out",
        "_parser",
        "_parser_upgraded",
        "_path",
        "_paused",
        "_peer",
        "_peer_bytes",
        "_pending",
        "_pending_size",
        "_released_at",
        "_request_done",
        "_request_id",
        "_resp_body",
        "_resp_close_delimited",
        "_resp_sent",
        "_resp_started",
        "_resp_status",
        "_route",
        "_settings",
        "_shard",
        "_started",
        "_state",
        "_stats",
        "_sticky",
        "_target",
        "_task",
        "_transport",
        "_upgrade",
        "_upstream",
        "_upstream_address",
        "_url",
        "_version",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx
        self._loop = ctx.loop
        self._settings = ctx.settings
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._state = _IDLE
        self._paused = 0
        #: When the current phase times out (idle, head, response); checked by
        #: the context's watchdog, so arming a timeout is one float store.
        self._deadline = _NEVER
        self._deferred: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None
        self._out: list[bytes] = []
        self._peer = "-"
        self._peer_bytes = b"-"
        self._fwd_for = b"for=unknown"
        self._parser_upgraded = False
        self._early: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        #: The client's socket buffer is full: do not read responses for it.
        self._client_full = False
        self._reset()

    def _reset(self) -> None:
        """Forget the finished request (keep-alive: the next one starts clean)."""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._method = b""
        self._version = "1.1"
        self._keep_alive = True
        self._host = b""
        self._hostkey = b""
        self._identity: bytes | None = None
        self._path = b""
        self._route: BoundRoute | None = None
        self._target: BoundTarget | None = None
        self._stats: RevisionStats | None = None
        self._endpoint: Endpoint | None = None
        #: The shard of the request's key on a route with key affinity; -1: none.
        self._shard = -1
        #: The response sets the pin cookie: a sticky split, and the request named no revision.
        self._sticky = False
        #: The replica that answered, for the access log (the endpoint is released first).
        self._upstream_address = ""
        self._upstream: UpstreamConnection | None = None
        self._head = b""
        self._request_id = b""
        self._body_expected = False
        self._body_chunked = False
        self._body_sent = False
        self._request_done = False
        self._expect = False
        self._upgrade: bytes | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._resp_started = False
        self._resp_status = 0
        self._resp_body = _BODY_NONE
        self._resp_close_delimited = False
        self._resp_sent = 0
        self._attempts = 0
        self._started = 0.0
        #: When the request began to be held, and when it was then sent to a
        #: replica (0.0: not held / not released); only held requests set them.
        self._held_at = 0.0
        self._released_at = 0.0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._ctx.connections.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            ip = str(peer[0])
            self._peer = ip
            self._peer_bytes = ip.encode("ascii")
            self._fwd_for = (b'for="[%s]"' if ":" in ip else b"for=%s") % ip.encode("ascii")
        self._deadline = self._loop.time() + self._settings.header_timeout

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is _UPGRADED:
            if self._upstream is not None:
                self._upstream.write(data)
            return
        if state is _CLOSED:
            return
        if self._parser_upgraded:
            # Bytes after an upgrade request, before the replica said 101.
            self._early.append(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._parser_upgraded = True
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            if offset < len(data):
                self._early.append(data[offset:])
        except httptools.HttpParserError as exc:
            if self._head_bytes > self._settings.max_head_bytes:
                self._head_too_large()
            else:
                self._malformed(exc)
            return
        if self._state is _READING_HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self._settings.max_head_bytes:
                self._head_too_large()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        self._state = _CLOSED
        self._cancel_timers()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        conn = self._upstream
        if conn is not None:
            self._upstream = None
            conn.detach()
            conn.close()
            self._release_endpoint()
        if self._stats is not None and state not in (_IDLE, _UPGRADED):
            # The client went away mid-request (nginx's 499).
            self._record(499)
        self._ctx.connection_closed(self)

    def pause_writing(self) -> None:
        self._client_full = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    # -- httptools callbacks (request side) ----------------------------------------

    def on_message_begin(self) -> None:
        if self._state is not _IDLE or self._deferred is not None:
            if self._state is _CLOSED:
                return
            self._defer(self._begin, ())
            self._pause(_PIPELINED)
            return
        self._begin()

    def _begin(self) -> None:
        self._state = _READING_HEAD
        self._deadline = self._loop.time() + self._settings.header_timeout

    def on_url(self, url: bytes) -> None:
        if self._deferred is not None:
            self._defer(self.on_url, (url,))
            return
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._deferred is not None:
            self._defer(self.on_header, (name, value))
            return
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        # The parser's view of the message must be read now: for a pipelined
        # request replayed later it will describe a later message.
        parser = self._parser
        if self._deferred is not None:
            facts = (parser.get_method(), parser.get_http_version(), parser.should_keep_alive(), parser.should_upgrade())
            self._defer(self._head_complete, facts)
            return
        if self._state is not _CLOSED:
            self._head_complete(
                parser.get_method(), parser.get_http_version(), parser.should_keep_alive(), parser.should_upgrade()
            )

    def on_body(self, body: bytes) -> None:
        if self._deferred is not None:
            self._defer(self.on_body, (body,))
            return
        if self._state is _CLOSED:
            return
        if self._body_chunked:
            self._send_body(b"%x\r\n" % len(body))
            self._send_body(body)
            self._send_body(b"\r\n")
        else:
            self._send_body(body)

    def on_message_complete(self) -> None:
        if self._deferred is not None:
            self._defer(self.on_message_complete, ())
            return
        if self._state is _CLOSED:
            return
        if self._request_done or self._state is _IDLE:
            return  # a bodiless request was complete at its head already
        self._request_done = True
        if self._body_chunked:
            self._send_body(b"0\r\n\r\n")

    def _defer(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self._deferred is None:
            self._deferred = []
        self._deferred.append((fn, args))

    def _replay_deferred(self) -> None:
        """Run the queued events of pipelined requests until one is in flight again."""
        events = self._deferred
        self._deferred = None
        if not events:
            self._resume(_PIPELINED)
            return
        for index, (fn, args) in enumerate(events):
            if fn == self._begin and self._state is not _IDLE:
                self._deferred = events[index:]
                return
            if self._state is _CLOSED:
                return
            fn(*args)
        self._resume(_PIPELINED)

    # -- the request head ------------------------------------------------------

    def _head_complete(self, method: bytes, version: str, keep_alive: bool, upgradable: bool) -> None:
        settings = self._settings
        self._deadline = _NEVER
        if self._head_bytes > settings.max_head_bytes:
            self._head_too_large()
            return
        self._state = _DISPATCHING
        self._started = self._loop.time()
        self._method = method
        self._version = version
        self._keep_alive = keep_alive and not self._ctx.closing

        url = self._url
        if url[:1] != b"/":
            if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
                try:
                    parsed = httptools.parse_url(url)
                except httptools.HttpParserInvalidURLError:
                    self._malformed(None)
                    return
                url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            elif not (url == b"*" and method == b"OPTIONS"):
                self._malformed(None)
                return
        query_at = url.find(b"?")
        path = self._path = url if query_at < 0 else url[:query_at]

        host: bytes | None = None
        xff: bytes | None = None
        forwarded: bytes | None = None
        request_id: bytes | None = None
        connection: bytes | None = None
        chunked = False
        length = b""
        upgrade: bytes | None = None
        identity: bytes | None = None
        pin_token: bytes | None = None
        pin: bytes | None = None
        pin_cookie: bytes | None = None
        duplicate: bytes | None = None
        kept: list[bytes] = []
        add = kept.extend
        special = _REQUEST_SPECIAL
        for name, value in self._headers:
            lname = name.lower()
            if lname not in special:
                add((name, b": ", value, b"\r\n"))
            elif lname == b"host":
                if host is not None:
                    duplicate = name
                host = value
                add((name, b": ", value, b"\r\n"))
            elif lname == b"cookie":
                add((name, b": ", value, b"\r\n"))
                if pin_cookie is None and _PIN_COOKIE_MARK in value:
                    pin_cookie = value
            elif lname == b"content-length":
                length = value
                add((name, b": ", value, b"\r\n"))
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"connection":
                connection = value if connection is None else connection + b"," + value
            elif lname == b"upgrade":
                upgrade = value
            elif lname == b"expect":
                self._expect = value.strip().lower() == b"100-continue"
            elif lname == b"x-request-id":
                request_id = value
            elif lname == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
            elif lname == b"forwarded":
                forwarded = value if forwarded is None else forwarded + b", " + value
            elif lname == IDENTITY_HEADER:
                if identity is not None:
                    duplicate = name
                identity = value
            elif lname == PIN_TOKEN_HEADER:
                if pin_token is not None:
                    duplicate = name
                pin_token = value
            elif lname == _DEFAULT_PIN:
                if pin is not None:
                    duplicate = name
                pin = value
            # keep-alive, proxy-connection, te, trailer, x-forwarded-proto/-host,
            # x-clearway-caller: dropped

        if duplicate is not None:
            self._malformed(
                None,
                f"The request has more than one {printable(duplicate)} header. Send exactly one.",
            )
            return

        if connection is not None and connection.lower() not in _CONNECTION_PLAIN:
            kept = _drop_connection_listed(kept, connection)

        if request_id is not None and 0 < len(request_id) <= 200 and not request_id.translate(None, _REQUEST_ID_CHARS):
            self._request_id = request_id
        else:
            self._request_id = self._ctx.new_request_id()

        if host is None:
            if self._version != "1.0":
                self._malformed(None, "The request has no Host header, which HTTP/1.1 requires.")
                return
            host = b""
        self._host = host
        hostkey = host.lower()
        colon = hostkey.rfind(b":")
        if colon >= 0 and b"]" not in hostkey[colon:]:
            hostkey = hostkey[:colon]
        if hostkey.endswith(b"."):
            hostkey = hostkey[:-1]
        self._hostkey = hostkey

        self._body_chunked = chunked
        self._body_expected = chunked or (length.strip() not in (b"", b"0"))
        if upgrade is not None and upgradable:
            self._upgrade = upgrade
            self._keep_alive = False  # after an upgrade attempt the connection is not reused
        if not self._body_expected:
            self._expect = False
            self._request_done = True  # the head is the whole request

        route = self._ctx.router.match(hostkey, path)
        if route is None:
            self._stats = self._ctx.metrics.unrouted
            self._stats.in_flight += 1
            self._respond_error(
                404,
                f"No app is served at host {printable(host)} path {printable(path)}; "
                "`clearway status` lists the apps and their URLs.",
            )
            return
        self._route = route

        if route.pin_header != _DEFAULT_PIN:
            # A route with its own pin header (rare): find it, and keep it from the app.
            pin = None
            for name, value in self._headers:
                if name.lower() == route.pin_header:
                    if pin is not None:
                        self._malformed(None, f"The request has more than one {printable(name)} header. Send exactly one.")
                        return
                    pin = value
            if pin is not None:
                kept = _drop_named(kept, route.pin_header)
        pinned: str | None = None
        if pin is not None:
            pinned = pin.decode("latin-1").strip()
            if route.weighted_target(pinned) is None:
                # Outside the split (weight 0, or unknown): only a pin token opens it.
                denial = check_pin(self._ctx.verifier, pin_token, route.app, pinned)
                if denial is not None:
                    self._deny(route, route.target_named(pinned), denial)
                    return
        elif pin_cookie is not None:
            pinned = cookie_pin(pin_cookie)
            if pinned is not None and route.weighted_target(pinned) is None:
                pinned = None  # stale (rolled back) or never ours: the normal split picks
        if pinned is None and route.sticky:
            self._sticky = True
        target = route.pick_target(pinned)
        if route.internal:
            caller = check_caller(self._ctx.verifier, identity, route.allow, route.description)
            if isinstance(caller, Denial):
                self._deny(route, target, caller)
                return
            self._identity = identity
            kept += (CALLER_HEADER, b": ", caller.header, b"\r\n")

        ip = self._fwd_for
        parts = [
            method, b" ",
            route.forward_path(path) + url[query_at:] if query_at >= 0 else route.forward_path(path),
            b" HTTP/1.1\r\n",
        ]
        parts += kept
        parts += (
            b"x-request-id: ", self._request_id,
            b"\r\nx-forwarded-for: ", (xff + b", " + self._peer_bytes if xff else self._peer_bytes),
            b"\r\nx-forwarded-proto: http\r\nx-forwarded-host: ", host,
            b"\r\nforwarded: ", (forwarded + b", " if forwarded else b""), ip,
            b';host="', host.replace(b'"', b""), b'";proto=http\r\n',
        )
        if chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        if self._upgrade is not None:
            parts += (b"connection: upgrade\r\nupgrade: ", self._upgrade, b"\r\n")
        parts.append(b"\r\n")
        self._head = b"".join(parts)

        if target is None:
            self._stats = self._ctx.metrics.stats(route.app, "", route.component)
            self._stats.in_flight += 1
            self._respond_error(
                503,
                f"The app {route.app!r} has no revision receiving traffic right now. "
                "Check `clearway status` for its rollout.",
            )
            return
        self._target = target
        stats = self._stats = target.stats
        stats.in_flight += 1

        if route.shards:
            self._shard = route.shard(self._headers, path)
        if target.endpoints:
            endpoint = route.pick_endpoint(target) if self._shard < 0 else route.pick_owner(target, self._shard)
            if endpoint is not None:
                conn = endpoint.take_idle()
                if conn is not None:
                    self._send(conn)
                    return
        self._start_slow_path()

    # -- sending the request -------------------------------------------------------

    def _send(self, conn: UpstreamConnection) -> None:
        """Write the request head (and any body received so far) to ``conn``."""
        self._state = _PROXYING
        conn.owner = self
        self._upstream = conn
        endpoint = self._endpoint = conn.endpoint
        endpoint.in_flight += 1
        self._upstream_address = endpoint.address
        if self._expect and not self._request_done and not self._pending:
            self._expect = False
            assert self._transport is not None
            self._transport.write(_CONTINUE)
        if self._pending:
            pending, self._pending, self._pending_size = self._pending, [], 0
            conn.writelines([self._head, *pending])
            self._body_sent = True
            self._resume(_BODY_BUFFERED)
        else:
            conn.write(self._head)
        assert self._route is not None
        self._deadline = self._loop.time() + self._route.timeout
        if self._client_full:
            conn.pause_reading()

    def _send_body(self, piece: bytes) -> None:
        conn = self._upstream
        if conn is not None:
            conn.write(piece)
            self._body_sent = True
            return
        self._pending.append(piece)
        self._pending_size += len(piece)
        if self._pending_size > self._settings.max_pending_body:
            self._pause(_BODY_BUFFERED)

    def _start_slow_path(self, avoid: Endpoint | None = None) -> None:
        assert self._route is not None and self._target is not None
        name = f"gateway request {self._request_id.decode('latin-1')} to {self._route.app}/{self._target.revision}"
        self._task = self._ctx.supervisor.start(name, self._slow_path(avoid), on_failure=self._on_task_failure)

    async def _slow_path(self, avoid: Endpoint | None = None) -> None:
        """Hold until the revision has replicas, connect (retrying on failure), send.

        ``avoid`` is a replica that just died answering this request: another
        is tried first, and it only if it is the only one (its socket outlives
        it, and its restart answers).
        """
        ctx = self._ctx
        route = self._route
        target = self._target
        assert route is not None and target is not None
        hold_deadline = self._loop.time() + self._settings.hold_timeout
        failed: set[Endpoint] = {avoid} if avoid is not None and len(target.endpoints) > 1 else set()
        last_error: BaseException | None = None
        while True:
            if not target.endpoints and not ctx.closing:
                stats = target.stats
                if stats.held >= self._settings.max_held:
                    self._task = None
                    self._respond_error(
                        503,
                        f"App {route.app!r} (revision {target.revision}) is starting and already has "
                        f"{stats.held} requests waiting for it; retry in a moment.",
                        _RETRY_SOON,
                    )
                    return
                stats.held += 1
                if not self._held_at:
                    # Counted once per request, however many reloads it waits through.
                    self._held_at = self._loop.time()
                    ctx.metrics.hold_started()
                try:
                    changed = await ctx.changes.wait(hold_deadline - self._loop.time())
                finally:
                    stats.held -= 1
                if not changed or ctx.closing:
                    self._task = None
                    self._respond_error(
                        503,
                        f"No replica of app {route.app!r} (revision {target.revision}) became ready "
                        f"within {self._settings.hold_timeout:g} s. Check `clearway status` and the app's logs.",
                        _RETRY_SOON,
                    )
                    return
                new_route = ctx.router.match(self._hostkey, self._path)
                if new_route is None:
                    self._task = None
                    self._respond_error(
                        404,
                        f"No app is served at host {printable(self._host)} path {printable(self._path)} "
                        "any more; `clearway status` lists the apps and their URLs.",
                    )
                    return
                if new_route.internal != route.internal:
                    self._task = None
                    self._respond_error(
                        503,
                        f"The route at host {printable(self._host)} path {printable(self._path)} changed "
                        "while the request waited. Retry it.",
                    )
                    return
                if new_route.internal:
                    # Policy and identities may have changed while we held the request.
                    caller = check_caller(ctx.verifier, self._identity, new_route.allow, new_route.description)
                    if isinstance(caller, Denial):
                        self._task = None
                        self._deny(new_route, new_route.target_named(target.revision), caller)
                        return
                new_target = new_route.target_named(target.revision)
                if new_target is None or (not new_target.endpoints and new_target.weight == 0):
                    new_target = new_route.pick_target(None) or new_target
                if new_target is None:
                    continue
                route, target = new_route, new_target
                self._switch_target(route, target)
                self._shard = route.shard(self._headers, self._path) if route.shards else -1
                continue
            if ctx.closing and not target.endpoints:
                self._task = None
                self._respond_error(503, "The gateway is shutting down. Retry the request.")
                return
            shard = self._shard
            endpoint = route.pick_endpoint(target, failed) if shard < 0 else route.pick_owner(target, shard, failed)
            if endpoint is None:
                self._task = None
                self._upstream_failed(last_error)
                return
            conn = endpoint.take_idle()
            if conn is None:
                try:
                    conn = await endpoint.connect()
                except (OSError, TimeoutError) as exc:
                    last_error = exc
                    failed.add(endpoint)
                    self._attempts += 1
                    if self._attempts >= self._settings.max_attempts:
                        self._task = None
                        self._upstream_failed(last_error)
                        return
                    continue
            self._task = None
            if self._state is _CLOSED:
                endpoint.release(conn)
                return
            if self._held_at and not self._released_at:
                self._released_at = self._loop.time()
                target.stats.record_hold(self._released_at - self._held_at)
            self._send(conn)
            return

    def _switch_target(self, route: BoundRoute, target: BoundTarget) -> None:
        if self._stats is not None:
            self._stats.in_flight -= 1
        self._route = route
        self._target = target
        self._stats = target.stats
        self._stats.in_flight += 1

    def _on_task_failure(self, exc: BaseException) -> None:
        self._task = None
        if self._state is not _CLOSED:
            self._respond_error(502, "The gateway failed while forwarding the request. Retry it; if it keeps failing, report a bug.")

    def _upstream_failed(self, error: BaseException | None) -> None:
        route, target = self._route, self._target
        assert route is not None and target is not None
        if isinstance(error, TimeoutError):
            self._respond_error(
                504,
                f"No replica of app {route.app!r} (revision {target.revision}) accepted a connection "
                f"within {self._settings.connect_timeout:g} s. Check the app's logs and `clearway status`.",
            )
        else:
            self._respond_error(
                502,
                f"Could not connect to any replica of app {route.app!r} (revision {target.revision}). "
                "It may have crashed; check the app's logs and `clearway status`.",
            )

    # -- the response (UpstreamOwner) ------------------------------------------------

    def on_upstream_head(self, conn: UpstreamConnection) -> None:
        self._deadline = _NEVER
        if self._released_at:
            # A held request's first response from the (likely cold) replica.
            stats = self._stats
            if stats is not None:
                stats.record_first_response(self._loop.time() - self._released_at)
            self._released_at = 0.0
        status = conn.parser.get_status_code()
        upgraded = status == 101
        if upgraded and self._upgrade is None:
            conn.detach()
            conn.close()
            self._upstream = None
            self._release_endpoint()
            self._respond_error(502, "The app answered 101 Switching Protocols to a request that asked for no upgrade.")
            return
        chunked = False
        has_length = False
        kept: list[bytes] = [_STATUS_PREFIX.get(status) or b"HTTP/1.1 %d " % status, conn.reason, b"\r\n"]
        add = kept.extend
        special = _RESPONSE_SPECIAL
        connection: bytes | None = None
        upgrade = b""
        for name, value in conn.headers:
            lname = name.lower()
            if lname not in special:
                add((name, b": ", value, b"\r\n"))
            elif lname == b"content-length":
                has_length = True
                add((name, b": ", value, b"\r\n"))
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"connection":
                connection = value if connection is None else connection + b"," + value
            elif lname == b"upgrade":
                upgrade = value
        if connection is not None and connection.lower() not in _CONNECTION_PLAIN:
            kept = kept[:3] + _drop_connection_listed(kept[3:], connection)
        kept += (b"x-request-id: ", self._request_id, b"\r\n")
        if self._sticky and self._target is not None:
            kept += (_STICKY_COOKIE, self._target.revision.encode("latin-1"), _STICKY_ATTRIBUTES)
        if self._shard >= 0:
            kept.append(b"x-clearway-shard: %d\r\n" % self._shard)
        self._resp_started = True
        self._resp_status = status
        if upgraded:
            kept += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n\r\n")
            self._out.append(b"".join(kept))
            return
        is_head = self._method == b"HEAD"
        if is_head or status == 204 or status == 304:
            body = _BODY_NONE
            if is_head and chunked and self._version != "1.0":
                kept.append(b"transfer-encoding: chunked\r\n")
        elif has_length:
            body = _BODY_PASS
        elif self._version == "1.0":
            body = _BODY_PASS
            self._keep_alive = False
            self._resp_close_delimited = not chunked
        else:
            body = _BODY_CHUNK
            self._resp_close_delimited = not chunked
            kept.append(b"transfer-encoding: chunked\r\n")
        if self._ctx.closing:
            self._keep_alive = False
        if not self._keep_alive:
            kept.append(b"connection: close\r\n")
        elif self._version == "1.0":
            kept.append(b"connection: keep-alive\r\n")
        kept.append(b"\r\n")
        self._resp_body = body
        self._out.append(b"".join(kept))
        if is_head:
            conn.end_message_at_head()
            self._response_complete(conn)

    def on_upstream_body(self, data: bytes) -> None:
        body = self._resp_body
        if body is _BODY_PASS:
            self._out.append(data)
        elif body is _BODY_CHUNK:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            return
        self._resp_sent += len(data)

    def on_upstream_complete(self, conn: UpstreamConnection) -> None:
        if self._resp_body is _BODY_CHUNK:
            self._out.append(b"0\r\n\r\n")
        self._response_complete(conn)

    def on_upstream_upgraded(self, conn: UpstreamConnection, data: bytes) -> None:
        self._state = _UPGRADED
        self._cancel_timers()
        if data:
            self._out.append(data)
        self.flush()
        self._record(101)
        self._stats = None
        early, self._early = self._early, []
        self._parser_upgraded = False
        for chunk in early:
            conn.write(chunk)

    def on_upstream_raw(self, data: bytes) -> None:
        if self._transport is not None and self._state is _UPGRADED:
            self._transport.write(data)

    def on_upstream_lost(self, conn: UpstreamConnection, reason: str) -> None:
        if conn is not self._upstream:
            return
        self._upstream = None
        self._release_endpoint()
        self._deadline = _NEVER
        state = self._state
        if state is _UPGRADED:
            if self._transport is not None:
                self._transport.close()
            return
        if state is _CLOSED:
            return
        if self._resp_started:
            if self._resp_close_delimited and self._resp_body is not _BODY_NONE:
                # The replica ended a close-delimited body: that is its normal end.
                if self._resp_body is _BODY_CHUNK:
                    self._out.append(b"0\r\n\r\n")
                self._response_complete(None)
            else:
                # Truncated response: the client must see the connection end too.
                self._keep_alive = False
                self._finish(self._resp_status)
            return
        if (
            not conn.received
            and self._method in _IDEMPOTENT
            and not self._body_expected
            and self._upgrade is None
            and self._attempts + 1 < self._settings.max_attempts
        ):
            # A pooled connection the replica closed before we used it: safe to resend.
            # A new one it closed without a byte of answer: the replica died answering;
            # an idempotent request may be sent again (RFC 9110 9.2.2), to another replica.
            self._attempts += 1
            self._state = _DISPATCHING
            self._start_slow_path(avoid=None if conn.reused else conn.endpoint)
            return
        route, target = self._route, self._target
        app = route.app if route is not None else "?"
        revision = target.revision if target is not None else "?"
        self._respond_error(
            502,
            f"The replica of app {app!r} (revision {revision}) closed the connection before "
            "answering. Check the app's logs; it may have crashed.",
        )

    def on_upstream_buffer_full(self) -> None:
        self._pause(_UPSTREAM_FULL)

    def on_upstream_buffer_drained(self) -> None:
        self._resume(_UPSTREAM_FULL)

    def flush(self) -> None:
        out = self._out
        if out and self._transport is not None:
            if len(out) == 1:
                self._transport.write(out[0])
            elif len(out) < 16:
                # Head and body of one upstream read: one joined write (one
                # send, and cheaper than uvloop's writelines for small pieces).
                self._transport.write(b"".join(out))
            else:
                self._transport.writelines(out)
            out.clear()

    # -- finishing ---------------------------------------------------------------------

    def _response_complete(self, conn: UpstreamConnection | None) -> None:
        """The whole response went to ``_out``: recycle the replica connection, finish."""
        if conn is not None and self._upstream is conn:
            self._upstream = None
            self._release_endpoint()
            if self._request_done:
                conn.endpoint.release(conn)
            else:
                conn.detach()
                conn.close()
        if not self._request_done:
            # The replica answered before the request body was complete; the
            # rest of the body is of no use to anyone.
            self._keep_alive = False
        self._finish(self._resp_status)

    def _deny(self, route: BoundRoute, target: BoundTarget | None, denial: Denial) -> None:
        """Refuse a request for access-control reasons, counted against its target revision."""
        revision = target.revision if target is not None else ""
        if self._stats is not None:
            self._stats.in_flight -= 1
        stats = self._stats = (
            target.stats if target is not None else self._ctx.metrics.stats(route.app, "", route.component)
        )
        stats.in_flight += 1
        self._ctx.metrics.deny(route.app, revision, route.component, denial.reason)
        self._respond_error(denial.status, denial.message, _WWW_AUTHENTICATE if denial.status == 401 else b"")

    def _respond_error(self, status: int, message: str, extra_headers: bytes = b"") -> None:
        """Answer with the gateway's own error page (no response started yet)."""
        if self._transport is None or self._state is _CLOSED:
            return
        if self._resp_started:
            self._keep_alive = False
            self._finish(self._resp_status)
            return
        conn = self._upstream
        if conn is not None:
            self._upstream = None
            conn.detach()
            conn.close()
            self._release_endpoint()
        if not self._request_done or self._ctx.closing:
            self._keep_alive = False
        self._resp_status = status
        self._resp_started = True
        self._out.append(
            error_response(
                status,
                message,
                request_id=self._request_id,
                keep_alive=self._keep_alive,
                head_only=self._method == b"HEAD",
                extra_headers=extra_headers,
            )
        )
        self._finish(status)

    def _finish(self, status: int) -> None:
        self.flush()
        self._deadline = _NEVER  # _cancel_timers(), inlined: this runs for every request
        self._record(status)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        transport = self._transport
        assert transport is not None
        if not self._keep_alive or self._parser_upgraded:
            self._state = _CLOSED
            conn = self._upstream
            if conn is not None:
                self._upstream = None
                conn.detach()
                conn.close()
                self._release_endpoint()
            transport.close()
            return
        self._reset()
        self._state = _IDLE
        self._deadline = self._loop.time() + self._settings.keepalive_timeout
        if self._deferred is not None:
            self._replay_deferred()

    def _record(self, status: int) -> None:
        stats = self._stats
        if stats is None:
            return
        self._stats = None
        stats.in_flight -= 1
        duration = self._loop.time() - self._started
        stats.record(status, duration)
        log = self._ctx.access_log
        if log is not None:
            log.log(
                self._peer,
                self._method,
                self._url,
                self._version,
                status,
                self._resp_sent,
                duration,
                stats.app,
                stats.revision,
                self._upstream_address,
                self._request_id,
            )

    def _release_endpoint(self) -> None:
        endpoint = self._endpoint
        if endpoint is not None:
            self._endpoint = None
            endpoint.in_flight -= 1

    # -- errors from the client side ---------------------------------------------------------

    def _malformed(self, exc: Exception | None, message: str | None = None) -> None:
        if self._resp_started or self._state in (_PROXYING, _UPGRADED):
            # Broken body framing mid-request: nothing sensible can be answered.
            self._abort()
            return
        self._keep_alive = False
        if self._stats is None:
            self._stats = self._ctx.metrics.unrouted
            self._stats.in_flight += 1
        detail = f" ({exc})" if exc is not None else ""
        self._respond_error(
            400,
            message or f"The request is not valid HTTP/1.1{detail}. Check the client that sent it.",
        )

    def _head_too_large(self) -> None:
        self._keep_alive = False
        if self._stats is None:
            self._stats = self._ctx.metrics.unrouted
            self._stats.in_flight += 1
        self._respond_error(
            413,
            f"The request line and headers are larger than {self._settings.max_head_bytes // 1024} KiB. "
            "Send large data in the request body instead.",
        )

    def _abort(self) -> None:
        self._keep_alive = False
        self._state = _CLOSED
        if self._transport is not None:
            self._transport.abort()

    # -- timers ------------------------------------------------------------------------------

    def _cancel_timers(self) -> None:
        self._deadline = _NEVER

    def check_deadline(self, now: float) -> None:
        """Called by the watchdog: act on the current phase's timeout if it passed."""
        if now < self._deadline:
            return
        self._deadline = _NEVER
        state = self._state
        if state is _IDLE:
            self._on_idle_timeout()
        elif state is _READING_HEAD:
            self._on_header_timeout()
        elif state is _PROXYING and not self._resp_started:
            self._on_response_timeout()

    def _on_idle_timeout(self) -> None:
        if self._state is _IDLE and self._transport is not None:
            self._state = _CLOSED
            self._transport.close()

    def _on_header_timeout(self) -> None:
        if self._state is _READING_HEAD:
            self._keep_alive = False
            if self._stats is None:
                self._stats = self._ctx.metrics.unrouted
                self._stats.in_flight += 1
            self._respond_error(
                408,
                f"The request head did not arrive within {self._settings.header_timeout:g} s. "
                "Send the request line and headers promptly.",
            )

    def _on_response_timeout(self) -> None:
        route, target = self._route, self._target
        assert route is not None and target is not None
        self._keep_alive = self._keep_alive and self._request_done
        self._respond_error(
            504,
            f"The app {route.app!r} (revision {target.revision}) did not answer within "
            f"{route.timeout:g} s. Check the app's logs, or raise the route's timeout.",
        )

    # -- client read pausing ---------------------------------------------------------------

    def _pause(self, reason: _Paused) -> None:
        if not self._paused and self._transport is not None:
            self._transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: _Paused) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self._transport is not None and self._state is not _CLOSED:
            self._transport.resume_reading()

    # -- graceful shutdown -------------------------------------------------------------------

    def close_if_idle(self) -> None:
        """Close now if between requests (used when the gateway shuts down)."""
        if self._state is _IDLE and self._deferred is None and self._transport is not None:
            self._state = _CLOSED
            self._transport.close()

    def abort(self) -> None:
        """Cut the connection (shutdown grace period over)."""
        if self._transport is not None:
            self._transport.abort()


def _drop_named(kept: list[bytes], lname: bytes) -> list[bytes]:
    """Remove every header called ``lname`` from a flat name/": "/value/CRLF list."""
    result: list[bytes] = []
    for i in range(0, len(kept), 4):
        if kept[i].lower() != lname:
            result += kept[i : i + 4]
    return result


def _drop_connection_listed(kept: list[bytes], connection: bytes) -> list[bytes]:
    """Remove headers named in a Connection header from a flat name/": "/value/CRLF list."""
    listed = {t.strip().lower() for t in connection.split(b",")} - _CONNECTION_TOKENS_KNOWN
    if not listed:
        return kept
    result: list[bytes] = []
    for i in range(0, len(kept), 4):
        if kept[i].lower() not in listed:
            result += kept[i : i + 4]
    return result
