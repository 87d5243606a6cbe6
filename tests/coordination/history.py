"""A history of what lock clients did and believed, and a checker over it.

Clients record, on one monotonic clock:

* lease grants and every *successful* renewal, with the time the request was
  *sent*: a client's own deadline is ``last successful renewal sent + ttl -
  margin``, which must end before the backend can expire the lease — or,
  where the renewals cannot be seen (the SDK renews them inside a replica),
  the deadline the client *reported* while acting (``Lock.deadline``,
  ``Leadership.deadline``, ``Shard.deadline``), with the moment it reported it;
* acquisitions (lock, token, the moment acquire returned) and releases (the
  moment the client stopped acting as holder, before sending the release; a
  holder that noticed a loss records it the same way);
* writes to a `FencedResource`, which accepts a write only if its token is at
  least the highest it has accepted (the unfenced variant accepts everything).

"One monotonic clock" is one process in the in-process tests; across processes
of one Linux machine it is ``CLOCK_MONOTONIC`` (`time.monotonic`), which is
system-wide — the same clock in every process, not reset per process, and not
virtualised by the replicas' sandbox (no time namespace) — so times recorded by
different processes compare (``tests/e2e/test_coordination_history.py``).

An acquisition is *valid* from the moment acquire returned until the earlier of
its release and its client's deadline. `check` reports:

1. two acquisitions of one lock whose validity intervals overlap (for a
   singleton's lock: two leaders at once);
2. tokens of one lock that do not strictly increase in acquisition order;
3. a resource that accepted a write with a token lower than one it had already
   accepted (a stale holder got through);
4. a resource that refused a write its writer made while still valid (fencing
   that refuses a rightful holder: it cannot happen if 1 holds, so seeing it
   means the history or the resource is wrong).

`check_owned_again` reports a lock (a shard, a singleton) left without a valid
holder for longer than a bound: the takeover promise.

The checker must be able to fail: an unfenced resource written by a holder that
was paused past its TTL shows violation 3 (``test_history.py``), and so does an
unfenced `replayed` copy of a real multi-process run; validity not bounded by
the deadline (``check(history, bounded=False)``) shows violation 1 when a holder
was killed or paused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Lease:
    """What a client's deadline is computed from: a grant and its renewals (sending
    times), or the deadlines it reported itself ((when reported, deadline))."""

    ttl: float | None = None
    granted_sent: float = 0.0
    renewals_sent: list[float] = field(default_factory=list)
    reported: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Acquisition:
    client: str
    lock: str
    lease: str
    token: int
    start: float
    released: float | None = None


@dataclass(frozen=True)
class Validity:
    client: str
    lock: str
    token: int
    start: float
    end: float


@dataclass(frozen=True)
class Write:
    client: str
    resource: str
    token: int
    at: float
    accepted: bool


class History:
    """Everything the clients did; ``margin`` is the safety margin of their deadlines (s)."""

    def __init__(self, *, margin: float) -> None:
        self.margin = margin
        self._leases: dict[str, _Lease] = {}
        self.acquisitions: list[Acquisition] = []
        self.writes: list[Write] = []

    def granted(self, lease: str, ttl: float, sent: float) -> None:
        self._leases[lease] = _Lease(ttl=ttl, granted_sent=sent)

    def renewed(self, lease: str, sent: float) -> None:
        self._leases[lease].renewals_sent.append(sent)

    def acquired(self, client: str, lock: str, lease: str, token: int, at: float) -> None:
        self.acquisitions.append(Acquisition(client, lock, lease, token, at))

    def released(self, client: str, lock: str, at: float) -> None:
        for i in range(len(self.acquisitions) - 1, -1, -1):
            a = self.acquisitions[i]
            if a.client == client and a.lock == lock and a.released is None:
                self.acquisitions[i] = Acquisition(a.client, a.lock, a.lease, a.token, a.start, at)
                return
        raise AssertionError(f"{client} released {lock} without holding it")

    def reported(self, lease: str, at: float, deadline: float) -> None:
        """The client said, at ``at``, that it counts on ``lease`` until ``deadline``."""
        self._leases.setdefault(lease, _Lease()).reported.append((at, deadline))

    def deadline(self, lease: str) -> float:
        """When the client stops believing in ``lease``: its deadline, extended until it lapses once."""
        record = self._leases[lease]
        if record.ttl is None:
            return self._reported_deadline(record)
        deadline = record.granted_sent + record.ttl - self.margin
        for sent in sorted(record.renewals_sent):
            if sent >= deadline:
                break  # lapsed: the client has lost its lease; later renewals do not revive the lock
            deadline = max(deadline, sent + record.ttl - self.margin)
        return deadline

    @staticmethod
    def _reported_deadline(record: _Lease) -> float:
        # The first report bounds the start; later ones extend it only while it has not
        # lapsed (a report made after its own deadline is a stale holder acting: it can
        # only repeat a deadline already past, and must not revive the holding).
        reports = sorted(record.reported)
        if not reports:
            return -math.inf
        deadline = reports[0][1]
        for at, reported in reports[1:]:
            if at >= deadline:
                break
            deadline = max(deadline, reported)
        return deadline

    def validity(self, *, bounded: bool = True) -> list[Validity]:
        """Each acquisition's validity; with ``bounded=False`` the client's deadline is
        ignored (valid until it released or noticed the loss, if ever) — wrong, and
        only there to show that the checker catches what the deadline is for."""
        return [
            Validity(
                a.client,
                a.lock,
                a.token,
                a.start,
                min(
                    a.released if a.released is not None else math.inf,
                    self.deadline(a.lease) if bounded else math.inf,
                ),
            )
            for a in self.acquisitions
        ]

    def apply(self, event: Mapping[str, Any]) -> None:
        """Record one event a replica logged (``tests/e2e/test_coordination_history.py``).

        ``{"ev": "acquired" | "acting" | "released" | "lost", "client", "lock",
        "token", "at", "deadline"}``: ``acquired`` starts a holding, ``acting``
        is the holder saying (before acting, a write say) that it counts on the
        holding until ``deadline``, ``released`` and ``lost`` end it (the moment
        the client stopped acting). Each holding is its own lease here
        (``client/lock/token``), bounded by the deadlines it reported.
        """
        kind, client, lock, token = event["ev"], str(event["client"]), str(event["lock"]), int(event["token"])
        lease = f"{client}/{lock}/{token}"
        at = float(event["at"])
        if kind == "acquired":
            self.acquired(client, lock, lease, token, at)
        elif kind in ("released", "lost"):
            self.released(client, lock, at)
        elif kind != "acting":
            raise ValueError(f"unknown history event {kind!r}: {event}")
        if "deadline" in event:
            self.reported(lease, at, float(event["deadline"]))

    def replayed(self, *, fenced: bool) -> History:
        """A copy whose writes are replayed, in the order they reached their resources,
        through resources of the same names that are ``fenced`` or not."""
        copy = History(margin=self.margin)
        copy._leases = self._leases
        copy.acquisitions = list(self.acquisitions)
        resources: dict[str, FencedResource] = {}
        for w in self.writes:
            resource = resources.setdefault(w.resource, FencedResource(w.resource, copy, fenced=fenced))
            resource.write(w.client, w.token, w.at)
        return copy


def check(history: History, *, bounded: bool = True) -> list[str]:
    """Every violation in ``history`` (empty when it is clean); ``bounded``: see `History.validity`."""
    violations: list[str] = []
    validity = history.validity(bounded=bounded)
    intervals = sorted(validity, key=lambda v: (v.lock, v.start))
    by_lock: dict[str, list[Validity]] = {}
    for v in intervals:
        by_lock.setdefault(v.lock, []).append(v)
    for lock, held in by_lock.items():
        for i, a in enumerate(held):
            for b in held[i + 1 :]:
                if b.start < a.end and a.start < b.end:
                    violations.append(
                        f"lock {lock}: {a.client} (token {a.token}, valid {a.start:.3f}..{a.end:.3f}) and "
                        f"{b.client} (token {b.token}, valid {b.start:.3f}..{b.end:.3f}) held it at once"
                    )
        for a, b in itertools.pairwise(held):
            if b.token <= a.token:
                violations.append(
                    f"lock {lock}: token {b.token} of {b.client} (at {b.start:.3f}) follows token {a.token} "
                    f"of {a.client} (at {a.start:.3f}): tokens must strictly increase"
                )
    highest: dict[str, tuple[int, str]] = {}
    for w in history.writes:
        if not w.accepted:
            continue
        top = highest.get(w.resource)
        if top is not None and w.token < top[0]:
            violations.append(
                f"resource {w.resource}: accepted token {w.token} of {w.client} (at {w.at:.3f}) after token "
                f"{top[0]} of {top[1]}: a stale holder's write got through"
            )
        if top is None or w.token >= top[0]:
            highest[w.resource] = (w.token, w.client)
    valid: dict[tuple[str, int], list[Validity]] = {}
    for v in validity:
        valid.setdefault((v.client, v.token), []).append(v)
    for w in history.writes:
        if not w.accepted and any(v.start <= w.at < v.end for v in valid.get((w.client, w.token), [])):
            violations.append(
                f"resource {w.resource}: refused token {w.token} of {w.client} at {w.at:.3f}, while it was "
                "still a valid holder: fencing refused a rightful write"
            )
    return violations


def check_owned_again(
    history: History,
    locks: Iterable[str],
    *,
    within: float,
    since: float,
    until: float,
    outages: Iterable[tuple[float, float]] = (),
    after_outage: float = 0.0,
) -> list[str]:
    """Every time one of ``locks`` had no valid holder for longer than ``within`` seconds
    between ``since`` and ``until`` (a shard or a singleton not taken over in time).

    ``outages`` are windows (start, end) in which the backend was down: nothing can
    be taken over then, so a gap that overlaps one may last until ``after_outage``
    seconds after its end."""
    windows = list(outages)
    violations: list[str] = []
    held: dict[str, list[Validity]] = {lock: [] for lock in locks}
    for v in history.validity():
        if v.lock in held:
            held[v.lock].append(v)

    def too_long(start: float, end: float) -> str | None:
        allowed = start + within
        for down, up in windows:
            if down < end and start < up:
                allowed = max(allowed, up + after_outage)
        return f"more than allowed by {allowed:.3f}" if end > allowed else None

    for lock, intervals in sorted(held.items()):
        covered = since  # the lock was held (or the run had not started) until here
        for v in sorted(intervals, key=lambda v: v.start):
            if (excess := too_long(covered, v.start)) is not None:
                violations.append(
                    f"lock {lock}: no valid holder from {covered:.3f} to {v.start:.3f} "
                    f"({v.start - covered:.2f} s, {excess})"
                )
            covered = max(covered, v.end)
        if (excess := too_long(covered, until)) is not None:
            violations.append(
                f"lock {lock}: no valid holder from {covered:.3f} to the end of the run at {until:.3f} "
                f"({until - covered:.2f} s, {excess})"
            )
    return violations


class FencedResource:
    """A store that refuses writes with a token lower than the highest it accepted (``fenced``)."""

    def __init__(self, name: str, history: History, *, fenced: bool = True) -> None:
        self.name = name
        self.history = history
        self.fenced = fenced
        self.highest = 0
        self.values: list[tuple[str, int]] = []

    def write(self, client: str, token: int, at: float) -> bool:
        accepted = not self.fenced or token >= self.highest
        if accepted:
            self.highest = max(self.highest, token)
            self.values.append((client, token))
        self.history.writes.append(Write(client, self.name, token, at, accepted))
        return accepted
