"""The canary analysis: pure functions of two traffic windows, a policy and the time elapsed."""

from __future__ import annotations

from bisect import bisect_left

import pytest

from clearway.backends.base import TrafficSample
from clearway.control.analysis import Analysis, Outcome, Summary, analyse, p99
from clearway.spec.model import CanaryPolicy

#: The gateway's DURATION_BUCKETS (seconds).
BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
POLICY = CanaryPolicy()  # min_requests 20, min_duration 30 s, max_error_rate 1%, ratio 1.5, slack 50 ms


def window(ok: int = 0, *, server_errors: int = 0, client_errors: int = 0, latency: float = 0.02) -> TrafficSample:
    """Requests that all took ``latency`` seconds."""
    buckets = [0] * (len(BOUNDS) + 1)
    buckets[bisect_left(BOUNDS, latency)] = ok + server_errors + client_errors
    return TrafficSample((0, ok, 0, client_errors, server_errors), tuple(buckets), BOUNDS)


def histogram(counts: dict[int, int]) -> TrafficSample:
    """2xx answers, ``counts[i]`` of them in bucket ``i`` (15 is +Inf)."""
    buckets = tuple(counts.get(i, 0) for i in range(len(BOUNDS) + 1))
    return TrafficSample((0, sum(buckets), 0, 0, 0), buckets, BOUNDS)


def test_waits_for_enough_requests() -> None:
    result = analyse(window(12), window(300), POLICY, elapsed=60.0)
    assert result.outcome is Outcome.WAITING
    assert result.reason == "waiting for data: 12/20 requests, 60.0/30.0 s"
    # Even all-failing: 12 requests are too few to judge, and too few to pass.
    assert analyse(window(server_errors=12), window(300), POLICY, elapsed=60.0).outcome is Outcome.WAITING


def test_waits_for_the_steps_duration() -> None:
    result = analyse(window(100), window(300), POLICY, elapsed=8.0)
    assert result.outcome is Outcome.WAITING
    assert result.reason == "waiting for data: 100/20 requests, 8.0/30.0 s"


def test_passes_with_enough_requests_and_time() -> None:
    result = analyse(window(100), window(300), POLICY, elapsed=31.0)
    assert result.outcome is Outcome.PASS
    assert result.canary == Summary(requests=100, errors=0, success_rate=1.0, p99=result.canary.p99)
    assert result.canary.p99 == pytest.approx(0.02485)
    assert result.stable is not None and result.stable.requests == 300
    # No stable window at all (a first rollout after a gateway restart): judged on its own.
    # Without the stable's figures the comparison has not been made: waiting, not pass.
    alone = analyse(window(100), None, POLICY, elapsed=31.0)
    assert alone.outcome is Outcome.WAITING and "stable's baseline" in alone.reason


def test_fails_on_5xx_at_once() -> None:
    result = analyse(window(44, server_errors=6), window(300), POLICY, elapsed=1.0)
    assert result.outcome is Outcome.FAIL
    assert result.reason == "canary 5xx rate 12.0% (6/50) exceeds stable 0.0% + 1.0%"
    assert result.canary.errors == 6 and result.canary.success_rate == pytest.approx(0.88)


def test_4xx_are_not_failures() -> None:
    result = analyse(window(30, client_errors=20), window(300), POLICY, elapsed=31.0)
    assert result.outcome is Outcome.PASS
    assert result.canary.requests == 50 and result.canary.errors == 0


def test_a_canary_as_bad_as_the_stable_passes() -> None:
    # The upstream both depend on fails 10% of the time: not the canary's fault.
    result = analyse(window(45, server_errors=5), window(270, server_errors=30), POLICY, elapsed=31.0)
    assert result.outcome is Outcome.PASS, result.reason
    # Worse than the stable by more than the allowed 1%: fails.
    result = analyse(window(40, server_errors=10), window(270, server_errors=30), POLICY, elapsed=31.0)
    assert result.outcome is Outcome.FAIL
    assert result.reason == "canary 5xx rate 20.0% (10/50) exceeds stable 10.0% + 1.0%"


def test_a_stable_with_too_few_requests_is_no_excuse() -> None:
    result = analyse(window(45, server_errors=5), window(9, server_errors=1), POLICY, elapsed=31.0)
    assert result.outcome is Outcome.FAIL
    assert result.reason == (
        "canary 5xx rate 10.0% (5/50) exceeds stable 0.0% + 1.0% "
        "(the stable's 10 requests are too few to compare with: taken as 0%)"
    )


def test_fails_when_slower_than_the_stable_beyond_ratio_and_slack() -> None:
    # Stable p99 ~24.9 ms: the limit is 24.9 * 1.5 + 50 = ~87 ms.
    result = analyse(window(50, latency=0.3), window(300, latency=0.02), POLICY, elapsed=1.0)
    assert result.outcome is Outcome.FAIL
    assert result.reason == "canary p99 497.5 ms exceeds stable p99 24.9 ms x 1.5 + 50.0 ms = 87.3 ms"
    # Within the slack: 50 ms against 25 ms is noise at this scale.
    assert analyse(window(50, latency=0.04), window(300, latency=0.02), POLICY, elapsed=31.0).outcome is Outcome.PASS
    # Too few stable requests to compare latency with: never a pass on that account.
    assert analyse(window(50, latency=0.3), window(5, latency=0.02), POLICY, elapsed=31.0).outcome is Outcome.WAITING


def test_max_p99_bounds_the_canary_even_without_a_stable() -> None:
    policy = CanaryPolicy(max_p99=0.1)
    result = analyse(window(50, latency=0.3), None, policy, elapsed=31.0)
    assert result.outcome is Outcome.FAIL
    assert result.reason == "canary p99 497.5 ms exceeds the policy's max_p99 100.0 ms"
    assert analyse(window(50, latency=0.08), None, policy, elapsed=31.0).outcome is Outcome.WAITING
    assert analyse(window(50, latency=0.08), window(50, latency=0.08), policy, elapsed=31.0).outcome is Outcome.PASS


def test_p99_interpolates_inside_its_bucket() -> None:
    assert p99(window()) is None  # no requests, no percentile
    # Half in (5, 10] ms, half in (10, 25] ms: the 99th of 100 is 49/50 of the way through the second.
    assert p99(histogram({3: 50, 4: 50})) == pytest.approx(0.01 + 0.015 * 49 / 50)
    # The first bucket starts at 0.
    assert p99(histogram({0: 100})) == pytest.approx(0.00099)
    # One slow request in 1000 is below the 99th percentile; eleven are not.
    assert p99(histogram({4: 999, 9: 1})) == pytest.approx(0.01 + 0.015 * 990 / 999)
    assert p99(histogram({4: 989, 9: 11})) == pytest.approx(0.5 + 0.5 * 1 / 11)
    # In the +Inf bucket: the last finite bound.
    assert p99(histogram({4: 10, 15: 90})) == 60.0


def test_minus_gives_the_window_and_none_after_a_reset() -> None:
    earlier = window(10, server_errors=1)
    later = window(30, server_errors=4, client_errors=2)
    delta = later.minus(earlier)
    assert delta is not None
    assert (delta.total, delta.errors, delta.by_class) == (25, 3, (0, 20, 0, 2, 3))
    assert sum(delta.buckets) == 25
    # The gateway restarted: its counters began again, lower than before.
    assert window(5).minus(earlier) is None
    assert TrafficSample.empty(BOUNDS).minus(TrafficSample.empty(BOUNDS)) == TrafficSample.empty(BOUNDS)


def test_json_round_trips() -> None:
    sample = window(3, server_errors=1)
    assert TrafficSample.from_json(sample.to_json()) == sample
    with pytest.raises(ValueError, match="5 status classes"):
        TrafficSample.from_json({**sample.to_json(), "by_class": [1, 2]})
    with pytest.raises(ValueError, match="non-negative integer"):
        TrafficSample.from_json({**sample.to_json(), "buckets": [-1] * 16})
    result = analyse(window(12), None, POLICY, elapsed=3.0)
    assert isinstance(result, Analysis)
    assert result.to_json() == {
        "outcome": "waiting",
        "reason": "waiting for data: 12/20 requests, 3.0/30.0 s",
        "canary": {"requests": 12, "errors": 0, "success_rate": 1.0, "p99": pytest.approx(0.02485)},
        "stable": None,
    }
