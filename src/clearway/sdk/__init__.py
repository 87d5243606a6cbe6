"""The SDK: what a user's app file imports.

Decorators only record intent into an ``App``; nothing here starts a process,
opens a socket or talks to the control plane, so importing a user's app is
always safe (the control plane imports it to read its spec). Only a
``Function`` handle's ``.remote()``, ``.spawn()`` and ``.map()`` talk to the
platform, and only when the app's code calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clearway.sdk.app import App, Component
from clearway.sdk.functions import Cron, Every, Function, Job, Request, Response
from clearway.sdk.identity import identity_headers, service_url

if TYPE_CHECKING:
    from cloudevents.v1.http import CloudEvent

__all__ = [
    "App",
    "CloudEvent",
    "Component",
    "Cron",
    "Every",
    "Function",
    "Job",
    "Request",
    "Response",
    "identity_headers",
    "service_url",
]


def __getattr__(name: str) -> Any:
    # CloudEvent is imported on first use (see clearway.sdk.functions).
    if name == "CloudEvent":
        from cloudevents.v1.http import CloudEvent

        return CloudEvent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
