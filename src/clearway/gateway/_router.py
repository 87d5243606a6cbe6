"""The route table compiled for the hot path: match, pick a revision, pick a replica.

A :class:`RouteTable` is plain data; a :class:`Router` is the same table bound
to one gateway's live objects - the :class:`Endpoint` pools and the
:class:`RevisionStats` counters of each (app, revision, component), looked up
here once per reload so that a request never looks them up - and indexed so that a request costs one dict
lookup on its Host plus a short scan of that host's prefixes, longest first.
A reload builds a new Router and swaps one reference, so a request never sees
half a table.

Endpoint objects outlive reloads (the :class:`EndpointRegistry` keys them by
address), so in-flight counts and pooled connections carry over when a
replica stays in the table.

Balancing choices and why:

* Revisions: weighted random over targets with weight > 0, unless the
  request is pinned to a revision (then that one).  The proxy decides which
  pins count: one to a revision with weight > 0 (:meth:`BoundRoute.weighted_target`)
  always - it could have been picked by chance, and it is how a client stays
  on the canary of a rollout (header, or the ``clearway-revision`` cookie) -
  and one to a weight-0 revision (a new revision smoke-tested before it gets
  traffic) only with a pin token, see ``_identity.py``.
* Replicas: least outstanding requests between two randomly chosen ones
  ("power of two choices"): nearly as good as global least-loaded and O(1).
  A route with key affinity (a sharded service) first tries the endpoint that
  owns the request's shard (:meth:`BoundRoute.shard`, :meth:`BoundRoute.pick_owner`),
  when it is one of the revision's ready endpoints; a route without costs
  nothing extra (``BoundRoute.shards`` is 0).
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from bisect import bisect_right
from itertools import accumulate

from clearway.sdk.sharding import shard_of

from ._metrics import Metrics, RevisionStats
from ._routes import Route, RouteTable
from ._settings import GatewaySettings
from ._upstream import Endpoint

__all__ = ["BoundRoute", "BoundTarget", "EndpointRegistry", "Router"]


class BoundTarget:
    """A revision of a route, with live endpoints and counters."""

    __slots__ = ("endpoints", "owners", "revision", "stats", "weight")

    def __init__(
        self,
        revision: str,
        weight: int,
        endpoints: list[Endpoint],
        stats: RevisionStats,
        owners: dict[int, Endpoint] | None = None,
    ) -> None:
        self.revision = revision
        self.weight = weight
        self.endpoints = endpoints
        self.stats = stats
        #: Shard -> the endpoint of this revision owning it (key affinity; only ready owners).
        self.owners = owners or {}


class BoundRoute:
    """A route, with its prefix as bytes and its targets' weights pre-summed."""

    __slots__ = (
        "_cumulative",
        "_rng",
        "_total",
        "_weighted",
        "_weighted_by_name",
        "affinity_header",
        "affinity_segment",
        "affinity_under",
        "allow",
        "app",
        "component",
        "description",
        "internal",
        "pin_header",
        "prefix",
        "route",
        "shards",
        "sticky",
        "strip_prefix",
        "targets",
        "timeout",
    )

    def __init__(self, route: Route, targets: list[BoundTarget], rng: random.Random) -> None:
        self.route = route
        self.app = route.app
        self.component = route.component
        self.internal = route.internal
        self.allow = route.allow
        #: How error messages name this route.
        self.description = f"app {route.app!r} at {route.host}{route.prefix if route.prefix != '/' else ''}"
        self.prefix = route.prefix.encode("latin-1")
        self.strip_prefix = route.strip_prefix and route.prefix != "/"
        self.timeout = route.timeout
        self.pin_header = route.pin_header.encode("latin-1")
        self.targets = targets
        self._weighted = [t for t in targets if t.weight > 0]
        self._weighted_by_name = {t.revision: t for t in self._weighted}
        #: Answers set the pin cookie: the route asks for it and splits its traffic now.
        self.sticky = route.sticky and len(self._weighted) > 1
        self._cumulative = list(accumulate(t.weight for t in self._weighted))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self._rng = rng
        #: Key affinity: 0 when the route has none (then nothing below is read).
        affinity = route.affinity
        self.shards = route.shards if affinity is not None else 0
        self.affinity_header = affinity.header.encode("latin-1") if affinity and affinity.header else None
        self.affinity_segment = affinity.segment if affinity and affinity.segment is not None else 0
        self.affinity_under = (affinity.under if affinity else "/").encode("latin-1")

    def matches(self, path: bytes) -> bool:
        prefix = self.prefix
        if prefix == b"/":
            return True
        return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == 0x2F)

    def forward_path(self, path: bytes) -> bytes:
        """The path sent upstream (``strip_prefix`` keeps a leading slash)."""
        if not self.strip_prefix:
            return path
        rest = path[len(self.prefix):]
        return rest if rest.startswith(b"/") else b"/" + rest

    def pick_target(self, pinned: str | None) -> BoundTarget | None:
        """The revision for one request; None if the route has no weighted target."""
        if pinned is not None:
            for target in self.targets:
                if target.revision == pinned:
                    return target
        weighted = self._weighted
        if len(weighted) == 1:
            return weighted[0]
        if not weighted:
            return None
        point = self._rng.random() * self._total
        return weighted[bisect_right(self._cumulative, point)]

    def weighted_target(self, revision: str) -> BoundTarget | None:
        """The target of ``revision`` if it gets a share of this route's traffic (weight > 0)."""
        return self._weighted_by_name.get(revision)

    def target_named(self, revision: str) -> BoundTarget | None:
        for target in self.targets:
            if target.revision == revision:
                return target
        return None

    def shard(self, headers: list[tuple[bytes, bytes]], path: bytes) -> int:
        """The shard of the request's key (``shards`` > 0), or -1 when it carries none.

        The key is decoded as the app sees it: a header's value as latin-1 (as
        ASGI servers do), a path segment percent-decoded as UTF-8."""
        name = self.affinity_header
        if name is not None:
            for header, value in headers:
                if header.lower() == name:
                    return shard_of(value.decode("latin-1"), self.shards) if value else -1
            return -1
        rest = self.forward_path(path)
        under = self.affinity_under
        if under != b"/" and rest.startswith(under) and (len(rest) == len(under) or rest[len(under)] == 0x2F):
            rest = rest[len(under):]
        parts = rest.split(b"/", self.affinity_segment + 2)
        index = self.affinity_segment + 1  # parts[0] is the "" before the leading slash
        if index >= len(parts) or not parts[index]:
            return -1
        return shard_of(urllib.parse.unquote_to_bytes(parts[index]).decode("utf-8", "replace"), self.shards)

    def pick_owner(self, target: BoundTarget, shard: int, exclude: set[Endpoint] | None = None) -> Endpoint | None:
        """The endpoint owning ``shard`` when it serves ``target`` (and is not excluded); else `pick_endpoint`."""
        owner = target.owners.get(shard)
        if owner is not None and not (exclude and owner in exclude):
            return owner
        return self.pick_endpoint(target, exclude)

    def pick_endpoint(self, target: BoundTarget, exclude: set[Endpoint] | None = None) -> Endpoint | None:
        """Power of two choices on in-flight counts; None if nothing is left."""
        endpoints = target.endpoints
        if exclude:
            endpoints = [e for e in endpoints if e not in exclude]
        count = len(endpoints)
        if count == 1:
            return endpoints[0]
        if count == 0:
            return None
        if count == 2:
            a, b = endpoints
        else:
            i = self._rng.randrange(count)
            j = self._rng.randrange(count - 1)
            a, b = endpoints[i], endpoints[j + 1 if j >= i else j]
        if a.in_flight == b.in_flight:
            return a if self._rng.random() < 0.5 else b
        return a if a.in_flight < b.in_flight else b


class EndpointRegistry:
    """One :class:`Endpoint` per address for the life of the gateway."""

    def __init__(self, settings: GatewaySettings, loop: asyncio.AbstractEventLoop) -> None:
        self._settings = settings
        self._loop = loop
        self._endpoints: dict[str, Endpoint] = {}

    def get(self, address: str) -> Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = self._endpoints[address] = Endpoint(address, self._settings, self._loop)
        return endpoint

    def keep_only(self, addresses: set[str]) -> None:
        """Retire every endpoint not in ``addresses`` (closing its idle connections)."""
        for address in list(self._endpoints):
            if address not in addresses:
                self._endpoints.pop(address).retire()

    def close_all(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.retire()
        self._endpoints.clear()

    def all(self) -> list[Endpoint]:
        return list(self._endpoints.values())


class Router:
    """A :class:`RouteTable` indexed by host, bound to live endpoints and stats."""

    __slots__ = ("_by_host", "generation", "table")

    def __init__(
        self,
        table: RouteTable,
        endpoints: EndpointRegistry,
        metrics: Metrics,
        rng: random.Random,
    ) -> None:
        self.table = table
        self.generation = table.generation
        by_host: dict[bytes, list[BoundRoute]] = {}
        for route in table.routes:
            targets = []
            for t in route.targets:
                bound_endpoints = [endpoints.get(address) for address in dict.fromkeys(t.endpoints)]
                owners = None
                if route.owners and route.affinity is not None:
                    by_address = {e.address: e for e in bound_endpoints}
                    owners = {s: by_address[a] for s, a in route.owners.items() if a in by_address}
                targets.append(
                    BoundTarget(
                        t.revision, t.weight, bound_endpoints, metrics.stats(route.app, t.revision, route.component), owners
                    )
                )
            bound = BoundRoute(route, targets, rng)
            names = {route.host} | {f"{route.host}.{domain}" for domain in table.domains}
            for name in names:
                by_host.setdefault(name.encode("latin-1"), []).append(bound)
        for routes in by_host.values():
            routes.sort(key=lambda r: len(r.prefix), reverse=True)
        self._by_host = by_host

    def addresses(self) -> set[str]:
        return {e for r in self.table.routes for t in r.targets for e in t.endpoints}

    def match(self, host: bytes, path: bytes) -> BoundRoute | None:
        """The route for a lowercased, port-less Host and a path (no query)."""
        routes = self._by_host.get(host)
        if routes is None:
            return None
        for route in routes:
            if route.matches(path):
                return route
        return None
