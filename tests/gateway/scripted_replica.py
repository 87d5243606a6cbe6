"""A raw-socket replica that misbehaves on purpose: it closes connections at chosen moments.

uvicorn is too well-behaved to reproduce "the replica closed a kept-alive
connection just as the gateway reused it", so this fake answers
``answers_per_connection`` requests per connection and then closes the
connection upon receiving the next request, without answering it.  It
listens on a Unix socket, as the platform's replicas do.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .replica import socket_dir


@dataclass
class ScriptedReplica:
    path: str
    #: "METHOD PATH" of every request that arrived, answered or not.
    requests: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"unix:{self.path}"


@contextlib.asynccontextmanager
async def run_scripted_replica(answers_per_connection: int) -> AsyncIterator[ScriptedReplica]:
    directory = socket_dir()
    replica = ScriptedReplica(path=f"{directory}/scripted.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ")[:2]
                replica.requests.append(f"{method.decode()} {path.decode()}")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                if answered >= answers_per_connection:
                    return
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, replica.path)
    try:
        yield replica
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(directory, ignore_errors=True)
