"""Schedules: functions that run on their own, on a cron expression or at a fixed interval.

The `Scheduler`, a supervised loop of the control plane, looks at every app's
serving production revision (previews run no schedules) and, for each
function with a ``schedule``, queues a durable invocation (kind ``cron``,
no arguments) at each fire time; the dispatcher (``control.invocations``)
delivers it with the function's retries like any other. Cron expressions
(five fields, through croniter, a maintained cron library) are read in UTC;
``every`` counts seconds from the previous fire.

What makes a fire happen exactly once, even across a ``kill -9``: the store
keeps each schedule's last fire time, and queuing a fire and recording it
are one transaction (`Store.fire_schedule`). The invocation's idempotency key
is ``schedule:<fire time, ISO 8601>``, so even a fire recorded twice would be
queued once.

**Missed fires.** Fires that fell while the control plane was down (or the
app had nothing serving) are *coalesced into one run* when it comes back,
for the latest of them: a job that reports or cleans up needs running once
to catch up, not once per missed minute, and a back-log of hundreds of runs
after a long stop would only hammer the function. The next fires follow the
schedule from there. A schedule seen for the first time (a new deploy, a new
function, a schedule that was removed and came back) starts from that
moment: its first fire is the next one after it, with no back-fill.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import time
from collections.abc import Callable

from croniter import croniter  # type: ignore[import-untyped]  # croniter ships no type hints

from clearway.control.store import InvocationKind, NewInvocation, Store
from clearway.spec.model import ScheduleSpec

__all__ = ["Scheduler", "due_fire", "fire_key", "next_fire"]

log = logging.getLogger("clearway.control.schedules")

#: The longest the scheduler sleeps: how soon it notices a deploy that adds or changes a schedule.
MAX_SLEEP = 5.0


def _utc(at: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(at, datetime.UTC)


def next_fire(schedule: ScheduleSpec, after: float) -> float:
    """The first fire time strictly after ``after``."""
    if schedule.every is not None:
        return after + schedule.every
    assert schedule.cron is not None
    return float(croniter(schedule.cron, _utc(after)).get_next(float))


def due_fire(schedule: ScheduleSpec, last: float, now: float) -> float | None:
    """The fire to run at ``now`` after the last one at ``last``: None when none is
    due yet, else the *latest* fire time up to ``now`` (missed ones coalesce into it)."""
    first = next_fire(schedule, last)
    if first > now:
        return None
    if schedule.every is not None:
        return last + math.floor((now - last) / schedule.every) * schedule.every
    assert schedule.cron is not None
    # The latest fire at or before now (croniter's get_prev is strictly before its start).
    latest = float(croniter(schedule.cron, _utc(now) + datetime.timedelta(microseconds=1)).get_prev(float))
    return max(first, latest)


def fire_key(fire_at: float) -> str:
    """The idempotency key of a schedule's fire at ``fire_at``."""
    return "schedule:" + _utc(fire_at).isoformat(timespec="milliseconds")


class Scheduler:
    """Queues schedules' fires (see the module docstring); ``on_queued`` is told
    when it queued something (the dispatcher's ``poke``)."""

    def __init__(
        self,
        store: Store,
        *,
        on_queued: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        max_sleep: float = MAX_SLEEP,
    ) -> None:
        self.store = store
        self._on_queued = on_queued
        self._clock = clock
        self.max_sleep = max_sleep
        #: Schedules croniter refused (logged once each).
        self._refused: set[tuple[str, str]] = set()

    async def run(self) -> None:
        while True:
            now = self._clock()
            upcoming = self.tick(now)
            wait = self.max_sleep if upcoming is None else min(self.max_sleep, max(0.0, upcoming - self._clock()))
            await asyncio.sleep(wait)

    def tick(self, now: float) -> float | None:
        """Queue every fire due at ``now``; when the next one is (None: no schedules)."""
        marks = self.store.schedule_marks()
        kept: set[tuple[str, str]] = set()
        upcoming: list[float] = []
        queued = 0
        for record in self.store.apps():
            revision = self.store.active(record.name)
            if revision is None:
                # Nothing serves: keep its marks, so the fires missed meanwhile coalesce on return.
                kept.update(key for key in marks if key[0] == record.name)
                continue
            for function in revision.spec.functions:
                if function.schedule is None:
                    continue
                key = (record.name, function.name)
                kept.add(key)
                last = marks.get(key)
                if last is None:
                    self.store.mark_schedule(record.name, function.name, now)
                    last = now
                try:
                    fire = due_fire(function.schedule, last, now)
                except ValueError as exc:  # croniter refused what the spec accepted: skip this one only
                    if key not in self._refused:
                        self._refused.add(key)
                        log.error("%s/%s: schedule %s cannot be computed: %s", *key, function.schedule, exc)
                    continue
                if fire is not None:
                    invocation, added = self.store.fire_schedule(
                        NewInvocation(
                            app=record.name,
                            function=function.name,
                            kind=InvocationKind.CRON,
                            payload="{}",
                            max_attempts=function.retries + 1,
                            idempotency_key=fire_key(fire),
                        ),
                        fire_at=fire,
                        now=now,
                    )
                    missed = fire > next_fire(function.schedule, last)
                    if added:
                        queued += 1
                        log.info(
                            "%s/%s: schedule fired for %s (invocation %s)%s",
                            record.name, function.name, _utc(fire).isoformat(timespec="seconds"), invocation.id,
                            "; earlier fires missed while the platform was down were coalesced into it" if missed else "",
                        )
                    last = fire
                upcoming.append(next_fire(function.schedule, last))
        if self.store.forget_schedules(kept):
            log.info("forgot the marks of schedules no serving revision has any more")
        if queued:
            self._on_queued()
        return min(upcoming, default=None)
