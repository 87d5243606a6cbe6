"""A restarted control plane re-attaches to replicas that kept running."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator

import pytest

from clearway.runtime import ReplicaState, Supervisor
from clearway.runtime.process import is_alive, read_start_time
from tests.runtime.conftest import FAST, SpecFactory, StatusLog, client_for
from tests.runtime.test_services import STARLETTE_APP


@pytest.fixture
async def second_supervisor(status_log: StatusLog) -> AsyncIterator[Supervisor]:
    sup = Supervisor(on_change=status_log, config=FAST)
    yield sup
    await sup.close(stop_replicas=True)


async def test_a_new_supervisor_adopts_a_running_replica(
    make_spec: SpecFactory, second_supervisor: Supervisor
) -> None:
    spec = make_spec(STARLETTE_APP, health_path="/healthz")
    first = Supervisor(config=FAST)
    await first.start(spec)
    before = await first.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    await first.close(stop_replicas=False)  # the control plane goes away...
    assert before.pid is not None and before.pid_start_time is not None
    assert is_alive(before.pid, before.pid_start_time)  # ...the replica does not

    adopted = await second_supervisor.adopt(
        spec, before.pid, before.pid_start_time, before.incarnation
    )
    assert adopted
    after = await second_supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    assert (after.pid, after.socket_path, after.restarts, after.incarnation) == (
        before.pid, before.socket_path, 0, before.incarnation,
    )  # fmt: skip
    async with client_for(after.socket_path) as client:
        assert (await client.get("/healthz")).text == "ok"

    # When the adopted process dies, it is restarted on the same socket path.
    os.kill(before.pid, signal.SIGKILL)
    restarted = await second_supervisor.wait_for(
        spec.replica_id, ReplicaState.READY, within=20, predicate=lambda s: s.restarts == 1
    )
    assert restarted.pid != before.pid
    assert restarted.socket_path == before.socket_path
    assert restarted.incarnation != before.incarnation
    async with client_for(restarted.socket_path) as client:
        assert (await client.get("/healthz")).text == "ok"
    assert restarted.last_exit_code == -9  # it was our child: the exit code is known

    stopped = await second_supervisor.stop(spec.replica_id)
    assert stopped.state is ReplicaState.STOPPED


async def test_adopt_refuses_a_pid_that_now_belongs_to_another_process(
    make_spec: SpecFactory, second_supervisor: Supervisor
) -> None:
    spec = make_spec(STARLETTE_APP)
    our_start_time = read_start_time(os.getpid())
    assert our_start_time is not None

    assert not await second_supervisor.adopt(spec, os.getpid(), our_start_time + 1, "0" * 16)
    assert spec.replica_id not in second_supervisor.statuses()
    assert not await second_supervisor.adopt(spec, 2**22 + 7, our_start_time, None)
