"""Services: ASGI and WSGI apps served on the supervisor's port, over real HTTP."""

from __future__ import annotations

import os
import stat
import time

from clearway.runtime import ReplicaState, Supervisor
from tests.runtime.conftest import SpecFactory, StatusLog, client_for

STARLETTE_APP = """
import os
import clearway as cw

app = cw.App("t")

@app.service(health="/healthz")
def web():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return JSONResponse({
            "cwd": os.getcwd(),
            "home": os.environ["HOME"],
            "port": os.environ.get("PORT"),
            "replica": os.environ["CLEARWAY_REPLICA_ID"],
            "greeting": os.environ.get("GREETING"),
            "pid": os.getpid(),
        })

    return Starlette(routes=[
        Route("/healthz", lambda r: PlainTextResponse("ok")),
        Route("/", hello),
    ])
"""

FLASK_APP = """
import clearway as cw

app = cw.App("t")

@app.service()
def web():
    from flask import Flask
    api = Flask("t")

    @api.get("/")
    def index():
        return "hello from flask"

    return api
"""


async def test_asgi_service_answers_on_its_unix_socket(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    spec = make_spec(
        STARLETTE_APP,
        health_path="/healthz",
        env={"GREETING": "hi", "CLEARWAY_REPLICA_ID": "spoofed"},
    )
    started = time.monotonic()
    first = await supervisor.start(spec)
    assert first.socket_path == str(spec.socket_path)  # bound before the process even starts
    assert spec.socket_path is not None
    # Only the platform's user may connect: the socket is 0600 in a 0700 directory.
    assert stat.S_IMODE(os.stat(spec.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spec.socket_path.parent).st_mode) == 0o700
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    print(f"spawn -> ready: {time.monotonic() - started:.3f}s")
    assert ready.socket_path == first.socket_path
    assert ready.pid is not None and ready.pid_start_time is not None
    assert ready.incarnation is not None and len(ready.incarnation) == 16

    async with client_for(ready.socket_path) as client:
        answer = (await client.get("/")).json()
    assert answer == {
        "cwd": str(spec.workdir),
        "home": str(spec.workdir),
        "port": None,  # there is no TCP port any more
        "replica": spec.replica_id,  # identity cannot be overridden by user env
        "greeting": "hi",
        "pid": 2,  # its own pid namespace: bwrap's init is 1
    }
    stopped = await supervisor.stop(spec.replica_id)
    assert stopped.state is ReplicaState.STOPPED
    assert stopped.last_exit_code == 0
    assert not spec.socket_path.exists()  # removed with the replica
    assert status_log.states(spec.replica_id) == ["starting", "ready", "stopping", "stopped"]


async def test_wsgi_service_answers_without_health_path(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec(FLASK_APP)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    async with client_for(ready.socket_path) as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.text == "hello from flask"
