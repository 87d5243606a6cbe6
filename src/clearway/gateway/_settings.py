"""Tunable limits and timeouts of the gateway, in one frozen value.

They are gathered here, instead of being module constants, so that tests can
start a gateway with a 0.2 s hold timeout or a tiny header limit without
patching anything, and so that the CLI has exactly one place to map its flags
onto.  The defaults are what the control plane runs with.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GatewaySettings"]


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Limits and timeouts (seconds) applied by the gateway."""

    #: How long a client may take to send a complete request head (slowloris).
    header_timeout: float = 10.0
    #: How long an idle keep-alive client connection is kept open.
    keepalive_timeout: float = 60.0
    #: How long connecting to a replica may take before trying another one.
    connect_timeout: float = 5.0
    #: How long a request waits for a revision that has no ready replica.
    hold_timeout: float = 30.0
    #: Requests held at once per revision (a flood at zero replicas); the next
    #: ones get a 503 with ``Retry-After`` at once rather than piling up.
    max_held: int = 1000
    #: How long ``close()`` lets in-flight requests finish before cutting them.
    shutdown_grace: float = 10.0
    #: Request line plus headers larger than this get a 413.
    max_head_bytes: int = 64 * 1024
    #: Idle keep-alive connections kept per replica endpoint.
    max_idle_per_endpoint: int = 512
    #: A pooled connection idle for longer is closed instead of reused.  It is
    #: kept below uvicorn's 5 s keep-alive so that we never race the replica
    #: closing its end of a connection we are about to reuse.
    upstream_idle_timeout: float = 4.0
    #: Request body bytes buffered while the upstream connection is not ready
    #: yet; past this, reading from the client pauses.
    max_pending_body: int = 256 * 1024
    #: Attempts at sending one request (connect failures and stale reused
    #: connections each count as one).
    max_attempts: int = 3
