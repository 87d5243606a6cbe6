"""`clearway deploy --canary`, `clearway rollout status|promote|abort`, the phase in
`clearway status`, `scale --previews` and `config --preview`, against a real
platform (real CLI, control plane and gateway): what they send and print.
How each view is laid out is tested without a platform in ``test_render.py``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clearway.cli.main import cli
from tests.e2e.conftest import write_app
from tests.e2e.platform import Platform, free_port

SERVICE = """
@app.service(replicas=1, public=True, health="/healthz")
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return asgi
"""

PLAN = (
    "canary rollout: 5% → 25% → 50% → 100%, each step at least 30s and 20 requests; "
    "promotes in 1m30s at the earliest"
)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One platform for the module (per xdist worker); app ``alpha`` is deployed by the first test."""
    root = tmp_path_factory.mktemp("delivery-commands")
    running = Platform(home=root / "home", port=free_port())
    running.up()
    try:
        yield running
    finally:
        running.down()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The default canary policy: without traffic a canary waits on its first step.
    return write_app(tmp_path_factory.mktemp("alpha"), SERVICE, name="alpha")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_canary_deploys_and_the_rollout_commands(platform: Platform, project: Path) -> None:
    first = platform.cli("deploy", str(project), "--canary")
    assert PLAN in first.stderr, first.stderr
    assert "alpha-1 is serving (no stable revision to compare it with: served directly)" in first.stdout, first
    never = platform.cli("rollout", "status", "alpha")
    assert "alpha has had no rollout" in never.stdout, never

    second = platform.cli("deploy", str(project), "--canary")
    assert PLAN in second.stderr, second.stderr
    assert "alpha-2 is a canary at 5%: follow it with `clearway rollout status alpha`" in second.stdout, second

    apps: list[dict[str, Any]] = json.loads(platform.cli("status", "--json").stdout)
    assert {a["name"]: a["phase"] for a in apps} == {"alpha": "canary 5%"}, apps
    row = next(line for line in platform.cli("status").stdout.splitlines() if line.startswith("alpha"))
    assert "canary 5%" in row and "alpha-1" in row, row
    detail = platform.cli("status", "alpha").stdout
    assert "alpha  canary 5%  serving alpha-1" in detail, detail
    assert "rollout  alpha-2 at 5%, step 1 of 4, beside alpha-1" in detail, detail

    shown = platform.cli("rollout", "status", "alpha").stdout
    for expected in ("alpha rollout #", ": running", "alpha-2  5% of traffic", "stable    alpha-1", "5% ← now → 25% → 50% → 100%", "started"):
        assert expected in shown, (expected, shown)
    as_json = json.loads(platform.cli("rollout", "status", "alpha", "--json").stdout)
    assert (as_json["current"]["canary"], as_json["current"]["state"]) == ("alpha-2", "running"), as_json

    aborted = platform.cli("rollout", "abort", "alpha")
    assert "rollout of alpha-2 aborted" in aborted.stdout and "alpha-1 serves all of alpha's traffic" in aborted.stdout, aborted
    again = platform.cli("rollout", "abort", "alpha", check=False)
    assert again.returncode == 1 and again.stdout == "", again
    assert "error: alpha has no rollout running" in again.stderr, again.stderr
    last = platform.cli("rollout", "status", "alpha").stdout
    assert "no rollout is running; the last one:" in last and "aborted" in last and "alpha-2" in last, last
    after = platform.status("alpha")
    assert (after["active_revision"], after["phase"]) == ("alpha-1", "rolled back"), after  # the newest deploy's fate

    third = json.loads(platform.cli("deploy", str(project), "--canary", "--json").stdout)
    assert third["revision"]["state"] == "canary" and third["rollout"]["canary"] == third["revision"]["id"], third
    promoted = platform.cli("rollout", "promote", "alpha")
    assert f"{third['revision']['id']} promoted: it serves all of alpha's traffic" in promoted.stdout, promoted
    view = platform.status("alpha")
    assert (view["active_revision"], view["phase"], view["rollout"]) == (third["revision"]["id"], "serving", None), view

    missing = platform.cli("rollout", "status", "nope", check=False)
    assert missing.returncode == 1 and "no app named 'nope'" in missing.stderr, missing


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_preview_scale_and_preview_configuration(platform: Platform, project: Path) -> None:
    # Alone, or on another xdist worker than the first test (each worker has its own
    # module platform), alpha is not deployed yet.
    shown = platform.cli("status", "alpha", "--json", check=False)
    if shown.returncode != 0 or not json.loads(shown.stdout)["active_revision"]:
        platform.cli("deploy", str(project))
    scaled = platform.cli("scale", "alpha", "web=2", "--previews")
    assert "alpha/web: 2 replicas in each preview" in scaled.stdout, scaled

    platform.cli("config", "set", "alpha", "DATABASE=preview-db", "--preview")
    previews = json.loads(platform.cli("config", "alpha", "--preview", "--json").stdout)
    assert previews["scope"] == "preview", previews
    assert [(e["key"], e["value"]) for e in previews["config"]] == [("DATABASE", "preview-db")], previews
    production = json.loads(platform.cli("config", "alpha", "--json").stdout)
    assert production["scope"] == "production" and production["config"] == [], production
    assert "preview-db" in platform.cli("config", "alpha", "--preview").stdout
    platform.cli("config", "unset", "alpha", "DATABASE", "--preview")
    empty = platform.cli("config", "show", "alpha", "--preview").stdout
    assert "alpha has no preview configuration" in empty and "--preview` adds some" in empty, empty


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["web=two"], "whole number from 0 to 1000"),
        (["web=1001"], "whole number from 0 to 1000"),
        (["web=2", "3"], "give the replicas once"),
        (["web"], "how many replicas?"),
    ],
)
def test_scale_checks_its_arguments_before_any_call(tmp_path: Path, args: list[str], says: str) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "scale", "alpha", *args, "--previews"])
    assert result.exit_code == 2 and says in result.output, result.output
