"""Functions end to end (issue 7): durable invocations, events and schedules
delivered by the control plane through the real gateway to real function replicas.

* ``clearway invoke`` calls a function synchronously;
* a spawned invocation (``invoke --async``, and ``Function.spawn`` from inside
  the app) runs to its result; an idempotency key queues it once;
* a function that raises is retried, then dead with its error;
  ``clearway invocations retry`` queues it again; bad input is dead at once;
* an event posted with ``clearway events send`` reaches the function
  subscribed to its type; so does one an outside producer posts with an event
  key (``clearway events key``), until ``clearway events revoke``;
* a ``cw.Every(1)`` schedule fires on its own;
* a ``kill -9`` of the control plane while invocations are queued and running
  loses none: after the restart every one completes.

Every wait is on a condition with a deadline (the invocation's state through
the API), never on time.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import write_app
from tests.e2e.platform import Gate, Platform, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FUNCTIONS = """
@app.function(timeout=30)
def add(a: int, b: int) -> int:
    return a + b


@app.function(retries=1)
def broken(n: int) -> int:
    raise ValueError(f"broken on {n}")


@app.function(events="com.example.ping")
def on_ping(event: cw.CloudEvent) -> dict:
    return {"id": event["id"], "data": event.data}


@app.function(timeout=60)
def chain(n: int) -> dict:
    job = add.spawn(a=n, b=1, idempotency_key=f"chain-{n}")
    return {"job": job.id, "result": job.result(timeout=50)}


@app.function(max_concurrency=100, max_replicas=1, timeout=120)
def gated(n: int) -> int:
{gate}    return n
"""


@pytest.fixture(scope="module")
def gate() -> Iterator[Gate]:
    opened = Gate()
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, gate: Gate) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp("functions")
    running = Platform(home=root / "home", port=free_port())
    running.up()
    try:
        running.cli("deploy", str(write_app(root / "fns", FUNCTIONS.replace("{gate}", gate.wait_code()), name="fns")))
        yield running
    finally:
        running.down()




def invocation(platform: Platform, invocation_id: str) -> dict[str, Any]:
    with platform.api() as client:
        response = client.get(f"/v1/invocations/{invocation_id}")
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


def finished(platform: Platform, invocation_id: str, *, within: float = 90) -> dict[str, Any]:
    """The invocation once it succeeded or is dead."""
    found: dict[str, Any] = wait_for(
        f"invocation {invocation_id} to finish",
        lambda: (i := invocation(platform, invocation_id))["state"] in ("succeeded", "dead") and i,
        within=within,
    )
    return found


def spawn(platform: Platform, function: str, data: dict[str, Any], *extra: str) -> dict[str, Any]:
    result = platform.cli("invoke", "fns", function, "--async", "--json", "--data", json.dumps(data), *extra)
    queued: dict[str, Any] = json.loads(result.stdout)
    return queued


def test_invoke_calls_a_function_and_waits_for_its_answer(platform: Platform) -> None:
    assert platform.cli("invoke", "fns", "add", "--data", '{"a": 2, "b": 3}').stdout == "5\n"

    failed = platform.cli("invoke", "fns", "broken", "--data", '{"n": 1}', check=False)
    assert failed.returncode == 1
    assert "broken answered 500" in failed.stderr and "broken on 1" in failed.stderr and "error id" in failed.stderr


def test_a_spawned_invocation_runs_to_its_result_once_per_key(platform: Platform) -> None:
    queued = spawn(platform, "add", {"a": 40, "b": 2}, "--key", "answer")
    assert queued["created"] is True
    again = spawn(platform, "add", {"a": 1, "b": 1}, "--key", "answer")
    assert (again["id"], again["created"]) == (queued["id"], False)

    done = finished(platform, queued["id"])
    assert (done["state"], done["result"], done["attempts"], done["kind"]) == ("succeeded", 42, 1, "spawn")
    shown = platform.cli("invocations", "show", queued["id"]).stdout
    assert "succeeded" in shown and "42" in shown
    refused = platform.cli("invocations", "retry", queued["id"], check=False)
    assert refused.returncode == 1 and "is succeeded: only dead invocations are retried" in refused.stderr


def test_a_function_spawns_another_and_waits_for_its_job(platform: Platform) -> None:
    answer = json.loads(platform.cli("invoke", "fns", "chain", "--json", "--data", '{"n": 9}').stdout)
    assert answer["status"] == 200, answer
    assert answer["body"]["result"] == 10
    spawned = invocation(platform, answer["body"]["job"])
    assert (spawned["function"], spawned["idempotency_key"], spawned["state"]) == ("add", "chain-9", "succeeded")


def test_a_failing_invocation_is_retried_then_dead_and_can_be_queued_again(platform: Platform) -> None:
    queued = spawn(platform, "broken", {"n": 7})
    dead = finished(platform, queued["id"])
    assert (dead["state"], dead["attempts"], dead["max_attempts"]) == ("dead", 2, 2)  # retries=1
    assert "500" in dead["error"] and "broken on 7" in dead["error"] and "gave up after 2 attempts" in dead["error"]

    listed = json.loads(platform.cli("invocations", "fns", "--dead", "--json").stdout)
    assert queued["id"] in {i["id"] for i in listed}
    assert "broken on 7" in platform.cli("invocations", "fns", "--dead").stdout

    retried = platform.cli("invocations", "retry", queued["id"])
    assert "queued again" in retried.stdout
    wait_for("the retried invocation to be attempted again", lambda: invocation(platform, queued["id"])["attempts"] >= 1)
    again = finished(platform, queued["id"])
    assert (again["state"], again["attempts"]) == ("dead", 2)


def test_bad_input_is_dead_at_once(platform: Platform) -> None:
    queued = spawn(platform, "add", {"a": "not a number", "b": 1})
    dead = finished(platform, queued["id"])
    assert (dead["state"], dead["attempts"]) == ("dead", 1)
    assert dead["error"].startswith("422 ")


def test_an_event_reaches_the_function_subscribed_to_its_type(platform: Platform) -> None:
    sent = json.loads(
        platform.cli(
            "events", "send", "fns", "--type", "com.example.ping", "--id", "ping-1", "--data", '{"n": 7}', "--json"
        ).stdout
    )
    [queued] = sent["invocations"]
    assert queued["function"] == "on-ping"
    done = finished(platform, queued["id"])
    assert done["state"] == "succeeded", done
    assert done["result"] == {"results": [{"id": "ping-1", "data": {"n": 7}}]}

    # The same event again (same source and id): not queued twice.
    resent = json.loads(
        platform.cli("events", "send", "fns", "--type", "com.example.ping", "--id", "ping-1", "--json").stdout
    )
    assert [(i["id"], i["created"]) for i in resent["invocations"]] == [(queued["id"], False)]

    unknown = platform.cli("events", "send", "fns", "--type", "com.example.nobody", check=False)
    assert unknown.returncode == 1 and "no function of fns receives events of type 'com.example.nobody'" in unknown.stderr


def test_an_event_key_lets_a_producer_post_events_until_it_is_revoked(platform: Platform) -> None:
    shown = platform.cli("events", "key", "fns", "--name", "relay").stdout
    fields = dict(line.split(maxsplit=1) for line in shown.splitlines()[:3])
    key, url, key_id = fields["Key"], fields["URL"], fields["ID"].split()[0]
    assert key.startswith(f"cwek_{key_id}_") and url.endswith("/v1/apps/fns/events")
    assert f"-H 'Authorization: Bearer {key}'" in shown and "-H 'ce-specversion: 1.0'" in shown, shown

    # What the printed curl does: a binary-mode CloudEvent.
    headers = {
        "authorization": f"Bearer {key}",
        "ce-specversion": "1.0",
        "ce-type": "com.example.ping",
        "ce-source": "/relay",
        "ce-id": "relay-1",
        "content-type": "application/json",
    }
    posted = httpx.post(url, content=b'{"n": 8}', headers=headers, timeout=30)
    assert posted.status_code == 202, posted.text
    [queued] = posted.json()["invocations"]
    done = finished(platform, queued["id"])
    assert done["state"] == "succeeded" and done["result"]["results"][0]["id"] == "relay-1", done

    listed = platform.cli("events", "keys", "fns").stdout
    assert key_id in listed and "relay" in listed and key not in listed
    assert "revoked" in platform.cli("events", "revoke", "fns", key_id).stdout
    refused = httpx.post(url, content=b'{"n": 9}', headers=headers | {"ce-id": "relay-2"}, timeout=30)
    assert refused.status_code == 401 and "clearway events key fns" in refused.json()["error"]
    again = platform.cli("events", "revoke", "fns", key_id, check=False)
    assert again.returncode == 1 and f"fns has no event key '{key_id}'" in again.stderr


def test_an_interval_schedule_fires_on_its_own(platform: Platform, tmp_path: Path) -> None:
    body = '@app.function(schedule=cw.Every(1))\ndef tick() -> str:\n    return "tock"\n'
    platform.cli("deploy", str(write_app(tmp_path / "ticker", body, name="ticker")))
    try:
        with platform.api() as client:

            def runs() -> list[dict[str, Any]]:
                found = client.get("/v1/apps/ticker/invocations", params={"state": "succeeded"}).json()
                return [i for i in found if i["kind"] == "cron"] if len(found) >= 2 else []

            fired = wait_for("two runs of the schedule", runs, within=60)
        assert all(i["function"] == "tick" and i["result"] == "tock" for i in fired)
        assert all(i["idempotency_key"].startswith("schedule:") for i in fired)
        view = json.loads(platform.cli("functions", "ticker", "--json").stdout)
        [tick] = view[0]["functions"]
        assert tick["triggers"]["schedule"] == {"every": 1.0} and tick["next_fire"] is not None
    finally:
        platform.cli("destroy", "ticker", "--yes")


def test_no_invocation_is_lost_when_the_control_plane_is_killed(platform: Platform, gate: Gate) -> None:
    count = 50
    with platform.api() as client:
        ids = []
        for n in range(count):
            response = client.post("/v1/apps/fns/functions/gated/spawn", json={"kwargs": {"n": n}})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        def running() -> bool:
            found = client.get("/v1/apps/fns/invocations", params={"function": "gated", "limit": count}).json()
            return any(i["state"] == "running" for i in found)

        wait_for("a gated invocation to be running", running)
        states = {i["state"] for i in client.get("/v1/apps/fns/invocations", params={"function": "gated", "limit": count}).json()}
    assert states <= {"queued", "running"}  # the gate is closed: none can have finished

    os.kill(platform.control_pid(), signal.SIGKILL)
    gate.open()
    platform.up()

    with platform.api() as client:

        def all_done() -> list[dict[str, Any]]:
            found = client.get("/v1/apps/fns/invocations", params={"function": "gated", "limit": 1000}).json()
            return found if all(i["state"] in ("succeeded", "dead") for i in found) else []

        done = wait_for("every gated invocation to finish after the restart", all_done, within=120)
    assert sorted(i["id"] for i in done) == sorted(ids)
    assert {i["state"] for i in done} == {"succeeded"}
    results = {i["id"]: invocation(platform, i["id"])["result"] for i in done}
    assert sorted(results.values()) == list(range(count))


def test_an_idle_function_scales_to_zero_and_a_request_wakes_it(platform: Platform, tmp_path: Path) -> None:
    body = (
        '@app.function(http="/hello", idle_timeout=3)\n'
        "def hello(name: str) -> str:\n"
        '    return f"hello {name}"\n'
    )
    platform.cli("deploy", str(write_app(tmp_path / "sleepy", body, name="sleepy")))
    try:
        with platform.api() as client:

            def replicas() -> int:
                [fn] = client.get("/v1/apps/sleepy/functions").json()["functions"]
                return int(fn["scaling"]["replicas"])

            # A new revision starts with one replica (the deploy proves it starts), then idles down.
            wait_for("the idle function to reach zero replicas", lambda: replicas() == 0, within=60)
            wait_for("its replica to stop", lambda: not platform.status("sleepy")["replicas"], within=60)

            # At zero, the gateway holds the request while a replica starts, then serves it.
            response = platform.get("sleepy", "/hello?name=cold")
            assert (response.status_code, response.json()) == (200, "hello cold")
            # Read while the woken replica runs (it idles away again after idle_timeout).
            [fn] = client.get("/v1/apps/sleepy/functions").json()["functions"]
            reasons = [d["reason"] for d in fn["scaling"]["decisions"]]
            assert any("idle" in r for r in reasons) and "cold start" in reasons[-1], reasons
            # The replica was forked from the revision's warm parent, and its start-up is measured:
            # per replica, and in the metrics beside the gateway's part of the cold start.
            assert fn["scaling"]["cold_starts"] == 1
            start = fn["last_start"]
            assert start["how"] == "fork" and 0 < start["launch_ms"] <= start["ready_ms"], start
            metrics = client.get("/v1/metrics").text
            revision = client.get("/v1/apps/sleepy/functions").json()["revision"]
            labels = f'app="sleepy",component="hello",how="fork",phase="init",revision="{revision}"'
            # Two starts: the deploy's (every new revision proves it starts), then the cold start.
            assert f"clearway_replica_start_seconds_count{{{labels}}} 2.0" in metrics, metrics[-3000:]
            held = f'app="sleepy",component="hello",revision="{revision}"'
            assert f"clearway_gateway_hold_seconds_count{{{held}}} 1.0" in metrics
            assert f"clearway_gateway_held_first_response_seconds_count{{{held}}} 1.0" in metrics

            # `clearway scale APP FUNCTION 0` puts it to sleep now, whatever its load.
            platform.cli("scale", "sleepy", "hello", "0")
            assert replicas() == 0
            wait_for("its replica to stop", lambda: not platform.status("sleepy")["replicas"], within=60)
            # At zero, the last cold start is still shown.
            listed = platform.cli("functions", "sleepy").stdout
            assert f"1; last forked in {start['launch_ms']:.1f} ms" in listed, listed
            assert platform.get("sleepy", "/hello?name=again").json() == "hello again"
    finally:
        platform.cli("destroy", "sleepy", "--yes")
