"""Who this replica is, and how it proves it when calling other services.

Every replica gets one credential, ``CLEARWAY_REPLICA_TOKEN``: a short-lived
token signed by the control plane that names its app, revision, component,
replica and incarnation. The replica runtime renews it in the background (the
variable always holds the current one), and the platform revokes it the moment
the replica stops. The gateway serves the internal service URLs only to callers
that present it, and checks the target service's ``allow`` policy against the
identity it names — never against a source address.

Calls within one revision::

    import httpx, clearway as cw
    httpx.get(cw.service_url("pricing") + "/quote", headers=cw.identity_headers())

Calls to another app's service (allowed by that service's ``allow=[...]``)::

    httpx.get(cw.service_url("pricing", app="billing"), headers=cw.identity_headers())

This module reads only the environment: it is importable anywhere and starts
nothing.
"""

from __future__ import annotations

import os

from clearway.exceptions import ClearwayError
from clearway.spec.ids import check_name

__all__ = ["IDENTITY_HEADER", "identity_headers", "service_url"]

#: The request header carrying the caller's replica token to the gateway.
IDENTITY_HEADER = "x-clearway-identity"


def _need(variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ClearwayError(
            f"${variable} is not set: this code is not running in a clearway replica "
            "(`clearway deploy` runs it in one)"
        )
    return value


def identity_headers() -> dict[str, str]:
    """The header that proves to the gateway which replica is calling."""
    return {IDENTITY_HEADER: _need("CLEARWAY_REPLICA_TOKEN")}


def service_url(service: str, *, app: str | None = None) -> str:
    """The internal URL of a service: of this revision by default, else of ``app``'s
    serving revision (the gateway follows that app's deploys and rollbacks)."""
    check_name(service, "service name")
    if app is None or app == os.environ.get("CLEARWAY_APP"):
        variable = "CLEARWAY_SERVICE_" + service.upper().replace("-", "_") + "_URL"
        if app is None or variable in os.environ:
            return _need(variable)
    check_name(app, "app name")
    return f"{_need('CLEARWAY_GATEWAY_URL')}/_apps/{app}/{service}"
