"""When to restart a replica that ended, and when to call it a crash loop.

Kept free of processes and I/O so the policy can be tested on its own with a
`ManualClock`. The rules, chosen to resemble Kubernetes' CrashLoopBackOff while
reporting the loop sooner:

* Each unexpected end (crash, exit, failed liveness, never ready) doubles the
  delay before the next start, from ``initial_backoff`` up to ``max_backoff``.
* A replica that stays ready for ``reset_after`` seconds is forgiven: the
  delay and the crash history start over.
* It is a crash loop when ``crashloop_crashes`` ends happen within
  ``crashloop_window`` seconds, or when ``crashloop_unready`` processes in a
  row end without ever becoming ready (a broken import never gets faster).
  A crash-looping replica is still retried, every ``max_backoff`` seconds,
  because the cause may be outside it (a database coming back).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from clearway.runtime.clock import Clock

__all__ = ["RestartDecision", "RestartPolicy", "RestartTracker"]


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff: float = 0.5
    multiplier: float = 2.0
    max_backoff: float = 30.0
    reset_after: float = 60.0
    crashloop_window: float = 60.0
    crashloop_crashes: int = 5
    crashloop_unready: int = 3


@dataclass(frozen=True)
class RestartDecision:
    delay: float
    crashloop: bool


class RestartTracker:
    """The restart history of one replica."""

    def __init__(self, policy: RestartPolicy, clock: Clock) -> None:
        self._policy = policy
        self._clock = clock
        self._ends: deque[float] = deque()
        self._consecutive = 0
        self._unready_in_a_row = 0
        self._ready_since: float | None = None

    def became_ready(self) -> None:
        self._ready_since = self._clock.monotonic()
        self._unready_in_a_row = 0

    def still_ready(self) -> None:
        """Call now and then while ready: forgives the past once ready long enough."""
        if self._ready_since is None:
            return
        if self._clock.monotonic() - self._ready_since >= self._policy.reset_after:
            self._ends.clear()
            self._consecutive = 0

    def ended(self, *, was_ready: bool) -> RestartDecision:
        """Record an unexpected end of the current process and decide what comes next."""
        policy = self._policy
        self.still_ready()
        self._ready_since = None
        now = self._clock.monotonic()
        self._ends.append(now)
        while self._ends and now - self._ends[0] > policy.crashloop_window:
            self._ends.popleft()
        self._unready_in_a_row = 0 if was_ready else self._unready_in_a_row + 1
        crashloop = (
            len(self._ends) >= policy.crashloop_crashes
            or self._unready_in_a_row >= policy.crashloop_unready
        )
        delay = min(
            policy.initial_backoff * policy.multiplier**self._consecutive, policy.max_backoff
        )
        self._consecutive += 1
        if crashloop:
            delay = policy.max_backoff
        return RestartDecision(delay=delay, crashloop=crashloop)
