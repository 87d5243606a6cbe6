"""Turning whatever a service function returns into one ASGI app.

Users return any ASGI app (Starlette, FastAPI, Django's ``get_asgi_application``)
or any WSGI app (Flask, Django's ``get_wsgi_application``, Bottle). The replica
always serves ASGI with uvicorn; WSGI apps are wrapped with ``a2wsgi``, which
runs them in a thread pool and is what uvicorn itself recommends over its own
deprecated WSGI adapter.

``auto`` decides by signature: an ``async def`` callable, or an object whose
``__call__`` is ``async def``, is ASGI; any other callable is WSGI. Apps that
fool this (an ASGI app written as a sync function returning a coroutine) can be
declared explicitly with ``interface="asgi"``.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

__all__ = ["BadAppObject", "as_asgi", "detect_interface"]


class BadAppObject(Exception):
    """The service function returned something that is not a web app."""


def detect_interface(app: object) -> Literal["asgi", "wsgi"]:
    if not callable(app):
        raise BadAppObject(
            f"the service function returned {type(app).__name__!r}, which is not an ASGI "
            "or WSGI app: return the app object itself, e.g. `return api` (a Starlette, "
            "FastAPI or Flask app)"
        )
    call = app if inspect.isroutine(app) or inspect.isclass(app) else type(app).__call__
    if inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app):
        return "asgi"
    return "wsgi"


def as_asgi(app: object, interface: Literal["auto", "asgi", "wsgi"]) -> Any:
    """The ASGI app to serve; raises `BadAppObject` for things that are not apps."""
    kind = detect_interface(app) if interface == "auto" else interface
    if not callable(app):
        raise BadAppObject(f"the service function returned a non-callable {type(app).__name__!r}")
    if kind == "asgi":
        return app
    from a2wsgi import WSGIMiddleware

    return WSGIMiddleware(app)
