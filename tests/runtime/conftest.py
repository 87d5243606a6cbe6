"""Fixtures for runtime tests: real app files, real replica processes, a fast supervisor."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clearway.runtime import (
    ProbePolicy,
    ReplicaSpec,
    ReplicaStatus,
    RestartPolicy,
    Supervisor,
    SupervisorConfig,
)

#: Small delays so restarts and probes happen within a test's patience, deterministically
#: driven by events (process exits, probe answers), never by sleeping in the tests.
FAST = SupervisorConfig(
    restart=RestartPolicy(
        initial_backoff=0.05, max_backoff=0.2, crashloop_crashes=5, crashloop_unready=3
    ),
    probes=ProbePolicy(
        readiness_interval=0.02,
        liveness_interval=0.1,
        timeout=1.0,
        failure_threshold=2,
        worker_ready_after=1.0,
    ),
)

#: A uid/gid no account on the machine uses: replicas started with it own nothing of ours.
APP_UID = 400123
OTHER_APP_UID = 400124


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def client_for(socket_path: str | Path | None, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client that talks to a replica over its unix socket."""
    assert socket_path is not None
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    return httpx.AsyncClient(transport=transport, base_url="http://replica", **kwargs)


SpecFactory = Callable[..., ReplicaSpec]


@pytest.fixture
def make_spec(tmp_path: Path, socket_dir: Path) -> SpecFactory:
    """Write ``source`` as the app file of a fresh code snapshot; return its spec."""
    counter = 0

    def make(
        source: str, *, component: str = "web", kind: str = "service", **overrides: Any
    ) -> ReplicaSpec:
        nonlocal counter
        counter += 1
        replica_id = overrides.pop("replica_id", f"t{counter}-{component}-0")
        code_dir = tmp_path / f"code-{counter}"
        code_dir.mkdir()
        (code_dir / "app.py").write_text(textwrap.dedent(source))
        fields: dict[str, Any] = {
            "replica_id": replica_id,
            "app": "t",
            "revision": str(counter),
            "component": component,
            "index": 0,
            "kind": kind,
            "code_dir": code_dir,
            "app_file": "app.py",
            "workdir": tmp_path / "replicas" / replica_id,
            "log_path": tmp_path / "logs" / f"{replica_id}.log",
            "socket_path": socket_dir / "sockets" / f"{counter}.sock",
            "grace_period": 5.0,
            "startup_timeout": 20.0,
        }
        fields.update(overrides)
        return ReplicaSpec(**fields)

    return make


class StatusLog:
    """Every status the supervisor reported, in order."""

    def __init__(self) -> None:
        self.changes: list[ReplicaStatus] = []

    def __call__(self, status: ReplicaStatus) -> None:
        self.changes.append(status)

    def states(self, replica_id: str) -> list[str]:
        states: list[str] = []
        for status in self.changes:
            if status.replica_id == replica_id and (not states or states[-1] != status.state.value):
                states.append(status.state.value)
        return states


@pytest.fixture
def status_log() -> StatusLog:
    return StatusLog()


@pytest.fixture
async def supervisor(status_log: StatusLog) -> AsyncIterator[Supervisor]:
    sup = Supervisor(on_change=status_log, config=FAST)
    try:
        yield sup
    finally:
        await sup.close(stop_replicas=True)


def cgroup_dir(pid: int, controller: str) -> Path:
    """Where ``pid``'s cgroup for ``controller`` (v1) lives in the file system."""
    relative = next(
        line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if controller in line.split(":")[1].split(",")
    )
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, after = line.partition(" - ")
        rest = after.split()
        if rest[0] == "cgroup" and controller in rest[2].split(","):
            return Path(fields.split()[4]) / relative.lstrip("/")
    raise AssertionError(f"no {controller} cgroup mount")
