"""A fake of the backend protocol for control-plane tests: it runs nothing.

It records what the control plane asks for and answers with what the test set:
readiness per revision, whether the data plane confirms (`converged`),
which incarnation each replica runs with, the shard owners it was given (`shard_owners`), the gateway's traffic counters
(`samples`), its load per component (`loads`) and its hold sequence number (`hold_seq`). `split(app)` is the last traffic split the control plane applied.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from clearway.backends.base import (
    ComponentLoad,
    ComponentObservation,
    DesiredState,
    ReplicaInfo,
    ReplicaStart,
    RevisionObservation,
    TrafficSample,
)
from clearway.spec.ids import branch_label, commit_label
from clearway.spec.model import AppSpec


@dataclass
class FakeBackend:
    applied: list[DesiredState] = field(default_factory=list)
    #: Revisions reported ready (every component at its desired count).
    ready: set[str] = field(default_factory=set)
    #: What `converged` answers.
    confirms: bool = True
    incarnations: dict[str, str] = field(default_factory=dict)
    #: What `traffic` answers: the gateway's counters per revision, as the test sets them.
    samples: dict[str, TrafficSample] = field(default_factory=dict)
    #: What `load` answers: the gateway's load per (app, revision, component), as the test sets it.
    loads: list[ComponentLoad] = field(default_factory=list)
    #: What `wait_held` answers: requests held so far (a test bumps it to signal a cold start).
    hold_seq: int = 0
    #: The shard owners the control plane set, by (app, component).
    shard_owners: dict[tuple[str, str], dict[int, str]] = field(default_factory=dict)

    async def start(self) -> None:
        pass

    async def apply(self, desired: DesiredState) -> None:
        self.applied.append(desired)

    async def converged(self) -> bool:
        return self.confirms

    def replica_incarnation(self, replica_id: str) -> str | None:
        return self.incarnations.get(replica_id)

    async def set_shard_owners(self, app: str, component: str, owners: Mapping[int, str]) -> None:
        self.shard_owners[(app, component)] = dict(owners)

    def observe(self) -> Mapping[str, RevisionObservation]:
        if not self.applied:
            return {}
        seen = {}
        for workload in self.applied[-1].workloads:
            ready = workload.revision in self.ready
            seen[workload.revision] = RevisionObservation(
                workload.revision,
                {n: ComponentObservation(desired=c, ready=c if ready else 0) for n, c in workload.replicas.items()},
            )
        return seen

    def replicas(self, app: str) -> list[ReplicaInfo]:
        return []

    def last_starts(self, app: str) -> Mapping[tuple[str, str], ReplicaStart]:
        return {}

    def urls(self, spec: AppSpec, *, branch: str | None = None, commit: str | None = None) -> list[str]:
        if branch is None and commit is None:
            return [f"http://{spec.name}.localhost:8080/"]
        labels = [branch_label(branch)] if branch is not None else []
        labels += [commit_label(commit)] if commit is not None else []
        return [f"http://{label}.{spec.name}.localhost:8080/" for label in labels]

    async def logs(
        self, app: str, *, revision: str | None, component: str | None, tail: int, follow: bool
    ) -> AsyncIterator[str]:
        lines: tuple[str, ...] = ()
        for line in lines:
            yield line

    async def metrics(self) -> str:
        return ""

    async def close(self, *, stop_workloads: bool) -> None:
        pass

    async def traffic(self) -> Mapping[str, TrafficSample]:
        return dict(self.samples)

    async def load(self) -> list[ComponentLoad]:
        return list(self.loads)

    async def wait_held(self, after: int, within: float) -> int:
        if self.hold_seq <= after:
            await asyncio.sleep(within)
        return self.hold_seq

    def split(self, app: str) -> dict[str, int]:
        """The last applied traffic split of ``app``."""
        return {t.revision: t.weight for t in self.applied[-1].traffic.get(app, [])}
