"""``App`` and its decorators: record what the user declares, nothing more.

Each decorator validates its arguments at once and raises ``SpecError`` that
points at the decorator's line in the user's file, because that is where the
fix goes. ``@app.service`` and ``@app.worker`` return the decorated function
unchanged; ``@app.function`` returns a ``Function`` handle, which calls the
function when called and adds ``.remote()``, ``.spawn()`` and ``.map()``
(`clearway.sdk.functions`): nothing happens until one of those is called.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from pydantic import ValidationError

from clearway.exceptions import SpecError
from clearway.sdk.functions import Function
from clearway.spec.ids import check_name
from clearway.spec.model import (
    AppSpec,
    CanaryPolicy,
    FunctionSpec,
    Interface,
    ScheduleSpec,
    Server,
    ServiceSpec,
    SmokeCheck,
    SourceLocation,
    WorkerSpec,
)

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")

#: The apps declared in this process, by name (`clearway.sdk.sharding.shard_for` reads shard counts here).
_APPS: weakref.WeakValueDictionary[str, App] = weakref.WeakValueDictionary()


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into one line per problem, naming the argument."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"] if p not in ("service", "worker", "function"))
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _caller(depth: int) -> SourceLocation | None:
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:  # pragma: no cover - shallower stack than expected
        return None
    return SourceLocation(file=frame.f_code.co_filename, line=frame.f_lineno)


@dataclass(frozen=True)
class Component:
    """One declared component: its spec and the user's function (``target``)."""

    spec: ServiceSpec | WorkerSpec | FunctionSpec
    target: Callable[..., Any]


class App:
    """An app: a named set of services, workers and functions.

    >>> app = App("hello")
    >>> @app.service(replicas=2, public=True)
    ... def web(): ...
    """

    def __init__(
        self,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        canary: CanaryPolicy | Mapping[str, Any] | None = None,
    ) -> None:
        self._location = _caller(1)
        where = str(self._location) if self._location else None
        try:
            check_name(name, "app name")
        except ValueError as exc:
            raise SpecError(str(exc), location=where) from None
        try:
            policy = canary if isinstance(canary, CanaryPolicy) else CanaryPolicy.model_validate(dict(canary or {}))
        except ValidationError as exc:
            raise SpecError(f"canary: {describe_validation_error(exc)}", location=where) from None
        self.name = name
        self.env = dict(env or {})
        #: How a production revision goes out (``clearway deploy --canary``, ``git push``).
        self.canary = policy
        self.components: dict[str, Component] = {}
        #: Smoke checks by name: run against a canary before it gets traffic.
        self.smoke_checks: dict[str, tuple[SmokeCheck, Callable[..., Any]]] = {}
        _APPS[name] = self

    def __repr__(self) -> str:
        return f"App({self.name!r}, components={list(self.components)})"

    def service(
        self,
        *,
        name: str | None = None,
        replicas: int = 1,
        public: bool = False,
        path: str = "/",
        health: str | None = None,
        interface: Interface = "auto",
        server: Server = "auto",
        env: Mapping[str, str] | None = None,
        memory_mb: int | None = None,
        cpu: float | None = None,
        sandbox: bool = False,
        network: bool = True,
        grace_period: float = 10.0,
        timeout: float = 60.0,
        startup_timeout: float = 60.0,
        allow: Sequence[str] = (),
        shards: int | None = None,
        affinity: str | None = None,
        lease_ttl: float = 10.0,
    ) -> Callable[[F], F]:
        """Declare an HTTP service. The function returns an ASGI or WSGI app.

        ``public=True`` routes ``http://<app>.<domain>/<path>`` to it; ``health``
        is the path probed for readiness and liveness (any HTTP answer otherwise).
        Replicas of the same revision call it at ``$CLEARWAY_SERVICE_<NAME>_URL``;
        ``allow=["billing", "shop.api"]`` lets other apps' components call it too.
        ``sandbox=True`` hides the host's file system; ``network=False`` gives no network.

        ``shards=N`` splits its keys in N shards owned by its live replicas (as a
        sharded worker's; ``cw.shard_for(key, worker=<name>)`` says a key's shard and
        owner), and ``affinity="header:x-customer"`` (or ``"path:<n>"``, the n-th path
        segment after ``path``) has the gateway send a request to the replica owning
        its key's shard, whenever that replica is ready (any replica otherwise).

        ``server`` picks the HTTP server of its replicas: ``"auto"`` (granian for a WSGI
        app when its environment could get it, else uvicorn), ``"granian"`` or ``"uvicorn"``.
        """
        location = _caller(1)

        def record(func: F) -> F:
            self._record(
                ServiceSpec,
                func,
                location,
                name=name or func.__name__,
                replicas=replicas,
                public=public,
                path=path,
                health=health,
                interface=interface,
                server=server,
                env=dict(env or {}),
                resources={"memory_mb": memory_mb, "cpu": cpu},
                sandbox=sandbox,
                network=network,
                grace_period=grace_period,
                timeout=timeout,
                startup_timeout=startup_timeout,
                allow=list(allow),
                shards=shards,
                affinity=affinity,
                lease_ttl=lease_ttl,
            )
            return func

        return record

    def worker(
        self,
        *,
        name: str | None = None,
        replicas: int = 1,
        env: Mapping[str, str] | None = None,
        memory_mb: int | None = None,
        cpu: float | None = None,
        sandbox: bool = False,
        network: bool = True,
        grace_period: float = 10.0,
        startup_timeout: float = 60.0,
        shards: int | None = None,
        lease_ttl: float = 10.0,
    ) -> Callable[[F], F]:
        """Declare a long-running background process: the function is its body.

        With ``shards=N`` the work is split in N shards spread over the live
        replicas (rebalanced when one joins or leaves; `clearway.sdk.sharding`):
        the function must be ``async def`` and is run once per shard a replica
        owns, with a `clearway.Shard` (``index``, ``count``, fencing ``token``;
        ``lost``, set when the shard is lost or moves away — the call is then
        cancelled). A dead replica's shards are taken over within about ``lease_ttl``
        seconds, a stopped one's at once."""
        return self._worker(
            _caller(1),
            name,
            env=env,
            memory_mb=memory_mb,
            cpu=cpu,
            replicas=replicas,
            sandbox=sandbox,
            network=network,
            grace_period=grace_period,
            startup_timeout=startup_timeout,
            shards=shards,
            lease_ttl=lease_ttl,
        )

    def singleton(
        self,
        *,
        name: str | None = None,
        replicas: int = 2,
        lease_ttl: float = 10.0,
        env: Mapping[str, str] | None = None,
        memory_mb: int | None = None,
        cpu: float | None = None,
        sandbox: bool = False,
        network: bool = True,
        grace_period: float = 10.0,
        startup_timeout: float = 60.0,
    ) -> Callable[[F], F]:
        """Declare a worker that runs in exactly one replica at a time: the leader.

        The other replicas stand by and one takes over within about ``lease_ttl``
        seconds when the leader dies, at once when it stops gracefully. The
        function may take one argument, a `clearway.Leadership` (its fencing
        ``token``; ``lost``, set the moment leadership is lost — an async
        function is then cancelled, a sync one's process ends)."""
        return self._worker(
            _caller(1),
            name,
            env=env,
            memory_mb=memory_mb,
            cpu=cpu,
            replicas=replicas,
            sandbox=sandbox,
            network=network,
            grace_period=grace_period,
            startup_timeout=startup_timeout,
            singleton=True,
            lease_ttl=lease_ttl,
        )

    def function(
        self,
        *,
        http: str | None = None,
        events: str | Sequence[str] = (),
        schedule: ScheduleSpec | None = None,
        max_concurrency: int = 8,
        min_replicas: int = 0,
        max_replicas: int = 10,
        timeout: float = 60.0,
        idle_timeout: float = 60.0,
        retries: int = 3,
        memory_mb: int | None = None,
        cpu: float | None = None,
        sandbox: bool = False,
        network: bool = True,
        env: Mapping[str, str] | None = None,
        allow: Sequence[str] = (),
        startup_timeout: float = 60.0,
        grace_period: float = 10.0,
        name: str | None = None,
        server: Server = "auto",
    ) -> Callable[[Callable[P, R]], Function[P, R]]:
        """Declare a function: called per HTTP request, CloudEvent or schedule, and
        run on as many replicas as its load needs.

        Its parameters come from a JSON object (or the query string of a GET) and
        are validated against their annotations; it returns anything JSON can
        carry, or a ``cw.Response``. ``http="/resize"`` routes that public path to
        it; ``events=["com.example.order.created"]`` makes it receive those
        CloudEvent types (as a ``cw.CloudEvent`` argument); ``schedule=cw.Cron(...)``
        or ``cw.Every(seconds)`` runs it on its own. It scales between
        ``min_replicas`` (0: none when idle for ``idle_timeout`` seconds) and
        ``max_replicas``, aiming at ``max_concurrency`` requests in flight per
        replica. ``retries`` is for durable invocations (spawned, events, schedules).
        ``server`` is the HTTP server of its replicas, as for services.
        """
        location = _caller(1)
        where = str(location) if location else None
        if schedule is not None and not isinstance(schedule, ScheduleSpec):
            raise SpecError(
                f"schedule={schedule!r}: pass cw.Cron('*/5 * * * *') or cw.Every(seconds)", location=where
            )

        def record(func: Callable[P, R]) -> Function[P, R]:
            spec = self._record(
                FunctionSpec,
                func,
                location,
                name=name or getattr(func, "__name__", ""),
                http=http,
                events=[events] if isinstance(events, str) else list(events),
                schedule=schedule,
                max_concurrency=max_concurrency,
                min_replicas=min_replicas,
                max_replicas=max_replicas,
                timeout=timeout,
                idle_timeout=idle_timeout,
                retries=retries,
                env=dict(env or {}),
                resources={"memory_mb": memory_mb, "cpu": cpu},
                sandbox=sandbox,
                network=network,
                grace_period=grace_period,
                startup_timeout=startup_timeout,
                allow=list(allow),
                server=server,
            )
            assert isinstance(spec, FunctionSpec)
            return Function(func, spec, app=self.name)

        return record

    def smoke_check(self, func: F) -> F:
        """Declare a smoke check: ``func(http)`` runs against a canary before it gets
        any traffic, and a failure (any exception, e.g. a failed ``assert``) rolls it back.

        ``http.get(path)`` / ``http.post(path, json=...)`` reach the canary revision
        alone through the gateway and return a response with ``status``,
        ``headers``, ``text`` and ``json()``.
        """
        location = _caller(1)
        if not callable(func):
            raise SpecError("@app.smoke_check must decorate a function", location=str(location) if location else None)
        name = func.__name__
        if name in self.smoke_checks:
            raise SpecError(
                f"a smoke check named {name!r} is already declared: rename the function",
                location=str(location) if location else None,
            )
        self.smoke_checks[name] = (SmokeCheck(name=name, source=location), func)
        return func

    def _worker(
        self,
        location: SourceLocation | None,
        name: str | None,
        *,
        env: Mapping[str, str] | None,
        memory_mb: int | None,
        cpu: float | None,
        **fields: Any,
    ) -> Callable[[F], F]:
        """The decorator of a worker (a singleton is one too): records its `WorkerSpec`."""

        def record(func: F) -> F:
            if fields.get("shards") is not None and callable(func) and not inspect.iscoroutinefunction(func):
                raise SpecError(
                    f"a sharded worker must be `async def` ({getattr(func, '__name__', func)!r} is not): "
                    "its call for a shard is cancelled when the shard moves to another replica, "
                    "and a thread cannot be",
                    location=str(location) if location else None,
                )
            self._record(
                WorkerSpec,
                func,
                location,
                name=name or func.__name__,
                env=dict(env or {}),
                resources={"memory_mb": memory_mb, "cpu": cpu},
                **fields,
            )
            return func

        return record

    def _record(
        self,
        model: type[ServiceSpec] | type[WorkerSpec] | type[FunctionSpec],
        func: Callable[..., Any],
        location: SourceLocation | None,
        **fields: Any,
    ) -> ServiceSpec | WorkerSpec | FunctionSpec:
        where = str(location) if location else None
        if not callable(func):
            raise SpecError(f"@app.{model.model_fields['kind'].default} must decorate a function", location=where)
        fields["name"] = str(fields["name"]).replace("_", "-")
        try:
            spec = model(source=location, **fields)
        except ValidationError as exc:
            raise SpecError(describe_validation_error(exc), location=where) from None
        if spec.name in self.components:
            first = self.components[spec.name].spec.source
            raise SpecError(
                f"a component named {spec.name!r} is already declared"
                + (f" at {first}" if first else "")
                + ": give this one another name= or rename the function",
                location=where,
            )
        self.components[spec.name] = Component(spec=spec, target=func)
        return spec

    def spec(self) -> AppSpec:
        """The declarative spec of this app (validated as a whole)."""
        try:
            return AppSpec(
                name=self.name,
                env=self.env,
                components=[c.spec for c in self.components.values()],
                canary=self.canary,
                smoke_checks=[check for check, _ in self.smoke_checks.values()],
            )
        except ValidationError as exc:
            raise SpecError(
                describe_validation_error(exc),
                location=str(self._location) if self._location else None,
            ) from None
