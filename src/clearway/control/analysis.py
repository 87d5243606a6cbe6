"""Canary analysis: is the new revision doing worse than the one it replaces?

The rollout controller (``control.rollouts``) reads the gateway's counters at
the start of a step and again on every pass, and hands the two differences -
the canary's and the stable revision's requests *since the step began* - to
:func:`analyse`, which answers pass, fail or waiting.  Everything here is a
pure function of those windows, the app's :class:`CanaryPolicy` and the time
the step has run, so the rules are tested without processes or clocks.

Choices and their reasons:

* **The canary is compared with the stable revision over the same minutes**,
  not with fixed thresholds.  Both serve the same users at the same time, so
  a slow database or a flaky upstream shows in both and is not held against
  the canary; only the canary's *excess* counts (Flagger and Argo Rollouts
  judge the same way).  The stable's figures count only when it answered at
  least ``min_requests`` in the window - a baseline of three requests is
  noise - and otherwise the baseline is a 0% error rate and no latency
  comparison (``max_p99`` still applies).
* **Only 5xx are failures.**  A 4xx is the server correctly refusing a bad
  request (a missing page, an expired login, a client that went away: the
  gateway's 499); a canary that answers them is doing its job.  They still
  count as requests, so the error rate is ``5xx / all answers``.
* **p99 from the histogram**, the way Prometheus' ``histogram_quantile``
  computes it: find the bucket where the cumulative count reaches 99% of the
  total and interpolate linearly between its bounds.  The true value is
  somewhere in that bucket; linear interpolation is the usual guess and its
  error is bounded by the bucket's width, which ``latency_slack`` absorbs.  A
  p99 in the open +Inf bucket is answered with the last finite bound (60 s):
  a lower bound, but far beyond any sensible limit.
* **A pass needs both revisions' figures.**  Every judged step leaves the
  stable a share of the traffic, so the step waits until the stable, too, has
  ``min_requests`` in the window: only then has the latency comparison been
  made.  (A canary that is slow but sure of its errors would otherwise pass a
  step in which the stable happened to get few requests.)
* **Failing is fast, passing is slow.**  A step fails as soon as the canary
  has ``min_requests`` answers that show it worse - waiting longer only
  hurts more users.  It passes only when it has both the requests *and* the
  step's ``min_duration``: errors that come in bursts (a cron, a cache
  expiry) need time to show.  Too little data is never a pass: it is
  ``waiting``, and says what it waits for.  A canary that gets no traffic
  at all therefore never promotes by itself; an operator decides.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from clearway.backends.base import TrafficSample
from clearway.spec.model import CanaryPolicy

__all__ = ["Analysis", "Outcome", "Summary", "analyse", "p99"]

#: Rates are ratios of integers; compare them with this much room so that
#: 2/100 is not "more than" 1/100 + 1% by a rounding error.
_EPSILON = 1e-12


class Outcome(enum.StrEnum):
    """The verdict on one step of a rollout, so far."""

    #: Enough requests and time, and no worse than the stable: go to the next step.
    PASS = "pass"
    #: Worse than the stable (or than ``max_p99``): roll back.
    FAIL = "fail"
    #: Not enough requests or time yet to tell; nothing is wrong so far.
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class Summary:
    """What one revision did in the window."""

    requests: int
    #: 5xx answers.
    errors: int
    #: Share of non-5xx answers, 0..1; None without requests.
    success_rate: float | None
    #: Seconds; None without requests.
    p99: float | None

    @classmethod
    def of(cls, window: TrafficSample) -> Summary:
        total = window.total
        return cls(
            requests=total,
            errors=window.errors,
            success_rate=1 - window.errors / total if total else None,
            p99=p99(window),
        )

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "success_rate": self.success_rate, "p99": self.p99}


@dataclass(frozen=True, slots=True)
class Analysis:
    """The verdict, why, and the figures it was drawn from."""

    outcome: Outcome
    #: One sentence for humans: the failing comparison, or what is still missing.
    reason: str
    canary: Summary
    #: None when the caller has no stable window (no stable revision, or its counters reset).
    stable: Summary | None

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "canary": self.canary.to_json(),
            "stable": self.stable.to_json() if self.stable is not None else None,
        }


def p99(sample: TrafficSample) -> float | None:
    """The 99th percentile of the request durations in ``sample`` (seconds); None without requests."""
    return _quantile(0.99, sample)


def _quantile(q: float, sample: TrafficSample) -> float | None:
    total = sum(sample.buckets)
    if total == 0:
        return None
    rank = q * total
    bounds = sample.bounds
    below = 0
    for index, count in enumerate(sample.buckets):
        if below + count >= rank:
            if index >= len(bounds):
                # The +Inf bucket has no upper bound to interpolate to.
                return bounds[-1] if bounds else None
            lower = bounds[index - 1] if index > 0 else 0.0
            upper = bounds[index]
            # count > 0 here: ``below < rank <= below + count`` (rank > 0).
            return lower + (upper - lower) * (rank - below) / count
        below += count
    return bounds[-1] if bounds else None  # unreachable: the loop ends at the total


def analyse(
    canary: TrafficSample,
    stable: TrafficSample | None,
    policy: CanaryPolicy,
    elapsed: float,
) -> Analysis:
    """Judge a step from the canary's and the stable's requests since it began, ``elapsed`` seconds ago."""
    ours = Summary.of(canary)
    theirs = Summary.of(stable) if stable is not None else None
    enough = ours.requests >= policy.min_requests
    comparable = theirs is not None and theirs.requests >= policy.min_requests

    def verdict(outcome: Outcome, reason: str) -> Analysis:
        return Analysis(outcome, reason, ours, theirs)

    if enough:
        rate = ours.errors / ours.requests
        baseline = theirs.errors / theirs.requests if comparable and theirs is not None else 0.0
        if rate > baseline + policy.max_error_rate + _EPSILON:
            return verdict(
                Outcome.FAIL,
                f"canary 5xx rate {_percent(rate)} ({ours.errors}/{ours.requests}) exceeds "
                f"stable {_percent(baseline)} + {_percent(policy.max_error_rate)}{_no_baseline(theirs, comparable)}",
            )
        if ours.p99 is not None:
            if comparable and theirs is not None and theirs.p99 is not None:
                limit = theirs.p99 * policy.max_latency_ratio + policy.latency_slack
                if ours.p99 > limit + _EPSILON:
                    return verdict(
                        Outcome.FAIL,
                        f"canary p99 {_ms(ours.p99)} exceeds stable p99 {_ms(theirs.p99)} "
                        f"x {policy.max_latency_ratio:g} + {_ms(policy.latency_slack)} = {_ms(limit)}",
                    )
            if policy.max_p99 is not None and ours.p99 > policy.max_p99 + _EPSILON:
                return verdict(
                    Outcome.FAIL,
                    f"canary p99 {_ms(ours.p99)} exceeds the policy's max_p99 {_ms(policy.max_p99)}",
                )
    if enough and elapsed >= policy.min_duration and not comparable:
        # The stable always has a share while a step is judged: without its figures the
        # latency comparison has not been made, and "could not compare" is not "no worse".
        seen = theirs.requests if theirs is not None else 0
        return verdict(
            Outcome.WAITING,
            f"waiting for the stable's baseline: {seen}/{policy.min_requests} requests "
            f"(the canary has {ours.requests})",
        )
    if enough and elapsed >= policy.min_duration:
        return verdict(
            Outcome.PASS,
            f"canary no worse than stable over {ours.requests} requests in {elapsed:.1f} s: "
            f"5xx rate {_percent(ours.errors / ours.requests)}, p99 {_ms(ours.p99)}",
        )
    return verdict(
        Outcome.WAITING,
        f"waiting for data: {ours.requests}/{policy.min_requests} requests, "
        f"{elapsed:.1f}/{policy.min_duration:.1f} s",
    )


def _no_baseline(stable: Summary | None, comparable: bool) -> str:
    """Why the stable's rate was taken as 0%, if it was."""
    if comparable:
        return ""
    if stable is None:
        return " (no stable window to compare with: taken as 0%)"
    return f" (the stable's {stable.requests} requests are too few to compare with: taken as 0%)"


def _percent(ratio: float) -> str:
    return f"{ratio * 100:.1f}%"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"
