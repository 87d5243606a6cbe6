"""The restart policy on its own, driven by a manual clock."""

from __future__ import annotations

from clearway.runtime import ManualClock, RestartPolicy
from clearway.runtime.restarts import RestartTracker

POLICY = RestartPolicy(
    initial_backoff=0.5,
    multiplier=2.0,
    max_backoff=30.0,
    reset_after=60.0,
    crashloop_window=60.0,
    crashloop_crashes=5,
    crashloop_unready=3,
)


def test_backoff_doubles_up_to_the_cap() -> None:
    clock = ManualClock()
    tracker = RestartTracker(RestartPolicy(crashloop_crashes=100, crashloop_window=1), clock)
    delays = []
    for _ in range(9):
        tracker.became_ready()
        clock.advance(10)
        delays.append(tracker.ended(was_ready=True).delay)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_five_crashes_within_the_window_are_a_crashloop() -> None:
    clock = ManualClock()
    tracker = RestartTracker(POLICY, clock)
    decisions = []
    for _ in range(5):
        tracker.became_ready()
        clock.advance(5)
        decisions.append(tracker.ended(was_ready=True))
    assert [d.crashloop for d in decisions] == [False, False, False, False, True]
    assert decisions[-1].delay == POLICY.max_backoff  # still retried, slowly


def test_exits_before_ready_are_a_crashloop_sooner() -> None:
    tracker = RestartTracker(POLICY, ManualClock())
    assert [tracker.ended(was_ready=False).crashloop for _ in range(3)] == [False, False, True]


def test_crashes_spread_out_are_not_a_loop() -> None:
    clock = ManualClock()
    tracker = RestartTracker(POLICY, clock)
    for _ in range(10):
        tracker.became_ready()
        clock.advance(20)  # ready 20s each time: under reset_after, but 3 crashes per window
        assert not tracker.ended(was_ready=True).crashloop


def test_staying_ready_long_enough_forgives_the_past() -> None:
    clock = ManualClock()
    tracker = RestartTracker(POLICY, clock)
    for _ in range(4):
        tracker.ended(was_ready=True)
    tracker.became_ready()
    clock.advance(61)
    decision = tracker.ended(was_ready=True)
    assert decision.delay == POLICY.initial_backoff
    assert not decision.crashloop


async def test_manual_clock_sleep_returns_when_time_is_advanced() -> None:
    import asyncio

    clock = ManualClock()
    sleeper = asyncio.ensure_future(clock.sleep(5))
    await asyncio.sleep(0)
    assert clock.sleepers == 1
    clock.advance(4)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(1)
    await asyncio.wait_for(sleeper, 1)
