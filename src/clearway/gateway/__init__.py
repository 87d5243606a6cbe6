"""clearway's HTTP gateway: the data plane in front of every app's replicas.

Asyncio processes (uvloop + httptools, no framework): a master that binds the
port and N workers that share it (``_workers.py``), each of which routes requests by
Host and path prefix to replica processes, splits traffic between revisions by
weight, holds requests for revisions with no ready replica (a scale from zero;
at most ``max_held`` per revision, for at most ``hold_timeout``, then 503 with
``Retry-After``), and exposes metrics,
load per component (for the autoscaler) and its route generation on an admin
Unix socket.

Run it as a process, as the control plane does::

    python -m clearway.gateway --listen 127.0.0.1:8080 --routes routes.json \\
        --admin-socket gateway.sock [--access-log access.log] [--hold-timeout 30] \\
        [--identity-key keys/signing.pub.pem] [--workers N]

or in-process (tests, the platform)::

    async with Gateway(RouteTable.from_json(data), port=0) as gateway:
        print(gateway.url)
        gateway.reload(load_routes("routes.json"))

Module map: ``_routes`` (the routes file), ``_router`` (matching and balancing),
``_proxy`` (client connections: the hot path), ``_identity`` (who is
calling and may they: replica and platform tokens, internal-route policy, pin tokens),
``_upstream`` (replica connections and pools), ``_holding``, ``_metrics``, ``_access_log``,
``_admin``, ``_error_pages``, ``_settings``, ``_gateway``
(lifecycle), ``_workers`` (the master and its workers), ``_merge`` (their
admin answers added up) and ``_cli``.  Only the names below are public.

The per-request modules run compiled by mypyc when ``scripts/install`` built
them, and as Python otherwise; ``compiled`` says which (``_compiled`` decides,
and must be imported before them).
"""

from . import _compiled
from ._gateway import Gateway, GatewayState, ListenError
from ._identity import IdentityKeyError
from ._routes import Affinity, AllowRule, Route, RoutesError, RouteTable, Target, load_routes
from ._settings import GatewaySettings

#: True when the hot path (``_proxy``, ``_upstream``, ...) runs as mypyc-compiled C.
compiled: bool = _compiled.use_compiled()

__all__ = [
    "Affinity",
    "AllowRule",
    "Gateway",
    "GatewaySettings",
    "GatewayState",
    "IdentityKeyError",
    "ListenError",
    "Route",
    "RouteTable",
    "RoutesError",
    "Target",
    "compiled",
    "load_routes",
]
