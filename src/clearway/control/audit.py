"""The audit log: every state-changing API call, who made it and how it ended.

An ASGI middleware, not a line in each handler, so no route can forget it and
refused calls (401, 403, 4xx, even a crash) are recorded like granted ones:
for every POST, PUT, PATCH and DELETE it writes one row — time, principal
("operator", a replica id, or "anonymous" when no credential was valid),
method, path, status, the app when known and a short detail — once the
response has been sent.

Handlers add what only they know through `note` (the app a deploy created,
the component scaled). Nothing secret goes in: never a token, never an
environment value (a deploy records the keys of its ``--env``, not the
values), and error messages recorded for refused calls never echo them either
(``control.uploads.parse_env`` names keys only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clearway.control.store import Store

log = logging.getLogger("clearway.control")

#: Methods that change state, hence are audited.
AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Longest detail kept.
MAX_DETAIL = 300

_STATE_KEY = "clearway_audit"


def note(request: Request, *, app: str | None = None, detail: str | None = None) -> None:
    """Attach the app and a short detail to the audit row of this request."""
    entry: dict[str, Any] = request.scope.setdefault("state", {}).setdefault(_STATE_KEY, {})
    if app is not None:
        entry["app"] = app
    if detail is not None:
        entry["detail"] = detail


class AuditMiddleware:
    """Writes an audit row for each state-changing request (see the module docstring).

    ``identify(authorization_header)`` names the principal without raising.
    """

    def __init__(self, app: ASGIApp, *, store: Store, identify: Callable[[str], str]) -> None:
        self.app = app
        self.store = store
        self.identify = identify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in AUDITED_METHODS:
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self._record(scope, status)

    def _record(self, scope: Scope, status: int) -> None:
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        entry: dict[str, Any] = scope.get("state", {}).get(_STATE_KEY, {})
        path_params = scope.get("path_params") or {}
        app = entry.get("app") or path_params.get("name")
        detail = entry.get("detail")
        try:
            self.store.add_audit(
                principal=self.identify(authorization),
                method=scope["method"],
                path=scope["path"],
                status=status,
                app=app if isinstance(app, str) else None,
                detail=detail[:MAX_DETAIL] if isinstance(detail, str) else None,
            )
        except Exception:
            # The response is gone already; a full disk must not also break the API.
            log.warning("could not write the audit record of %s %s", scope["method"], scope["path"], exc_info=True)
