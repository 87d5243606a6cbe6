"""What the coordination backends hand out: leases, holdings, and the checks on names and TTLs.

A **lease** is a promise of liveness with a time to live: it lives ``ttl``
seconds after it was granted or last renewed (``keepalive``), then the backend
expires it, and everything attached to it goes with it. A **holding** is a
lock held with a lease; its ``token`` (the fencing token) is the revision at
which the holder's queue entry was created: it strictly increases across all
successive holders of a lock, so a resource that remembers the highest token it
has seen can refuse a holder whose lease already ended (see `clearway.coordination`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clearway.exceptions import CoordinationError, CoordinationUnavailable, LeaseGone
from clearway.spec.ids import MAX_LOCK_NAME, check_lock_name

__all__ = [
    "MAX_LOCK_NAME",
    "MAX_OWNER",
    "MAX_TTL",
    "MIN_TTL",
    "CoordinationError",
    "CoordinationUnavailable",
    "Holding",
    "Lease",
    "LeaseGone",
    "check_lock_name",
    "check_owner",
    "check_ttl",
    "check_wait",
]

#: Bounds of a lease's time to live, in seconds. Below a second, the round trip of a
#: renewal and the backend's own expiry granularity (etcd checks every 500 ms) eat the TTL.
MIN_TTL = 1.0
MAX_TTL = 300.0
MAX_OWNER = 400


@dataclass(frozen=True)
class Lease:
    """A lease: ``id`` (opaque string), its ``owner`` and the ``ttl`` as granted, in seconds.

    The granted ttl can be longer than the one asked for (etcd rounds up to whole
    seconds and has a minimum of its own, 2 s with its default election timeout):
    the holder's deadlines must be computed from this one.
    """

    id: str
    owner: str
    ttl: float


@dataclass(frozen=True)
class Holding:
    """Lock ``lock`` held with ``lease`` by ``owner``; ``token`` is its fencing token."""

    lock: str
    token: int
    lease: str
    owner: str


def check_ttl(ttl: object) -> float:
    """``ttl`` as a float when it is a valid lease TTL (1 to 300 seconds), else ValueError."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ValueError(f"a lease TTL must be a number of seconds, not {type(ttl).__name__}")
    value = float(ttl)
    if not math.isfinite(value) or not MIN_TTL <= value <= MAX_TTL:
        raise ValueError(
            f"lease TTL {ttl!r} is out of range: it must be between {MIN_TTL:g} and {MAX_TTL:g} seconds"
        )
    return value


def check_wait(wait: object) -> float:
    """``wait`` as a float when it is a valid acquire wait (a finite number >= 0), else ValueError."""
    if isinstance(wait, bool) or not isinstance(wait, int | float):
        raise ValueError(f"an acquire wait must be a number of seconds, not {type(wait).__name__}")
    value = float(wait)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"acquire wait {wait!r} must be a finite number of seconds >= 0")
    return value


def check_owner(owner: object) -> str:
    """``owner`` when it is a valid lease owner (a non-empty string of at most 400 characters)."""
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER:
        raise ValueError(f"a lease owner must be a non-empty string of at most {MAX_OWNER} characters, not {owner!r}")
    return owner
