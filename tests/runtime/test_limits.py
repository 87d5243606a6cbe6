"""Resource limits through cgroups."""

# Tests check small local files inline; a thread hop would only obscure them.
# ruff: noqa: ASYNC240

from __future__ import annotations

from pathlib import Path

import pytest

from clearway.runtime import ReplicaState, Supervisor
from tests.runtime.conftest import SpecFactory, cgroup_dir

STARLETTE_PLAIN = """
import clearway as cw

app = cw.App("t")

@app.service()
def web():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    return Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))])
"""


async def test_memory_and_cpu_limits_are_applied_through_cgroups(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec(STARLETTE_PLAIN, memory_mb=300, cpu=0.5)
    await supervisor.start(spec)
    status = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    if status.warnings:
        pytest.skip(f"this kernel/container does not let us create cgroups: {status.warnings}")
    assert status.pid is not None
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        pytest.skip("cgroup v2-only host: this test reads v1 files")  # pragma: no cover

    memory = cgroup_dir(status.pid, "memory")
    assert memory.name == spec.replica_id and memory.parent.name == "clearway"
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(300 * 1024 * 1024)
    assert str(status.pid) in (memory / "cgroup.procs").read_text().split()
    cpu = cgroup_dir(status.pid, "cpu")
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
    assert (cpu / "cpu.cfs_period_us").read_text().strip() == "100000"

    await supervisor.stop(spec.replica_id)
    assert not memory.exists() and not cpu.exists()  # cleaned up with the replica
