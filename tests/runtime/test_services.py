"""Services: ASGI and WSGI apps served on the supervisor's port, over real HTTP."""

from __future__ import annotations

import time

import httpx

from clearway.runtime import ReplicaState, Supervisor
from tests.runtime.conftest import SpecFactory, StatusLog

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
            "port": os.environ["PORT"],
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


async def test_asgi_service_answers_on_its_port(
    supervisor: Supervisor, make_spec: SpecFactory, status_log: StatusLog
) -> None:
    spec = make_spec(
        STARLETTE_APP,
        health_path="/healthz",
        env={"GREETING": "hi", "CLEARWAY_REPLICA_ID": "spoofed"},
    )
    started = time.monotonic()
    first = await supervisor.start(spec)
    assert first.port is not None  # known before the process even starts
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    print(f"spawn -> ready: {time.monotonic() - started:.3f}s")
    assert ready.port == first.port
    assert ready.pid is not None and ready.pid_start_time is not None

    async with httpx.AsyncClient() as client:
        answer = (await client.get(f"http://127.0.0.1:{ready.port}/")).json()
    assert answer == {
        "cwd": str(spec.workdir),
        "home": str(spec.workdir),
        "port": str(ready.port),
        "replica": spec.replica_id,  # identity cannot be overridden by user env
        "greeting": "hi",
        "pid": ready.pid,
    }
    stopped = await supervisor.stop(spec.replica_id)
    assert stopped.state is ReplicaState.STOPPED
    assert stopped.last_exit_code == 0
    assert status_log.states(spec.replica_id) == ["starting", "ready", "stopping", "stopped"]


async def test_wsgi_service_answers_without_health_path(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec(FLASK_APP)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{ready.port}/")
    assert response.status_code == 200
    assert response.text == "hello from flask"
