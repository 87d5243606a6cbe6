"""The reconcile loop: desired state (store) → backend, observations → lifecycle.

Level-triggered and idempotent: each pass reads the whole desired state from
the store, hands it to the backend, then advances revision lifecycles from what
the backend observes:

* a ``STARTING`` revision whose replicas are all ready becomes ``ACTIVE`` and
  the previously active one retires (the backend drains it only after the
  gateway has switched traffic);
* a ``STARTING`` revision that reports an error, or is not ready — or not
  confirmed served by the data plane (``backend.converged()`` returning
  True) — within its startup timeout, becomes ``FAILED`` and its replicas
  stop; the active revision was never touched, so it kept serving throughout.
  Only a True from ``converged()`` makes a revision ``ACTIVE``: "active" means
  "answering requests", never "we stopped waiting".

A full disk (`StorageFull`) stops a pass but not the loop: it is logged once
per episode, exposed as `Reconciler.fault` (the API shows it to a waiting
``clearway deploy``), and cleared by the first pass that completes.

Tracks: production and each preview branch activate separately (a preview's
new revision retires only that branch's old one), and previews run with their
own replica counts (``AppRecord.preview_scale``, default one per component).
A ready production revision created with ``canary=True`` does not take the
traffic at once: `control.rollouts` starts its rollout, and from then on the
weights of that app's route come from the rollout's step.

Because nothing lives only in memory, a control plane killed mid-deploy resumes
the deploy (or the rollout) where it left off after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable

from clearway.backends.base import (
    Artifact,
    Backend,
    DesiredState,
    HostAlias,
    TrafficTarget,
    Workload,
)
from clearway.control.autoscaler import Autoscaler
from clearway.control.faults import StorageFull, is_disk_full
from clearway.control.rollouts import RolloutController, SmokeRunner
from clearway.control.store import RUNNING_STATES, AppRecord, Revision, RevisionState, Store
from clearway.spec.ids import branch_label, commit_label
from clearway.spec.model import FunctionSpec

log = logging.getLogger("clearway.control")

#: The interpreter version of revisions stored before per-app environments.
_PLATFORM_PYTHON = ".".join(str(part) for part in sys.version_info[:3])

#: Extra time beyond a component's own startup timeout before a deploy fails.
STARTUP_MARGIN = 5.0


def desired_replicas(revision: Revision, scale: dict[str, int]) -> dict[str, int]:
    return {c.name: scale.get(c.name, c.replicas) for c in revision.spec.components}


def replicas_for(revision: Revision, app: AppRecord | None) -> dict[str, int]:
    """Production revisions: the spec's counts under ``clearway scale``; previews: one
    each (a component the spec turns off stays off) under ``clearway scale --previews``."""
    if revision.branch is None:
        return desired_replicas(revision, app.scale if app else {})
    scale = app.preview_scale if app else {}
    return {c.name: scale.get(c.name, min(c.replicas, 1)) for c in revision.spec.components}


class Reconciler:
    def __init__(
        self,
        store: Store,
        backend: Backend,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        assign_uids: bool | None = None,
        after_activation: Callable[[], Awaitable[None]] | None = None,
        smoke: SmokeRunner | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.interval = interval
        self.clock = clock
        #: Replicas run as their app's uid only when we can switch to it (root).
        self.assign_uids = os.geteuid() == 0 if assign_uids is None else assign_uids
        #: What keeps passes from completing (a full disk), for the API to show; None when well.
        self.fault: str | None = None
        #: Run after a pass that made a revision active (garbage collection): off the
        #: path of the deploy itself, which is complete by then; its failure is logged.
        self.after_activation = after_activation
        self.rollouts = RolloutController(store, backend, clock=clock, smoke=smoke)
        #: Replicas of functions: decided from the gateway's load, not the store.
        self.autoscaler = Autoscaler()
        #: The functions of the running revisions, as of the last pass (the autoscaler's scope).
        self.functions: dict[tuple[str, str], tuple[str, FunctionSpec]] = {}
        #: (app, service) of the running revisions' sharded services with affinity, as of the last
        #: pass (whose shard owners `control.shard_owners` follows).
        self.sharded_services: frozenset[tuple[str, str]] = frozenset()
        self._wake = asyncio.Event()
        self._passes = 0
        self._pass_done = asyncio.Condition()

    def poke(self) -> None:
        """Ask for a pass soon (after any API change)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self.guarded_pass()
            with contextlib.suppress(TimeoutError):  # (not wait_for: see Dispatcher._idle)
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    async def guarded_pass(self) -> None:
        """One pass; a full disk is logged once per episode and the loop goes on."""
        try:
            await self.reconcile_once()
        except (StorageFull, sqlite3.Error, OSError) as exc:
            if not isinstance(exc, StorageFull) and not is_disk_full(exc):
                raise
            message = exc.message if isinstance(exc, StorageFull) else StorageFull(self.store.path, what="reconciling").message
            if self.fault is None:
                log.error("reconciling is stuck: %s", message)
            self.fault = message
            async with self._pass_done:  # waiters must not hang on a stuck loop
                self._passes += 1
                self._pass_done.notify_all()
            return
        if self.fault is not None:
            log.info("reconciling again: the disk has room")
            self.fault = None

    async def wait_pass(self) -> None:
        """Wait for the next complete pass (used by the API for read-your-writes)."""
        async with self._pass_done:
            target = self._passes + 1
            await self._pass_done.wait_for(lambda: self._passes >= target)

    def desired_state(self, promoting: frozenset[str] = frozenset()) -> DesiredState:
        """The whole desired state; ``promoting`` revisions get the traffic of their track."""
        apps = {a.name: a for a in self.store.apps()}
        running = self.store.revisions(states=set(RUNNING_STATES))
        rollouts = self.rollouts.running()
        promoted_tracks = {(r.app, r.branch) for r in running if r.id in promoting}
        workloads = [
            Workload(
                app=r.app,
                revision=r.id,
                spec=r.spec,
                artifact=Artifact(code=r.code_digest, env=r.env_digest, python=r.python or _PLATFORM_PYTHON),
                app_file=r.app_file,
                env={**r.spec.env, **r.env},
                replicas=self.replicas_wanted(r, apps.get(r.app)),
                uid=r.uid if self.assign_uids else None,
            )
            for r in running
        ]

        def weight(r: Revision) -> int:
            if (r.app, r.branch) in promoted_tracks:
                return 100 if r.id in promoting else 0
            rollout = rollouts.get(r.app) if r.branch is None else None
            if rollout is not None and r.id == rollout.canary:
                return rollout.weight
            if rollout is not None and r.id == rollout.stable:
                return 100 - rollout.weight
            return 100 if r.state is RevisionState.ACTIVE else 0

        traffic: dict[str, list[TrafficTarget]] = {}
        previews: dict[tuple[str, str], list[TrafficTarget]] = {}
        commits: dict[tuple[str, str], Revision] = {}
        for r in running:
            target = TrafficTarget(revision=r.id, weight=weight(r))
            if r.branch is None:
                traffic.setdefault(r.app, []).append(target)
            else:
                previews.setdefault((r.app, r.branch), []).append(target)
            if r.commit is not None:
                # The newest revision built from a commit answers at <sha7>.<app>.
                commits[(r.app, commit_label(r.commit))] = r
        aliases = [
            HostAlias(app=app, label=branch_label(branch), targets=targets)
            for (app, branch), targets in sorted(previews.items())
        ]
        aliases += [
            HostAlias(app=app, label=label, targets=[TrafficTarget(revision=r.id, weight=100)])
            for (app, label), r in sorted(commits.items())
        ]
        self.functions = {(r.id, fn.name): (r.app, fn) for r in running for fn in r.spec.functions}
        self.autoscaler.forget(self.functions)
        self.sharded_services = frozenset(
            (r.app, s.name) for r in running for s in r.spec.services if s.shards and s.affinity
        )
        sticky = frozenset(app for app, rollout in rollouts.items() if rollout.policy.sticky)
        return DesiredState(workloads=workloads, traffic=traffic, aliases=aliases, sticky=sticky)

    def replicas_wanted(self, revision: Revision, app: AppRecord | None) -> dict[str, int]:
        """`replicas_for`, with the autoscaler's count for every function."""
        counts = replicas_for(revision, app)
        running: dict[str, int] | None = None
        for fn in revision.spec.functions:
            key = (revision.id, fn.name)
            if running is None and not self.autoscaler.known(key):
                running = {}
                for info in self.backend.replicas(revision.app):
                    if info.revision == revision.id:
                        running[info.component] = running.get(info.component, 0) + 1
            counts[fn.name] = self.autoscaler.replicas(
                revision.id, fn, running=(running or {}).get(fn.name) if running is not None else None
            )
        return counts

    async def autoscale(self, *, period: float = 0.1) -> None:
        """Read the gateway's load every ``period`` and resize functions (a supervised loop).

        It also wakes the moment the gateway holds a request (``Backend.wait_held``):
        a request for a function at zero replicas starts one at once, not at the next tick.
        """
        seq = -1
        while True:
            functions = {key: spec for key, (_, spec) in self.functions.items()}
            if functions:
                loads = await self.backend.load()
                for decision in self.autoscaler.update(loads, functions):
                    app = self.functions[(decision.revision, decision.function)][0]
                    log.info(
                        "function %s of %s: %d -> %d replicas (%s)",
                        decision.function, decision.revision, decision.replicas_from, decision.replicas_to,
                        decision.reason,
                    )
                    self.store.add_event(
                        app,
                        f"function {decision.function} of {decision.revision}: "
                        f"{decision.replicas_from} -> {decision.replicas_to} replicas ({decision.reason})",
                    )
                    self.poke()
            seq = await self.backend.wait_held(seq, period if functions else 5 * period)

    def _deadline(self, rev: Revision) -> tuple[float, float] | None:
        """(startup limit, deadline) of a starting revision; None when it has no start time."""
        if rev.started_at is None:
            return None
        limit = max((c.startup_timeout for c in rev.spec.components), default=60.0)
        return limit, rev.started_at + limit + STARTUP_MARGIN

    def _begin_rollouts(self, ready: list[Revision]) -> list[Revision]:
        """Start the rollouts of ready canaries; the revisions left to activate outright."""
        rest: list[Revision] = []
        for rev in ready:
            stable = self.store.active(rev.app) if rev.canary and rev.branch is None else None
            if stable is None:
                rest.append(rev)
                continue
            newer = [r for r in ready if r.app == rev.app and r.branch is None and r.number > rev.number]
            if newer:
                rest.append(rev)  # a newer ready revision supersedes it (activate fails older ones)
                continue
            self.rollouts.begin(rev, stable)
        return rest

    async def reconcile_once(self) -> None:
        await self.backend.apply(self.desired_state())
        observed = self.backend.observe()
        changed = False
        activated = False
        ready: list[Revision] = []
        for rev in self.store.revisions(states={RevisionState.STARTING}):
            obs = observed.get(rev.id)
            if obs is None:
                continue
            if obs.error:
                log.warning("revision %s failed: %s", rev.id, obs.error.splitlines()[0])
                self.store.fail(rev.id, obs.error)
                changed = True
            elif obs.ready:
                ready.append(rev)
            elif (bounds := self._deadline(rev)) is not None and self.clock() > bounds[1]:
                waiting = ", ".join(
                    f"{name} {c.ready}/{c.desired} ready"
                    for name, c in obs.components.items()
                    if c.ready < c.desired
                )
                last = next((c.last_error for c in obs.components.values() if c.last_error), None)
                self.store.fail(
                    rev.id,
                    f"not ready within {bounds[0]:.0f}s ({waiting}); raise startup_timeout= "
                    "if the app needs longer, or check `clearway logs`"
                    + (f"\nlast error: {last}" if last else ""),
                )
                changed = True
        rest = self._begin_rollouts(ready)
        changed |= len(rest) != len(ready)
        ready = rest
        if ready:
            # Move the traffic first and mark the revision active only once the
            # data plane confirms it serves it: "active" then means "answering
            # requests". A crash in between leaves it STARTING, and the next
            # pass redoes this.
            ids = frozenset(r.id for r in ready)
            log.info("revisions %s are ready; switching traffic", ", ".join(sorted(ids)))
            await self.backend.apply(self.desired_state(promoting=ids))
            if await self.backend.converged():
                for rev in ready:
                    if rev.branch is None:
                        self.rollouts.end_superseded(rev.app, rev.id)
                    self.store.activate(rev.id)
                activated = True
            else:
                # Not confirmed: the next apply puts traffic back on the active
                # revision; past its deadline the new one fails, the old serves on.
                for rev in ready:
                    bounds = self._deadline(rev)
                    if bounds is not None and self.clock() > bounds[1]:
                        self.store.fail(
                            rev.id,
                            f"its replicas are ready, but the data plane did not confirm serving it "
                            f"within {bounds[0]:.0f}s; the previous revision keeps serving. "
                            "Check the gateway (`clearway status`, logs/gateway.log) and deploy again",
                        )
                    else:
                        log.warning("the data plane has not confirmed serving %s yet; retrying", rev.id)
            changed = True
        if await self.rollouts.advance(observed):
            changed = True
        if changed:
            # Apply the new lifecycle at once rather than on the next tick.
            await self.backend.apply(self.desired_state())
        if activated and self.after_activation is not None:
            try:
                await self.after_activation()
            except Exception:
                log.exception("cleaning up after an activation failed; the next activation tries again")
        async with self._pass_done:
            self._passes += 1
            self._pass_done.notify_all()
