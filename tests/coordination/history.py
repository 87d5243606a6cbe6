"""A history of what lock clients did and believed, and a checker over it.

Clients record, on one monotonic clock (the tests run them in one process):

* lease grants and every *successful* renewal, with the time the request was
  *sent*: a client's own deadline is ``last successful renewal sent + ttl -
  margin``, which must end before the backend can expire the lease;
* acquisitions (lock, token, the moment acquire returned) and releases (the
  moment the client stopped acting as holder, before sending the release);
* writes to a `FencedResource`, which accepts a write only if its token is at
  least the highest it has accepted (the unfenced variant accepts everything).

An acquisition is *valid* from the moment acquire returned until the earlier of
its release and its client's deadline. `check` reports:

1. two acquisitions of one lock whose validity intervals overlap;
2. tokens of one lock that do not strictly increase in acquisition order;
3. a resource that accepted a write with a token lower than one it had already
   accepted (a stale holder got through).

The checker must be able to fail: an unfenced resource written by a holder that
was paused past its TTL shows violation 3 (``test_history.py``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field


@dataclass
class _Lease:
    ttl: float
    granted_sent: float
    renewals_sent: list[float] = field(default_factory=list)


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

    def deadline(self, lease: str) -> float:
        """When the client stops believing in ``lease``: its deadline, renewed until it lapses once."""
        record = self._leases[lease]
        deadline = record.granted_sent + record.ttl - self.margin
        for sent in sorted(record.renewals_sent):
            if sent >= deadline:
                break  # lapsed: the client has lost its lease; later renewals do not revive the lock
            deadline = max(deadline, sent + record.ttl - self.margin)
        return deadline

    def validity(self) -> list[Validity]:
        return [
            Validity(
                a.client,
                a.lock,
                a.token,
                a.start,
                min(a.released if a.released is not None else math.inf, self.deadline(a.lease)),
            )
            for a in self.acquisitions
        ]


def check(history: History) -> list[str]:
    """Every violation in ``history`` (empty when it is clean)."""
    violations: list[str] = []
    intervals = sorted(history.validity(), key=lambda v: (v.lock, v.start))
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
