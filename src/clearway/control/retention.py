"""What the platform keeps on disk: code snapshots and environments.

Every deploy adds a code snapshot and possibly an environment; without a limit
the disk fills. After each activation (never on the deploy's own path) the
reconciler calls `Retention.collect`, which keeps, per app, the newest
``keep_revisions`` revisions (``clearway up --keep-revisions N``, default 10)
plus every starting or active one, whatever their age, and:

* deletes the code snapshot of every other revision, unless a kept revision
  has the same snapshot (identical code shares one), and marks the revision
  *pruned*, so ``clearway rollback`` to it says why it cannot;
* deletes every environment that no unpruned revision uses, except those a
  build in progress is handing to a revision not stored yet
  (`EnvironmentBuilder.pinned`).

A revision keeps its row (history, ``clearway status``) after pruning. The
collection takes the builder's artifact lock, so it never deletes a snapshot
that a deploy of the same code is placing at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from clearway.control.environments import EnvironmentBuilder
from clearway.control.store import RUNNING_STATES, Revision, Store

log = logging.getLogger("clearway.control")

#: Revisions kept per app (their code and environment) for rollback.
DEFAULT_KEEP_REVISIONS = 10

_RUNNING = RUNNING_STATES


@dataclass(frozen=True)
class Collected:
    """What one collection freed."""

    pruned: tuple[str, ...]
    snapshots: int
    environments: tuple[str, ...]
    freed_bytes: int


def kept(revisions: list[Revision], keep: int) -> set[str]:
    """Ids of the revisions of one app to keep: the newest ``keep``, and every running one."""
    newest = sorted(revisions, key=lambda r: r.number)[-keep:] if keep > 0 else []
    return {r.id for r in newest} | {r.id for r in revisions if r.state in _RUNNING}


class Retention:
    def __init__(
        self, store: Store, home: Path, environments: EnvironmentBuilder, lock: asyncio.Lock, *, keep: int
    ) -> None:
        self.store = store
        self.code_root = home / "code"
        self.environments = environments
        self.lock = lock
        self.keep = keep

    async def collect(self) -> Collected:
        async with self.lock:
            result = await asyncio.to_thread(self._collect)
        if result.pruned or result.environments:
            log.info(
                "freed %.1f MiB: code of %s (%d snapshots), %d environments",
                result.freed_bytes / 2**20,
                ", ".join(result.pruned) or "no revisions",
                result.snapshots,
                len(result.environments),
            )
        return result

    def _collect(self) -> Collected:
        revisions = self.store.revisions()
        by_app: dict[str, list[Revision]] = {}
        for rev in revisions:
            by_app.setdefault(rev.app, []).append(rev)
        prune: list[Revision] = []
        keep_ids: set[str] = set()
        for revs in by_app.values():
            keep_ids |= kept(revs, self.keep)
            prune += [r for r in revs if r.id not in kept(revs, self.keep) and r.pruned_at is None]
        live = [r for r in revisions if r.id in keep_ids]
        live_code = {(r.app, r.code_digest) for r in live}
        freed = 0
        snapshots = 0
        for rev in prune:
            if (rev.app, rev.code_digest) in live_code:
                continue
            path = self.code_root / rev.app / rev.code_digest
            if path.is_dir():
                freed += _size(path)
                shutil.rmtree(path, ignore_errors=True)
                snapshots += 1
        self.store.mark_pruned([r.id for r in prune])
        live_envs = {r.env_digest for r in live if r.env_digest}
        gone: list[str] = []
        for digest in self.environments.existing():
            if digest in live_envs or self.environments.is_pinned(digest):
                continue
            freed += _size(self.environments.path_of(digest))
            self.environments.remove(digest)
            gone.append(digest)
        return Collected(tuple(r.id for r in prune), snapshots, tuple(gone), freed)


def _size(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += (Path(dirpath) / name).lstat().st_size
            except OSError:
                continue
    return total
