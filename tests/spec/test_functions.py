"""Functions in the spec and the SDK: what ``@app.function`` records, validates and returns."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from croniter import croniter
from pydantic import ValidationError

import clearway as cw
from clearway.exceptions import SpecError
from clearway.spec import AppSpec, FunctionSpec, ScheduleSpec, ServiceSpec, WorkerSpec
from clearway.spec.model import check_cron

pytestmark = pytest.mark.timeout(30)


def test_a_function_round_trips_through_json_as_a_component() -> None:
    spec = AppSpec(
        name="shop",
        components=[
            ServiceSpec(name="api", public=True, path="/api"),
            WorkerSpec(name="orders"),
            FunctionSpec(
                name="resize",
                http="/resize/",
                events=["com.example.order.created"],
                schedule=ScheduleSpec(cron="*/5 * * * *"),
                min_replicas=1,
                max_replicas=20,
            ),
        ],
    )
    again = AppSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    function = again.component("resize")
    assert isinstance(function, FunctionSpec) and function.http == "/resize"
    assert [f.name for f in again.functions] == ["resize"]
    assert [c.name for c in again.listeners] == ["api", "resize"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas (5) is above max_replicas (2)"),
        ({"max_replicas": 0}, "greater than or equal to 1"),
        ({"max_concurrency": 0}, "greater than or equal to 1"),
        ({"http": "resize"}, "must be a URL path"),
        ({"events": [""]}, "non-empty string"),
        ({"events": [" padded "]}, "without surrounding spaces"),
        ({"allow": ["Bad App"]}, "must be 'app' or 'app.component'"),
        ({"schedule": {"cron": "*/5 * * *"}}, "has 4 field(s); it needs 5"),
        ({"schedule": {"cron": "61 * * * *"}}, "minute field: 61 is out of range 0-59"),
        ({"schedule": {"every": 0.5}}, "greater than or equal to 1"),
        ({"schedule": {"cron": "* * * * *", "every": 5}}, "exactly one of cron= and every="),
        ({"schedule": {}}, "exactly one of cron= and every="),
    ],
)
def test_invalid_functions_say_what_to_change(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        AppSpec.model_validate({"name": "ok", "components": [{"kind": "function", "name": "f", **fields}]})
    assert message in str(info.value)


def test_http_paths_of_functions_and_public_services_never_collide() -> None:
    with pytest.raises(ValidationError, match=r"function 'f' .* and 'api' both claim path '/api'"):
        AppSpec(name="ok", components=[ServiceSpec(name="api", public=True, path="/api"), FunctionSpec(name="f", http="/api/")])
    with pytest.raises(ValidationError, match=r"function 'g' .* and 'f' both claim path '/x'"):
        AppSpec(name="ok", components=[FunctionSpec(name="f", http="/x"), FunctionSpec(name="g", http="/x")])
    # A private service's path is no route: no collision.
    AppSpec(name="ok", components=[ServiceSpec(name="api", path="/api"), FunctionSpec(name="f", http="/api")])


GOOD_CRON = [
    "*/5 * * * *", "0 9 * * MON-FRI", "1,2,3-7/2 0 1 1 0", "* * * jan-mar *", "* * * * 7", "5-1 * * * *",
    "* * L * *", "* * 15W * *", "* * * * L5", "* * * * 5#3", "* * ? * *", "@hourly", "@daily",
]  # fmt: skip
BAD_CRON = [
    "* * * *", "* * * * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "* * * 13 *", "* * * * 8", "*/0 * * * *",
    "a * * * *", "H * * * *", "* * LW * *", "@reboot", "",
]  # fmt: skip


@pytest.mark.parametrize("expression", GOOD_CRON)
def test_cron_expressions_croniter_accepts_pass_the_shape_check(expression: str) -> None:
    assert croniter.is_valid(expression)
    assert check_cron(expression) == expression


@pytest.mark.parametrize("expression", BAD_CRON)
def test_cron_expressions_croniter_refuses_are_refused_with_a_reason(expression: str) -> None:
    assert not croniter.is_valid(expression) or len(expression.split()) == 6  # 6 fields: croniter's seconds
    with pytest.raises(ValueError, match="cron expression"):
        check_cron(expression)


def test_app_function_records_the_spec_and_returns_a_callable_handle() -> None:
    app = cw.App("shop")

    @app.function(http="/resize", events="com.example.resized", schedule=cw.Every(30), max_replicas=3, memory_mb=256)
    def resize_image(width: int, height: int = 2) -> int:
        """Resize an image."""
        return width * height

    assert isinstance(resize_image, cw.Function)
    assert resize_image(3) == 6  # called here, like the undecorated function
    assert resize_image.__name__ == "resize_image" and resize_image.__doc__ == "Resize an image."
    assert resize_image.name == "resize-image"
    spec = app.spec().component("resize-image")
    assert isinstance(spec, FunctionSpec)
    assert (spec.http, spec.events, spec.schedule, spec.max_replicas, spec.resources.memory_mb) == (
        "/resize", ["com.example.resized"], ScheduleSpec(every=30), 3, 256
    )
    assert spec.source is not None and spec.source.file == __file__
    assert app.components["resize-image"].target.__name__ == "resize_image"  # the plain function


def test_async_functions_stay_coroutine_functions_when_called_here() -> None:
    import asyncio

    app = cw.App("shop")

    @app.function()
    async def greet(name: str) -> str:
        return f"hi {name}"

    assert asyncio.run(greet("ada")) == "hi ada"


def test_bad_schedules_and_arguments_point_at_the_users_line() -> None:
    app = cw.App("shop")
    with pytest.raises(SpecError, match="minute field: 99 is out of range") as info:
        cw.Cron("99 * * * *")
    assert info.value.location is not None and "test_functions.py" in info.value.location
    with pytest.raises(SpecError, match=r"pass cw.Cron\('\*/5 \* \* \* \*'\) or cw.Every") as info:
        app.function(schedule="*/5 * * * *")  # type: ignore[arg-type]
    assert info.value.location is not None and "test_functions.py" in info.value.location
    with pytest.raises(SpecError, match="min_replicas"):
        app.function(min_replicas=3, max_replicas=1, name="f")(lambda: None)


class FakeControlPlane(ThreadingHTTPServer):
    """The replica channel's invocation routes, as far as `spawn` and `Job` use them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spawned: list[tuple[str, dict[str, Any]]] = []
        #: States each invocation's GETs return, in turn (the last repeats).
        self.states: dict[str, list[dict[str, Any]]] = {}


class _Handler(BaseHTTPRequestHandler):
    server: FakeControlPlane

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.spawned.append((self.headers["authorization"], body))
        if body["function"] == "missing":
            self._answer(404, {"error": "no function 'missing' in app 'shop'"})
            return
        self._answer(201, {"id": f"inv-{len(self.server.spawned)}"})

    def do_GET(self) -> None:
        states = self.server.states[self.path.rsplit("/", 1)[-1]]
        self._answer(200, states.pop(0) if len(states) > 1 else states[0])


@pytest.fixture
def control(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeControlPlane]:
    server = FakeControlPlane()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CLEARWAY_CONTROL_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("CLEARWAY_REPLICA_TOKEN", "replica-token")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_spawn_queues_through_the_control_plane_and_job_result_waits(control: FakeControlPlane) -> None:
    app = cw.App("shop")

    @app.function()
    def report(day: str, data: bytes = b"") -> None: ...

    job = report.spawn("monday", data=b"\xff", idempotency_key="report:monday")
    assert job.id == "inv-1"
    assert control.spawned == [
        (
            "Bearer replica-token",
            {"function": "report", "kwargs": {"day": "monday", "data": "_w=="}, "idempotency_key": "report:monday"},
        )
    ]
    control.states["inv-1"] = [{"state": "queued"}, {"state": "running"}, {"state": "succeeded", "result": {"rows": 3}}]
    assert job.result(timeout=10) == {"rows": 3}

    dead = report.spawn("tuesday")
    control.states[dead.id] = [{"state": "dead", "attempts": 4, "error": "HTTP 500: boom"}]
    with pytest.raises(cw.FunctionError, match=r"is dead after 4 attempt\(s\): HTTP 500: boom"):
        dead.result()
    stuck = cw.Job("inv-9")
    control.states["inv-9"] = [{"state": "queued"}]
    with pytest.raises(TimeoutError, match="still queued"):
        stuck.result(timeout=0.2)


def test_spawn_refused_by_the_control_plane_raises_function_error(control: FakeControlPlane) -> None:
    app = cw.App("shop")

    @app.function()
    def missing() -> None: ...

    with pytest.raises(cw.FunctionError, match="answered 404: no function 'missing'") as info:
        missing.spawn()
    assert info.value.status == 404


def test_remote_outside_a_replica_says_where_it_runs() -> None:
    app = cw.App("shop")

    @app.function()
    def nowhere() -> None: ...

    with pytest.raises(cw.ClearwayError, match="not running in a clearway replica"):
        nowhere.remote()
    with pytest.raises(TypeError, match="nowhere"):
        nowhere.remote(1)  # type: ignore[call-arg]
