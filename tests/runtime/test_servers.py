"""Every guarantee a replica's HTTP server keeps, for granian and uvicorn alike, through
real replica processes on the supervisor's socket (`clearway.runtime.servers`)."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest

from clearway.runtime import ReplicaState, Supervisor
from clearway.runtime.exit_codes import ExitCode
from clearway.runtime.servers import choose
from tests.runtime.conditions import file_text, poll_until
from tests.runtime.conftest import SpecFactory, client_for

SERVERS = pytest.mark.parametrize("server", ["granian", "uvicorn"])

# Lifespan start/stop marked by files in the workdir; /echo streams the request body back
# chunk by chunk as it arrives; /ws echoes WebSocket messages; /slow holds until "release".
ASGI_APP = """
import asyncio, contextlib, os
import clearway as cw

app = cw.App("t")

@app.service(server={server!r})
def web():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Mount, Route, WebSocketRoute

    @contextlib.asynccontextmanager
    async def lifespan(api):
        open("lifespan-started", "w").close()
        yield
        open("lifespan-stopped", "w").close()

    async def echo(scope, receive, send):
        # Plain ASGI: Starlette's StreamingResponse also reads receive() (for a disconnect)
        # under ASGI spec 2.3, and would race request.stream() for the body's chunks.
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        while True:
            message = await receive()
            if message.get("body"):
                await send({{"type": "http.response.body", "body": b"<" + message["body"] + b">", "more_body": True}})
            if not message.get("more_body"):
                break
        await send({{"type": "http.response.body", "body": b""}})

    async def slow(request):
        async def body():
            yield b"started\\n"
            while not os.path.exists("release"):
                await asyncio.sleep(0.01)
            yield b"finished\\n"
        return StreamingResponse(body())

    async def ws(websocket):
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_text(text.upper())

    async def hello(request):
        return PlainTextResponse(os.environ["CLEARWAY_REPLICA_ID"])

    return Starlette(lifespan=lifespan, routes=[
        Route("/", hello), Mount("/echo", echo), Route("/slow", slow),
        WebSocketRoute("/ws", ws),
    ])
"""

# A WSGI app: /stream yields its chunks as a generator; /upload reads wsgi.input in pieces.
WSGI_APP = """
import os, time
import clearway as cw

app = cw.App("t")

@app.service(server={server!r})
def web():
    def api(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/upload":
            sizes = []
            stream = environ["wsgi.input"]
            while True:
                chunk = stream.read(4096)
                if not chunk:
                    break
                sizes.append(len(chunk))
            start_response("200 OK", [("content-type", "text/plain")])
            return [str(sum(sizes)).encode()]
        if path == "/stream":
            start_response("200 OK", [("content-type", "text/plain")])
            def chunks():
                yield b"first\\n"
                while not os.path.exists("release"):
                    time.sleep(0.01)
                yield b"second\\n"
            return chunks()
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"wsgi " + environ["CLEARWAY_REPLICA_ID"].encode() if "CLEARWAY_REPLICA_ID" in environ
                else b"wsgi " + os.environ["CLEARWAY_REPLICA_ID"].encode()]
    return api
"""

# An ASGI app whose request never ends: the drain gives up, the lifespan shutdown still runs.
STUCK_APP = """
import asyncio, contextlib
import clearway as cw

app = cw.App("t")

@app.service(server={server!r})
def web():
    async def api(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({{"type": "lifespan.startup.complete"}})
                else:
                    open("lifespan-stopped", "w").close()
                    await send({{"type": "lifespan.shutdown.complete"}})
                    return
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": b"started", "more_body": True}})
        await asyncio.sleep(3600)
    return api
"""


def _log(spec_log: Path) -> str:
    return file_text(spec_log)


@SERVERS
async def test_asgi_lifespan_streaming_both_ways_and_websocket(
    supervisor: Supervisor, make_spec: SpecFactory, server: str
) -> None:
    spec = make_spec(ASGI_APP.format(server=server))
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    await poll_until(lambda: f"serving with {server}" in _log(spec.log_path), what="the server named")
    assert (spec.workdir / "lifespan-started").exists()

    async with client_for(ready.socket_path, timeout=10) as client:
        assert (await client.get("/")).text == spec.replica_id


    # Full duplex: the request body is read as it arrives and the response sent as it is
    # made; each chunk's echo comes back before the next chunk is sent.
    reader, writer = await asyncio.open_unix_connection(str(ready.socket_path))
    writer.write(b"POST /echo/ HTTP/1.1\r\nHost: replica\r\nTransfer-Encoding: chunked\r\n\r\n")
    for word in (b"one", b"two", b"three"):
        writer.write(b"%x\r\n%s\r\n" % (len(word), word))
        await writer.drain()
        echoed = await asyncio.wait_for(reader.readuntil(b">"), 10)
        assert echoed.endswith(b"<" + word + b">"), echoed
    writer.write(b"0\r\n\r\n")
    writer.close()

    # WebSocket over the unix socket: the handshake and a message each way.
    reader, writer = await asyncio.open_unix_connection(str(ready.socket_path))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: replica\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    mask = os.urandom(4)
    payload = b"hello"
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    frame = await reader.readexactly(2 + len(payload))
    assert frame == bytes([0x81, len(payload)]) + b"HELLO"
    writer.close()

    stopped = await supervisor.stop(spec.replica_id)
    assert stopped.last_exit_code == 0
    assert (spec.workdir / "lifespan-stopped").exists()


@SERVERS
async def test_sigterm_drains_an_in_flight_request_then_runs_the_lifespan_shutdown(
    supervisor: Supervisor, make_spec: SpecFactory, server: str
) -> None:
    spec = make_spec(ASGI_APP.format(server=server), grace_period=20.0)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    async with client_for(ready.socket_path, timeout=30) as client, client.stream("GET", "/slow") as response:
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"started\n"
        stopping = asyncio.create_task(supervisor.stop(spec.replica_id), name="stop")
        await poll_until(lambda: "draining in-flight requests" in _log(spec.log_path), what="draining")
        assert not (spec.workdir / "lifespan-stopped").exists()
        assert not stopping.done()
        (spec.workdir / "release").write_text("")
        assert b"".join([chunk async for chunk in chunks]) == b"finished\n"
    stopped = await asyncio.wait_for(stopping, 20)
    assert stopped.state is ReplicaState.STOPPED
    assert stopped.last_exit_code == 0
    assert (spec.workdir / "lifespan-stopped").exists()


@SERVERS
async def test_a_request_that_outlasts_the_drain_still_lets_the_lifespan_shutdown_run(
    supervisor: Supervisor, make_spec: SpecFactory, server: str
) -> None:
    spec = make_spec(STUCK_APP.format(server=server), grace_period=3.0)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    async with client_for(ready.socket_path, timeout=30) as client, client.stream("GET", "/") as response:
        assert await anext(response.aiter_bytes()) == b"started"
        stopped = await asyncio.wait_for(supervisor.stop(spec.replica_id), 10)
    assert stopped.last_exit_code == 0  # not SIGKILL's
    assert (spec.workdir / "lifespan-stopped").exists()


@SERVERS
async def test_wsgi_streams_both_ways_and_drains(
    supervisor: Supervisor, make_spec: SpecFactory, server: str
) -> None:
    spec = make_spec(WSGI_APP.format(server=server), grace_period=20.0)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    await poll_until(lambda: f"serving with {server}" in _log(spec.log_path), what="the server named")
    async with client_for(ready.socket_path, timeout=30) as client:
        assert (await client.get("/")).text == f"wsgi {spec.replica_id}"

        async def upload():  # type: ignore[no-untyped-def]
            for _ in range(64):
                yield b"x" * 16384

        assert (await client.post("/upload", content=upload())).text == str(64 * 16384)
        async with client.stream("GET", "/stream") as response:
            chunks = response.aiter_bytes()
            assert await anext(chunks) == b"first\n"  # sent before the generator ends
            stopping = asyncio.create_task(supervisor.stop(spec.replica_id), name="stop")
            await poll_until(lambda: "draining in-flight requests" in _log(spec.log_path), what="draining")
            assert not stopping.done()
            (spec.workdir / "release").write_text("")
            assert b"".join([chunk async for chunk in chunks]) == b"second\n"
    stopped = await asyncio.wait_for(stopping, 20)
    assert stopped.last_exit_code == 0


async def test_auto_serves_wsgi_services_with_granian_and_asgi_ones_with_uvicorn(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    wsgi = make_spec(WSGI_APP.format(server="auto"))
    asgi = make_spec(ASGI_APP.format(server="auto"))
    for spec in (wsgi, asgi):
        await supervisor.start(spec)
        await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    await poll_until(lambda: "serving with granian (WSGI)" in _log(wsgi.log_path), what="granian for WSGI")
    await poll_until(lambda: "serving with uvicorn" in _log(asgi.log_path), what="uvicorn for ASGI")
    assert choose("auto", kind="function", interface="wsgi") == "uvicorn"


async def test_a_failed_lifespan_startup_is_a_server_start_failure(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    source = STUCK_APP.format(server="granian").replace(
        '{"type": "lifespan.startup.complete"}', '{"type": "lifespan.startup.failed", "message": "no db"}'
    )
    spec = make_spec(source)
    await supervisor.start(spec)
    await poll_until(lambda: "lifespan startup failed" in _log(spec.log_path), what="startup failure said")
    await poll_until(
        lambda: f"exited with code {int(ExitCode.SERVER_START)}" in _log(spec.log_path)
        or (supervisor.status(spec.replica_id).last_exit_code == ExitCode.SERVER_START),
        what="exit code 5",
    )


def test_granian_asked_for_where_it_is_not_installed_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from clearway.runtime import servers

    monkeypatch.setattr(servers, "granian_installed", lambda: False)
    assert servers.choose("auto", kind="service", interface="wsgi") == "uvicorn"
    with pytest.raises(servers.ServerUnavailable, match="relax those pins, or use server='auto'"):
        servers.choose("granian", kind="service")
