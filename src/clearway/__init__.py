"""clearway: describe your app in Python; the platform runs it.

The public API is exactly what this module re-exports (``tests/test_public_api.py``
keeps it honest). Layers, from the top (``.importlinter`` enforces them):

    cli  ->  control  ->  backends  ->  runtime | gateway  ->  sdk  ->  spec

Importing ``clearway`` imports only the SDK and the spec model: importing a
user's app must never start anything. ``CloudEvent`` (the ``cloudevents`` SDK's
class) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clearway.exceptions import (
    APIError,
    AppLoadError,
    AuthenticationError,
    ClearwayError,
    ControlPlaneError,
    DeployError,
    FunctionError,
    NotRunningError,
    RuntimeStartError,
    SpecError,
)
from clearway.sdk import (
    App,
    Component,
    Cron,
    Every,
    Function,
    Job,
    Request,
    Response,
    identity_headers,
    service_url,
)
from clearway.sdk.coordination import Leadership, Lock, LockError, LockTimeout, leader
from clearway.sdk.sharding import Shard, shard_for
from clearway.spec import AppSpec, CanaryPolicy, FunctionSpec, ScheduleSpec, ServiceSpec, WorkerSpec

if TYPE_CHECKING:
    from cloudevents.v1.http import CloudEvent

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "App",
    "AppLoadError",
    "AppSpec",
    "AuthenticationError",
    "CanaryPolicy",
    "ClearwayError",
    "CloudEvent",
    "Component",
    "ControlPlaneError",
    "Cron",
    "DeployError",
    "Every",
    "Function",
    "FunctionError",
    "FunctionSpec",
    "Job",
    "Leadership",
    "Lock",
    "LockError",
    "LockTimeout",
    "NotRunningError",
    "Request",
    "Response",
    "RuntimeStartError",
    "ScheduleSpec",
    "ServiceSpec",
    "Shard",
    "SpecError",
    "WorkerSpec",
    "__version__",
    "identity_headers",
    "leader",
    "service_url",
    "shard_for",
]


def __getattr__(name: str) -> Any:
    if name == "CloudEvent":
        from cloudevents.v1.http import CloudEvent

        return CloudEvent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
