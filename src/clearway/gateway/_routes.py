"""The routes file: what the control plane tells the gateway to serve.

The control plane writes ``routes.json`` atomically (write + rename) and sends
SIGHUP; the gateway parses it into a :class:`RouteTable`.  The table is plain,
immutable data with no sockets or counters attached, so it can be built by
tests, compared, and handed to several gateways; the hot-path structure
compiled from it lives in ``_router.py``.

Parsing is strict: a table the gateway does not fully understand is refused
with a :class:`RoutesError` that names the bad field, and the caller keeps
serving the previous table.  A half-understood table would send traffic to the
wrong place, which is worse than serving a stale one for a moment.

The table also carries what access control needs, so that one atomic file
swap changes routes and trust together: each internal route's ``allow`` rules
(which callers may use it) and the top-level ``identities`` (replica id ->
incarnation of every replica running now).  A replica credential is honoured
only while its (replica, incarnation) pair is in the table the gateway serves,
so removing a stopped replica from the table revokes its token at once,
without waiting for the token to expire.

A route may name the ``component`` its targets run (a function's name, say;
empty when it does not say).  It changes no routing: the gateway counts the
route's requests per (app, revision, component) instead of per (app,
revision), which is what the autoscaler reads to size each function on its own
load (``GET /load`` on the admin socket).

A route of a sharded service may carry key affinity (``"shards"``,
``"affinity"``, ``"owners"``): the request's key (a header, or a path segment
after ``affinity.under``) picks shard ``shard_of(key, shards)`` — the SDK's own
function, so the gateway and the replicas agree — and ``owners`` says which
endpoint owns each shard now. The gateway prefers that endpoint when it is one
of the chosen revision's ready endpoints; with no key, no owner, or an owner
not ready it balances as usual: affinity never fails a request.

Endpoints are ``"unix:/abs/path.sock"`` (replicas listen only on Unix sockets
that the platform's user may open, so nothing can reach them around the
gateway's checks) or ``"host:port"`` (kept for tests and benchmarks).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearway.exceptions import ClearwayError

__all__ = ["Affinity", "AllowRule", "Route", "RouteTable", "RoutesError", "Target", "load_routes"]

#: The only routes-file format this gateway reads.
ROUTES_VERSION = 1
#: Longest path a Unix socket address can hold on Linux (``sun_path`` is 108
#: bytes including the terminating NUL).
MAX_UNIX_PATH_BYTES = 107
#: What a route's component looks like (it becomes a metrics label and a JSON field).
_COMPONENT = re.compile(r"[A-Za-z0-9._-]{1,200}")
#: A header name an affinity may read (an HTTP token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")
#: The most shards a route may have (`clearway.sdk.sharding.MAX_SHARDS`).
MAX_SHARDS = 4096


class RoutesError(ClearwayError):
    """The routes file is missing, is not JSON, or does not follow version 1."""


@dataclass(frozen=True, slots=True)
class Target:
    """One revision of an app and the replica endpoints serving it."""

    revision: str
    weight: int
    #: ``"unix:/run/x.sock"`` or ``"127.0.0.1:40123"`` strings; empty while the
    #: revision has no ready replica.
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AllowRule:
    """Callers an internal route accepts: replicas of ``app`` (``None`` = any revision/component)."""

    app: str
    revision: str | None = None
    component: str | None = None

    def allows(self, app: str, revision: str, component: str) -> bool:
        return (
            self.app == app
            and (self.revision is None or self.revision == revision)
            and (self.component is None or self.component == component)
        )


@dataclass(frozen=True, slots=True)
class Affinity:
    """Where a request's shard key is: request header ``header`` (lowercase), or
    path segment ``segment`` (from 0) of the forwarded path after ``under``."""

    header: str | None = None
    segment: int | None = None
    under: str = "/"

    def to_json(self) -> dict[str, Any]:
        if self.header is not None:
            return {"header": self.header}
        return {"path": self.segment, "under": self.under}


@dataclass(frozen=True, slots=True)
class Route:
    """Requests for ``host`` under ``prefix`` go to one of ``targets``."""

    app: str
    host: str
    targets: tuple[Target, ...]
    prefix: str = "/"
    strip_prefix: bool = False
    #: Seconds the replica has to start answering (response head) before a 504.
    timeout: float = 60.0
    #: A request header naming a revision sends the request to that revision.
    pin_header: str = "x-clearway-revision"
    #: A private service: callers must prove a replica identity
    #: (``x-clearway-identity``) that one of ``allow`` accepts.
    internal: bool = False
    #: Who may call an internal route (empty: nobody). Only for internal routes.
    allow: tuple[AllowRule, ...] = ()
    #: The component the targets run; requests are counted per (app, revision,
    #: component). Empty: not said (counted for the revision as a whole).
    component: str = ""
    #: Key affinity (a sharded service): the shard count (0: none), where the key is,
    #: and the endpoint owning each shard now (shards without a ready owner are absent).
    shards: int = 0
    affinity: Affinity | None = None
    owners: Mapping[int, str] = field(default_factory=dict)
    #: While more than one target has weight, an answer to a request that named no
    #: revision sets the ``clearway-revision`` cookie (a rollout with sticky sessions).
    #: Only for public routes.
    sticky: bool = False


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Everything the gateway serves, as of one control-plane ``generation``."""

    routes: tuple[Route, ...] = ()
    domains: tuple[str, ...] = ()
    generation: int = 0
    #: replica id -> incarnation of every replica whose credential is honoured.
    identities: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> RouteTable:
        """Build a table from the decoded JSON of a version-1 routes file."""
        if not isinstance(data, Mapping):
            raise RoutesError("the routes file must hold a JSON object")
        version = data.get("version")
        if version != ROUTES_VERSION:
            raise RoutesError(
                f"the routes file has version {version!r}, this gateway reads version "
                f"{ROUTES_VERSION}; upgrade clearway so both sides agree"
            )
        generation = _int(data.get("generation", 0), "generation")
        domains = tuple(
            _str(d, "domains[]").lower().strip(".") for d in _list(data.get("domains", []), "domains")
        )
        routes = tuple(
            _route(r, f"routes[{i}]") for i, r in enumerate(_list(data.get("routes", []), "routes"))
        )
        raw_identities = data.get("identities", {})
        if not isinstance(raw_identities, Mapping):
            raise RoutesError("identities must be an object mapping replica ids to incarnations")
        identities = {
            _str(replica, "identities key"): _str(inc, f"identities[{replica!r}]")
            for replica, inc in raw_identities.items()
        }
        return cls(routes=routes, domains=domains, generation=generation, identities=identities)

    def to_json(self) -> dict[str, Any]:
        """The table as version-1 JSON data (the inverse of :meth:`from_json`)."""
        return {
            "version": ROUTES_VERSION,
            "generation": self.generation,
            "domains": list(self.domains),
            "identities": dict(self.identities),
            "routes": [
                {
                    "app": r.app,
                    "host": r.host,
                    "prefix": r.prefix,
                    "strip_prefix": r.strip_prefix,
                    "timeout": r.timeout,
                    "pin_header": r.pin_header,
                    "internal": r.internal,
                    "component": r.component,
                    **(
                        {
                            "shards": r.shards,
                            "affinity": r.affinity.to_json() if r.affinity is not None else None,
                            "owners": {str(shard): endpoint for shard, endpoint in sorted(r.owners.items())},
                        }
                        if r.shards
                        else {}
                    ),
                    **(
                        {"allow": [{"app": a.app, "revision": a.revision, "component": a.component} for a in r.allow]}
                        if r.internal
                        else {}
                    ),
                    **({"sticky": True} if r.sticky else {}),
                    "targets": [
                        {"revision": t.revision, "weight": t.weight, "endpoints": list(t.endpoints)}
                        for t in r.targets
                    ],
                }
                for r in self.routes
            ],
        }


def load_routes(path: str | Path) -> RouteTable:
    """Read and parse a routes file; raise :class:`RoutesError` if it is unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutesError(f"cannot read the routes file {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RoutesError(f"the routes file {path} is not valid JSON: {exc}") from exc
    try:
        return RouteTable.from_json(data)
    except RoutesError as exc:
        raise RoutesError(f"{path}: {exc}") from None


def _route(data: Any, where: str) -> Route:
    if not isinstance(data, Mapping):
        raise RoutesError(f"{where} must be an object")
    prefix = _str(data.get("prefix", "/"), f"{where}.prefix")
    if not prefix.startswith("/"):
        raise RoutesError(f"{where}.prefix must start with '/', got {prefix!r}")
    if len(prefix) > 1:
        prefix = prefix.rstrip("/") or "/"
    timeout = data.get("timeout", 60.0)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise RoutesError(f"{where}.timeout must be a positive number of seconds")
    strip = data.get("strip_prefix", False)
    if not isinstance(strip, bool):
        raise RoutesError(f"{where}.strip_prefix must be true or false")
    internal = data.get("internal", False)
    if not isinstance(internal, bool):
        raise RoutesError(f"{where}.internal must be true or false")
    if "allow" in data and not internal:
        raise RoutesError(f"{where}.allow is only meaningful on an internal route (\"internal\": true)")
    sticky = data.get("sticky", False)
    if not isinstance(sticky, bool):
        raise RoutesError(f"{where}.sticky must be true or false")
    if sticky and internal:
        raise RoutesError(f"{where}.sticky is only meaningful on a public route (browsers carry the cookie)")
    allow = tuple(
        _allow(a, f"{where}.allow[{i}]") for i, a in enumerate(_list(data.get("allow", []), f"{where}.allow"))
    )
    targets = tuple(
        _target(t, f"{where}.targets[{i}]")
        for i, t in enumerate(_list(data.get("targets", []), f"{where}.targets"))
    )
    host = _str(data.get("host"), f"{where}.host").lower().strip(".")
    if not host:
        raise RoutesError(f"{where}.host must not be empty")
    component = _str(data.get("component", ""), f"{where}.component")
    if component and not _COMPONENT.fullmatch(component):
        raise RoutesError(
            f"{where}.component must be a component name (letters, digits, '.', '_', '-'), got {component!r}"
        )
    shards, affinity, owners = _sharding(data, where)
    return Route(
        app=_str(data.get("app"), f"{where}.app"),
        host=host,
        targets=targets,
        prefix=prefix,
        strip_prefix=strip,
        timeout=float(timeout),
        pin_header=_str(data.get("pin_header", "x-clearway-revision"), f"{where}.pin_header").lower(),
        internal=internal,
        allow=allow,
        component=component,
        shards=shards,
        affinity=affinity,
        owners=owners,
        sticky=sticky,
    )


def _sharding(data: Mapping[str, Any], where: str) -> tuple[int, Affinity | None, dict[int, str]]:
    """A route's key affinity: ``shards``, ``affinity`` and ``owners`` (all absent, or shards given)."""
    raw = data.get("shards")
    if raw is None:
        if data.get("affinity") is not None or data.get("owners"):
            raise RoutesError(f"{where}.affinity and {where}.owners need {where}.shards")
        return 0, None, {}
    shards = _int(raw, f"{where}.shards")
    if not 1 <= shards <= MAX_SHARDS:
        raise RoutesError(f"{where}.shards must be 1 to {MAX_SHARDS}, got {shards}")
    affinity = None
    raw_affinity = data.get("affinity")
    if raw_affinity is not None:
        if not isinstance(raw_affinity, Mapping):
            raise RoutesError(f"{where}.affinity must be an object: {{\"header\": name}} or {{\"path\": n, \"under\": prefix}}")
        if "header" in raw_affinity:
            header = _str(raw_affinity["header"], f"{where}.affinity.header").lower()
            if set(raw_affinity) != {"header"} or not _HEADER_NAME.fullmatch(header):
                raise RoutesError(f"{where}.affinity must be {{\"header\": a header name}}, got {dict(raw_affinity)!r}")
            affinity = Affinity(header=header)
        elif "path" in raw_affinity:
            segment = _int(raw_affinity["path"], f"{where}.affinity.path")
            under = _str(raw_affinity.get("under", "/"), f"{where}.affinity.under")
            if set(raw_affinity) - {"path", "under"} or segment < 0 or not under.startswith("/"):
                raise RoutesError(
                    f"{where}.affinity must be {{\"path\": a segment from 0, \"under\": a path}}, got {dict(raw_affinity)!r}"
                )
            affinity = Affinity(segment=segment, under=under.rstrip("/") or "/")
        else:
            raise RoutesError(f"{where}.affinity must name a \"header\" or a \"path\" segment")
    raw_owners = data.get("owners", {})
    if not isinstance(raw_owners, Mapping):
        raise RoutesError(f"{where}.owners must be an object mapping shards to endpoints")
    owners: dict[int, str] = {}
    for key, endpoint in raw_owners.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < shards):
            raise RoutesError(f"{where}.owners: {key!r} is not a shard of 0 to {shards - 1}")
        owners[int(key)] = _endpoint(endpoint, f"{where}.owners[{key!r}]")
    return shards, affinity, owners


def _allow(data: Any, where: str) -> AllowRule:
    if not isinstance(data, Mapping):
        raise RoutesError(f"{where} must be an object")
    unknown = set(data) - {"app", "revision", "component"}
    if unknown:
        raise RoutesError(f"{where} has unknown field(s) {sorted(unknown)}; expected app, revision, component")
    app = _str(data.get("app"), f"{where}.app")
    if not app:
        raise RoutesError(f"{where}.app must not be empty")
    revision = data.get("revision")
    component = data.get("component")
    return AllowRule(
        app=app,
        revision=None if revision is None else _str(revision, f"{where}.revision"),
        component=None if component is None else _str(component, f"{where}.component"),
    )


def _target(data: Any, where: str) -> Target:
    if not isinstance(data, Mapping):
        raise RoutesError(f"{where} must be an object")
    weight = _int(data.get("weight", 0), f"{where}.weight")
    if weight < 0:
        raise RoutesError(f"{where}.weight must not be negative")
    endpoints = tuple(
        _endpoint(e, f"{where}.endpoints[]") for e in _list(data.get("endpoints", []), f"{where}.endpoints")
    )
    return Target(revision=_str(data.get("revision"), f"{where}.revision"), weight=weight, endpoints=endpoints)


def _endpoint(value: Any, where: str) -> str:
    text = _str(value, where)
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") or "\0" in path:
            raise RoutesError(f"{where} must be 'unix:' and an absolute socket path, got {text!r}")
        if len(path.encode("utf-8", "surrogateescape")) > MAX_UNIX_PATH_BYTES:
            raise RoutesError(
                f"{where}: the socket path {path!r} is longer than {MAX_UNIX_PATH_BYTES} bytes, "
                "which a Unix socket address cannot hold; use a shorter directory"
            )
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RoutesError(f"{where} must look like 'unix:/run/app.sock' or '127.0.0.1:40123', got {text!r}")
    return text


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RoutesError(f"{where} must be a string")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RoutesError(f"{where} must be an integer")
    return value


def _list(value: Any, where: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise RoutesError(f"{where} must be a list")
    return value
