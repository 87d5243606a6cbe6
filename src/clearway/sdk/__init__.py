"""The SDK: what a user's app file imports.

Decorators only record intent into an ``App``; nothing here starts a process,
opens a socket or talks to the control plane, so importing a user's app is
always safe (the control plane imports it to read its spec).
"""

from clearway.sdk.app import App, Component
from clearway.sdk.identity import identity_headers, service_url

__all__ = ["App", "Component", "identity_headers", "service_url"]
