"""``python -m clearway.gateway`` as a real process: READY, SIGHUP reload, port clash, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import route, table
from .replica import Replica


async def spawn(tmp_path: Path, listen: str, routes: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clearway.gateway",
        "--listen", listen, "--routes", str(routes), "--admin-socket", str(tmp_path / "gw.sock"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
async def test_process_serves_reloads_on_sighup_and_exits_cleanly(replica: Replica, tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(table(route("old", [replica.address]), generation=1).to_json()))
    port = free_port()
    proc = await spawn(tmp_path, f"127.0.0.1:{port}", routes)
    assert proc.stdout is not None and proc.stderr is not None
    assert await proc.stdout.readline() == b"READY\n"
    admin = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(tmp_path / "gw.sock")))
    async with admin, httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/echo", headers={"host": "old.localhost"})
        assert r.status_code == 200

        # A bad file is refused and the old table kept.
        routes.write_text("{not json")
        proc.send_signal(signal.SIGHUP)
        line = await proc.stderr.readline()
        assert b"not valid JSON" in line and b"keeping the routes of generation 1" in line

        tmp = tmp_path / "routes.tmp"
        tmp.write_text(json.dumps(table(route("new", [replica.address]), generation=2).to_json()))
        tmp.rename(routes)  # atomically, as the control plane does
        proc.send_signal(signal.SIGHUP)
        while (await admin.get("http://gw/routes")).json()["generation"] != 2:
            await proc.stderr.readline()  # wait for the next log line (the reload's)
        r = await client.get(f"http://127.0.0.1:{port}/echo", headers={"host": "new.localhost"})
        assert r.status_code == 200
        r = await client.get(f"http://127.0.0.1:{port}/echo", headers={"host": "old.localhost"})
        assert r.status_code == 404

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0


@pytest.mark.timeout(30)
async def test_port_clash_exits_3_with_one_clear_line(tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps(table().to_json()))
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = await spawn(tmp_path, listen, routes)
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 3
    assert stdout == b""
    assert stderr.decode().strip() == (
        f"clearway gateway: cannot listen on {listen}: address already in use — "
        "stop the other program or choose another port with --port"
    )
