"""Spec model: pydantic models for the declarative, versioned app description.

Why pydantic: the same class validates user input (with messages we can turn
into ``file:line`` errors), serialises to JSON, and generates the published
JSON Schema, so the three can never drift apart.

Names are DNS labels because they become host names (``<app>.localhost``) here
and object names on Kubernetes later.

Cron expressions are checked here only for their shape (five fields, known
characters, numbers in range): the spec package stays free of croniter, which
only the control plane needs. croniter, in the control plane's scheduler
(``control/schedules.py``), is the authority: an expression that passes here
but that croniter refuses is to fail the deploy with croniter's own message,
never to reach a running schedule.
"""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clearway.spec.ids import check_env_name, check_name

API_VERSION: Literal["clearway.dev/v1"] = "clearway.dev/v1"

Interface = Literal["auto", "asgi", "wsgi"]
#: Which HTTP server runs a replica's app (`clearway.runtime.servers`): ``auto`` picks
#: granian for a WSGI service when the app's environment has it, else uvicorn.
Server = Literal["auto", "uvicorn", "granian"]

#: ``"app"`` or ``"app.component"``: who may call a service (see ``ServiceSpec.allow``).
_CALLER = re.compile(r"[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?(?:\.(?:[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?|\*))?")


def check_env(value: dict[str, str]) -> dict[str, str]:
    """Environment variables: valid names, values without NUL (execve cannot carry it)."""
    for key, item in value.items():
        check_env_name(key)
        if "\0" in item:
            raise ValueError(f"environment variable {key!r} contains a NUL byte")
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/") or "?" in value or "#" in value or " " in value:
        raise ValueError(f"path {value!r} must be a URL path starting with '/', like '/api'")
    return value.rstrip("/") or "/"


#: A header name (an HTTP token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")
#: The highest path segment an affinity may name.
MAX_AFFINITY_SEGMENT = 63


def parse_affinity(value: str) -> tuple[Literal["header"], str] | tuple[Literal["path"], int]:
    """``("header", lowercase name)`` or ``("path", segment)`` of a ``ServiceSpec.affinity``.

    ``"header:x-customer"``: the key is the value of request header ``x-customer``;
    ``"path:1"``: it is the path segment 1 (from 0) after the service's path
    (``/api/customers/42`` -> ``42`` for a service at ``/api``). ValueError otherwise.
    """
    kind, colon, where = str(value).partition(":")
    if kind == "header" and colon and _HEADER_NAME.fullmatch(where):
        return "header", where.lower()
    if kind == "path" and re.fullmatch(r"[0-9]{1,3}", where) and int(where) <= MAX_AFFINITY_SEGMENT:
        return "path", int(where)
    raise ValueError(
        f"{value!r} must be 'header:<name>' (the key is that request header, e.g. "
        "'header:x-customer') or 'path:<n>' (the key is the n-th path segment after the service's "
        f"path, from 0 to {MAX_AFFINITY_SEGMENT}, e.g. 'path:1')"
    )


def _check_allow(value: list[str]) -> list[str]:
    for item in value:
        if not isinstance(item, str) or not _CALLER.fullmatch(item):
            raise ValueError(
                f"allow entry {item!r} must be 'app' or 'app.component' "
                "(lowercase names, e.g. 'billing' or 'billing.api')"
            )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceLocation(_Strict):
    """Where in the user's code a component was declared (for error messages)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class Resources(_Strict):
    """Per-replica limits; enforced with cgroups locally, as limits on Kubernetes."""

    memory_mb: Annotated[int, Field(ge=16, le=1_048_576)] | None = None
    cpu: Annotated[float, Field(gt=0, le=1024)] | None = None


class _Component(_Strict):
    name: str
    replicas: Annotated[int, Field(ge=0, le=1000)] = 1
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    sandbox: bool = False
    """Stricter isolation: no host file system beyond system libraries (see runtime/isolation.py)."""
    network: bool = True
    """False: the replica gets no network at all (it still serves through the gateway)."""
    grace_period: Annotated[float, Field(ge=0, le=3600)] = 10.0
    source: SourceLocation | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "component name")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)


class ServiceSpec(_Component):
    """An HTTP service: any ASGI or WSGI app, run as replicas behind the gateway."""

    kind: Literal["service"] = "service"
    public: bool = False
    path: str = "/"
    health: str | None = None
    interface: Interface = "auto"
    server: Server = "auto"
    """The HTTP server its replicas run: ``"granian"``, ``"uvicorn"`` or ``"auto"``
    (granian for a WSGI app when it could be installed beside the app's dependencies,
    uvicorn for an ASGI app or without granian)."""
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    startup_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    allow: list[str] = Field(default_factory=list)
    """Who else may call this service through its internal URL: ``"app"`` (any of
    that app's components) or ``"app.component"``. Its own revision may always."""
    shards: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Split the service's keys into this many shards, owned by its live replicas and
    rebalanced when one joins or leaves, as a sharded worker's (`clearway.sdk.sharding`)."""
    affinity: str | None = None
    """Where a request's shard key is, for the gateway to send it to the replica owning
    that key's shard: ``"header:<name>"`` or ``"path:<n>"`` (the n-th path segment after
    the service's ``path``, from 0). Needs ``shards``; see `parse_affinity`."""
    lease_ttl: Annotated[float, Field(ge=1, le=300)] = 10.0
    """The lease of a sharded service's shards: a dead replica's are owned again within about this long."""

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        return _check_allow(value)

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind, where = parse_affinity(value)
        return f"{kind}:{where}"

    @model_validator(mode="after")
    def _sharded(self) -> ServiceSpec:
        if self.affinity is not None and self.shards is None:
            raise ValueError(
                f"affinity={self.affinity!r} sends a request to the replica owning its key's shard: "
                "it needs shards=N (e.g. shards=64)"
            )
        if self.shards is not None and self.replicas < 1:
            raise ValueError(f"shards={self.shards} needs replicas >= 1 to own them (replicas={self.replicas})")
        return self

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return _check_path(value)

    @field_validator("health")
    @classmethod
    def _health(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"health {value!r} must be a URL path starting with '/', like '/healthz'")
        return value


class WorkerSpec(_Component):
    """A long-running background process (no port, no route)."""

    kind: Literal["worker"] = "worker"
    startup_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    singleton: bool = False
    """Run the function in one replica at a time (the leader); the others stand by
    (``@app.singleton``, `clearway.sdk.coordination`)."""
    lease_ttl: Annotated[float, Field(ge=1, le=300)] = 10.0
    """The lease of a singleton's leadership, or of a sharded worker's shards: the part of a
    dead replica is taken over within about this long."""
    shards: Annotated[int, Field(ge=1, le=4096)] | None = None
    """Split the work into this many shards, spread over the live replicas and rebalanced
    when one joins or leaves (``@app.worker(shards=N)``, `clearway.sdk.sharding`)."""

    @model_validator(mode="after")
    def _sharded(self) -> WorkerSpec:
        if self.shards is not None and self.singleton:
            raise ValueError(
                "a worker is either a singleton (one replica runs it) or sharded (every replica runs "
                "its shards), not both: drop shards= or use @app.worker"
            )
        if self.shards is not None and self.replicas < 1:
            raise ValueError(f"shards={self.shards} needs replicas >= 1 to run them (replicas={self.replicas})")
        return self


#: Cron's five fields, in order: (name, lowest, highest, names accepted for numbers).
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")),
    # 7 is Sunday too, as in Vixie cron and croniter.
    ("day-of-week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
#: The shorthands croniter understands for whole expressions.
_CRON_ALIASES = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
#: One item of a field: ``*``, ``?``, ``5``, ``1-5``, ``mon-fri``, each with an optional ``/step``.
_CRON_ITEM = re.compile(r"(?:(?P<any>[*?])|(?P<low>[0-9a-z]+)(?:-(?P<high>[0-9a-z]+))?)(?:/(?P<step>[0-9]+))?")
#: croniter's extensions of the day fields: L (last day, last given weekday),
#: W (nearest weekday) and # (nth weekday of the month), e.g. ``L``, ``15W``, ``L5``, ``5#3``.
_CRON_DAY_EXTENSIONS = {
    "day-of-month": re.compile(r"l|[0-9]{1,2}w"),
    "day-of-week": re.compile(r"l[0-7]|[0-7]#[1-5]"),
}


def _cron_number(text: str, field: str, low: int, high: int, names: tuple[str, ...]) -> int:
    number = names.index(text) + low if text in names else int(text) if text.isdigit() else None
    if number is None:
        raise ValueError(f"{field} field: {text!r} is not a number" + (f" or a name ({', '.join(names)})" if names else ""))
    if not low <= number <= high:
        raise ValueError(f"{field} field: {number} is out of range {low}-{high}")
    return number


def check_cron(expression: str) -> str:
    """The shape of a 5-field cron expression (see the module docstring for why only the shape)."""
    fields = expression.lower().split()
    if len(fields) == 1 and fields[0] in _CRON_ALIASES:
        return expression
    if len(fields) != 5:
        raise ValueError(
            f"cron expression {expression!r} has {len(fields)} field(s); it needs 5: "
            "minute hour day-of-month month day-of-week, e.g. '*/5 * * * *' (every 5 minutes)"
        )
    for text, (field, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            extension = _CRON_DAY_EXTENSIONS.get(field)
            if extension is not None and extension.fullmatch(item):
                continue
            match = _CRON_ITEM.fullmatch(item)
            if match is None:
                raise ValueError(f"cron expression {expression!r}: {field} field: cannot read {item!r}")
            if match["step"] is not None and int(match["step"]) == 0:
                raise ValueError(f"cron expression {expression!r}: {field} field: a step must be at least 1")
            try:
                # A range may wrap around ('fri-mon'), as croniter allows.
                for bound in (match["low"], match["high"]):
                    if bound is not None:
                        _cron_number(bound, field, low, high, names)
            except ValueError as error:
                raise ValueError(f"cron expression {expression!r}: {error}") from None
    return expression


class ScheduleSpec(_Strict):
    """When a function runs on its own: a cron expression or a fixed interval (exactly one).

    ``cw.Cron("*/5 * * * *")`` and ``cw.Every(30)`` build one. Fires missed while
    the control plane was down are coalesced into one run when it comes back.
    """

    cron: str | None = None
    """Five fields: minute hour day-of-month month day-of-week (read in UTC)."""
    every: Annotated[float, Field(ge=1, le=31_622_400)] | None = None
    """Seconds between runs (at least 1)."""

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> ScheduleSpec:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a schedule needs exactly one of cron= and every=, e.g. cw.Cron('0 * * * *') or cw.Every(60)")
        return self


class FunctionSpec(_Component):
    """A function: called per request, per event or on a schedule, with replicas
    started on demand between ``min_replicas`` and ``max_replicas``.

    ``replicas`` (from the common fields) is not used: the autoscaler decides.
    """

    kind: Literal["function"] = "function"
    http: str | None = None
    """A public path on the app's host that calls it (like ``ServiceSpec.path``); None: none."""
    events: list[str] = Field(default_factory=list)
    """The CloudEvent types it receives (``type`` attribute, matched exactly)."""
    schedule: ScheduleSpec | None = None
    max_concurrency: Annotated[int, Field(ge=1, le=1000)] = 8
    """In-flight requests per replica the autoscaler aims at (the replica does not enforce it)."""
    min_replicas: Annotated[int, Field(ge=0, le=1000)] = 0
    """0: scales to zero when idle."""
    max_replicas: Annotated[int, Field(ge=1, le=1000)] = 10
    timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """Seconds one invocation may take; past it the caller gets a 504."""
    idle_timeout: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    """Seconds without requests after which it scales down to ``min_replicas``."""
    retries: Annotated[int, Field(ge=0, le=100)] = 3
    """Extra attempts of a durable invocation (spawned, event, schedule) that failed."""
    startup_timeout: Annotated[float, Field(gt=0, le=3600)] = 60.0
    allow: list[str] = Field(default_factory=list)
    """Who else may call it through its internal URL, as ``ServiceSpec.allow``."""
    server: Server = "auto"
    """The HTTP server its replicas run, as ``ServiceSpec.server`` (``"auto"`` is uvicorn for
    functions: see `clearway.runtime.servers`)."""

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        return _check_allow(value)

    @field_validator("http")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        return None if value is None else _check_path(value)

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[str]) -> list[str]:
        for item in value:
            if not isinstance(item, str) or not item.strip() or item != item.strip():
                raise ValueError(
                    f"event type {item!r} must be a non-empty string without surrounding spaces, "
                    "like 'com.example.order.created'"
                )
        return value

    @model_validator(mode="after")
    def _replica_bounds(self) -> FunctionSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}): "
                "lower min_replicas or raise max_replicas"
            )
        return self


ComponentSpec = Annotated[ServiceSpec | WorkerSpec | FunctionSpec, Field(discriminator="kind")]


class CanaryPolicy(_Strict):
    """How a new production revision goes out (``control.rollouts``): traffic in
    steps, each held until the gateway's metrics say the canary is no worse than
    the stable revision.

    The defaults follow what canary tools converge on (Flagger, Argo Rollouts):
    a few percent first, so a bad revision hurts few requests; a minimum time
    *and* a minimum number of requests per step, because a verdict on too
    little data is a guess. Errors are judged as an increase over the stable
    revision (a flaky upstream is not the canary's fault); latency as a ratio
    plus a slack, which absorbs noise and the histogram's bucket widths.
    """

    steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(default_factory=lambda: [5, 25, 50, 100])
    """Percent of the app's requests the canary gets, step by step; the last is 100."""
    min_duration: Annotated[float, Field(ge=0, le=86_400)] = 30.0
    """Seconds each step lasts at least."""
    min_requests: Annotated[int, Field(ge=1, le=10_000_000)] = 20
    """Requests the canary must answer in a step before the step can pass."""
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.01
    """How much higher than the stable revision's the canary's 5xx share may be."""
    max_latency_ratio: Annotated[float, Field(ge=1, le=1000)] = 1.5
    """The canary's p99 may be at most this times the stable revision's p99 ..."""
    latency_slack: Annotated[float, Field(ge=0, le=3600)] = 0.05
    """... plus this many seconds."""
    max_p99: Annotated[float, Field(gt=0, le=3600)] | None = None
    """An absolute bound on the canary's p99 in seconds (also when the stable has no data)."""
    sticky: bool = False
    """Keep each browser on the revision it first got (a ``clearway-revision`` session
    cookie) rather than splitting its every request, so a user does not flip between
    versions mid-session. Off by default: every client with a cookie jar (``httpx.Client``,
    ``requests.Session``) sticks too, so when a few clients send most of the requests the
    canary's share of requests can stray far from the step's percent."""

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int]) -> list[int]:
        if not value or value[-1] != 100:
            raise ValueError("canary steps must end at 100 (percent of traffic), e.g. [5, 25, 50, 100]")
        if any(b <= a for a, b in pairwise(value)):
            raise ValueError(f"canary steps {value} must increase, e.g. [5, 25, 50, 100]")
        return value

    @property
    def minimum_seconds(self) -> float:
        """The least time a rollout under this policy takes to promote (the last step promotes at once)."""
        return self.min_duration * (len(self.steps) - 1)


class SmokeCheck(_Strict):
    """A function of the app run against a canary before it gets any traffic (``@app.smoke_check``)."""

    name: str
    source: SourceLocation | None = None


class AppSpec(_Strict):
    """The whole app: what to run, never where or how."""

    api_version: Literal["clearway.dev/v1"] = API_VERSION
    kind: Literal["App"] = "App"
    name: str
    env: dict[str, str] = Field(default_factory=dict)
    components: list[ComponentSpec] = Field(default_factory=list)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    smoke_checks: list[SmokeCheck] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "app name")

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env(value)

    @model_validator(mode="after")
    def _consistent(self) -> AppSpec:
        seen: dict[str, SourceLocation | None] = {}
        paths: dict[str, str] = {}
        for comp in self.components:
            if comp.name in seen:
                where = f" (first declared at {seen[comp.name]})" if seen[comp.name] else ""
                raise ValueError(f"two components are named {comp.name!r}{where}: rename one")
            seen[comp.name] = comp.source
            if isinstance(comp, ServiceSpec) and comp.public:
                if comp.path in paths:
                    raise ValueError(
                        f"public services {paths[comp.path]!r} and {comp.name!r} both claim path "
                        f"{comp.path!r}: give one of them another path= prefix"
                    )
                paths[comp.path] = comp.name
        for fn in self.functions:
            if fn.http is not None and fn.http in paths:
                raise ValueError(
                    f"function {fn.name!r} (http={fn.http!r}) and {paths[fn.http]!r} both claim path "
                    f"{fn.http!r}: give the function another http= path"
                )
            if fn.http is not None:
                paths[fn.http] = fn.name
        return self

    def component(self, name: str) -> ServiceSpec | WorkerSpec | FunctionSpec:
        for comp in self.components:
            if comp.name == name:
                return comp
        raise KeyError(name)

    @property
    def services(self) -> list[ServiceSpec]:
        return [c for c in self.components if isinstance(c, ServiceSpec)]

    @property
    def functions(self) -> list[FunctionSpec]:
        return [c for c in self.components if isinstance(c, FunctionSpec)]

    @property
    def listeners(self) -> list[ServiceSpec | FunctionSpec]:
        """The components that serve HTTP on a socket: services and functions."""
        return [c for c in self.components if isinstance(c, ServiceSpec | FunctionSpec)]


def json_schema() -> dict[str, Any]:
    """The published JSON Schema of ``AppSpec`` (``schema/app.schema.json``)."""
    schema = AppSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://clearway.dev/schema/app.v1.json"
    return schema
