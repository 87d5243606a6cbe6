"""The function server: ``function_app(func, spec)``, the ASGI app a function replica serves.

A function replica runs like a service replica (uvicorn on the unix socket the
supervisor passes as fd 3, `clearway.runtime.replica`); only the web app is
ours instead of the user's. Paths, as the replica sees them:

* ``GET /_clearway/health``: 200 without calling the function (the supervisor's
  probes; a probe must never cost an invocation);
* ``POST /_events``: CloudEvents 1.0 over HTTP, parsed by the ``cloudevents``
  SDK in binary, structured and batch (``application/cloudevents-batch+json``)
  mode. The function is called once per event, in order, with the event;
  200 ``{"results": [...]}``. An unreadable event is a 400 naming the reason;
* anything else is an *invocation*.

**Why JSON keyword arguments.** Every caller already speaks it (``curl``,
another language, the platform's own dispatcher), it maps one-to-one onto a
Python call (``{"width": 10}`` is ``resize(width=10)``), and the signature's
annotations say how to check it, with pydantic, so the function never sees a
string where it declared an ``int``. The body, when there is one, must be a
JSON object; otherwise (a ``GET``, an empty ``POST``) the query string gives the
arguments. ``bytes`` parameters take base64 in JSON, as ``.remote()`` sends
them. A parameter annotated ``cw.Request`` gets the raw request instead; the
other parameters then come from the query string (what they do not name is
left to the function) and the body is the function's. A returned ``cw.Response`` is sent as is; anything else is sent as
JSON (200).

**Why 400 and 422 differ.** 400 means the request could not be read at all
(the body is not JSON, not an object, not a CloudEvent): fix the client's
encoding. 422 means it was read, but the arguments do not fit the signature (a
missing or unknown argument, a wrong type): fix the values; ``details`` names
each field. Both are the caller's fault, and the durable dispatcher does not
retry either (a retry would fail the same way). 413 answers bodies over 6 MiB
(Lambda's synchronous limit, a well-known bound) before they are read.

**Failures.** An exception is a 500 with an ``error_id``; the traceback goes
to stderr, every line prefixed ``[<error_id>] ``, so ``clearway logs APP |
grep <error_id>`` shows it whole. Internal callers (the gateway names them in
``x-clearway-caller``, which it strips from public requests) also get the
exception's type and message; public callers get only the id, as an exception
message can carry internals. An invocation running past ``spec.timeout`` is a
504 with an error id, and the stack it was stuck at goes to stderr the same way.

**Why a thread pool, and what a timeout leaves behind.** ``async def``
functions run on the event loop, awaited in the request's own task (a task of
their own would cost about half the throughput of a trivial function); plain
functions run in a thread pool so that a slow or blocking one does not stall
the loop, the other requests and the health probes. A timed-out coroutine is
cancelled (one that swallows the cancellation holds its request until it
ends). A timed-out *thread* cannot be: Python has no way to stop one. It runs on until it returns, holding its
pool thread, and its result is dropped (a line says when it finally ends). A
function that hangs every time therefore fills the pool, and later calls wait
for a thread and time out too: the replica keeps answering 504 rather than
hanging, and the autoscaler sees the load. Once half the pool is held by
timed-out calls, the health path answers 503: the supervisor's liveness probe
then takes the replica out of rotation and restarts it, which is the only way
to get those threads back. The pool is large
(``max(32, 2 * max_concurrency)`` threads) because ``max_concurrency`` is a
target for the autoscaler, not a limit the replica enforces.

**Why per-invocation prefixes.** A replica serves many invocations at once,
and their prints interleave in one log. While an invocation runs, what it
prints to stdout or stderr (``print``, a thread it started, a logging handler
on those streams) is prefixed ``[<id>] ``: the durable invocation id
(``x-clearway-invocation-id``) when the platform sent one, else the request id
(``x-request-id``). Streams are wrapped once; a context variable carries the
current invocation, so concurrent ones on the loop and in threads never mix,
and partial lines are held per invocation until their newline.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, TextIO, cast
from urllib.parse import parse_qsl

import pydantic_core
from pydantic import ConfigDict, Field, ValidationError, create_model

from clearway.sdk.functions import Request, Response, parameter_types
from clearway.spec.model import FunctionSpec

__all__ = [
    "ATTEMPT_HEADER",
    "EVENTS_PATH",
    "HEALTH_PATH",
    "INVOCATION_HEADER",
    "MAX_BODY",
    "ASGIApp",
    "function_app",
    "parse_events",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Answered without calling the function (the supervisor's probes).
HEALTH_PATH = "/_clearway/health"
#: CloudEvents in, one call per event.
EVENTS_PATH = "/_events"
#: Set by the platform on durable invocations (spawned, events, schedules).
INVOCATION_HEADER = "x-clearway-invocation-id"
ATTEMPT_HEADER = "x-clearway-attempt"
#: The gateway's header naming an authenticated internal caller (absent on public routes).
CALLER_HEADER = "x-clearway-caller"
#: Request bodies above this are refused with 413.
MAX_BODY = 6 * 1024 * 1024

_BATCH = "application/cloudevents-batch+json"
_STRUCTURED = "application/cloudevents+json"


class _BadRequest(Exception):
    """The caller's fault: answered with ``status`` and a JSON error."""

    def __init__(self, status: int, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


class _TimedOut(Exception):
    def __init__(self, stack: str) -> None:
        super().__init__("timed out")
        self.stack = stack


def _new_error_id() -> str:
    return secrets.token_hex(8)


# -- per-invocation output ---------------------------------------------------------


@dataclass
class _Invocation:
    """What the output streams need to know about the invocation running in this context."""

    id: str
    #: Partial lines by stream (id of the wrapper), held until their newline.
    pending: dict[int, str] = field(default_factory=dict)


_current: contextvars.ContextVar[_Invocation | None] = contextvars.ContextVar("clearway_invocation", default=None)


class PrefixedStream:
    """A text stream that prefixes each line written during an invocation with its id.

    Outside an invocation (the runtime's own messages, import-time prints) it
    writes through unchanged.
    """

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        invocation = _current.get()
        if invocation is None:
            with self._lock:
                written = self.raw.write(text)
            return written
        key = id(self)
        lines = (invocation.pending.pop(key, "") + text).split("\n")
        rest = lines.pop()
        if rest:
            invocation.pending[key] = rest
        if lines:
            self.write_lines(f"[{invocation.id}] ", lines)
        return len(text)

    def write_lines(self, prefix: str, lines: Iterable[str]) -> None:
        """Whole lines, each with ``prefix``, in one write (lines of concurrent invocations never mix)."""
        out = "".join(f"{prefix}{line}\n" for line in lines)
        with self._lock:
            self.raw.write(out)
            self.raw.flush()

    def end(self, invocation: _Invocation) -> None:
        """The invocation is over: write what it left without a newline."""
        rest = invocation.pending.pop(id(self), None)
        if rest:
            self.write_lines(f"[{invocation.id}] ", [rest])

    def flush(self) -> None:
        with self._lock:
            self.raw.flush()

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        # fileno, isatty, encoding, buffer...: those of the real stream.
        return getattr(self.raw, name)


def _streams() -> tuple[PrefixedStream, PrefixedStream]:
    """sys.stdout and sys.stderr, wrapped (once per process)."""
    out, err = sys.stdout, sys.stderr
    if not isinstance(out, PrefixedStream):
        out = PrefixedStream(out)
        sys.stdout = cast(TextIO, out)
    if not isinstance(err, PrefixedStream):
        err = PrefixedStream(err)
        sys.stderr = cast(TextIO, err)
    return out, err


# -- arguments -----------------------------------------------------------------------


class _Arguments:
    """How a JSON object or a query string becomes a call: validated against the signature."""

    def __init__(self, func: Callable[..., Any], spec: FunctionSpec) -> None:
        try:
            types = parameter_types(func)
        except NameError as error:
            raise TypeError(
                f"function {spec.name!r}: an annotation names something that is not defined ({error}); "
                "import it in the function's module"
            ) from None
        signature = inspect.signature(func)
        self.request: str | None = None
        self.positional: list[str] = []
        fields: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        extra = False
        for index, (name, parameter) in enumerate(signature.parameters.items()):
            annotation = types[name]
            if annotation is Request:
                self.request = name
                continue
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                extra = True
                continue
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                self.positional.append(name)
            default = ... if parameter.default is inspect.Parameter.empty else parameter.default
            # Field names of our own, the parameter's name as alias: a parameter may be
            # called `json` or `copy` without shadowing BaseModel's attributes.
            fields[f"p{index}"] = (annotation, Field(default, alias=name))
            self.names[f"p{index}"] = name
        self.multi = {
            self.names[key] for key, (annotation, _) in fields.items() if _takes_many(annotation)
        }
        self.model = create_model(
            f"{spec.name.replace('-', '_')}_arguments",
            __config__=ConfigDict(
                extra="allow" if extra else "forbid",
                val_json_bytes="base64",
                arbitrary_types_allowed=True,
            ),
            **fields,
        )
        self.signature = "(" + ", ".join(
            f"{name}: {_type_name(types[name])}" for name in signature.parameters if name != self.request
        ) + ")"

    def from_json(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise _BadRequest(400, f"the body is not JSON ({error}): send the arguments as a JSON object") from None
        if not isinstance(data, dict):
            raise _BadRequest(
                400, f"the body is a JSON {type(data).__name__}, not an object: send {{\"argument\": value, ...}}"
            )
        return self._validate(lambda: self.model.model_validate_json(body))

    def from_query(self, query_string: str, *, only_known: bool = False) -> dict[str, Any]:
        """``only_known``: ignore parameters the signature does not name (the raw request has them)."""
        known = set(self.names.values())
        values: dict[str, Any] = {}
        for key, value in parse_qsl(query_string, keep_blank_values=True):
            if only_known and key not in known:
                continue
            if key in self.multi:
                values.setdefault(key, []).append(value)
            else:
                values[key] = value
        return self._validate(lambda: self.model.model_validate(values))

    def _validate(self, validate: Callable[[], Any]) -> dict[str, Any]:
        try:
            model = validate()
        except ValidationError as error:
            details = json.loads(error.json(include_url=False, include_input=False))
            summary = "; ".join(
                f"{'.'.join(str(p) for p in item['loc']) or 'arguments'}: {item['msg']}" for item in details
            )
            raise _BadRequest(422, f"the arguments do not fit {self.signature}: {summary}", details) from None
        arguments = {self.names[key]: getattr(model, key) for key in model.model_fields_set}
        arguments.update(model.__pydantic_extra__ or {})
        return arguments

    def call_args(self, arguments: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional-only parameters out of ``arguments``, in order, as far as they were given."""
        args = []
        for name in self.positional:
            if name not in arguments:
                break
            args.append(arguments.pop(name))
        return tuple(args), arguments


def _takes_many(annotation: Any) -> bool:
    """Whether a query parameter repeated (``?tag=a&tag=b``) should arrive as a list."""
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and getattr(annotation, "__metadata__", None) is not None:  # Annotated[...]
        return _takes_many(annotation.__origin__)
    return annotation in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset)


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


# -- the server ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One HTTP request to the function, read."""

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes
    id: str
    """What its output is prefixed with: the durable invocation's id, else the request's."""


def _call_id(headers: dict[str, str]) -> str:
    """The durable invocation's id when the platform sent one (only internal callers can:
    the gateway names them in ``x-clearway-caller``), else the gateway's request id."""
    if CALLER_HEADER in headers and INVOCATION_HEADER in headers:
        return headers[INVOCATION_HEADER]
    return headers.get("x-request-id") or secrets.token_hex(6)


class _FunctionServer:
    def __init__(self, func: Callable[..., Any], spec: FunctionSpec) -> None:
        self.func = func
        self.spec = spec
        self.arguments = _Arguments(func, spec)
        self.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(
            getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
        )
        self.event_parameter = _event_parameter(func, self.arguments)
        if spec.events:
            # Loaded now rather than on the first event (about 60 ms): a subscriber will need it.
            import cloudevents.v1.http  # noqa: F401
        self.pool_size = max(32, 2 * spec.max_concurrency)
        self.pool = ThreadPoolExecutor(max_workers=self.pool_size, thread_name_prefix=f"clearway-{spec.name}")
        self.streams: tuple[PrefixedStream, PrefixedStream] | None = None
        #: Timed-out calls whose threads still run (see the module docstring).
        self.stuck = 0
        self.stuck_limit = max(1, self.pool_size // 2)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not for functions (uvicorn closes the connection)
        if self.streams is None:
            self.streams = _streams()
        path: str = scope["path"]
        method: str = scope["method"]
        if path == HEALTH_PATH:
            if self.stuck >= self.stuck_limit:
                reason = f"{self.stuck} timed-out calls still hold threads of {self.pool_size}: restart me"
                await _send(send, 503, _json({"ok": False, "reason": reason}, "health"))
                return
            await _send(send, 200, b'{"ok":true}')
            return
        headers = _headers(scope)
        try:
            body = await _read_body(headers, receive)
        except _BadRequest as error:
            await _send_error(send, error.status, error.message)
            return
        call = _Call(
            method,
            path,
            scope.get("query_string", b"").decode("latin-1"),
            headers,
            body,
            id=_call_id(headers),
        )
        if path == EVENTS_PATH:
            if method != "POST":
                await _send_error(send, 405, f"{EVENTS_PATH} takes CloudEvents by POST")
                return
            status, payload = await self._events(call)
        else:
            status, payload = await self._invoke(call)
        if isinstance(payload, Response):
            await _send_response(send, payload)
        else:
            await _send(send, status, payload)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.streams = _streams()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Threads of timed-out calls may never end: do not wait for them.
                self.pool.shutdown(wait=False, cancel_futures=True)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _invoke(self, call: _Call) -> tuple[int, bytes | Response]:
        try:
            if self.arguments.request is not None:
                arguments = self.arguments.from_query(call.query_string, only_known=True)
                arguments[self.arguments.request] = Request(
                    method=call.method,
                    path=call.path,
                    query=dict(parse_qsl(call.query_string, keep_blank_values=True)),
                    headers=call.headers,
                    body=call.body,
                    query_string=call.query_string,
                )
            elif call.body:
                arguments = self.arguments.from_json(call.body)
            else:
                arguments = self.arguments.from_query(call.query_string)
        except _BadRequest as error:
            return error.status, _error_body(error.message, details=error.details)
        args, kwargs = self.arguments.call_args(arguments)
        return await self._run(call, args, kwargs)

    async def _events(self, call: _Call) -> tuple[int, bytes | Response]:
        try:
            events = parse_events(call.headers, call.body)
        except ValueError as error:
            return 400, _error_body(str(error))
        results: list[Any] = []
        for index, event in enumerate(events):
            args: tuple[Any, ...]
            kwargs: dict[str, Any]
            if self.event_parameter is None:
                args, kwargs = (), {}
            elif self.event_parameter == "":
                args, kwargs = (event,), {}
            else:
                args, kwargs = (), {self.event_parameter: event}
            status, payload = await self._run(
                call, args, kwargs, collect=True, index=index if len(events) > 1 else None
            )
            if status != 200:
                return status, payload
            results.append(payload)
        return 200, _json({"results": results}, self.spec.name)

    async def _run(
        self,
        call: _Call,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        collect: bool = False,
        index: int | None = None,
    ) -> tuple[int, Any]:
        """Call the function as one invocation: prefixed output, timeout, errors.

        Returns the status and what to send: a JSON body or a ``Response``; with
        ``collect``, a success returns the result itself (events gather them).
        ``index``: which event of a batch, for the messages.
        """
        invocation = _Invocation(call.id)
        token = _current.set(invocation)
        try:
            result = await self._call_with_timeout(args, kwargs)
        except _TimedOut as timeout:
            error_id = _new_error_id()
            self._report(
                error_id,
                call,
                f"timed out after {self.spec.timeout:g}s" + (f" on event {index}" if index is not None else ""),
                timeout.stack,
            )
            return 504, _error_body(
                f"function {self.spec.name!r} did not finish within its timeout of {self.spec.timeout:g}s",
                error_id=error_id,
                index=index,
            )
        except (Exception, SystemExit) as error:  # sys.exit() in a function fails the call, not the replica
            error_id = _new_error_id()
            self._report(
                error_id,
                call,
                "raised" + (f" on event {index}" if index is not None else ""),
                "".join(traceback.format_exception(type(error), error, self._user_traceback(error.__traceback__))),
            )
            message = f"function {self.spec.name!r} failed"
            if CALLER_HEADER in call.headers:
                message += f": {type(error).__name__}: {error}"
            return 500, _error_body(message, error_id=error_id, index=index)
        finally:
            _current.reset(token)
            if self.streams is not None:
                for stream in self.streams:
                    stream.end(invocation)
        if collect:
            return 200, result
        if isinstance(result, Response):
            return result.status, result
        try:
            return 200, pydantic_core.to_json(result, bytes_mode="base64")
        except pydantic_core.PydanticSerializationError as error:
            error_id = _new_error_id()
            self._report(error_id, call, "returned a value JSON cannot carry", str(error))
            return 500, _error_body(
                f"function {self.spec.name!r} returned a {type(result).__name__}, which JSON cannot carry: "
                "return dicts, lists, strings, numbers, pydantic models or dataclasses, or a cw.Response",
                error_id=error_id,
            )

    async def _call_with_timeout(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        timeout = self.spec.timeout
        if self.is_async:
            return await self._await_within_timeout(self.func(*args, **kwargs))
        thread: list[int] = []

        def run() -> Any:
            thread.append(threading.get_ident())
            return self.func(*args, **kwargs)

        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(self.pool, context.run, run)
        done, _ = await asyncio.wait({future}, timeout=timeout)
        if not done:
            frame = sys._current_frames().get(thread[0]) if thread else None
            stack = self._stack(_thread_frames(frame)) if frame is not None else "(it is still waiting for a free thread)\n"
            invocation = context.get(_current)
            started = time.monotonic() - timeout
            self.stuck += 1
            future.add_done_callback(lambda done: self._late(done, invocation, started))
            raise _TimedOut(stack)
        return future.result()

    async def _await_within_timeout(self, coroutine: Awaitable[Any]) -> Any:
        """Await the function's coroutine in this task (no task of its own: cheaper), cancelled
        at the deadline like ``asyncio.timeout`` does, but after noting where it was stuck."""
        task = asyncio.current_task()
        assert task is not None
        stuck: list[str] = []

        def expire() -> None:
            stuck.append(self._stack(_coroutine_frames(task)))
            task.cancel()

        deadline = asyncio.get_running_loop().call_later(self.spec.timeout, expire)
        try:
            return await coroutine
        except asyncio.CancelledError:
            if stuck and task.uncancel() == 0:
                raise _TimedOut(stuck[0]) from None
            raise
        finally:
            deadline.cancel()

    def _user_traceback(self, tb: TracebackType | None) -> TracebackType | None:
        """The traceback from the function's own frame on: the server's frames above it are noise."""
        code = getattr(self.func, "__code__", None)
        found = tb
        while found is not None and found.tb_frame.f_code is not code:
            found = found.tb_next
        return found or tb

    def _stack(self, frames: list[FrameType]) -> str:
        """A stack (outermost first), formatted from the function's own frame on."""
        code = getattr(self.func, "__code__", None)
        start = next((i for i, f in enumerate(frames) if f.f_code is code), 0)
        return "".join(traceback.format_list(traceback.StackSummary.extract((f, f.f_lineno) for f in frames[start:])))

    def _late(self, done: asyncio.Future[Any], invocation: _Invocation | None, started: float) -> None:
        """A timed-out call in a thread has finished at last (its result is dropped)."""
        self.stuck -= 1
        if not done.cancelled():
            done.exception()  # retrieved: asyncio would log it as never retrieved
        if invocation is not None and not done.cancelled():
            _, err = self.streams or _streams()
            err.write_lines(
                f"[{invocation.id}] ",
                [f"[clearway] the timed-out call finished after {time.monotonic() - started:.1f}s; its result was dropped"],
            )

    def _report(self, error_id: str, call: _Call, what: str, text: str) -> None:
        """The failure on stderr, every line prefixed with its error id."""
        attempt = call.headers.get(ATTEMPT_HEADER)
        head = f"[clearway] function {self.spec.name!r} {what} (invocation {call.id}" + (
            f", attempt {attempt})" if attempt else ")"
        )
        lines = [head, *text.rstrip("\n").split("\n")]
        _, err = self.streams or _streams()
        err.write_lines(f"[{error_id}] ", lines)


def _coroutine_frames(task: asyncio.Task[Any]) -> list[FrameType]:
    """Where a task is suspended, through every ``await``, outermost first."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return frames


def _thread_frames(frame: FrameType) -> list[FrameType]:
    """A thread's stack from its current frame, outermost first."""
    frames = []
    current: FrameType | None = frame
    while current is not None:
        frames.append(current)
        current = current.f_back
    return frames[::-1]


def _event_parameter(func: Callable[..., Any], arguments: _Arguments) -> str | None:
    """Where an event goes: the parameter annotated ``CloudEvent``, else the first one
    (``""``: positionally), else nowhere (a function without parameters)."""
    types = parameter_types(func)
    for name, annotation in types.items():
        if getattr(annotation, "__name__", None) == "CloudEvent" and "cloudevents" in getattr(annotation, "__module__", ""):
            return name
    parameters = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.name != arguments.request and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    return "" if parameters else None


def parse_events(headers: dict[str, str], body: bytes) -> list[Any]:
    """The CloudEvents in one HTTP request, parsed by the ``cloudevents`` SDK: binary,
    structured or batch mode (``headers`` with lowercase names).

    Raises ``ValueError`` saying what is wrong (a 400 for the sender).
    """
    from cloudevents.v1.exceptions import GenericException
    from cloudevents.v1.http import from_http

    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == _BATCH:
        try:
            items = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"the CloudEvents batch is not JSON ({error})") from None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ValueError("a CloudEvents batch must be a JSON array of event objects")
        messages = [
            (f"event {n} of the batch", {"content-type": _STRUCTURED}, json.dumps(item).encode())
            for n, item in enumerate(items, 1)
        ]
    else:
        messages = [("the event", headers, body)]
    events = []
    for where, message_headers, message_body in messages:
        try:
            events.append(from_http(message_headers, message_body))
        except (GenericException, ValueError, TypeError) as error:
            raise ValueError(
                f"{where} is not a valid CloudEvent ({error}): send binary mode (ce-specversion, ce-type, "
                f"ce-source, ce-id headers), structured mode ({_STRUCTURED}) or a batch ({_BATCH})"
            ) from None
    return events


# -- HTTP plumbing ---------------------------------------------------------------------


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


async def _read_body(headers: dict[str, str], receive: Receive) -> bytes:
    length = headers.get("content-length")
    too_large = _BadRequest(413, f"the request body is over {MAX_BODY // (1024 * 1024)} MiB: send less")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            # Never call the function with half a body; the answer reaches no one.
            raise _BadRequest(400, "the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _json(value: Any, name: str) -> bytes:
    try:
        return pydantic_core.to_json(value, bytes_mode="base64")
    except pydantic_core.PydanticSerializationError:
        return _error_body(f"function {name!r} returned a value JSON cannot carry")


def _error_body(message: str, *, error_id: str | None = None, details: Any = None, index: int | None = None) -> bytes:
    body: dict[str, Any] = {"error": message}
    if error_id is not None:
        body["error_id"] = error_id
    if details is not None:
        body["details"] = details
    if index is not None:
        body["index"] = index
    return json.dumps(body).encode()


async def _send(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, status: int, message: str) -> None:
    await _send(send, status, _error_body(message))


async def _send_response(send: Send, response: Response) -> None:
    body = response.body.encode() if isinstance(response.body, str) else bytes(response.body)
    headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in response.headers.items()]
    names = {name for name, _ in headers}
    if b"content-type" not in names:
        kind = b"text/plain; charset=utf-8" if isinstance(response.body, str) else b"application/octet-stream"
        headers.append((b"content-type", kind))
    headers = [(k, v) for k, v in headers if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def function_app(func: Callable[..., Any], spec: FunctionSpec) -> ASGIApp:
    """The ASGI app that serves ``func`` as the function ``spec`` describes.

    Raises ``TypeError`` when the function's annotations cannot be resolved or
    turned into a validator (the replica reports it and exits at start-up).
    """
    return _FunctionServer(func, spec)

