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


async def test_a_probe_cut_short_by_the_deadline_does_not_hide_the_error_before_it(
    answers_503_then_hangs: Path,
) -> None:
    # Every probe after the first is cut short: the deadline (0.5 s) comes before
    # the probe timeout (5 s) would.
    policy = ProbePolicy(readiness_interval=0.05, timeout=5.0)
    result = await probe_until_ready(
        answers_503_then_hangs, "/healthz", startup_timeout=0.5, policy=policy
    )
    assert not result.ok
    assert result.detail == (
        "never answered GET /healthz within 0.5s; last error: GET /healthz answered 503"
    )


async def test_a_probe_that_runs_its_full_time_is_the_error_reported(
    answers_503_then_hangs: Path,
) -> None:
    # The second probe runs its whole 0.1 s and gets nothing: that is news about the
    # app (it hangs now), so it replaces the 503.
    policy = ProbePolicy(readiness_interval=0.05, timeout=0.1)
    result = await probe_until_ready(
        answers_503_then_hangs, "/healthz", startup_timeout=2.0, policy=policy
    )
    assert not result.ok
    assert result.detail == (
        "never answered GET /healthz within 2s; last error: GET /healthz got no answer within 0.1s"
    )
