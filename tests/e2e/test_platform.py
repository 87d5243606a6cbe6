"""The platform end to end: real CLI, real control plane, real gateway, real replicas."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import asgi_app, write_app
from tests.e2e.platform import EXAMPLES, Gate, Load, Platform, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One platform for the tests that only deploy apps of their own (each its own
    name); tests that kill, stop or restart parts of the platform get their own."""
    running = Platform(home=tmp_path_factory.mktemp("shared") / "home", port=free_port())
    running.up()
    try:
        yield running
    finally:
        running.down()


def test_hello_example_answers_on_its_url_from_every_replica(shared: Platform) -> None:
    result = shared.cli("deploy", str(EXAMPLES / "hello"))
    assert f"http://hello.localhost:{shared.port}/" in result.stdout, result

    # The load is spread over the three replicas: each answers within a bounded
    # number of requests (30 at least; up to 300, since a route-table reload while
    # the janitor becomes ready may briefly change who is picked; a replica that
    # is never picked still fails this).
    answered: list[str] = []
    while len(answered) < 30 or (len(set(answered)) < 3 and len(answered) < 300):
        response = shared.get("hello", "/?name=tester")
        assert response.status_code == 200, (response.status_code, response.text)
        assert response.text.startswith("Hello, tester! (revision hello-1"), response.text
        assert response.headers.get("x-request-id"), response.headers
        answered.append(response.text.split("replica ")[1].rstrip(")\n"))
    assert set(answered) == {"hello-1.web.0", "hello-1.web.1", "hello-1.web.2"}, (
        answered,
        shared.status("hello")["replicas"],
    )

    status = shared.status("hello")
    assert {c["name"]: (c["ready"], c["desired"]) for c in status["components"]} == {
        "web": (3, 3),
        "janitor": (1, 1),
    }, status
    table = shared.cli("status").stdout
    assert "hello" in table and "web 3/3" in table, table


def test_shop_example_routes_paths_to_several_services(shared: Platform) -> None:
    shared.cli("deploy", str(EXAMPLES / "shop"))
    products = shared.get("shop", "/api/products")
    assert products.status_code == 200 and products.json()["currency"] == "EUR"  # FastAPI (ASGI)
    page = shared.get("shop", "/")
    assert page.status_code == 200 and "<h1>The shop</h1>" in page.text  # Flask (WSGI)
    quote = shared.get("shop", "/api/quote/1")  # api -> private pricing service, same revision
    assert quote.status_code == 200 and quote.json() == {"product": "teapot", "price": 16.2, "currency": "EUR"}
    assert shared.get("nothing-here", "/").status_code == 404
    status = shared.status("shop")
    ready = {c["name"]: c["ready"] for c in status["components"]}
    assert ready == {"api": 2, "storefront": 2, "pricing": 1, "orders": 1}


def test_new_revision_takes_over_without_a_failed_request(shared: Platform, tmp_path: Path) -> None:
    project = write_app(tmp_path / "takeover", asgi_app("version one"), name="takeover")
    shared.cli("deploy", str(project))
    with Load(shared, "takeover") as load:
        load.wait_for(20)
        write_app(project, asgi_app("version two"), name="takeover")
        shared.cli("deploy", str(project))
        load.wait_for(20)
    assert load.failures == []
    assert load.bodies[-1] == "version two"
    status = shared.status("takeover")
    assert status["active_revision"] == "takeover-2"
    assert {r["revision"] for r in status["replicas"]} <= {"takeover-2"} | {
        r["revision"] for r in status["replicas"] if r["state"] == "draining"
    }


def test_restart_replaces_every_replica_without_a_failed_request(shared: Platform, tmp_path: Path) -> None:
    project = write_app(tmp_path / "again", asgi_app("first code"), name="again")
    shared.cli("deploy", str(project))
    # A revision still starting decides what a restart would restart: refused until it ends.
    gate = Gate()
    try:
        gated = asgi_app("same code").replace("def web():\n", "def web():\n" + gate.wait_code())
        write_app(project, gated, name="again")
        shared.cli("deploy", str(project), "--no-wait")
        refused = shared.cli("restart", "again", check=False)
        assert refused.returncode == 1, refused
        assert "again-2 of again is starting: wait until it serves" in refused.stderr, refused
        gate.open()
        wait_for("again-2 to serve", lambda: shared.status("again")["active_revision"] == "again-2")
        before = {r["pid"] for r in shared.status("again")["replicas"]}

        with Load(shared, "again") as load:
            load.wait_for(20)
            restarted = shared.cli("restart", "again")
            load.wait_for(20)
    finally:
        gate.close()
    assert load.failures == []
    assert set(load.bodies) == {"same code"}
    assert "again restarted: again-3 replaces again-2 (same code)" in restarted.stdout, restarted
    status = shared.status("again")
    assert status["active_revision"] == "again-3"
    revisions = {r["id"]: r for r in status["revisions"]}
    assert revisions["again-3"]["artifact"] == revisions["again-2"]["artifact"], revisions
    serving = [r for r in status["replicas"] if r["revision"] == "again-3"]
    assert [r["state"] for r in serving] == ["ready", "ready"], serving
    assert not {r["pid"] for r in serving} & before, (serving, before)
    wait_for(
        "again-2's replicas to stop",
        lambda: all(r["revision"] == "again-3" for r in shared.status("again")["replicas"]),
    )
    audit = json.loads(shared.cli("audit", "--json", "-n", "50").stdout)
    assert any(e["detail"] == "again-2 replaced by again-3 (same code)" for e in audit), audit

    missing = shared.cli("restart", "nope", check=False)
    assert missing.returncode == 1 and "no app named 'nope'" in missing.stderr, missing


SLOW_APP = """
import asyncio, os

@app.service(replicas=2, public=True, health="/healthz")
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] != "/healthz":
            await asyncio.sleep(0.05)  # most of the time a request is in flight
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": os.environ["CLEARWAY_REPLICA_ID"].encode()})
    return asgi
"""


def test_a_replica_killed_under_load_fails_no_request(shared: Platform, tmp_path: Path) -> None:
    shared.cli("deploy", str(write_app(tmp_path / "crashy", SLOW_APP, name="crashy")))
    with Load(shared, "crashy") as load:
        load.wait_for(10)
        # Kill the replica that answered last: likely the one answering now.
        victim = load.bodies[-1]
        pid = next(r["pid"] for r in shared.status("crashy")["replicas"] if r["id"] == victim)
        os.killpg(pid, signal.SIGKILL)
        load.wait_for(20)
        # Restarted (same id, new process), it serves again; no GET failed meanwhile.
        wait_for(
            "the killed replica to serve again",
            lambda: any(
                r["id"] == victim and r["pid"] != pid and r["state"] == "ready"
                for r in shared.status("crashy")["replicas"]
            ),
        )
        load.wait_for(10)
    assert load.failures == []


def gateway_workers(platform: Platform) -> list[int]:
    master = json.loads((platform.home / "gateway.json").read_text())["pid"]
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--worker-of" in cmdline and cmdline[cmdline.index(b"--worker-of") + 1] == str(master).encode():
                found.append(int(entry.name))
    return sorted(found)


def test_a_gateway_worker_killed_under_load_fails_only_its_own_requests(shared: Platform, tmp_path: Path) -> None:
    shared.cli("deploy", str(write_app(tmp_path / "steady", SLOW_APP, name="steady")))
    before = gateway_workers(shared)
    assert len(before) == 2, before
    # Four clients, one keep-alive connection and at most one request in flight each: killing
    # a worker can fail at most the requests it had in flight, so at most four, and only as
    # broken connections (never an HTTP error); every client then goes on through the other.
    loads = [Load(shared, "steady", tolerate=4) for _ in range(4)]
    for load in loads:
        load.__enter__()
    try:
        for load in loads:
            load.wait_for(5)
        os.kill(before[0], signal.SIGKILL)
        wait_for("the killed worker to be replaced", lambda: len(set(gateway_workers(shared)) - set(before)) == 1)
        for load in loads:
            load.wait_for(10)
    finally:
        for load in loads:
            load.__exit__(None, None, None)
    failures = [failure for load in loads for failure in load.failures]
    assert len(failures) <= 4, failures
    assert all(not failure[:3].isdigit() for failure in failures), failures  # no 5xx: only cut connections
    metrics = shared.cli("metrics").stdout.splitlines()
    assert "clearway_gateway_worker_restarts_total 1.0" in metrics, [m for m in metrics if "worker" in m]


@pytest.mark.parametrize(
    ("broken", "expected"),
    [
        ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
        (
            '@app.service(replicas=1, public=True, health="/healthz", startup_timeout=10)\n'
            "def web():\n    raise RuntimeError('database password missing')\n",
            "RuntimeError: database password missing",
        ),
        (
            '@app.service(replicas=1, public=True, health="/healthz", startup_timeout=2)\n'
            "def web():\n"
            "    async def asgi(scope, receive, send):\n"
            "        await send({'type': 'http.response.start', 'status': 500, 'headers': []})\n"
            "        await send({'type': 'http.response.body', 'body': b'no'})\n"
            "    return asgi\n",
            "/healthz",
        ),
    ],
    ids=["import-error", "crash-at-start", "never-healthy"],
)
def test_failed_deploy_shows_why_and_the_old_revision_keeps_serving(
    shared: Platform, tmp_path: Path, broken: str, expected: str, request: pytest.FixtureRequest
) -> None:
    app = "failing-" + request.node.callspec.id
    project = write_app(tmp_path / "demo", asgi_app("good"), name=app)
    shared.cli("deploy", str(project))
    with Load(shared, app) as load:
        load.wait_for(10)
        write_app(project, broken, name=app)
        result = shared.cli("deploy", str(project), check=False)
        load.wait_for(10)
    assert result.returncode == 1
    assert expected in result.stderr
    assert load.failures == []
    assert set(load.bodies) == {"good"}
    assert shared.status(app)["active_revision"] == f"{app}-1"


def test_spec_error_points_at_the_users_line(shared: Platform, tmp_path: Path) -> None:
    project = write_app(tmp_path / "specerr", "\n@app.service(replicas=2, health='healthz')\ndef web(): ...\n", name="specerr")
    result = shared.cli("deploy", str(project), check=False)
    assert result.returncode == 1
    assert "app.py:4" in result.stderr and "health" in result.stderr


def test_control_plane_kill9_loses_nothing_and_readopts_replicas(platform: Platform, tmp_path: Path) -> None:
    project = write_app(tmp_path / "demo", asgi_app("still here"))
    platform.cli("deploy", str(project))
    before = {r["id"]: r["pid"] for r in platform.status("demo")["replicas"]}

    with Load(platform, "demo") as load:
        load.wait_for(5)
        os.kill(platform.control_pid(), signal.SIGKILL)
        load.wait_for(20)  # the gateway and replicas serve on without the control plane
        platform.up()
        load.wait_for(20)
    assert load.failures == []

    after = platform.status("demo")
    assert after["active_revision"] == "demo-1"
    assert {r["id"]: r["pid"] for r in after["replicas"]} == before  # adopted, not restarted
    write_app(project, asgi_app("after restart"))
    platform.cli("deploy", str(project))
    assert platform.get("demo").text == "after restart"


def test_scale_and_rollback(shared: Platform, tmp_path: Path) -> None:
    project = write_app(tmp_path / "scaling", asgi_app("one", replicas=1), name="scaling")
    shared.cli("deploy", str(project))
    shared.cli("scale", "scaling", "web", "3")
    assert len([r for r in shared.status("scaling")["replicas"] if r["state"] == "ready"]) == 3
    write_app(project, asgi_app("two", replicas=1), name="scaling")
    shared.cli("deploy", str(project))
    assert shared.get("scaling").text == "two"
    # scale sticks across deploys
    assert [c["desired"] for c in shared.status("scaling")["components"]] == [3]
    shared.cli("rollback", "scaling")
    assert shared.get("scaling").text == "one"
    assert shared.status("scaling")["active_revision"] == "scaling-1"
    shared.cli("destroy", "scaling", "--yes")
    assert shared.get("scaling").status_code == 404
    assert "no app named 'scaling'" in shared.cli("status", "scaling", check=False).stderr


def test_logs_show_replica_output(platform: Platform) -> None:
    platform.cli("deploy", str(EXAMPLES / "hello"))
    deadline_lines = ""
    for _ in range(100):
        deadline_lines = platform.cli("logs", "hello", "--component", "janitor").stdout
        if "janitor: sweep #1" in deadline_lines:
            break
        platform.get("hello", "/")  # let time pass on the platform's clock, not ours
    assert "[hello-1.janitor.0] janitor: sweep #1" in deadline_lines
    as_json = [json.loads(line) for line in platform.cli("logs", "hello", "-c", "janitor", "--json").stdout.splitlines()]
    assert {"replica": "hello-1.janitor.0", "line": "janitor: sweep #1"} in as_json


def test_metrics_count_requests_per_revision(shared: Platform, tmp_path: Path) -> None:
    shared.cli("deploy", str(write_app(tmp_path / "metered", asgi_app("m", replicas=1), name="metered")))
    for _ in range(7):
        assert shared.get("metered", "/").status_code == 200
    text = shared.cli("metrics").stdout
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("clearway_gateway_requests_total{") and 'revision="metered-1"' in line and '"2xx"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) >= 7
    assert "clearway_gateway_workers 2.0" in text.splitlines()  # summed over both workers


def test_api_refuses_requests_without_the_token(shared: Platform) -> None:
    api = shared.cli("status", "--json")  # works with the token the CLI reads
    assert api.returncode == 0
    info = (shared.home / "control.json").read_text()
    url = __import__("json").loads(info)["api_url"]
    assert (shared.home / "token").stat().st_mode & 0o777 == 0o600
    anonymous = httpx.get(f"{url}/v1/apps")
    assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["error"]
    wrong = httpx.get(f"{url}/v1/apps", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{url}/openapi.json").json()["info"]["title"] == "clearway control plane"


def test_unknown_app_and_bad_input_get_clear_errors(shared: Platform, tmp_path: Path) -> None:
    missing = shared.cli("status", "nope", check=False)
    assert missing.returncode == 1 and "no app named 'nope'" in missing.stderr
    no_file = shared.cli("deploy", str(tmp_path), check=False)
    assert no_file.returncode == 1 and "no app.py" in no_file.stderr
    scale = shared.cli("scale", "nope", "web", "2", check=False)
    assert scale.returncode == 1 and "no app named" in scale.stderr


def test_port_clash_is_reported(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        other = Platform(home=tmp_path / "other", port=port)
        try:
            result = other.cli("up", "--detach", "--port", str(port), check=False)
        finally:
            other.down()
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower() and "--port" in result.stderr


def test_down_stops_everything_and_up_starts_as_last_time(tmp_path: Path) -> None:
    platform = Platform(home=tmp_path / "home", port=free_port())
    try:
        # Three gateway workers: neither the suite's two nor this machine's default.
        platform.cli("up", "--detach", "--port", str(platform.port), "--gateway-workers", "3")
        platform.cli("deploy", str(write_app(tmp_path / "demo", asgi_app("x", replicas=1))))
        pids = [r["pid"] for r in platform.status("demo")["replicas"]]
        platform.cli("down")
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not (platform.home / "control.json").exists()
        again = platform.cli("status", check=False)
        assert again.returncode == 1 and "clearway up --detach" in again.stderr

        started = platform.cli("up", "--detach")  # no flags: the port and the workers as last time
        assert f":{platform.port}/" in started.stdout, started.stdout
        assert "clearway_gateway_workers 3.0" in platform.cli("metrics").stdout.splitlines()
    finally:
        platform.down()


def test_a_killed_gateway_is_replaced_and_serves_the_same_routes(platform: Platform, tmp_path: Path) -> None:
    platform.cli("deploy", str(write_app(tmp_path / "demo", asgi_app("routed", replicas=1))))
    record = platform.home / "gateway.json"
    old_pid = json.loads(record.read_text())["pid"]
    os.kill(old_pid, signal.SIGKILL)

    def answered() -> bool:
        try:
            return platform.get("demo").text == "routed"
        except httpx.TransportError:
            return False

    def replaced() -> bool:
        # The new gateway answers a moment before its record is rewritten.
        return record.exists() and json.loads(record.read_text())["pid"] != old_pid

    deadline = time.monotonic() + 60
    while not (answered() and replaced()):
        assert time.monotonic() < deadline, "no new gateway served the app within 60s"
    assert "exited; starting a new one" in (platform.home / "logs" / "control.log").read_text()


def test_foreground_up_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    import subprocess
    import sys

    platform = Platform(home=tmp_path / "home", port=free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "clearway.cli.main", "--home", str(platform.home), "up", "--port", str(platform.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while platform.cli("status", check=False).returncode != 0:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the foreground control plane never answered"
        platform.cli("deploy", str(write_app(tmp_path / "demo", asgi_app("fg", replicas=1))))
        pids = [r["pid"] for r in platform.status("demo")["replicas"]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        platform.down()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_replicas_reach_the_control_plane_with_their_own_token(shared: Platform, tmp_path: Path) -> None:
    worker = """
@app.worker()
def caller():
    import json, os, time, urllib.request
    request = urllib.request.Request(
        os.environ["CLEARWAY_CONTROL_URL"] + "/v1/replica",
        headers={"authorization": "Bearer " + os.environ["CLEARWAY_REPLICA_TOKEN"]},
    )
    print("identity:", urllib.request.urlopen(request).read().decode(), flush=True)
    try:
        admin = urllib.request.Request(os.environ["CLEARWAY_CONTROL_URL"] + "/v1/apps", headers=request.headers)
        urllib.request.urlopen(admin)
        print("admin: allowed", flush=True)
    except urllib.error.HTTPError as exc:
        print("admin:", exc.code, flush=True)
    while True:
        time.sleep(60)
"""
    shared.cli("deploy", str(write_app(tmp_path / "caller", worker, name="caller")))
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while not any(line.startswith("admin:") for line in lines):
        assert time.monotonic() < deadline, lines
        lines = [json.loads(x)["line"] for x in shared.cli("logs", "caller", "--json").stdout.splitlines()]
    identity = json.loads(next(line for line in lines if line.startswith("identity:")).split(" ", 1)[1])
    assert identity | {"spec": None} == {
        "app": "caller",
        "revision": "caller-1",
        "component": "caller",
        "replica": "caller-1.caller.0",
        "revision_state": identity["revision_state"],
        "spec": None,
    }
    assert identity["spec"]["kind"] == "worker"
    assert "admin: 401" in lines


def test_a_deploy_interrupted_by_a_control_plane_crash_completes_after_restart(
    platform: Platform, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    project = write_app(tmp_path / "demo", asgi_app("first", replicas=1))
    platform.cli("deploy", str(project))
    # The second revision cannot become ready until the test opens this gate,
    # so the crash lands mid-deploy whatever the machine's speed.
    gate = Gate()
    request.addfinalizer(gate.close)
    gated = asgi_app("second", replicas=2).replace("def web():\n", "def web():\n" + gate.wait_code())
    write_app(project, gated)
    accepted = json.loads(platform.cli("deploy", str(project), "--no-wait", "--json").stdout)
    os.kill(platform.control_pid(), signal.SIGKILL)  # mid-deploy: the revision is starting
    assert platform.get("demo").text == "first"  # still served without a control plane
    gate.open()
    platform.up()
    deadline = time.monotonic() + 120
    while platform.status("demo")["active_revision"] != accepted["revision"]:
        assert time.monotonic() < deadline, platform.status("demo")
    assert platform.get("demo").text == "second"
    replicas = platform.status("demo")["replicas"]
    assert sorted(r["id"] for r in replicas if r["state"] == "ready") == ["demo-2.web.0", "demo-2.web.1"]


def test_websockets_and_streaming_pass_through_the_platform(shared: Platform, tmp_path: Path) -> None:
    import asyncio

    from websockets.asyncio.client import connect

    app = """
@app.service(public=True, health="/healthz")
def web():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route, WebSocketRoute

    async def health(request):
        return PlainTextResponse("ok")

    async def stream(request):
        async def chunks():
            for i in range(3):
                yield f"chunk {i}\\n"
        return StreamingResponse(chunks())

    async def echo(ws):
        await ws.accept()
        async for message in ws.iter_text():
            await ws.send_text("echo: " + message)

    return Starlette(routes=[Route("/healthz", health), Route("/stream", stream), WebSocketRoute("/ws", echo)])
"""
    project = write_app(tmp_path / "streams", app, name="streams")
    (project / "requirements.txt").write_text("starlette\nwebsockets\n")  # uvicorn speaks WebSocket through it
    shared.cli("deploy", str(project))
    streamed = shared.get("streams", "/stream")
    assert streamed.text == "chunk 0\nchunk 1\nchunk 2\n"
    assert streamed.headers.get("transfer-encoding") == "chunked"

    async def talk() -> list[str]:
        # The URI names the app (one Host header: the gateway refuses two); the
        # connection goes to the gateway's address.
        async with connect(
            f"ws://streams.localhost:{shared.port}/ws", host="127.0.0.1", port=shared.port, open_timeout=30
        ) as ws:
            replies = []
            for word in ("one", "two"):
                await ws.send(word)
                replies.append(str(await ws.recv()))
            return replies

    assert asyncio.run(talk()) == ["echo: one", "echo: two"]


def test_a_revision_the_data_plane_never_confirms_fails_and_is_never_made_active(
    platform: Platform, tmp_path: Path
) -> None:
    project = write_app(tmp_path / "demo", asgi_app("good", replicas=1))
    platform.cli("deploy", str(project))
    gateway_pid = int(json.loads((platform.home / "gateway.json").read_text())["pid"])
    # 6 s: time for the replica to become ready on a loaded machine (it must, for the
    # data plane's confirmation to be what is missing); the deploy fails 5 s after that.
    write_app(project, asgi_app("never served", replicas=1).replace("health=\"/healthz\"", "health=\"/healthz\", startup_timeout=6"))
    # A frozen gateway loads no route table: the new revision's replicas become
    # ready, but no table that serves them is ever confirmed.
    os.kill(gateway_pid, signal.SIGSTOP)
    try:
        result = platform.cli("deploy", str(project), check=False)
    finally:
        os.kill(gateway_pid, signal.SIGCONT)
    assert result.returncode == 1, result
    assert "did not confirm serving it" in result.stderr, result.stderr
    revisions = {r["id"]: r for r in platform.status("demo")["revisions"]}
    assert revisions["demo-2"]["state"] == "failed" and revisions["demo-2"]["activated_at"] is None, revisions
    assert platform.status("demo")["active_revision"] == "demo-1"
    deadline = time.monotonic() + 60
    while (text := platform.get("demo").text) != "good":
        assert time.monotonic() < deadline, text
