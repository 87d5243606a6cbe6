"""Isolation, attacked from inside: replicas started by the Supervisor under their own uid.

Every attack runs in a real replica (bubblewrap + setpriv to uid 400123), driven
over HTTP by the test: /read, /write, /connect and /env say what the replica
could do. Needs root (to switch uids) and bubblewrap.
"""

# Tests check small local files inline; a thread hop would only obscure them.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from clearway.runtime import ReplicaSpec, ReplicaState, ReplicaStatus, Supervisor
from tests.runtime.conftest import (
    APP_UID,
    FAST,
    OTHER_APP_UID,
    SpecFactory,
    StatusLog,
    client_for,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
]

# Each endpoint tries one thing and reports what happened, never raising.
PROBE_APP = """
import os, socket
import clearway as cw

app = cw.App("t")

@app.service()
def web():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    def read(request):
        try:
            with open(request.query_params["path"]) as f:
                return PlainTextResponse("read: " + f.read(100))
        except OSError as error:
            return PlainTextResponse(f"refused: {type(error).__name__}")

    def listdir(request):
        try:
            return JSONResponse(sorted(os.listdir(request.query_params["path"])))
        except OSError as error:
            return JSONResponse(f"refused: {type(error).__name__}")

    def write(request):
        try:
            with open(request.query_params["path"], "w") as f:
                f.write("written")
        except OSError as error:
            return PlainTextResponse(f"refused: {type(error).__name__}")
        return PlainTextResponse("written")

    def connect(request):
        target = request.query_params["to"]
        family = socket.AF_UNIX if target.startswith("/") else socket.AF_INET
        address = target if family == socket.AF_UNIX else ("127.0.0.1", int(target))
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            try:
                s.connect(address)
            except OSError as error:
                return PlainTextResponse(f"refused: {type(error).__name__}")
        return PlainTextResponse("connected")

    def whoami(request):
        return JSONResponse({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()})

    def env(request):
        return JSONResponse(dict(os.environ))

    return Starlette(routes=[
        Route("/read", read), Route("/ls", listdir), Route("/write", write),
        Route("/connect", connect), Route("/whoami", whoami), Route("/env", env),
    ])
"""


class Replica:
    """A running probe replica and the HTTP calls that drive its attacks."""

    def __init__(self, spec: ReplicaSpec, status: ReplicaStatus) -> None:
        self.spec = spec
        self.status = status

    async def get(self, route: str, **params: str) -> Any:
        async with client_for(self.status.socket_path, timeout=10) as client:
            response = await client.get(route, params=params)
        response.raise_for_status()
        return response.json() if route in ("/ls", "/whoami", "/env") else response.text


@pytest.fixture
def platform_home(tmp_path: Path) -> Iterator[Path]:
    """A stand-in for $CLEARWAY_HOME, with an operator token in it."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "token").write_text("operator-secret")
    (home / "token").chmod(0o600)
    yield home


@pytest.fixture
async def start(
    supervisor: Supervisor, make_spec: SpecFactory, platform_home: Path
) -> AsyncIterator[Any]:
    async def start_replica(**overrides: Any) -> Replica:
        overrides.setdefault("uid", APP_UID)
        overrides.setdefault("hide", (platform_home,))
        spec = make_spec(PROBE_APP, **overrides)
        await supervisor.start(spec)
        status = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
        return Replica(spec, status)

    yield start_replica


async def test_replica_runs_under_its_own_uid_with_no_privileges(start: Any) -> None:
    replica = await start(env={"GREETING": "hi"})
    assert await replica.get("/whoami") == {"uid": APP_UID, "gid": APP_UID, "groups": []}
    info = replica.spec.workdir.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (APP_UID, APP_UID, 0o700)
    assert await replica.get("/write", path=str(replica.spec.workdir / "mine")) == "written"


async def test_replica_cannot_read_hidden_paths_or_shadow(start: Any, platform_home: Path) -> None:
    replica = await start()
    # The platform home is an empty tmpfs in the replica's view.
    assert await replica.get("/read", path=str(platform_home / "token")) == (
        "refused: FileNotFoundError"
    )
    assert await replica.get("/ls", path=str(platform_home)) == []
    assert await replica.get("/read", path="/etc/shadow") == "refused: PermissionError"


async def test_replica_cannot_write_its_code_or_the_host(start: Any) -> None:
    replica = await start()
    code = replica.spec.code_dir / "app.py"
    assert await replica.get("/write", path=str(code)) == "refused: OSError"  # read-only mount
    assert await replica.get("/write", path="/etc/clearway-escape") in (
        "refused: OSError", "refused: PermissionError",
    )  # fmt: skip
    assert not Path("/etc/clearway-escape").exists()
    # /tmp is private: a write there lands in the replica's own tmpfs, not on the host.
    assert await replica.get("/write", path="/tmp/clearway-escape") == "written"
    assert not Path("/tmp/clearway-escape").exists()


async def test_replica_sees_only_its_own_processes(start: Any) -> None:
    replica = await start()
    pids = [name for name in await replica.get("/ls", path="/proc") if name.isdigit()]
    # bwrap's init, the replica (setpriv exec'd into python): nothing of the host.
    assert len(pids) <= 3, pids
    assert str(os.getpid()) not in pids or int(max(pids, key=int)) < 10
    assert await replica.get("/read", path=f"/proc/{os.getpid()}/environ") in (
        "refused: FileNotFoundError", "refused: PermissionError",
    )  # fmt: skip


async def test_replica_cannot_connect_to_another_replicas_socket(start: Any) -> None:
    first = await start()
    second = await start(uid=OTHER_APP_UID)
    assert first.spec.socket_path is not None
    answer = await second.get("/connect", to=str(first.spec.socket_path))
    assert answer in ("refused: FileNotFoundError", "refused: PermissionError")
    # Even a process on the host under the other app's uid could not: 0600 in a 0700 dir.
    assert (first.spec.socket_path.stat().st_mode & 0o777) == 0o600
    assert (first.spec.socket_path.parent.stat().st_mode & 0o777) == 0o700


async def test_environment_is_minimal_and_the_token_appears_once(
    socket_dir: Path, make_spec: SpecFactory, status_log: StatusLog, platform_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("CLEARWAY_PARENT_SECRET", "do-not-leak")
    minted: list[tuple[str, str]] = []

    def credentials(spec: ReplicaSpec, incarnation: str) -> str:
        minted.append((spec.replica_id, incarnation))
        return f"token-for-{incarnation}"

    async with Supervisor(on_change=status_log, config=FAST, credentials=credentials) as sup:
        spec = make_spec(PROBE_APP, uid=APP_UID, hide=(platform_home,), env={"GREETING": "hi"})
        await sup.start(spec)
        status = await sup.wait_for(spec.replica_id, ReplicaState.READY, within=20)
        env = await Replica(spec, status).get("/env")

    assert minted == [(spec.replica_id, status.incarnation)]
    token = f"token-for-{status.incarnation}"
    assert env.pop("CLEARWAY_REPLICA_TOKEN") == token
    assert sum(token in value for value in env.values()) == 0  # once: not in the spec JSON
    assert env.pop("CLEARWAY_REPLICA_INCARNATION") == status.incarnation
    assert env.pop("CLEARWAY_REPLICA_SPEC")
    assert env.pop("GREETING") == "hi"
    assert env.pop("PWD", str(spec.workdir)) == str(spec.workdir)  # set by bwrap's --chdir
    allowed = {
        "PATH", "HOME", "LANG", "PYTHONUNBUFFERED", "CLEARWAY_APP", "CLEARWAY_REVISION",
        "CLEARWAY_COMPONENT", "CLEARWAY_REPLICA_ID", "CLEARWAY_LISTEN_FD",
    }  # fmt: skip
    assert set(env) <= allowed, set(env) - allowed
    assert "do-not-leak" not in str(env)


async def test_sandbox_shows_no_home_or_root(start: Any) -> None:
    replica = await start(sandbox=True)
    assert await replica.get("/ls", path="/home") == "refused: FileNotFoundError"
    assert await replica.get("/ls", path="/root") in (
        "refused: FileNotFoundError", [".pyenv"], [],
    )  # fmt: skip  # only what the interpreter needs, when it lives there
    assert await replica.get("/read", path="/etc/shadow") == "refused: FileNotFoundError"
    assert await replica.get("/ls", path="/var") == "refused: FileNotFoundError"


@pytest.mark.parametrize("sandbox", [True, False])
async def test_without_network_a_replica_cannot_reach_a_local_listener(start: Any, sandbox: bool) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = str(listener.getsockname()[1])
    try:
        open_replica = await start(sandbox=sandbox)
        assert await open_replica.get("/connect", to=port) == "connected"
        closed = await start(sandbox=sandbox, network=False)
        assert await closed.get("/connect", to=port) == "refused: ConnectionRefusedError"
    finally:
        listener.close()


async def test_sigterm_reaches_the_isolated_replica(start: Any, supervisor: Supervisor) -> None:
    replica = await start()
    stopped = await asyncio.wait_for(supervisor.stop(replica.spec.replica_id), 20)
    assert stopped.last_exit_code == 0  # uvicorn inside got SIGTERM and drained
