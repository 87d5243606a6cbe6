"""A real replica for the gateway tests: uvicorn serving a small ASGI app on a Unix socket.

Running the same server the platform runs (uvicorn), listening the way the
platform's replicas listen (a Unix socket; ``tcp=True`` for the one test that
keeps TCP endpoints covered), keeps the tests honest about keep-alive, chunked
encoding and WebSocket upgrades.  ``ReplicaControl``
lets a test hold a response open (``release``) and see what arrived, so tests
synchronise on events, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class ReplicaControl:
    name: str
    #: Set by a test to let /stream and /slow finish.
    release: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set by the replica once /stream sent its first chunk.
    first_chunk_sent: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when the replica sees a client disconnect on /upload.
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    requests: list[str] = field(default_factory=list)


def make_app(control: ReplicaControl) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def read_body(receive: Receive) -> bytes:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                control.disconnected.set()
                raise ConnectionError("client went away")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        hdrs = [(b"content-type", b"text/plain"), (b"x-replica", control.name.encode())] + (headers or [])
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": f"{control.name}:{message.get('text')}"})
        path: str = scope["path"]
        control.requests.append(f"{scope['method']} {path}")
        if path.startswith("/stream"):
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"first\n", "more_body": True})
            control.first_chunk_sent.set()
            await control.release.wait()
            await send({"type": "http.response.body", "body": b"second\n"})
        elif path.startswith("/slow"):
            await control.release.wait()
            await respond(send, 200, b"late")
        elif path.startswith("/upload"):
            try:
                body = await read_body(receive)
            except ConnectionError:
                return
            digest = hashlib.sha256(body).hexdigest()
            await respond(send, 200, json.dumps({"length": len(body), "sha256": digest}).encode())
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": code, "headers": [(b"x-replica", control.name.encode())]})
            await send({"type": "http.response.body", "body": b""})
        elif path.startswith("/big"):
            size = int(dict(p.split("=") for p in scope["query_string"].decode().split("&") if p).get("n", "1000"))
            await respond(send, 200, b"x" * size, [(b"content-length", str(size).encode())])
        elif path.startswith("/hop"):
            await respond(
                send, 200, b"hop",
                [(b"connection", b"x-secret"), (b"x-secret", b"1"), (b"keep-alive", b"timeout=5"), (b"x-kept", b"1")],
            )
        else:
            body = await read_body(receive)
            info = {
                "replica": control.name,
                "method": scope["method"],
                "path": path,
                "raw_path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "body_length": len(body),
            }
            await respond(send, 200, json.dumps(info).encode(), [(b"content-type", b"application/json")])

    return app


@dataclass
class Replica:
    control: ReplicaControl
    #: The route-table endpoint: ``"unix:/tmp/cw-.../r1.sock"`` or ``"127.0.0.1:port"``.
    address: str


def socket_dir() -> str:
    """A fresh directory for Unix sockets, short enough for ``sun_path`` (107 bytes)."""
    return tempfile.mkdtemp(prefix="cw-", dir="/tmp")


@contextlib.asynccontextmanager
async def run_replica(name: str = "r1", *, tcp: bool = False) -> AsyncIterator[Replica]:
    control = ReplicaControl(name)
    directory = None if tcp else socket_dir()
    path = f"{directory}/{name}.sock" if directory is not None else None
    config = uvicorn.Config(
        make_app(control),
        host="127.0.0.1",
        port=0,
        uds=path,
        log_level="critical",
        lifespan="off",
        ws="websockets-sansio",
        http="httptools",
        timeout_graceful_shutdown=1,
    )
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    if path is not None:
        address = f"unix:{path}"
    else:
        address = f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        yield Replica(control, address)
    finally:
        control.release.set()
        server.should_exit = True
        await server.shutdown()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
