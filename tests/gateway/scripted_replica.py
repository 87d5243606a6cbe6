"""A raw-socket replica that misbehaves on purpose: it closes connections at chosen moments.

uvicorn is too well-behaved to reproduce "the replica closed a kept-alive
connection just as the gateway reused it", so this fake answers
``answers_per_connection`` requests per connection and then closes the
connection upon receiving the next request, without answering it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class ScriptedReplica:
    port: int
    #: "METHOD PATH" of every request that arrived, answered or not.
    requests: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def run_scripted_replica(answers_per_connection: int) -> AsyncIterator[ScriptedReplica]:
    replica = ScriptedReplica(port=0)

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

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    replica.port = server.sockets[0].getsockname()[1]
    try:
        yield replica
    finally:
        server.close()
        await server.wait_closed()
