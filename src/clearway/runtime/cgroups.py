"""Memory and CPU limits for replicas, through Linux control groups.

Limits are best effort: a developer laptop or a container may not let us create
cgroups, and an app that runs without its limit is more useful than one that
does not run. So `create_cgroup` raises `CgroupUnavailable`, which the
supervisor turns into a warning on the replica's status, and the replica starts
anyway.

Which hierarchy:

* cgroup v2 when a cgroup2 mount offers the needed controllers (``memory``,
  ``cpu``): ``<mount>/clearway/<replica>`` with ``memory.max`` and ``cpu.max``.
* otherwise cgroup v1: ``<memory mount>/clearway/<replica>`` with
  ``memory.limit_in_bytes`` and ``<cpu mount>/clearway/<replica>`` with a CFS
  quota (``cpu.cfs_quota_us`` over a 100 ms ``cpu.cfs_period_us``).

Hybrid hosts mount an empty cgroup2 at ``/sys/fs/cgroup/unified`` next to the v1
controllers, which is why availability is decided per controller, not per mount.

A process joins its cgroup *before* it runs any code (see
`clearway.runtime.launcher`), by writing its own pid to each ``cgroup.procs``,
so a replica never runs unlimited, not even for a moment, and everything it
forks is born inside. A cgroup is per replica, not per process: it outlives
restarts and is removed when the replica stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CFS_PERIOD_US", "Cgroup", "CgroupUnavailable", "create_cgroup"]

CFS_PERIOD_US = 100_000


class CgroupUnavailable(Exception):
    """The requested limits cannot be enforced here; the message says why."""


@dataclass(frozen=True)
class _Mount:
    fstype: str
    path: Path
    options: frozenset[str]


def _mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[_Mount]:
    mounts = []
    for line in mountinfo.read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, rest = before.split(), after.split()
        if len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            mounts.append(_Mount(rest[0], Path(fields[4]), frozenset(rest[2].split(","))))
    return mounts


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        raise CgroupUnavailable(f"cannot write {value!r} to {path}: {error.strerror}") from error


@dataclass(frozen=True)
class Cgroup:
    version: int
    paths: tuple[Path, ...]
    """The replica's directory in each hierarchy (one for v2, one per controller for v1)."""
    limit_files: tuple[Path, ...]
    """The files holding the limits that were applied (for status and tests)."""

    @property
    def procs_files(self) -> tuple[Path, ...]:
        return tuple(path / "cgroup.procs" for path in self.paths)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in procs.read_text().split())
        return found

    async def remove(self, *, within: float = 5.0) -> str | None:
        """Kill stragglers and delete the directories; returns a warning when that fails."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = asyncio.get_running_loop().time() + within
        remaining = list(self.paths)
        while remaining:
            still = []
            for path in remaining:
                try:
                    path.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    still.append(path)
            remaining = still
            if not remaining:
                return None
            if asyncio.get_running_loop().time() > deadline:
                return f"could not remove cgroup {', '.join(map(str, remaining))}"
            # Killed processes leave their cgroup a moment after SIGKILL.
            await asyncio.sleep(0.02)
        return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def create_cgroup(
    name: str,
    *,
    memory_mb: int | None,
    cpu: float | None,
    parent: str = "clearway",
    mounts: Iterable[_Mount] | None = None,
) -> Cgroup | None:
    """Create (or reuse) the cgroup ``<parent>/<name>`` with these limits; None if no limit."""
    if memory_mb is None and cpu is None:
        return None
    if memory_mb is not None and memory_mb <= 0:
        raise CgroupUnavailable(f"memory_mb must be positive, got {memory_mb}")
    if cpu is not None and cpu <= 0:
        raise CgroupUnavailable(f"cpu must be positive, got {cpu}")
    needed = {c for c, v in (("memory", memory_mb), ("cpu", cpu)) if v is not None}
    all_mounts = list(_mounts() if mounts is None else mounts)
    leaf = _safe_name(name)
    for mount in all_mounts:
        if mount.fstype == "cgroup2" and needed <= _v2_controllers(mount.path):
            return _create_v2(mount.path / parent, leaf, memory_mb, cpu, needed)
    v1 = {}
    for controller in needed:
        found = next(
            (m for m in all_mounts if m.fstype == "cgroup" and controller in m.options), None
        )
        if found is None:
            raise CgroupUnavailable(
                f"no cgroup hierarchy offers the {controller!r} controller on this host"
            )
        v1[controller] = found.path
    return _create_v1(v1, parent, leaf, memory_mb, cpu)


def _v2_controllers(root: Path) -> set[str]:
    try:
        return set((root / "cgroup.controllers").read_text().split())
    except OSError:
        return set()


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CgroupUnavailable(f"cannot create cgroup {path}: {error.strerror}") from error


def _create_v2(
    parent: Path, leaf: str, memory_mb: int | None, cpu: float | None, needed: set[str]
) -> Cgroup:
    enable = " ".join(f"+{c}" for c in sorted(needed))
    _write(parent.parent / "cgroup.subtree_control", enable)
    _mkdir(parent)
    _write(parent / "cgroup.subtree_control", enable)
    path = parent / leaf
    _mkdir(path)
    files = []
    if memory_mb is not None:
        _write(path / "memory.max", str(memory_mb * 1024 * 1024))
        files.append(path / "memory.max")
    if cpu is not None:
        _write(path / "cpu.max", f"{round(cpu * CFS_PERIOD_US)} {CFS_PERIOD_US}")
        files.append(path / "cpu.max")
    return Cgroup(version=2, paths=(path,), limit_files=tuple(files))


def _create_v1(
    roots: dict[str, Path], parent: str, leaf: str, memory_mb: int | None, cpu: float | None
) -> Cgroup:
    paths: list[Path] = []
    files: list[Path] = []
    if memory_mb is not None:
        path = roots["memory"] / parent / leaf
        _mkdir(path)
        paths.append(path)
        limit = str(memory_mb * 1024 * 1024)
        _write(path / "memory.limit_in_bytes", limit)
        files.append(path / "memory.limit_in_bytes")
        # With swap accounting on, also cap memory+swap, or the limit only moves pages to swap.
        with contextlib.suppress(OSError):
            (path / "memory.memsw.limit_in_bytes").write_text(limit)
    if cpu is not None:
        path = roots["cpu"] / parent / leaf
        _mkdir(path)
        if path not in paths:
            paths.append(path)
        _write(path / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _write(path / "cpu.cfs_quota_us", str(round(cpu * CFS_PERIOD_US)))
        files.append(path / "cpu.cfs_quota_us")
    return Cgroup(version=1, paths=tuple(paths), limit_files=tuple(files))
