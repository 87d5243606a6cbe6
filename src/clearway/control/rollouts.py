"""Canary rollouts: a new production revision earns its traffic step by step.

What Flagger and Argo Rollouts do on a cluster — with a service mesh to split
traffic and Prometheus to judge it — is one small state machine here, because
the platform already owns both ends: the gateway splits an app's requests by
per-revision weights, and counts every answer per revision.

The life of a rollout (a row of the ``rollouts`` table, so nothing lives only
in memory):

1. A production revision created with ``canary=True`` (``clearway deploy
   --canary``, every ``git push`` to the production branch) becomes ready
   while another revision serves. Instead of taking all traffic it becomes
   ``CANARY`` and its rollout starts (`RolloutController.begin`). With no
   stable revision to compare against (the first deploy) it is simply
   activated: there is nothing to protect and nothing to compare with.
2. If the app declares smoke checks (``@app.smoke_check``) they run first,
   against the canary alone, while it gets no traffic; a failure rolls back
   before a single user request reached it.
3. Each pass of the reconciler (every second, or sooner when poked) reads
   the gateway's counters (`Backend.traffic`), takes the window since the
   step began for both revisions and asks `control.analysis.analyse`:

   * *fail*: the rollout ends **rolled back** in the same pass — the canary
     leaves the route table in the very apply that follows, so traffic is
     back on the stable revision within one route reload (measured in
     ``bench/delivery.py``);
   * *pass*: the next step (its window starts from the counters now); passing
     the step before 100% **promotes**: the canary becomes the active
     revision and the stable one retires;
   * *waiting*: the analysis is recorded (``clearway rollout status`` shows
     why it waits) and nothing moves. Too little data never passes a step.

The gateway's counters are cumulative per revision and survive a crash of the
control plane (the gateway is not its child). A step's baseline is stored
with the step, so a restarted control plane resumes the rollout where it was,
on the same weights; if the gateway itself restarted (its counters went
backwards) the step's window starts over rather than judging a partial one.

An operator can `promote` (skip the remaining steps) or `abort` (roll back
now) at any time; a deploy without ``--canary`` while a rollout runs, once
ready, ends the rollout as aborted and replaces both revisions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from clearway.backends.base import Backend, RevisionObservation, TrafficSample
from clearway.control.analysis import Outcome, analyse
from clearway.control.store import Revision, RevisionState, Rollout, RolloutState, Store
from clearway.tasks import TaskSupervisor

__all__ = ["RolloutController", "SmokeRunner", "describe_plan", "format_duration"]

log = logging.getLogger("clearway.control")

#: Runs a revision's smoke checks against it: (passed, output to keep).
SmokeRunner = Callable[[Revision], Awaitable[tuple[bool, str]]]


def format_duration(seconds: float) -> str:
    """``90`` -> ``"1m30s"``, ``5`` -> ``"5s"``, ``3600`` -> ``"1h0m"``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m"


def describe_plan(revision: Revision) -> str:
    """One line: the steps, what each waits for and the least time to promotion."""
    policy = revision.spec.canary
    steps = " → ".join(f"{s}%" for s in policy.steps)
    smoke = f"{len(revision.spec.smoke_checks)} smoke check(s) first, then " if revision.spec.smoke_checks else ""
    sticky = "; each browser stays on one side (sticky)" if policy.sticky else ""
    return (
        f"canary rollout: {smoke}{steps}, each step at least {format_duration(policy.min_duration)} "
        f"and {policy.min_requests} requests; promotes in {format_duration(policy.minimum_seconds)} at the earliest"
        f"{sticky}"
    )


class RolloutController:
    """Starts, advances and ends rollouts; driven by the reconciler's passes."""

    def __init__(
        self,
        store: Store,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        smoke: SmokeRunner | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.clock = clock
        self.smoke = smoke
        self._tasks = TaskSupervisor(log)
        self._smoking: dict[int, asyncio.Task[None]] = {}

    def running(self) -> dict[str, Rollout]:
        """The running rollout of each app that has one."""
        return {r.app: r for r in self.store.running_rollouts()}

    def begin(self, revision: Revision, stable: Revision) -> Rollout:
        """``revision`` is ready: start its rollout against ``stable`` (ending any other of the app)."""
        previous = self.store.rollout(revision.app)
        if previous is not None:
            self.store.finish_rollout(
                previous.id,
                RolloutState.ABORTED,
                f"superseded by {revision.id}, a newer canary",
                canary_state=RevisionState.RETIRED,
            )
        has_smoke = bool(revision.spec.smoke_checks) and self.smoke is not None
        rollout = self.store.start_rollout(
            revision.id,
            stable.id,
            revision.spec.canary,
            detail=f"{revision.id} against {stable.id}; {describe_plan(revision)}",
            smoke=has_smoke,
        )
        log.info("rollout of %s started against %s", revision.id, stable.id)
        return rollout

    def promote(self, app: str, *, reason: str) -> Rollout | None:
        rollout = self.store.rollout(app)
        if rollout is None:
            return None
        self.store.finish_rollout(rollout.id, RolloutState.PROMOTED, reason)
        return self.store.rollout_by_id(rollout.id)

    def abort(self, app: str, *, reason: str) -> Rollout | None:
        rollout = self.store.rollout(app)
        if rollout is None:
            return None
        self.store.finish_rollout(rollout.id, RolloutState.ABORTED, reason)
        return self.store.rollout_by_id(rollout.id)

    def end_superseded(self, app: str, by: str) -> None:
        """A revision deployed without a canary became ready: the app's rollout is moot."""
        rollout = self.store.rollout(app)
        if rollout is not None and rollout.canary != by:
            self.store.finish_rollout(
                rollout.id,
                RolloutState.ABORTED,
                f"superseded by {by}, deployed without a canary",
                canary_state=RevisionState.RETIRED,
            )

    async def advance(self, observed: Mapping[str, RevisionObservation]) -> bool:
        """One look at every running rollout; True when one changed step or ended."""
        rollouts = self.store.running_rollouts()
        if not rollouts:
            return False
        samples: Mapping[str, TrafficSample] | None = None
        changed = False
        for rollout in rollouts:
            canary = self.store.revision(rollout.canary)
            stable = self.store.revision(rollout.stable)
            if canary is None or canary.state is not RevisionState.CANARY:
                self.store.finish_rollout(rollout.id, RolloutState.ABORTED, f"the canary {rollout.canary} is gone")
                changed = True
                continue
            if stable is None or stable.state is not RevisionState.ACTIVE:
                self.store.finish_rollout(
                    rollout.id, RolloutState.ABORTED, f"the stable revision {rollout.stable} no longer serves"
                )
                changed = True
                continue
            obs = observed.get(canary.id)
            if obs is not None and obs.error:
                self.store.finish_rollout(
                    rollout.id, RolloutState.ROLLED_BACK, f"the canary failed: {obs.error.splitlines()[0]}"
                )
                changed = True
                continue
            if rollout.smoke == "pending":
                self._ensure_smoke(rollout, canary)
                continue
            if samples is None:
                samples = await self.backend.traffic()
            changed |= self._judge(rollout, samples)
        return changed

    def _judge(self, rollout: Rollout, samples: Mapping[str, TrafficSample]) -> bool:
        canary_now = samples.get(rollout.canary)
        stable_now = samples.get(rollout.stable)
        now_json = {
            "canary": canary_now.to_json() if canary_now else None,
            "stable": stable_now.to_json() if stable_now else None,
        }
        baseline = rollout.baseline
        if baseline is None:
            # The step's window starts now (a new step, or counters that were reset).
            self.store.update_rollout(rollout.id, baseline=now_json)
            return False
        bounds = next((x.bounds for x in (canary_now, stable_now) if x is not None), ())
        canary_window = _window(canary_now, baseline.get("canary"), bounds)
        stable_window = _window(stable_now, baseline.get("stable"), bounds)
        stable_reset = baseline.get("stable") is not None and stable_window is None
        if canary_window is None or stable_reset:
            # Counters went backwards: the gateway restarted. Judge a whole window, not a torn one.
            self.store.update_rollout(
                rollout.id,
                baseline=now_json,
                event=("restarted step", "the gateway's counters were reset; the step's window starts over"),
            )
            return False
        elapsed = self.clock() - rollout.step_started_at
        analysis = analyse(canary_window, stable_window, rollout.policy, elapsed)
        weight = rollout.weight
        if analysis.outcome is Outcome.FAIL:
            log.warning("rollout of %s failed at %d%%: %s", rollout.canary, weight, analysis.reason)
            self.store.update_rollout(rollout.id, analysis=analysis.to_json())
            self.store.finish_rollout(rollout.id, RolloutState.ROLLED_BACK, f"at {weight}%: {analysis.reason}")
            return True
        if analysis.outcome is Outcome.PASS:
            next_step = rollout.step + 1
            if next_step >= len(rollout.policy.steps) - 1:
                self.store.update_rollout(rollout.id, analysis=analysis.to_json())
                self.store.finish_rollout(
                    rollout.id, RolloutState.PROMOTED, f"every step passed ({weight}%: {analysis.reason})"
                )
                return True
            self.store.update_rollout(
                rollout.id,
                analysis=analysis.to_json(),
                baseline=now_json,
                step=next_step,
                event=(f"{rollout.policy.steps[next_step]}%", f"{weight}% passed: {analysis.reason}"),
            )
            return True
        # Written when the figures move, not every pass: the waiting reason's clock
        # alone changes each second, and `clearway rollout status` shows the step's age.
        if _figures(analysis.to_json()) != _figures(rollout.analysis):
            self.store.update_rollout(rollout.id, analysis=analysis.to_json())
        return False

    def _ensure_smoke(self, rollout: Rollout, canary: Revision) -> None:
        if rollout.id in self._smoking or self.smoke is None:
            return
        runner = self.smoke

        async def run() -> None:
            try:
                passed, output = await runner(canary)
            except Exception as exc:  # a broken runner must not leave the canary waiting forever
                passed, output = False, f"the smoke checks could not run: {exc}"
            current = self.store.rollout_by_id(rollout.id)
            if current is None or current.state is not RolloutState.RUNNING:
                return
            if passed:
                self.store.update_rollout(
                    rollout.id, smoke="passed", event=("smoke checks passed", output.strip()[-2000:])
                )
            else:
                self.store.finish_rollout(
                    rollout.id, RolloutState.ROLLED_BACK, f"smoke checks failed: {output.strip()[-2000:]}"
                )

        def done(_: asyncio.Task[None]) -> None:
            self._smoking.pop(rollout.id, None)

        task = self._tasks.start(f"smoke-checks:{canary.id}", run())
        task.add_done_callback(done)
        self._smoking[rollout.id] = task

    async def close(self) -> None:
        await self._tasks.close()


def _figures(analysis: Mapping[str, object] | None) -> object:
    """An analysis without its wording: what it concluded and from which counts."""
    if analysis is None:
        return None
    return {k: v for k, v in analysis.items() if k != "reason"}


def _window(
    now: TrafficSample | None, earlier: object, bounds: tuple[float, ...]
) -> TrafficSample | None:
    """Traffic since ``earlier`` (a stored sample, or None: no traffic yet then);
    an empty sample when there is none at all; None when the counters were reset."""
    if now is None:
        return TrafficSample.empty(bounds) if earlier is None else None
    if not isinstance(earlier, dict):
        return now
    return now.minus(TrafficSample.from_json(earlier))
