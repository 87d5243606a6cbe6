"""Stopping: in-flight requests drain within the grace period; stubborn processes get SIGKILL."""

from __future__ import annotations

import asyncio

from clearway.runtime import ReplicaState, Supervisor
from tests.runtime.conditions import file_text, poll_until
from tests.runtime.conftest import SpecFactory, StatusLog, client_for

# /slow sends a first chunk, then finishes only once the test creates "release" in the workdir.
SLOW_APP = """
import asyncio, os
import clearway as cw

app = cw.App("t")

@app.service()
def web():
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def body():
        yield b"started\\n"
        while not os.path.exists("release"):
            await asyncio.sleep(0.01)
        yield b"finished\\n"

    async def slow(request):
        return StreamingResponse(body())

    return Starlette(routes=[Route("/slow", slow)])
"""

STUBBORN_WORKER = """
import signal, time
import clearway as cw

app = cw.App("t")

@app.worker()
def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open("ignoring-sigterm", "w").close()
    while True:
        time.sleep(1)
"""

POLITE_WORKER = """
import time
import clearway as cw

app = cw.App("t")

@app.worker()
def polite():
    try:
        open("running", "w").close()
        while True:
            time.sleep(1)
    finally:
        open("cleaned-up", "w").close()
"""


async def test_stop_lets_an_in_flight_request_finish(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    spec = make_spec(SLOW_APP, grace_period=20.0)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)

    async with (
        client_for(ready.socket_path, timeout=30) as client,
        client.stream("GET", "/slow") as response,
    ):
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"started\n"  # the request is in flight

        stopping = asyncio.create_task(supervisor.stop(spec.replica_id), name="stop")
        await supervisor.wait_for(spec.replica_id, ReplicaState.STOPPING, within=5)
        await poll_until(
            lambda: "draining in-flight requests" in file_text(spec.log_path),
            what="the server started draining",
        )
        assert not stopping.done()
        (spec.workdir / "release").write_text("")
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"finished\n"
    stopped = await asyncio.wait_for(stopping, 20)
    assert stopped.state is ReplicaState.STOPPED
    assert stopped.last_exit_code == 0


async def test_stop_kills_a_process_that_ignores_sigterm(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec(STUBBORN_WORKER, component="stubborn", kind="worker")
    await supervisor.start(spec)
    await poll_until(
        lambda: (spec.workdir / "ignoring-sigterm").exists(), what="worker ignores SIGTERM"
    )
    stopped = await supervisor.stop(spec.replica_id, grace=0.3)
    assert stopped.state is ReplicaState.STOPPED
    assert stopped.last_exit_code == -9
    assert "sending SIGKILL" in file_text(spec.log_path)


async def test_sigterm_unwinds_a_worker_cleanly(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    spec = make_spec(POLITE_WORKER, component="polite", kind="worker")
    await supervisor.start(spec)
    await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    await poll_until(lambda: (spec.workdir / "running").exists(), what="worker is running")
    stopped = await supervisor.stop(spec.replica_id)
    assert stopped.last_exit_code == 0
    assert (spec.workdir / "cleaned-up").exists()
    assert status_log.states(spec.replica_id) == ["starting", "ready", "stopping", "stopped"]


async def test_stop_during_backoff_needs_no_process(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec("import clearway as cw\nraise SystemExit('no app today')\n")
    await supervisor.start(spec)
    await supervisor.wait_for(
        spec.replica_id, ReplicaState.BACKOFF, ReplicaState.CRASHLOOP, within=20
    )
    stopped = await supervisor.stop(spec.replica_id)
    assert stopped.state is ReplicaState.STOPPED
    assert spec.replica_id not in supervisor.statuses()
