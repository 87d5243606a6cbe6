"""What the CLI shows for rollouts, canary deploys and app phases, from plain dicts
shaped like the API's answers, without a platform."""

from __future__ import annotations

import io
import time
from typing import Any

import pytest
from rich.console import Console, RenderableType

from clearway.cli import render

pytestmark = pytest.mark.timeout(10)

T0 = 1_700_000_000.0


def text(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=200, record=True, highlight=False, color_system=None)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def rows_after(header: str, lines: list[str], count: int = 2) -> list[list[str]]:
    """The ``count`` table rows under the header line holding ``header``, split into cells."""
    at = next(i for i, line in enumerate(lines) if header in line)
    return [line.split() for line in lines[at + 1 : at + 1 + count]]


def summary(requests: int, errors: int, p99: float | None) -> dict[str, Any]:
    return {
        "requests": requests,
        "errors": errors,
        "success_rate": 1 - errors / requests if requests else None,
        "p99": p99,
    }


def rollout(**changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": 3,
        "app": "shop",
        "canary": "shop-4",
        "stable": "shop-3",
        "steps": [5, 25, 50, 100],
        "step": 1,
        "weight": 25,
        "state": "running",
        "reason": None,
        "started_at": T0,
        "step_started_at": T0 + 40,
        "finished_at": None,
        "analysis": {
            "outcome": "waiting",
            "reason": "12 of 20 requests so far",
            "canary": summary(12, 0, 0.012),
            "stable": summary(250, 1, 0.0105),
        },
        "smoke": "passed",
        "timeline": [
            {"at": T0, "event": "started", "detail": "canary rollout: 5% → 25% → 50% → 100%"},
            {"at": T0 + 2, "event": "smoke checks passed", "detail": "2 passed"},
            {"at": T0 + 40, "event": "25%", "detail": "5% passed: no worse than shop-3"},
        ],
        "policy": {"steps": [5, 25, 50, 100], "min_duration": 30.0, "min_requests": 20},
        "minimum_seconds": 90.0,
    }
    return view | changes


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (5, "5s"), (30.0, "30s"), (90, "1m30s"), (120, "2m"), (3600, "1h0m")],
)
def test_durations_read_like_people_write_them(seconds: float, shown: str) -> None:
    assert render.format_duration(seconds) == shown


def test_steps_mark_the_passed_the_current_and_the_end() -> None:
    steps = [5, 25, 50, 100]
    assert render.steps_line(steps, 0, "running") == "5% ← now → 25% → 50% → 100%"
    assert render.steps_line(steps, 1, "running") == "5% ✓ → 25% ← now → 50% → 100%"
    assert render.steps_line(steps, 3, "promoted") == "5% ✓ → 25% ✓ → 50% ✓ → 100% ✓"
    assert render.steps_line(steps, 1, "promoted") == "5% ✓ → 25% ✓ → 50% ✓ → 100% ✓"  # promoted by hand
    assert render.steps_line(steps, 2, "rolled back") == "5% ✓ → 25% ✓ → 50% ✗ → 100%"
    assert render.steps_line(steps, 0, "aborted") == "5% ✗ → 25% → 50% → 100%"


def test_the_plan_line_says_the_steps_what_each_needs_and_the_least_time() -> None:
    plan = {"steps": [5, 25, 50, 100], "min_duration": 30.0, "min_requests": 20, "minimum_seconds": 90.0}
    assert render.plan_line(plan) == (
        "canary rollout: 5% → 25% → 50% → 100%, each step at least 30s and 20 requests; "
        "promotes in 1m30s at the earliest"
    )
    quick = {"steps": [50, 100], "min_duration": 0.0, "min_requests": 1, "minimum_seconds": 0.0, "smoke_checks": ["home"]}
    assert render.plan_line(quick) == (
        "canary rollout: 1 smoke check first, then 50% → 100%, each step at least 0s and 1 requests; "
        "promotes in 0s at the earliest"
    )
    slow = {"steps": [1, 10, 100], "min_duration": 1800.0, "min_requests": 500, "minimum_seconds": 3600.0, "smoke_checks": ["a", "b"]}
    assert render.plan_line(slow) == (
        "canary rollout: 2 smoke checks first, then 1% → 10% → 100%, each step at least 30m and 500 requests; "
        "promotes in 1h0m at the earliest"
    )
    assert render.plan_line({**plan, "sticky": True}).endswith(
        "promotes in 1m30s at the earliest; each browser stays on one side (sticky)"
    )


def test_a_running_rollout_shows_where_it_is_what_it_waits_for_and_its_timeline() -> None:
    shown = text(render.rollout_status(rollout(), now=T0 + 105))
    lines = shown.splitlines()
    assert lines[0] == "shop rollout #3: running", shown
    for expected in (
        "canary    shop-4  25% of traffic",
        "stable    shop-3",
        "steps     5% ✓ → 25% ← now → 50% → 100%",
        "in step   1m05s (needs at least 30s and 20 requests)",
        "smoke     passed",
        "analysis  waiting: 12 of 20 requests so far",
    ):
        assert expected in lines, (expected, shown)
    assert f"started   {clock(T0)}, 1m45s ago" in lines, shown
    assert rows_after("REQUESTS", lines) == [
        ["canary", "12", "0", "100.0%", "12ms"],
        ["stable", "250", "1", "99.6%", "10ms"],
    ], shown
    assert lines[lines.index(next(line for line in lines if line.startswith("TIME "))) + 1 :] == [
        f"{clock(T0)}  started              canary rollout: 5% → 25% → 50% → 100%",
        f"{clock(T0 + 2)}  smoke checks passed  2 passed",
        f"{clock(T0 + 40)}  25%                  5% passed: no worse than shop-3",
    ], shown


def test_a_finished_rollout_shows_how_it_ended_and_when() -> None:
    ended = rollout(
        state="rolled back",
        step=0,
        weight=0,
        reason="canary 5xx 40.0% vs stable 0.0%",
        finished_at=T0 + 75,
        analysis={
            "outcome": "fail",
            "reason": "canary 5xx 40.0% vs stable 0.0%",
            "canary": summary(25, 10, 2.5),
            "stable": None,
        },
        timeline=[{"at": T0 + 75, "event": "rolled back", "detail": None}],
    )
    shown = text(render.rollout_status(ended, now=T0 + 1000))
    lines = shown.splitlines()
    assert lines[0] == "shop rollout #3: rolled back (canary 5xx 40.0% vs stable 0.0%)", shown
    assert "steps     5% ✗ → 25% → 50% → 100%" in lines, shown
    assert f"finished  {clock(T0 + 75)} after 1m15s" in lines, shown
    assert "analysis  fail: canary 5xx 40.0% vs stable 0.0%" in lines, shown
    assert not any(line.startswith("in step") for line in lines), shown
    assert rows_after("REQUESTS", lines) == [
        ["canary", "25", "10", "60.0%", "2.50s"],
        ["stable", "-", "-", "-", "-"],
    ], shown
    assert any(line.startswith(clock(T0 + 75)) and "rolled back" in line for line in lines), shown


def test_a_rollout_before_its_first_analysis_and_during_its_smoke_checks() -> None:
    fresh = rollout(step=0, weight=0, smoke="pending", analysis=None, step_started_at=T0, timeline=[])
    lines = text(render.rollout_status(fresh, now=T0 + 3)).splitlines()
    assert "smoke     running: the canary gets no traffic until they pass" in lines
    assert "analysis  none yet" in lines
    assert "canary    shop-4  0% of traffic" in lines


def test_promote_and_abort_say_where_the_traffic_is() -> None:
    assert render.rollout_outcome(rollout(state="promoted", weight=100)) == (
        "shop-4 promoted: it serves all of shop's traffic"
    )
    assert render.rollout_outcome(rollout(state="aborted", weight=0, reason="aborted by the operator")) == (
        "rollout of shop-4 aborted: shop-3 serves all of shop's traffic"
    )
    assert render.rollout_outcome(rollout(state="rolled back", weight=0, reason="canary p99 2.5s")) == (
        "rollout of shop-4 rolled back (canary p99 2.5s): shop-3 serves all of shop's traffic"
    )
    assert render.rollout_outcome(rollout()) == "rollout of shop-4 is running at 25%"


def test_a_canary_deploy_ends_on_its_first_step() -> None:
    revision = {"id": "shop-4", "app": "shop", "state": "canary"}
    assert render.canary_outcome(revision, rollout(step=0, weight=5)) == (
        "shop-4 is a canary at 5%: follow it with `clearway rollout status shop`"
    )
    assert render.canary_outcome(revision, rollout(step=0, weight=0, smoke="pending")) == (
        "shop-4 is a canary running its smoke checks (no traffic yet): follow it with `clearway rollout status shop`"
    )


def app_view(name: str, phase: str, **changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": name,
        "phase": phase,
        "active_revision": f"{name}-1" if phase not in ("none", "building") else None,
        "urls": [f"http://{name}.localhost:8080/"] if phase not in ("none", "building") else [],
        "components": [{"name": "web", "kind": "service", "desired": 2, "ready": 2}],
        "revisions": [],
        "replicas": [],
        "events": [],
        "rollout": None,
        "previews": [],
        "builds": [],
    }
    return view | changes


def test_the_apps_table_has_a_phase_column_and_the_preview_branches() -> None:
    apps = [
        app_view("shop", "canary 25%", previews=[{"branch": "feature/cart", "revision": "shop-7", "commit": "a" * 40, "state": "active", "urls": []}]),
        app_view("blog", "serving"),
        app_view("wiki", "building", components=[]),
        app_view("old", "rolled back"),
    ]
    lines = text(render.apps_table(apps)).splitlines()
    header = lines[0].split()
    assert header == ["APP", "PHASE", "REVISION", "READY", "PREVIEWS", "URL"], lines
    phase_at = lines[0].index("PHASE")
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["shop"][phase_at:].startswith("canary 25%"), lines
    assert "feature/cart" in rows["shop"] and "web 2/2" in rows["shop"], lines
    assert rows["blog"][phase_at:].startswith("serving"), lines
    assert rows["wiki"][phase_at:].split()[:3] == ["building", "-", "-"], lines
    assert rows["old"][phase_at:].startswith("rolled back"), lines
    # An older control plane without phases still gets a table.
    legacy = {k: v for k, v in app_view("blog", "serving").items() if k not in ("phase", "previews")}
    assert "blog" in text(render.apps_table([legacy]))


def test_one_app_shows_its_rollout_previews_revisions_builds_and_history() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    view = app_view(
        "shop",
        "canary 25%",
        rollout=rollout(),
        previews=[{"branch": "feature/cart", "revision": "shop-7", "commit": sha, "state": "active", "urls": ["http://feature-cart.shop.localhost:8080/"]}],
        revisions=[
            {"id": "shop-3", "phase": "serving", "state": "active", "branch": None, "commit": None, "created_at": T0, "error": None},
            {"id": "shop-4", "phase": "canary 25%", "state": "canary", "branch": None, "commit": sha, "created_at": T0 + 1, "error": None},
            {"id": "shop-7", "phase": "preview", "state": "active", "branch": "feature/cart", "commit": sha, "created_at": T0 + 2, "error": None},
            {"id": "shop-8", "phase": "failed", "state": "failed", "branch": None, "commit": None, "created_at": T0 + 3, "error": "Traceback\nImportError: no module named 'x'"},
        ],
        builds=[
            {"number": 4, "ref": "refs/heads/main", "new_sha": sha, "state": "deployed", "revision": "shop-4", "created_at": T0},
            {"number": 5, "ref": "refs/heads/feature/cart", "new_sha": sha, "state": "failed tests", "revision": None, "created_at": T0 + 5},
        ],
        events=[{"at": T0, "message": "deployed shop-3"}, {"at": T0 + 1, "message": "rollout of shop-4 started"}],
    )
    lines = text(render.app_detail(view)).splitlines()
    assert lines[0] == "shop  canary 25%  serving shop-1", lines
    assert any(line.startswith("rollout  shop-4 at 25%, step 2 of 4, beside shop-3") for line in lines), lines
    preview = next(line for line in lines if line.startswith("feature/cart"))
    assert preview.split() == ["feature/cart", "shop-7", "0123456", "active", "http://feature-cart.shop.localhost:8080/"]
    revisions = [line.split() for line in lines if line.startswith("shop-")]
    assert [r[:4] for r in revisions] == [
        ["shop-8", "failed", "-", "-"],
        ["shop-7", "preview", "feature/cart", "0123456"],
        ["shop-4", "canary", "25%", "-"],  # "canary 25%" is one cell
        ["shop-3", "serving", "-", "-"],
    ], lines
    assert "ImportError: no module named 'x'" in next(line for line in lines if line.startswith("shop-8"))
    builds = rows_after("BUILD", lines)  # newest first, the branch without refs/heads/
    assert [(b[0], b[3], b[4], b[5]) for b in builds] == [
        ("5", "feature/cart", "0123456", "failed"),
        ("4", "main", "0123456", "deployed"),
    ], lines
    assert any(line.startswith(clock(T0 + 1)) and line.endswith("rollout of shop-4 started") for line in lines), lines


# -- functions and invocations --------------------------------------------------------
def test_triggers_read_like_the_decorator() -> None:
    assert render.triggers_text({"http": "/resize", "events": [], "schedule": None}) == "http /resize"
    assert (
        render.triggers_text({"http": None, "events": ["a.b", "c.d"], "schedule": {"cron": "*/5 * * * *"}})
        == "events a.b, c.d, cron */5 * * * * (UTC)"
    )
    assert render.triggers_text({"http": None, "events": [], "schedule": {"every": 90.0}}) == "every 1m30s"
    assert render.triggers_text({"http": None, "events": [], "schedule": None}) == "spawn and internal calls only"


def test_the_functions_table_shows_replicas_invocations_and_the_next_run() -> None:
    view = {
        "app": "shop",
        "revision": "shop-2",
        "functions": [
            {
                "name": "report",
                "triggers": {"http": None, "events": [], "schedule": {"every": 60.0}},
                "next_fire": T0 + 42,
                "min_replicas": 0,
                "max_replicas": 10,
                "desired": 1,
                "ready": 1,
                "invocations": {"queued": 2, "running": 1, "succeeded": 7, "dead": 3},
                "scaling": {
                    "replicas": 1,
                    "in_flight": 4,
                    "held": 0,
                    "cold_starts": 1,
                    "decisions": [{"at": T0, "from": 0, "to": 1, "reason": "cold"}],
                },
                "last_start": {"replica": "shop-2.report.0", "how": "fork", "launch_ms": 3.14, "ready_ms": 12.0},
            }
        ],
    }
    lines = text(render.functions_table([view], now=T0)).splitlines()
    assert rows_after("FUNCTION", lines, 1) == [
        ["shop", "report", "1/1", "(min", "0,", "max", "10)", "4", "2", "1", "3", "in", "42s", "every", "1m",
         "1;", "last", "forked", "in", "3.1", "ms,", "ready", "in", "12.0", "ms", "0", "→", "1:", "cold"]
    ]
    assert render.starts_text(0, None) == "0"
    assert render.starts_text(2, {"how": "spawn", "launch_ms": 1.0, "ready_ms": 480.25}) == (
        "2; last spawned in 1.0 ms, ready in 480.2 ms"
    )


def test_invocations_show_their_attempts_and_first_error_line() -> None:
    dead = {
        "id": "abc",
        "app": "shop",
        "function": "resize",
        "kind": "spawn",
        "state": "dead",
        "attempts": 4,
        "max_attempts": 4,
        "created_at": T0,
        "finished_at": T0 + 30,
        "error": "500 Internal Server Error: boom (gave up after 4 attempts)\nmore",
        "idempotency_key": "k",
        "payload": {"width": 3},
        "result": None,
    }
    lines = text(render.invocations_table([dead])).splitlines()
    assert rows_after("ATTEMPTS", lines, 1)[0][:5] == ["abc", "resize", "spawn", "dead", "4/4"]
    assert lines[1].endswith("500 Internal Server Error: boom (gave up after 4 attempts)")
    shown = text(render.invocation_detail(dead, now=T0 + 60))
    assert "attempts    4 of 4" in shown and '{"width": 3}' in shown and "gave up after 4 attempts" in shown
