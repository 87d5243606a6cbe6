"""Functions as the app's code sees them: the ``Function`` handle and the types a function uses.

``@app.function(...)`` records a ``FunctionSpec`` and returns a ``Function``: a
thin handle around the user's callable. Calling it calls the function right
here, like before it was decorated (tests and local scripts keep working);
``.remote()``, ``.spawn()`` and ``.map()`` call it *through the platform*:

* ``.remote(**kwargs)`` posts the arguments as a JSON object to the function's
  internal URL (``cw.service_url(name)``, through the gateway, which holds the
  request while a replica starts when the function is at zero) and returns the
  JSON result. It is synchronous: the caller waits, nothing is persisted.
* ``.spawn(**kwargs)`` asks the control plane to run it durably
  (``POST $CLEARWAY_CONTROL_URL/v1/replica/invocations``): the invocation is
  stored before the call returns, retried with backoff when it fails, and ends
  on a dead-letter list when every attempt failed. An ``idempotency_key`` makes
  a repeated spawn (a retried request, a crashed producer) return the first
  invocation instead of queueing a second.
* ``.map(items)`` is ``.remote`` over many inputs from a few threads, results in
  input order.

HTTP goes through ``urllib`` on purpose: this module is imported inside the
app's environment, which holds the app's dependencies and the replica runtime's
(``REPLICA_REQUIREMENTS``), not httpx. The opener ignores ``*_proxy`` variables,
because the gateway and the control plane are on this machine.

Arguments and results are JSON. ``bytes`` travel as (URL-safe) base64 strings,
the function side decodes them for ``bytes`` parameters, so a function taking
``data: bytes`` can be called with ``data=b"..."``.

``CloudEvent`` is the ``cloudevents`` SDK's own class (``cloudevents.v1.http``):
the events a function receives are built by that SDK, and users know its API
(``event["type"]``, ``event.data``). It is imported on first use, not with
``clearway``: the SDK is imported wherever an app is read, and most apps never
touch an event.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
import typing
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

import pydantic_core

from clearway.exceptions import FunctionError, SpecError
from clearway.sdk.identity import _need, identity_headers, service_url
from clearway.spec.model import FunctionSpec, ScheduleSpec, SourceLocation

if TYPE_CHECKING:
    from cloudevents.v1.http import CloudEvent

__all__ = ["CloudEvent", "Cron", "Every", "Function", "Job", "Request", "Response", "parameter_types"]

P = ParamSpec("P")
R = TypeVar("R")

#: Seconds a call may wait beyond the function's own timeout and start-up (the gateway's holding, the network).
_CALL_MARGIN = 10.0
#: Polling ``Job.result``: the first interval, doubled up to the last.
_POLL_FIRST = 0.05
_POLL_MAX = 1.0
#: At most this many ``.map`` calls in flight.
_MAP_THREADS = 32

# Never through a proxy: every URL here is the local gateway or control plane.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def __getattr__(name: str) -> Any:
    if name == "CloudEvent":
        from cloudevents.v1.http import CloudEvent

        return CloudEvent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _location(depth: int) -> str | None:
    frame = inspect.currentframe()
    for _ in range(depth + 1):
        frame = frame.f_back if frame is not None else None
    return None if frame is None else str(SourceLocation(file=frame.f_code.co_filename, line=frame.f_lineno))


def Cron(expression: str) -> ScheduleSpec:
    """A cron schedule for ``@app.function(schedule=...)``: ``cw.Cron("*/5 * * * *")``."""
    try:
        return ScheduleSpec(cron=expression)
    except ValueError as error:  # pydantic's ValidationError is a ValueError
        raise SpecError(_first_message(error), location=_location(1)) from None


def Every(seconds: float) -> ScheduleSpec:
    """An interval schedule for ``@app.function(schedule=...)``: ``cw.Every(30)`` runs it every 30 s."""
    try:
        return ScheduleSpec(every=seconds)
    except ValueError as error:
        raise SpecError(f"every: {_first_message(error)}", location=_location(1)) from None


def _first_message(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        return "; ".join(str(item["msg"]).removeprefix("Value error, ") for item in errors())
    return str(error)


@dataclass(frozen=True)
class Request:
    """The raw HTTP request, for a function with a parameter annotated ``cw.Request``.

    Its other parameters then come from the query string: the body is the
    function's to read.
    """

    method: str
    path: str
    """As the replica sees it: a public trigger keeps its path (``/resize/x``)."""
    query: Mapping[str, str]
    """The query parameters, the last value of each (``query_string`` has them all)."""
    headers: Mapping[str, str]
    """Lowercase names; repeated headers joined with ``", "``."""
    body: bytes
    query_string: str = ""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Response:
    """Returned by a function: sent as is instead of as a JSON result.

    A ``str`` body is sent as ``text/plain; charset=utf-8`` and ``bytes`` as
    ``application/octet-stream`` unless ``headers`` names a ``content-type``.
    """

    body: bytes | str = b""
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"Response status {self.status} is not an HTTP status (100-599)")


def _to_json(value: Any) -> bytes:
    return pydantic_core.to_json(value, bytes_mode="base64")


def _request(
    url: str, *, data: bytes | None, headers: Mapping[str, str], timeout: float, what: str
) -> tuple[int, bytes]:
    """(status, body) of one HTTP request; error statuses are answers too, not exceptions."""
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST", headers=dict(headers))
    try:
        with _opener.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise FunctionError(f"{what}: no answer from {url} ({reason})") from None


def _failure(what: str, status: int, body: bytes, *, app: str | None) -> FunctionError:
    """The ``FunctionError`` for an error answer: the function's own JSON error, or the body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    error_id: str | None = None
    details: str | None = None
    if isinstance(data, dict) and "error" in data:
        message = str(data["error"])
        error_id = str(data["error_id"]) if data.get("error_id") else None
        if data.get("details") is not None:
            details = json.dumps(data["details"], indent=2)
    else:
        message = body[:500].decode("utf-8", "replace").strip() or "(empty answer)"
    text = f"{what} answered {status}: {message}"
    if error_id is not None:
        text += f" (error id {error_id}: `clearway logs {app or 'APP'} | grep {error_id}` shows what happened)"
    return FunctionError(text, status=status, error_id=error_id, details=details)


def _control(path: str, *, data: Any | None, what: str, timeout: float = 30.0) -> Any:
    """One call to the control plane's replica channel, as this replica."""
    url = _need("CLEARWAY_CONTROL_URL").rstrip("/") + path
    headers = {"Authorization": f"Bearer {_need('CLEARWAY_REPLICA_TOKEN')}"}
    body = None
    if data is not None:
        body = _to_json(data)
        headers["Content-Type"] = "application/json"
    status, answer = _request(url, data=body, headers=headers, timeout=timeout, what=what)
    if not 200 <= status < 300:
        raise _failure(what, status, answer, app=os.environ.get("CLEARWAY_APP"))
    return json.loads(answer)


class Job:
    """A durable invocation started with ``.spawn()``; ``Job(id)`` finds one again by its id."""

    def __init__(self, id: str, *, function: str | None = None) -> None:
        self.id = id
        self.function = function

    def __repr__(self) -> str:
        return f"Job({self.id!r}, function={self.function!r})"

    def status(self) -> dict[str, Any]:
        """What the control plane knows: ``state`` (queued, running, succeeded, dead), ``attempts``, ..."""
        answer = _control(f"/v1/replica/invocations/{self.id}", data=None, what=f"invocation {self.id}")
        if not isinstance(answer, dict):
            raise FunctionError(f"invocation {self.id}: the control plane answered {answer!r}")
        return answer

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the invocation to finish and return its JSON result.

        Raises ``FunctionError`` when it is dead (every attempt failed, or the
        input was refused), ``TimeoutError`` when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = _POLL_FIRST
        while True:
            status = self.status()
            state = status.get("state")
            if state == "succeeded":
                return status.get("result")
            if state == "dead":
                raise FunctionError(
                    f"invocation {self.id} of {self.function or status.get('function') or 'a function'} is dead "
                    f"after {status.get('attempts', '?')} attempt(s): {status.get('error') or 'no error recorded'} "
                    f"(`clearway invocations retry {self.id}` queues it again)",
                    status=status.get("status") if isinstance(status.get("status"), int) else None,
                    error_id=status.get("error_id") if isinstance(status.get("error_id"), str) else None,
                )
            if deadline is not None and time.monotonic() + interval > deadline:
                raise TimeoutError(f"invocation {self.id} is still {state} after {timeout:g}s")
            # Polling: the control plane offers no push to replicas.
            time.sleep(interval)
            interval = min(interval * 2, _POLL_MAX)


class Function(Generic[P, R]):
    """What ``@app.function`` returns: call it here, or ``.remote()``, ``.spawn()``, ``.map()`` it."""

    def __init__(self, func: Callable[P, R], spec: FunctionSpec, *, app: str) -> None:
        self._func = func
        self.spec = spec
        self.app = app
        functools.update_wrapper(self, func)
        # Raw-request parameters are filled by the platform, never by a caller.
        signature = inspect.signature(func)
        types = parameter_types(func, strict=False)
        self._signature = signature.replace(
            parameters=[p for p in signature.parameters.values() if types.get(p.name) is not Request]
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"<clearway Function {self.app}.{self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._func(*args, **kwargs)

    def _arguments(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Positional arguments named, so the function receives a JSON object of keyword arguments."""
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{self.name}(): {error}") from None
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self._signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"{self.name}(): *{name} cannot be passed through the platform (JSON objects only)")
            else:
                arguments[name] = value
        return arguments

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Call the function through the platform and return its JSON result.

        Raises ``FunctionError`` with the status and error id when it fails.
        """
        return self._remote(self._arguments(args, kwargs))

    def _remote(self, arguments: Mapping[str, Any]) -> Any:
        what = f"function {self.name!r}"
        headers = {**identity_headers(), "Content-Type": "application/json", "Accept": "application/json"}
        timeout = self.spec.timeout + self.spec.startup_timeout + _CALL_MARGIN
        status, body = _request(
            service_url(self.name), data=_to_json(arguments), headers=headers, timeout=timeout, what=what
        )
        if not 200 <= status < 300:
            raise _failure(what, status, body, app=self.app)
        try:
            return json.loads(body) if body else None
        except ValueError:
            # A function that returned a raw cw.Response with a body that is not JSON.
            return body

    def spawn(self, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> Job:
        """Queue a durable invocation; returns at once with its ``Job``.

        With ``idempotency_key``, spawning again with the same key returns the
        same invocation (whatever the arguments), however often it is repeated.
        """
        arguments = self._arguments(args, kwargs)
        answer = _control(
            "/v1/replica/invocations",
            data={"function": self.name, "kwargs": arguments, "idempotency_key": idempotency_key},
            what=f"spawning function {self.name!r}",
        )
        return Job(str(answer["id"]), function=self.name)

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """``.remote`` for each item, a few at a time; yields the results in input order.

        An item that is a mapping gives the keyword arguments; anything else is
        the first argument. The first failure raises ``FunctionError`` when its
        result's turn comes.
        """
        calls = (
            self._arguments((), item) if isinstance(item, Mapping) else self._arguments((item,), {})
            for item in items
        )
        threads = max(1, min(_MAP_THREADS, self.spec.max_concurrency * self.spec.max_replicas))
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"clearway-map-{self.name}")
        pending: deque[Future[Any]] = deque()
        try:
            for arguments in calls:
                pending.append(pool.submit(self._remote, arguments))
                if len(pending) >= threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def parameter_types(func: Callable[..., Any], *, strict: bool = True) -> dict[str, Any]:
    """Each parameter's annotation, resolved also when written as a string
    (``from __future__ import annotations``); ``Any`` where there is none.

    ``strict=False``: an annotation that does not resolve stays a string instead
    of raising ``NameError`` (the SDK must import any app; the function server
    resolves strictly and says which name is missing when the replica starts).
    """
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:
        if strict:
            raise
        hints = {}
    return {
        name: hints.get(name, Any if parameter.annotation is inspect.Parameter.empty else parameter.annotation)
        for name, parameter in inspect.signature(func).parameters.items()
    }
