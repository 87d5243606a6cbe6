"""The function server (`clearway.runtime.functions`) over real HTTP.

One server process for the module serves every test function of ``APP``, each
under ``/<name>`` (the prefix stripped, as the gateway's internal routes do),
with uvicorn on a loopback port; its stdout and stderr go to files the tests
read. A response is sent only after the server has written (and flushed) what
it logs about the request, so the tests read the files without waiting.
One more test runs a real function replica under the supervisor.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import clearway as cw
from clearway.runtime import ReplicaState, Supervisor
from clearway.runtime.functions import HEALTH_PATH, MAX_BODY
from tests.runtime.conftest import SpecFactory, client_for

pytestmark = pytest.mark.timeout(60)

APP = """
import asyncio
import threading
import time

import clearway as cw

app = cw.App("t")


@app.function()
def typed(width: int, height: int = 2, data: bytes = b"", tags: list[str] = []) -> dict:
    return {"area": width * height, "size": len(data), "first": data[:1].hex(), "tags": tags}


@app.function()
def raw(request: cw.Request, x: int = 0) -> cw.Response:
    text = f"{request.method} {request.path} q={request.query_string} x={x} body={request.body.decode()}"
    return cw.Response(text, status=201, headers={"x-test": "yes"})


@app.function()
async def asleep(name: str) -> str:
    print(f"hello from {name}", end="")
    await asyncio.sleep(0)
    print("!")
    return f"hi {name}"


@app.function()
def noisy(n: int) -> int:
    print(f"line one of {n}")
    print(f"line two of {n}", flush=True)
    return n


@app.function()
def fails(n: int) -> float:
    return 1 / n


@app.function(timeout=0.3)
def hangs() -> None:
    threading.Event().wait(30)  # the hanging line


@app.function(timeout=0.2)
def wedged() -> None:
    threading.Event().wait(20)


@app.function(timeout=0.3)
async def hangs_async() -> None:
    await asyncio.sleep(30)  # the awaiting line


@app.function(events=["com.example.order.created"])
def on_order(event: cw.CloudEvent) -> dict:
    return {"type": event["type"], "id": event["id"], "data": event.data}


@app.function()
def unserialisable() -> object:
    return object()
"""

SERVER = """
import socket
import sys
from pathlib import Path

import uvicorn

from clearway.runtime.functions import function_app
from clearway.sdk.loader import load_app

app = load_app(Path(sys.argv[1]))
apps = {name: function_app(c.target, c.spec) for name, c in app.components.items()}


async def mount(scope, receive, send):
    name, _, rest = scope["path"].lstrip("/").partition("/")
    await apps[name](dict(scope, path="/" + rest), receive, send)


server = uvicorn.Server(uvicorn.Config(mount, lifespan="off", access_log=False, log_level="warning"))
server.run(sockets=[socket.socket(fileno=int(sys.argv[2]))])
"""


class Server:
    def __init__(self, url: str, stdout: Path, stderr: Path) -> None:
        self.url = url
        self.stdout = stdout
        self.stderr = stderr

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10)

    def lines(self, pattern: str) -> list[str]:
        """Lines of the server's stdout and stderr that contain ``pattern``."""
        text = self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")
        return [line for line in text.splitlines() if pattern in line]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("functions")
    (root / "app.py").write_text(textwrap.dedent(APP))
    (root / "server.py").write_text(SERVER)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    stdout, stderr = root / "stdout", root / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(root / "server.py"), str(root / "app.py"), str(listener.fileno())],
            pass_fds=[listener.fileno()],
            stdout=out,
            stderr=err,
            cwd=root,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    listener.close()
    try:
        # The socket listens already: the first request waits until the server accepts it.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            assert client.get(f"/typed{HEALTH_PATH}").status_code == 200
        yield Server(f"http://127.0.0.1:{port}", stdout, stderr)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_typed_arguments_are_validated_and_the_result_is_json(server: Server) -> None:
    with server.client() as client:
        ok = client.post("/typed/", json={"width": 3, "height": "4", "data": base64.urlsafe_b64encode(b"\xff\x00").decode()})
        assert ok.status_code == 200, ok.text
        assert ok.headers["content-type"] == "application/json"
        assert ok.json() == {"area": 12, "size": 2, "first": "ff", "tags": []}

        wrong = client.post("/typed/", json={"width": "wide", "colour": "red"})
        assert wrong.status_code == 422
        body = wrong.json()
        assert "width" in body["error"] and "colour" in body["error"]
        assert {tuple(item["loc"]) for item in body["details"]} == {("width",), ("colour",)}

        missing = client.post("/typed/", json={})
        assert missing.status_code == 422 and missing.json()["details"][0]["loc"] == ["width"]

        not_json = client.post("/typed/", content=b"width=3", headers={"content-type": "application/x-www-form-urlencoded"})
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
        not_object = client.post("/typed/", json=[3, 4])
        assert not_object.status_code == 400 and "not an object" in not_object.json()["error"]


def test_get_takes_the_arguments_from_the_query_string(server: Server) -> None:
    with server.client() as client:
        ok = client.get("/typed/anything", params=[("width", "5"), ("tags", "a"), ("tags", "b")])
        assert ok.status_code == 200 and ok.json() == {"area": 10, "size": 0, "first": "", "tags": ["a", "b"]}
        bad = client.get("/typed/", params={"width": "five"})
        assert bad.status_code == 422 and bad.json()["details"][0]["loc"] == ["width"]


def test_raw_request_in_raw_response_out(server: Server) -> None:
    with server.client() as client:
        answer = client.put("/raw/some/path?x=7&y=z", content=b"not json at all")
    assert answer.status_code == 201
    assert answer.headers["x-test"] == "yes"
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert answer.text == "PUT /some/path q=x=7&y=z x=7 body=not json at all"


def test_async_function_and_its_output_prefixed_with_the_request_id(server: Server) -> None:
    with server.client() as client:
        answer = client.post("/asleep/", json={"name": "ada"}, headers={"x-request-id": "req-ada-1"})
    assert answer.status_code == 200 and answer.json() == "hi ada"
    assert server.lines("hello from ada") == ["[req-ada-1] hello from ada!"]


def test_output_of_concurrent_invocations_is_prefixed_with_their_ids(server: Server) -> None:
    with server.client() as client:
        for n in range(3):
            headers = {"x-clearway-invocation-id": f"inv-{n}", "x-clearway-attempt": "1", "x-clearway-caller": "platform"}
            assert client.post("/noisy/", json={"n": n}, headers=headers).json() == n
    for n in range(3):
        assert server.lines(f"of {n}") == [f"[inv-{n}] line one of {n}", f"[inv-{n}] line two of {n}"]


def test_an_exception_is_a_500_with_an_error_id_and_the_traceback_in_stderr(server: Server) -> None:
    with server.client() as client:
        public = client.post("/fails/", json={"n": 0}, headers={"x-request-id": "req-zero"})
        internal = client.post("/fails/", json={"n": 0}, headers={"x-clearway-caller": "t.web"})
        assert client.post("/fails/", json={"n": 4}).json() == 0.25
    assert public.status_code == 500
    error_id = public.json()["error_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", error_id)
    # Public callers learn the id, not the exception (it may carry internals) ...
    assert "ZeroDivisionError" not in public.text
    # ... internal callers (named by the gateway) get its type and message too.
    assert internal.status_code == 500 and "ZeroDivisionError: division by zero" in internal.json()["error"]
    traceback = server.lines(f"[{error_id}] ")
    assert "invocation req-zero" in traceback[0]
    assert any("return 1 / n" in line for line in traceback)
    assert traceback[-1] == f"[{error_id}] ZeroDivisionError: division by zero"


@pytest.mark.parametrize(("name", "where"), [("hangs", "the hanging line"), ("hangs-async", "the awaiting line")])
def test_past_its_timeout_an_invocation_is_a_504_and_the_stuck_stack_is_logged(
    server: Server, name: str, where: str
) -> None:
    with server.client() as client:
        answer = client.post(f"/{name}/", json={})
        assert answer.status_code == 504
        error_id = answer.json()["error_id"]
        assert "timeout of 0.3s" in answer.json()["error"]
        # The replica keeps serving.
        assert client.post("/typed/", json={"width": 1}).status_code == 200
    logged = server.lines(f"[{error_id}] ")
    assert "timed out after 0.3s" in logged[0]
    assert any(where in line for line in logged), logged


def test_a_result_json_cannot_carry_is_a_500_that_says_so(server: Server) -> None:
    with server.client() as client:
        answer = client.post("/unserialisable/")
    assert answer.status_code == 500 and "JSON cannot carry" in answer.json()["error"]


EVENT = {"specversion": "1.0", "type": "com.example.order.created", "source": "/shop", "id": "e1", "data": {"order": 7}}


def test_cloudevents_binary_structured_and_batch(server: Server) -> None:
    with server.client() as client:
        binary = client.post(
            "/on-order/_events",
            content=b'{"order": 1}',
            headers={
                "content-type": "application/json",
                "ce-specversion": "1.0",
                "ce-type": "com.example.order.created",
                "ce-source": "/shop",
                "ce-id": "b1",
            },
        )
        assert binary.status_code == 200, binary.text
        assert binary.json() == {"results": [{"type": "com.example.order.created", "id": "b1", "data": {"order": 1}}]}

        structured = client.post(
            "/on-order/_events", content=json.dumps(EVENT), headers={"content-type": "application/cloudevents+json"}
        )
        assert structured.json() == {"results": [{"type": "com.example.order.created", "id": "e1", "data": {"order": 7}}]}

        batch = client.post(
            "/on-order/_events",
            content=json.dumps([EVENT, {**EVENT, "id": "e2", "data": {"order": 8}}]),
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        assert [r["id"] for r in batch.json()["results"]] == ["e1", "e2"]
        assert client.post(
            "/on-order/_events", content=b"[]", headers={"content-type": "application/cloudevents-batch+json"}
        ).json() == {"results": []}


@pytest.mark.parametrize(
    ("content", "content_type", "reason"),
    [
        (b"{not json", "application/cloudevents+json", "not a valid CloudEvent"),
        (json.dumps({"specversion": "1.0", "source": "/shop"}).encode(), "application/cloudevents+json", "Missing required"),
        (json.dumps({**EVENT, "specversion": "9.9"}).encode(), "application/cloudevents+json", "specversion"),
        (b'{"a": 1}', "application/cloudevents-batch+json", "JSON array of event objects"),
        (b"[{", "application/cloudevents-batch+json", "batch is not JSON"),
    ],
)
def test_malformed_cloudevents_are_a_400_with_the_reason(
    server: Server, content: bytes, content_type: str, reason: str
) -> None:
    with server.client() as client:
        answer = client.post("/on-order/_events", content=content, headers={"content-type": content_type})
    assert answer.status_code == 400
    assert reason in answer.json()["error"]


def test_bodies_over_6_mib_are_a_413(server: Server) -> None:
    with server.client() as client:
        too_big = client.post("/typed/", content=b"x" * (MAX_BODY + 1), headers={"content-type": "application/json"})
        assert too_big.status_code == 413 and "6 MiB" in too_big.json()["error"]


def test_health_path_answers_without_calling_the_function(server: Server) -> None:
    with server.client() as client:
        # `fails` would raise if it were called.
        assert client.get(f"/fails{HEALTH_PATH}").status_code == 200


def test_remote_calls_through_http_and_raises_function_error(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's `.remote()` against the server: bytes as base64, errors as `FunctionError`."""
    monkeypatch.setenv("CLEARWAY_SERVICE_TYPED_URL", f"{server.url}/typed")
    monkeypatch.setenv("CLEARWAY_SERVICE_FAILS_URL", f"{server.url}/fails")
    monkeypatch.setenv("CLEARWAY_REPLICA_TOKEN", "token")
    app = cw.App("t")

    @app.function()
    def typed(width: int, height: int = 2, data: bytes = b"") -> dict[str, object]:
        raise AssertionError("called locally")

    @app.function()
    def fails(n: int) -> float:
        raise AssertionError("called locally")

    assert typed.remote(3, data=b"\xff\x00\x01") == {"area": 6, "size": 3, "first": "ff", "tags": []}
    assert list(typed.map([1, {"width": 2, "height": 5}, 3])) == [
        {"area": w, "size": 0, "first": "", "tags": []} for w in (2, 10, 6)
    ]
    with pytest.raises(cw.FunctionError) as info:
        fails.remote(n=0)
    assert info.value.status == 500 and info.value.error_id is not None
    assert info.value.error_id in str(info.value) and "clearway logs t" in str(info.value)
    with pytest.raises(cw.FunctionError) as info:
        typed.remote(width="wide")  # type: ignore[arg-type]
    assert info.value.status == 422 and info.value.details is not None and "width" in info.value.details


FUNCTION_REPLICA_APP = """
import clearway as cw

app = cw.App("t")

@app.function()
def greet(name: str) -> str:
    print(f"greeting {name}")
    return f"hello {name}"
"""


async def test_a_function_replica_is_served_by_the_replica_runtime(
    supervisor: Supervisor, make_spec: SpecFactory
) -> None:
    spec = make_spec(FUNCTION_REPLICA_APP, component="greet", kind="function", health_path=HEALTH_PATH)
    await supervisor.start(spec)
    ready = await supervisor.wait_for(spec.replica_id, ReplicaState.READY, within=20)
    async with client_for(ready.socket_path) as client:
        headers = {"x-clearway-invocation-id": "inv-7", "x-clearway-caller": "platform"}
        answer = await client.post("/", json={"name": "ada"}, headers=headers)
    assert answer.status_code == 200 and answer.json() == "hello ada"
    await supervisor.stop(spec.replica_id)
    assert "[inv-7] greeting ada" in spec.log_path.read_text()


def test_a_replica_whose_threads_are_held_by_timed_out_calls_asks_to_be_restarted(server: Server) -> None:
    # The pool has 32 threads; once 16 are held by calls that timed out, health says 503,
    # which the supervisor's liveness probe turns into a restart.
    with server.client() as client:
        assert client.get(f"/wedged{HEALTH_PATH}").status_code == 200
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{server.url}/wedged/", json={}, timeout=10).status_code, range(16)))
    assert answers == [504] * 16
    with server.client() as client:
        health = client.get(f"/wedged{HEALTH_PATH}")
        assert health.status_code == 503 and "16 timed-out calls" in health.json()["reason"], health.text
        assert client.get(f"/typed{HEALTH_PATH}").status_code == 200  # other functions are unaffected
