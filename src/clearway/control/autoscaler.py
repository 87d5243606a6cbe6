"""Function autoscaling: replicas follow in-flight concurrency, down to zero when idle.

The signal is the one Knative's autoscaler uses, concurrency: requests being
answered plus requests waiting (the gateway's in-flight count holds both), per function of a revision, read from the
gateway (``Backend.load``, which counts both per route component) ten times
a second. Concurrency rather than requests per second because a function's
capacity is how many calls it can have open at once (``max_concurrency``),
whatever each one costs.

The decision, for a function with ``max_concurrency`` c and current replicas n:

* **target** per replica is 70% of c (head room, so a burst is absorbed while
  a new replica starts);
* the **stable** wish is ceil(mean concurrency over the last 60 s / target);
  the **panic** wish the same over the last 6 s. When the panic wish is at
  least twice n, the autoscaler is in panic: it scales up to the panic wish at
  once and never scales down while in panic (a burst must not be met by
  half-measures a minute late). Otherwise it follows the stable wish, so a
  short lull does not tear replicas down;
* **from zero**: a request held by the gateway for a function at zero
  replicas scales it to at least one at once — that is a cold start, and the
  time until it is served is what ``bench/`` measures;
* **to zero**: with no request answered or waiting for ``idle_timeout``
  seconds, the function goes to ``min_replicas`` (0 by default). Short of
  that it keeps at least one replica. A new revision starts with one, so the
  deploy proves the function starts, and idles down from there;
* everything is clamped to ``[min_replicas, max_replicas]``.

Every change is a `Decision` with its reason, kept in memory for ``clearway
functions`` and written to the app's events. Nothing else is persisted: after
a control-plane restart the autoscaler starts from the replicas the backend
still runs (adopted, not restarted), and the idle clock starts anew.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from clearway.backends.base import ComponentLoad
from clearway.spec.model import FunctionSpec

__all__ = ["PANIC_WINDOW", "STABLE_WINDOW", "TARGET_UTILISATION", "Autoscaler", "Decision"]

STABLE_WINDOW = 60.0
PANIC_WINDOW = 6.0
#: The share of ``max_concurrency`` each replica is aimed at.
TARGET_UTILISATION = 0.7
#: Decisions kept per function, newest last.
KEEP_DECISIONS = 20

Key = tuple[str, str]  # (revision, function)


@dataclass(frozen=True)
class Decision:
    at: float
    revision: str
    function: str
    replicas_from: int
    replicas_to: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "revision": self.revision,
            "function": self.function,
            "from": self.replicas_from,
            "to": self.replicas_to,
            "reason": self.reason,
        }


@dataclass
class _State:
    replicas: int
    #: (time, concurrency) samples within the stable window.
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    #: When a request was last answered or waiting.
    last_active: float = 0.0
    last_requests: int = -1
    in_flight: int = 0
    held: int = 0
    #: Scale-ups from zero replicas (each a cold start).
    cold_starts: int = 0
    decisions: deque[Decision] = field(default_factory=lambda: deque(maxlen=KEEP_DECISIONS))


class Autoscaler:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall = wall
        self._state: dict[Key, _State] = {}

    def replicas(self, revision: str, function: FunctionSpec, *, running: int | None = None) -> int:
        """The replicas wanted now for ``function`` of ``revision``.

        Before any decision: what the backend already runs (a restarted control
        plane keeps adopted replicas); for a new revision one replica (or
        ``min_replicas``), so that a deploy proves the function starts — it then
        idles down to ``min_replicas`` like any other.
        """
        state = self._state.get((revision, function.name))
        if state is None:
            start = running if running is not None else max(function.min_replicas, 1)
            start = min(max(start, function.min_replicas), function.max_replicas)
            state = self._state[(revision, function.name)] = _State(replicas=start, last_active=self.clock())
        return state.replicas

    def force(self, revision: str, function: FunctionSpec, replicas: int, *, reason: str) -> Decision:
        """Set the replicas now (``clearway scale APP FUNCTION N``); later readings decide as usual,
        so a function forced to zero wakes at its next request. The count is clamped to
        ``max_replicas`` but may go below ``min_replicas`` (the operator asked)."""
        self.replicas(revision, function)
        state = self._state[(revision, function.name)]
        wanted = min(replicas, function.max_replicas)
        decision = Decision(self.wall(), revision, function.name, state.replicas, wanted, reason)
        state.decisions.append(decision)
        state.replicas = wanted
        # Forced to zero means idle from now on: no stale readings wake it before a request does.
        state.last_active = self.clock() - (function.idle_timeout if wanted == 0 else 0)
        state.samples.clear()
        return decision

    def known(self, key: Key) -> bool:
        return key in self._state

    def forget(self, keep: Iterable[Key]) -> None:
        """Drop the state of functions no longer running."""
        wanted = set(keep)
        for key in list(self._state):
            if key not in wanted:
                del self._state[key]

    def update(self, loads: Iterable[ComponentLoad], functions: Mapping[Key, FunctionSpec]) -> list[Decision]:
        """Take one reading of the gateway's load; the decisions it leads to."""
        now = self.clock()
        by_key = {(load.revision, load.component): load for load in loads if load.component}
        decisions = []
        for key, spec in functions.items():
            state = self._state.get(key)
            if state is None:
                self.replicas(key[0], spec)
                state = self._state[key]
            load = by_key.get(key)
            in_flight, held, requests = (load.in_flight, load.held, load.requests) if load else (0, 0, 0)
            state.in_flight, state.held = in_flight, held
            concurrency = in_flight  # the gateway counts held requests as in flight too
            if concurrency > 0 or (state.last_requests >= 0 and requests != state.last_requests):
                state.last_active = now
            state.last_requests = requests
            state.samples.append((now, concurrency))
            while state.samples and state.samples[0][0] < now - STABLE_WINDOW:
                state.samples.popleft()
            wanted, reason = self._decide(spec, state, now)
            if wanted != state.replicas:
                if state.replicas == 0:
                    state.cold_starts += 1
                decision = Decision(self.wall(), key[0], key[1], state.replicas, wanted, reason)
                state.decisions.append(decision)
                state.replicas = wanted
                decisions.append(decision)
        return decisions

    def _decide(self, spec: FunctionSpec, state: _State, now: float) -> tuple[int, str]:
        current = state.replicas
        target = max(spec.max_concurrency * TARGET_UTILISATION, 1e-9)
        stable = _mean(state.samples, now - STABLE_WINDOW)
        panic = _mean(state.samples, now - PANIC_WINDOW)
        want_stable = math.ceil(stable / target)
        want_panic = math.ceil(panic / target)
        idle_for = now - state.last_active

        def clamp(n: int) -> int:
            return min(max(n, spec.min_replicas), spec.max_replicas)

        if current == 0 and state.held > 0:
            wanted = clamp(max(1, want_panic))
            return wanted, f"{state.held} request(s) waiting at zero replicas: cold start"
        if current == 0:
            return 0, ""  # only a waiting request wakes a function at zero (above)
        if idle_for >= spec.idle_timeout:
            return clamp(0), f"idle for {idle_for:.0f}s (idle_timeout {spec.idle_timeout:g}s)"
        if current > 0 and want_panic >= 2 * current:
            wanted = clamp(max(current, want_panic))
            return wanted, (
                f"panic: {panic:.1f} concurrent over {PANIC_WINDOW:g}s against {target:.1f} per replica"
            )
        wanted = clamp(max(1, want_stable))
        if wanted > current:
            return wanted, f"{stable:.1f} concurrent over {STABLE_WINDOW:g}s against {target:.1f} per replica"
        if wanted < current:
            if current > 0 and want_panic >= current:
                return current, ""  # the last seconds still need them
            return wanted, f"{stable:.1f} concurrent over {STABLE_WINDOW:g}s: fewer replicas suffice"
        return current, ""

    def status(self, revision: str, function: str) -> dict[str, object]:
        """What ``clearway functions`` shows for one function of one revision."""
        state = self._state.get((revision, function))
        if state is None:
            return {"replicas": None, "in_flight": 0, "held": 0, "cold_starts": 0, "decisions": []}
        return {
            "replicas": state.replicas,
            "in_flight": state.in_flight,
            "held": state.held,
            "cold_starts": state.cold_starts,
            "idle_seconds": round(self.clock() - state.last_active, 1),
            "decisions": [d.to_json() for d in state.decisions],
        }


def _mean(samples: deque[tuple[float, int]], since: float) -> float:
    values = [c for t, c in samples if t >= since]
    return sum(values) / len(values) if values else 0.0
