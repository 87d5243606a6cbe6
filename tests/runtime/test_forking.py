"""The fork launcher: function replicas forked from a warm parent keep what spawned ones have.

Real warm parents and replicas under bubblewrap and the app's uid, real
sockets; the supervisor watches them as it watches spawned replicas.
"""

# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from clearway.exceptions import RuntimeStartError
from clearway.runtime import ReplicaState, Supervisor
from clearway.runtime.cgroups import CgroupUnavailable, create_cgroup
from clearway.runtime.forking import ForkLauncher, warm_parent_spec
from clearway.runtime.functions import HEALTH_PATH
from clearway.runtime.launcher import LaunchRequest
from clearway.runtime.process import is_alive
from clearway.runtime.spec import ReplicaSpec, replica_environment

from .conftest import APP_UID, FAST, SpecFactory, StatusLog, cgroup_dir, client_for

pytestmark = pytest.mark.timeout(90)

#: Counts its imports in the warm parent's cwd (the directory holding the replicas' workdirs).
APP = """
import os, random, socket, threading
import clearway as cw

with open("imports.txt", "a") as imports:
    imports.write(f"{os.getpid()}\\n")

app = cw.App("t")

def seqpacket_sockets() -> int:
    # The warm parent's control socket and the report sockets are SOCK_SEQPACKET; the
    # replica's own listening socket and uvicorn's are not.
    found = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            with socket.socket(fileno=os.dup(int(name))) as sock:
                found += sock.type == socket.SOCK_SEQPACKET
        except OSError:
            pass
    return found

@app.function()
def whoami() -> dict:
    print(f"answering as {os.environ['CLEARWAY_REPLICA_ID']}")
    return {
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "cwd": os.getcwd(),
        "replica": os.environ["CLEARWAY_REPLICA_ID"],
        "has_token": "CLEARWAY_REPLICA_TOKEN" in os.environ,
        "random": random.random(),
        "threads": sorted(t.name for t in threading.enumerate()),
        "seqpacket": seqpacket_sockets(),
    }

@app.function()
def leave(code: int) -> None:
    os._exit(code)
"""

THREADED_APP = """
import threading
import clearway as cw

threading.Thread(target=threading.Event().wait, name="poller", daemon=True).start()

app = cw.App("t")

@app.function()
def ping() -> str:
    return "pong"
"""


def replica_of(spec: ReplicaSpec, index: int) -> ReplicaSpec:
    """Replica ``index`` of the same function of the same revision (workdirs side by side)."""
    replica_id = f"{spec.revision}.{spec.component}.{index}"
    assert spec.socket_path is not None
    return dataclasses.replace(
        spec,
        replica_id=replica_id,
        index=index,
        workdir=spec.workdir.parent / replica_id,
        log_path=spec.log_path.with_name(f"{replica_id}.log"),
        socket_path=spec.socket_path.with_name(f"{index}-{spec.socket_path.name}"),
    )


@pytest.fixture
def launcher() -> ForkLauncher:
    return ForkLauncher(cgroup_parent="clearway-test")


@pytest.fixture
async def forking(status_log: StatusLog, launcher: ForkLauncher) -> AsyncIterator[Supervisor]:
    sup = Supervisor(
        on_change=status_log, config=FAST, launcher=launcher, credentials=lambda spec, inc: f"token-{inc}"
    )
    try:
        yield sup
    finally:
        await sup.close(stop_replicas=True)


def function_spec(make_spec: SpecFactory, source: str = APP, component: str = "whoami") -> ReplicaSpec:
    first = make_spec(
        source,
        component=component,
        kind="function",
        health_path=HEALTH_PATH,
        uid=APP_UID,
        # A control URL makes each replica start its token renewal thread (nothing listens there).
        env={"CLEARWAY_CONTROL_URL": "http://127.0.0.1:9"},
    )
    # Function replicas keep their workdirs in one directory per function (the backend's layout).
    return replica_of(dataclasses.replace(first, workdir=first.workdir.parent / "fn" / "x"), 0)


async def call(socket_path: str | None, function_path: str = "/", **kwargs: object) -> object:
    async with client_for(socket_path, timeout=10) as client:
        answer = await client.post(function_path, json=kwargs)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_replicas_fork_from_one_warm_parent_and_each_becomes_its_own_process(
    forking: Supervisor, launcher: ForkLauncher, make_spec: SpecFactory
) -> None:
    first = function_spec(make_spec)
    second = replica_of(first, 1)
    await forking.start(first)
    await forking.start(second)
    one = await forking.wait_for(first.replica_id, ReplicaState.READY, within=30)
    two = await forking.wait_for(second.replica_id, ReplicaState.READY, within=30)
    assert (one.started_by, two.started_by) == ("fork", "fork")
    assert one.launch_seconds is not None and one.start_seconds is not None

    a, b = await call(one.socket_path), await call(two.socket_path)
    assert isinstance(a, dict) and isinstance(b, dict)
    # Pids in the sandbox's namespace: each leads its own session.
    assert (a["replica"], b["replica"]) == (first.replica_id, second.replica_id)
    assert a["sid"] == a["pid"] and b["sid"] == b["pid"] and a["pid"] != b["pid"]
    assert a["ppid"] == b["ppid"], "both are children of the one warm parent"
    assert (a["uid"], a["cwd"], a["has_token"]) == (APP_UID, str(first.workdir), True)
    assert b["cwd"] == str(second.workdir)
    assert a["random"] != b["random"], "each child reseeds its random generator"
    # Threads do not survive a fork: the token renewal thread was started anew in each.
    assert "clearway-token-renewal" in a["threads"] and "clearway-token-renewal" in b["threads"]
    # Neither holds the parent's control socket nor any report socket (its own or a sibling's).
    assert a["seqpacket"] == 0 and b["seqpacket"] == 0
    # Each writes to its own log, through its own log writer.
    await asyncio.wait_for(logged(first.log_path, f"answering as {first.replica_id}"), 10)
    await asyncio.wait_for(logged(second.log_path, f"answering as {second.replica_id}"), 10)
    assert f"answering as {first.replica_id}" not in second.log_path.read_text()
    # The app was imported once, by the warm parent, not by each replica.
    imports = (first.workdir.parent / "imports.txt").read_text().split()
    assert len(imports) == 1
    parents = launcher.parents()
    assert list(parents) == [warm_parent_spec(first).replica_id]
    assert parents[warm_parent_spec(first).replica_id]["children"] == 2
    assert "forked from the warm parent" in first.log_path.read_text()


GRANIAN_APP = """
import os
import clearway as cw

app = cw.App("t")

@app.function(server="granian")
def where() -> dict:
    return {"pid": os.getpid(), "replica": os.environ["CLEARWAY_REPLICA_ID"]}
"""


async def test_a_function_on_granian_is_forked_and_served_by_granian(
    forking: Supervisor, make_spec: SpecFactory
) -> None:
    """granian's Rust runtime must start in the forked child, never in the warm parent."""
    first = function_spec(make_spec, GRANIAN_APP, component="where")
    second = replica_of(first, 1)
    for spec in (first, second):
        await forking.start(spec)
    one = await forking.wait_for(first.replica_id, ReplicaState.READY, within=30)
    two = await forking.wait_for(second.replica_id, ReplicaState.READY, within=30)
    assert (one.started_by, two.started_by) == ("fork", "fork")
    a, b = await call(one.socket_path), await call(two.socket_path)
    assert isinstance(a, dict) and isinstance(b, dict)
    assert (a["replica"], b["replica"]) == (first.replica_id, second.replica_id) and a["pid"] != b["pid"]
    for spec in (first, second):
        await asyncio.wait_for(logged(spec.log_path, "serving with granian (ASGI)"), 10)
    # Each answers again: the server keeps running after its first request.
    assert await call(one.socket_path) == a and await call(two.socket_path) == b


async def test_a_forked_replicas_exit_code_is_reported_and_it_is_forked_again(
    forking: Supervisor, status_log: StatusLog, make_spec: SpecFactory
) -> None:
    spec = function_spec(make_spec, component="leave")
    await forking.start(spec)
    ready = await forking.wait_for(spec.replica_id, ReplicaState.READY, within=30)
    async with client_for(ready.socket_path, timeout=10) as client:
        with pytest.raises(httpx.TransportError):  # the process is gone before it answers
            await client.post("/", json={"code": 7})
    again = await forking.wait_for(
        spec.replica_id, ReplicaState.READY, within=30, predicate=lambda s: s.restarts >= 1
    )
    assert again.last_exit_code == 7, again.last_error
    assert "exited with code 7" in (again.last_error or "")
    assert again.started_by == "fork" and again.pid != ready.pid
    await forking.stop(spec.replica_id)
    assert forking_status_code(status_log, spec.replica_id) == 0


def forking_status_code(status_log: StatusLog, replica_id: str) -> int | None:
    stopped = [s for s in status_log.changes if s.replica_id == replica_id and s.state is ReplicaState.STOPPED]
    return stopped[-1].last_exit_code


async def test_a_forked_replica_runs_in_its_own_cgroup(
    forking: Supervisor, make_spec: SpecFactory
) -> None:
    try:
        probe = create_cgroup("probe", memory_mb=64, cpu=None, parent="clearway-test")
    except CgroupUnavailable as error:
        pytest.skip(f"no writable cgroup hierarchy here: {error}")
    await probe.remove()
    spec = dataclasses.replace(function_spec(make_spec), memory_mb=256)
    await forking.start(spec)
    ready = await forking.wait_for(spec.replica_id, ReplicaState.READY, within=30)
    assert ready.pid is not None and not ready.warnings
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        pytest.skip("cgroup v2-only host: this test reads v1 files")  # pragma: no cover
    # The child joined the replica's own cgroup, and that cgroup carries the replica's limit.
    memory = cgroup_dir(ready.pid, "memory")
    assert memory.name == spec.replica_id
    assert (memory / "memory.limit_in_bytes").read_text().strip() == str(256 * 1024 * 1024)


async def test_an_app_that_starts_threads_at_import_is_spawned_and_says_why(
    forking: Supervisor, launcher: ForkLauncher, make_spec: SpecFactory
) -> None:
    spec = function_spec(make_spec, THREADED_APP, component="ping")
    await forking.start(spec)
    ready = await forking.wait_for(spec.replica_id, ReplicaState.READY, within=40)
    assert ready.started_by == "spawn"
    assert await call(ready.socket_path) == "pong"
    (parent,) = launcher.parents().values()
    assert parent["state"] == "failed" and "started threads (poller)" in str(parent["error"])


async def test_when_the_warm_parent_dies_its_replicas_are_restarted_from_a_new_one(
    forking: Supervisor, launcher: ForkLauncher, make_spec: SpecFactory
) -> None:
    spec = function_spec(make_spec)
    await forking.start(spec)
    ready = await forking.wait_for(spec.replica_id, ReplicaState.READY, within=30)
    (old,) = launcher.parents().values()
    assert isinstance(old["pid"], int)
    os.killpg(old["pid"], signal.SIGKILL)
    again = await forking.wait_for(
        spec.replica_id, ReplicaState.READY, within=40, predicate=lambda s: s.restarts >= 1
    )
    assert again.pid != ready.pid and not is_alive(ready.pid or 0)
    (new,) = launcher.parents().values()
    assert new["pid"] != old["pid"] and again.started_by == "fork"
    assert isinstance(await call(again.socket_path), dict)


async def test_a_warm_parent_refuses_a_request_for_another_revision(
    launcher: ForkLauncher, make_spec: SpecFactory, socket_dir: Path
) -> None:
    spec = function_spec(make_spec)
    launcher.retain([spec])
    parent = await launcher._parent_for(spec)  # the parent of revision A ...
    assert parent is not None
    other = dataclasses.replace(spec, revision="someone-else", replica_id="x.whoami.0")
    listener = socket.socket(socket.AF_UNIX)
    try:
        request = LaunchRequest(spec=other, env=replica_environment(other), listen_fd=listener.fileno())
        with pytest.raises(RuntimeStartError, match="differs in revision"):
            await launcher._fork(parent, request)  # ... asked to fork revision B's replica
    finally:
        listener.close()
        await launcher.close()


async def test_forked_replicas_are_adopted_by_a_new_supervisor_and_outlive_their_launcher(
    status_log: StatusLog, make_spec: SpecFactory
) -> None:
    spec = function_spec(make_spec)
    first = Supervisor(on_change=status_log, config=FAST, launcher=ForkLauncher(cgroup_parent="clearway-test"))
    await first.start(spec)
    ready = await first.wait_for(spec.replica_id, ReplicaState.READY, within=30)
    assert ready.pid is not None and ready.pid_start_time is not None
    await first.close(stop_replicas=False)  # the control plane "crashes": replicas stay

    second = Supervisor(on_change=status_log, config=FAST, launcher=ForkLauncher(cgroup_parent="clearway-test"))
    try:
        assert await second.adopt(spec, ready.pid, ready.pid_start_time, ready.incarnation)
        adopted = await second.wait_for(spec.replica_id, ReplicaState.READY, within=20)
        assert adopted.pid == ready.pid
        answer = await call(adopted.socket_path)
        assert isinstance(answer, dict) and answer["replica"] == spec.replica_id
        assert is_alive(ready.pid, ready.pid_start_time), "the very process that was forked"
    finally:
        await second.close(stop_replicas=True)
    # With its last child gone, the orphaned warm parent exits by itself.
    assert not is_alive(ready.pid)
    await asyncio.wait_for(_gone(spec), 20)


async def logged(path: Path, text: str) -> None:
    """Wait until ``text`` is in the log at ``path`` (its log writer appends it a moment later)."""
    while text not in (path.read_text() if path.exists() else ""):
        await asyncio.sleep(0.02)


async def _gone(spec: ReplicaSpec) -> None:
    """Wait until no process runs the warm parent of ``spec`` (its log says it exited)."""
    log = warm_parent_spec(spec).log_path
    while "exiting" not in (log.read_text() if log.exists() else ""):
        await asyncio.sleep(0.05)
