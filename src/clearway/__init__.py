"""clearway: describe your app in Python; the platform runs it.

The public API is exactly what this module re-exports (``tests/test_public_api.py``
keeps it honest). Layers, from the top (``.importlinter`` enforces them):

    cli  ->  control  ->  backends  ->  runtime | gateway  ->  sdk  ->  spec

Importing ``clearway`` imports only the SDK and the spec model: importing a
user's app must never start anything.
"""

from __future__ import annotations

from clearway.exceptions import (
    APIError,
    AppLoadError,
    AuthenticationError,
    ClearwayError,
    ControlPlaneError,
    DeployError,
    NotRunningError,
    RuntimeStartError,
    SpecError,
)
from clearway.sdk import App, Component, identity_headers, service_url
from clearway.spec import AppSpec, CanaryPolicy, ServiceSpec, WorkerSpec

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "App",
    "AppLoadError",
    "AppSpec",
    "AuthenticationError",
    "CanaryPolicy",
    "ClearwayError",
    "Component",
    "ControlPlaneError",
    "DeployError",
    "NotRunningError",
    "RuntimeStartError",
    "ServiceSpec",
    "SpecError",
    "WorkerSpec",
    "__version__",
    "identity_headers",
    "service_url",
]
