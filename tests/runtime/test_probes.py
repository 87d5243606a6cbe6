"""The readiness loop against a real unix-socket server: which failure it reports.

The server answers its first connection with a 503 and then never answers again, so
the probes after the first hang until their time runs out.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clearway.runtime.probes import ProbePolicy, probe_until_ready

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def answers_503_then_hangs(tmp_path: Path) -> AsyncIterator[Path]:
    socket_path = tmp_path / "replica.sock"
    connections = 0
    hung: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        if connections == 1:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
        else:
            hung.append(writer)  # never answered

    server = await asyncio.start_unix_server(serve, path=str(socket_path))
    try:
        yield socket_path
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("startup_timeout", "probe_timeout", "last_error"),
    [
        # Every probe after the first is cut short: the deadline (0.5 s) comes before the
        # probe timeout (5 s) would. Running out of time says nothing about the app.
        (0.5, 5.0, "GET /healthz answered 503"),
        # The second probe runs its whole 0.1 s and gets nothing: that is news about the
        # app (it hangs now), so it replaces the 503.
        (2.0, 0.1, "GET /healthz got no answer within 0.1s"),
    ],
    ids=["cut-short-by-the-deadline", "full-timeout"],
)
async def test_the_failure_reported_is_the_last_one_that_says_something_about_the_app(
    answers_503_then_hangs: Path, startup_timeout: float, probe_timeout: float, last_error: str
) -> None:
    policy = ProbePolicy(readiness_interval=0.05, timeout=probe_timeout)
    result = await probe_until_ready(
        answers_503_then_hangs, "/healthz", startup_timeout=startup_timeout, policy=policy
    )
    assert not result.ok
    assert result.detail == (
        f"never answered GET /healthz within {startup_timeout:g}s; last error: {last_error}"
    )
