"""Replicas that crash, fail to import, never get ready or turn unhealthy."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

from clearway.runtime import ProbePolicy, ReplicaState, Supervisor
from tests.runtime.conftest import FAST, SpecFactory, StatusLog, client_for

CRASHING_WORKER = """
import clearway as cw

app = cw.App("t")

@app.worker()
def janitor():
    raise ValueError("the janitor tripped over a bucket")
"""

BROKEN_IMPORT = """
import clearway as cw
import no_such_module_anywhere

app = cw.App("t")

@app.service()
def web():
    raise AssertionError("never reached")
"""

NEVER_READY = """
import clearway as cw

app = cw.App("t")

@app.service(health="/healthz")
def web():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    return Starlette(routes=[Route("/healthz", lambda r: PlainTextResponse("not yet", 503))])
"""

# Healthy until a file named "sick" appears in the workdir; a fresh process removes it.
FALLS_SICK = """
import os
import clearway as cw

app = cw.App("t")

@app.service(health="/healthz")
def web():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    if os.path.exists("sick"):
        os.remove("sick")

    def healthz(request):
        if os.path.exists("sick"):
            return PlainTextResponse("sick", 500)
        return PlainTextResponse(str(os.getpid()))

    return Starlette(routes=[Route("/healthz", healthz)])
"""


async def test_crashing_replica_backs_off_then_reports_crashloop_with_traceback(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    spec = make_spec(CRASHING_WORKER, component="janitor", kind="worker")
    await supervisor.start(spec)
    status = await supervisor.wait_for(spec.replica_id, ReplicaState.CRASHLOOP, within=30)

    assert status.last_exit_code == 1
    assert status.pid is None
    assert status.restarts >= 2
    assert "exited with code 1 (the component raised an exception)" in (status.last_error or "")
    assert "Traceback (most recent call last)" in (status.last_error or "")
    assert "ValueError: the janitor tripped over a bucket" in (status.last_error or "")
    states = status_log.states(spec.replica_id)
    assert states[0] == "starting" and "backoff" in states
    # Still retried while crash-looping.
    await supervisor.wait_for(
        spec.replica_id, within=10, predicate=lambda s: s.restarts > status.restarts
    )


async def test_import_error_is_reported_with_its_traceback(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec(BROKEN_IMPORT)
    await supervisor.start(spec)
    status = await supervisor.wait_for(
        spec.replica_id, ReplicaState.BACKOFF, ReplicaState.CRASHLOOP, within=20
    )
    error = status.last_error or ""
    assert status.last_exit_code == 3
    assert "(could not load the app)" in error
    assert "Traceback (most recent call last)" in error
    assert "ModuleNotFoundError: No module named 'no_such_module_anywhere'" in error
    assert 'app.py", line 3' in error
    # A broken import never gets better: a few unready exits make a crash loop.
    await supervisor.wait_for(spec.replica_id, ReplicaState.CRASHLOOP, within=30)


async def test_never_ready_replica_is_killed_and_the_reason_reported(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    # 4 s: time for the app to import on a loaded machine and answer 503 at least once.
    spec = make_spec(NEVER_READY, health_path="/healthz", startup_timeout=4, grace_period=1.0)
    await supervisor.start(spec)
    first_pid = (
        await supervisor.wait_for(spec.replica_id, within=10, predicate=lambda s: s.pid is not None)
    ).pid
    status = await supervisor.wait_for(
        spec.replica_id, ReplicaState.BACKOFF, ReplicaState.CRASHLOOP, within=20
    )
    assert status.last_error == (
        "never answered GET /healthz within 4s; last error: GET /healthz answered 503"
    )
    assert status.last_exit_code == 0  # it took SIGTERM gracefully
    assert first_pid is not None
    assert "ready" not in status_log.states(spec.replica_id)


async def test_failing_liveness_probes_restart_the_replica(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    spec = make_spec(FALLS_SICK, health_path="/healthz")
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)

    (spec.workdir / "sick").write_text("")
    again = await supervisor.wait_for(
        spec.replica_id, ReplicaState.READY, within=20, predicate=lambda s: s.restarts == 1
    )

    assert again.pid != ready.pid
    assert again.socket_path == ready.socket_path  # the socket belongs to the replica
    assert again.last_error == (
        "failed 2 liveness probes in a row; last: GET /healthz answered 500"
    )
    assert status_log.states(spec.replica_id) == [
        "starting", "ready", "unhealthy", "backoff", "starting", "ready",
    ]  # fmt: skip
    async with client_for(again.socket_path) as client:
        answer = await client.get("/healthz")
    assert answer.text == "2"  # a fresh process, in its own pid namespace


async def test_a_stopped_replica_leaves_rotation_within_the_probe_bound(
    make_spec: SpecFactory, status_log: StatusLog
) -> None:
    """SIGSTOP: the first failed liveness probe takes it out of rotation (default policy)."""
    config = dataclasses.replace(FAST, probes=ProbePolicy(failure_threshold=3))
    spec = make_spec(FALLS_SICK, health_path="/healthz", grace_period=1.0)
    async with Supervisor(on_change=status_log, config=config) as supervisor:
        await supervisor.start(spec)
        ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
        assert ready.pid is not None
        os.killpg(ready.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            out = await supervisor.wait_for(
                spec.replica_id, within=20, predicate=lambda s: s.state is not ReplicaState.READY
            )
            took = time.monotonic() - stopped_at
        finally:
            os.killpg(ready.pid, signal.SIGCONT)
        print(f"SIGSTOP -> out of rotation: {took:.2f}s")
        bound = config.probes.liveness_interval + config.probes.timeout
        assert out.state is ReplicaState.UNHEALTHY
        assert took <= bound + 0.5  # interval + timeout, plus scheduling
        # Awake again: back in rotation at the next success, without a restart.
        back = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
        assert back.pid == ready.pid and back.restarts == 0
