"""How the CLI shows the API's views to people.

Pure functions from the API's JSON (plain dicts, exactly what ``--json``
prints) to text and rich tables: the commands in ``cli.main`` fetch and
print, these decide what it looks like, and tests check it with dicts shaped
like the API's answers, without a platform. The clock is a parameter
(``now``) wherever the output depends on it.

Views read fields the control plane added later with ``.get`` so that a newer
CLI still shows an older control plane's answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table

from clearway.control.rollouts import format_duration

__all__ = [
    "app_detail",
    "apps_table",
    "canary_outcome",
    "event_keys_table",
    "format_duration",
    "functions_table",
    "invocation_detail",
    "invocation_state",
    "invocations_table",
    "phase_text",
    "plan_line",
    "rollout_line",
    "rollout_outcome",
    "rollout_status",
    "starts_text",
    "steps_line",
    "triggers_text",
]

View = Mapping[str, Any]

#: How each app or revision phase is coloured: at a glance, what needs a look.
_PHASE_STYLES = {
    "serving": "green",
    "building": "cyan",
    "testing": "cyan",
    "starting": "cyan",
    "preview": "blue",
    "retired": "dim",
    "none": "dim",
    "rolled back": "red",
    "failed": "red",
}


def timestamp(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at is not None else "-"


def phase_text(phase: str | None) -> str:
    """A phase ("serving", "canary 25%", "failed", ...) as rich markup, coloured by what it means."""
    if not phase:
        return "-"
    style = "yellow" if phase.startswith("canary") else _PHASE_STYLES.get(phase)
    return f"[{style}]{escape(phase)}[/]" if style else escape(phase)


# -- status ---------------------------------------------------------------------------
def apps_table(apps: Sequence[View]) -> Table:
    """``clearway status``: one row per app."""
    table = Table("APP", "PHASE", "REVISION", "READY", "PREVIEWS", box=None, pad_edge=False)
    table.add_column("URL", overflow="fold")
    for app in apps:
        ready = ", ".join(f"{c['name']} {c['ready']}/{c['desired']}" for c in app["components"]) or "-"
        previews = ", ".join(escape(str(p["branch"])) for p in app.get("previews") or []) or "-"
        table.add_row(
            escape(app["name"]),
            phase_text(app.get("phase")),
            app["active_revision"] or "-",
            ready,
            previews,
            " ".join(app["urls"]) or "-",
        )
    return table


def rollout_line(rollout: View) -> str:
    """One line about a rollout, for ``clearway status APP``."""
    steps = rollout["steps"]
    where = f"step {min(rollout['step'], len(steps) - 1) + 1} of {len(steps)}"
    if rollout["state"] == "running":
        waiting = " (smoke checks first)" if rollout.get("smoke") == "pending" else ""
        return (
            f"rollout  {rollout['canary']} at {rollout['weight']}%{waiting}, {where}, beside {rollout['stable']}; "
            f"`clearway rollout status {rollout['app']}` follows it"
        )
    return f"rollout  {rollout['canary']} {rollout['state']}" + (f": {rollout['reason']}" if rollout.get("reason") else "")


def app_detail(view: View) -> Group:
    """``clearway status APP``: phase, URLs, components, replicas, rollout, previews,
    revisions, the latest builds and the history."""
    parts: list[RenderableType] = []
    serving = view["active_revision"] or "nothing yet"
    parts.append(f"[bold]{escape(view['name'])}[/]  {phase_text(view.get('phase'))}  serving {serving}")
    parts.extend(f"  {escape(url)}" for url in view["urls"])
    if view.get("rollout"):
        parts.append(escape(rollout_line(view["rollout"])))
    comps = Table("COMPONENT", "KIND", "READY", box=None, pad_edge=False)
    for comp in view["components"]:
        comps.add_row(comp["name"], comp["kind"], f"{comp['ready']}/{comp['desired']}")
    parts.append(comps)
    reps = Table("REPLICA", "STATE", "PID", "ENDPOINT", "RESTARTS", box=None, pad_edge=False)
    for rep in view["replicas"]:
        reps.add_row(rep["id"], rep["state"], str(rep["pid"] or "-"), rep["endpoint"] or "-", str(rep["restarts"]))
    parts.append(reps)
    locks = view.get("locks") or []
    if locks:
        held = Table("LOCK", "HOLDER", "TOKEN", box=None, pad_edge=False)
        # Numbered parts in number order (shard 2 before shard 10).
        def order(lock: dict[str, Any]) -> list[tuple[int, int, str]]:
            return [(0, int(p), "") if p.isdecimal() else (1, 0, p) for p in str(lock["lock"]).split("/")]

        for lock in sorted(locks, key=order):
            name = str(lock["lock"])
            if name.startswith("singleton/"):
                name = f"{name.removeprefix('singleton/')} (singleton leader)"
            elif name.startswith("shards/") and name.count("/") >= 3:
                _, worker, what, part = name.split("/", 3)
                name = f"{worker} shard {part}" if what == "shard" else f"{worker} shards member" if what == "members" else name
            held.add_row(escape(name), escape(str(lock["replica"])), str(lock["token"]))
        parts.append(held)
    previews = view.get("previews") or []
    if previews:
        table = Table("PREVIEW", "REVISION", "COMMIT", "STATE", box=None, pad_edge=False)
        table.add_column("URL", overflow="fold")
        for preview in previews:
            table.add_row(
                escape(str(preview["branch"])),
                preview["revision"] or "-",
                (preview.get("commit") or "-")[:7],
                phase_text(preview["state"]),
                " ".join(preview.get("urls") or []) or "-",
            )
        parts.append(table)
    revs = Table("REVISION", "PHASE", "BRANCH", "COMMIT", "CREATED", box=None, pad_edge=False)
    revs.add_column("NOTE", overflow="fold")
    for rev in reversed(view["revisions"][-10:]):
        note = (rev.get("error") or "").strip().splitlines()
        revs.add_row(
            rev["id"],
            phase_text(rev.get("phase") or rev["state"]),
            escape(rev.get("branch") or "-"),
            (rev.get("commit") or "-")[:7],
            timestamp(rev["created_at"]),
            escape(note[-1]) if note else "",
        )
    parts.append(revs)
    builds = view.get("builds") or []
    branch = view.get("production_branch") or "main"
    if builds or branch != "main":
        parts.append(f"pushes to {escape(branch)} go to production; other branches make previews")
    if builds:
        table = Table("BUILD", "STARTED", "REF", "COMMIT", "STATUS", "REVISION", box=None, pad_edge=False)
        for build in sorted(builds, key=lambda b: int(b["number"]), reverse=True):
            table.add_row(
                str(build["number"]),
                timestamp(build["created_at"]),
                escape(str(build["ref"]).removeprefix("refs/heads/")),
                str(build["new_sha"])[:7],
                escape(build["state"]),
                build["revision"] or "-",
            )
        parts.append(table)
    events = view.get("events") or []
    if events:
        history = Table("TIME", box=None, pad_edge=False)
        history.add_column("HISTORY", overflow="fold")
        for event in events:
            history.add_row(timestamp(event["at"]), escape(event["message"]))
        parts.append(history)
    return Group(*parts)


# -- rollouts -------------------------------------------------------------------------
def steps_line(steps: Sequence[int], step: int, state: str) -> str:
    """``5% ✓ → 25% ← now → 50% → 100%``: the steps passed, the current one, the rest.

    A promoted rollout passed them all; one that ended otherwise shows ✗ on
    the step it ended in.
    """
    marked = []
    for index, weight in enumerate(steps):
        if state == "promoted" or index < step:
            marked.append(f"{weight}% ✓")
        elif index == step:
            marked.append(f"{weight}% ← now" if state == "running" else f"{weight}% ✗")
        else:
            marked.append(f"{weight}%")
    return " → ".join(marked)


def plan_line(canary: View) -> str:
    """What a canary deploy will do, from the deploy answer's ``canary`` plan."""
    steps = " → ".join(f"{s}%" for s in canary["steps"])
    checks = canary.get("smoke_checks") or []
    smoke = f"{len(checks)} smoke check{'s' if len(checks) != 1 else ''} first, then " if checks else ""
    sticky = "; each browser stays on one side (sticky)" if canary.get("sticky") else ""
    return (
        f"canary rollout: {smoke}{steps}, each step at least {format_duration(canary['min_duration'])} "
        f"and {canary['min_requests']} requests; promotes in {format_duration(canary['minimum_seconds'])} "
        f"at the earliest{sticky}"
    )


def canary_outcome(revision: View, rollout: View | None) -> str:
    """What a ``deploy --canary`` that stopped waiting left: a canary on its first step."""
    app = revision["app"]
    if rollout is not None and rollout.get("smoke") == "pending":
        where = "running its smoke checks (no traffic yet)"
    elif rollout is not None:
        where = f"at {rollout['weight']}%"
    else:
        where = "started"
    return f"{revision['id']} is a canary {where}: follow it with `clearway rollout status {app}`"


def rollout_outcome(rollout: View) -> str:
    """After ``clearway rollout promote|abort``: where the traffic is now."""
    state = rollout["state"]
    if state == "promoted":
        return f"{rollout['canary']} promoted: it serves all of {rollout['app']}'s traffic"
    if state in ("aborted", "rolled back"):
        # An abort is the operator's own doing; a roll back (the analysis won the race) says why.
        why = f" ({rollout['reason']})" if state == "rolled back" and rollout.get("reason") else ""
        return f"rollout of {rollout['canary']} {state}{why}: {rollout['stable']} serves all of {rollout['app']}'s traffic"
    return f"rollout of {rollout['canary']} is {state} at {rollout['weight']}%"


_SMOKE = {
    "none": "none declared",
    "pending": "running: the canary gets no traffic until they pass",
    "passed": "passed",
}


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _figures(analysis: View) -> Table:
    table = Table("", "REQUESTS", "ERRORS", "SUCCESS", "P99", box=None, pad_edge=False)
    for side in ("canary", "stable"):
        figures = analysis.get(side)
        if figures is None:
            table.add_row(side, "-", "-", "-", "-")
        else:
            table.add_row(
                side,
                str(figures["requests"]),
                str(figures["errors"]),
                _percent(figures["success_rate"]),
                _latency(figures["p99"]),
            )
    return table


def rollout_status(rollout: View, *, now: float) -> Group:
    """``clearway rollout status APP``: revisions, steps, the time in the step, the
    latest analysis, the smoke checks and the timeline."""
    state = rollout["state"]
    running = state == "running"
    style = {"running": "yellow", "promoted": "green"}.get(state, "red")
    parts: list[RenderableType] = []
    header = f"[bold]{escape(rollout['app'])}[/] rollout #{rollout['id']}: [{style}]{escape(state)}[/]"
    if rollout.get("reason"):
        header += f" ({escape(rollout['reason'])})"
    parts.append(header)
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("canary", f"{rollout['canary']}  {rollout['weight']}% of traffic")
    facts.add_row("stable", rollout["stable"])
    facts.add_row("steps", steps_line(rollout["steps"], rollout["step"], state))
    policy = rollout.get("policy") or {}
    if running:
        in_step = format_duration(max(0.0, now - rollout["step_started_at"]))
        need = []
        if "min_duration" in policy:
            need.append(f"at least {format_duration(policy['min_duration'])}")
        if "min_requests" in policy:
            need.append(f"{policy['min_requests']} requests")
        facts.add_row("in step", in_step + (f" (needs {' and '.join(need)})" if need else ""))
        ago = format_duration(max(0.0, now - rollout["started_at"]))
        facts.add_row("started", f"{timestamp(rollout['started_at'])}, {ago} ago")
    else:
        finished = rollout.get("finished_at")
        took = f" after {format_duration(finished - rollout['started_at'])}" if finished is not None else ""
        facts.add_row("finished", f"{timestamp(finished)}{took}")
    facts.add_row("smoke", _SMOKE.get(rollout.get("smoke") or "none", escape(str(rollout.get("smoke")))))
    analysis = rollout.get("analysis")
    if analysis:
        outcome = analysis["outcome"]
        colour = {"pass": "green", "fail": "red"}.get(outcome, "yellow")
        facts.add_row("analysis", f"[{colour}]{escape(outcome)}[/]: {escape(analysis['reason'])}")
    else:
        facts.add_row("analysis", "[dim]none yet[/]")
    parts.append(facts)
    if analysis:
        parts.append(_figures(analysis))
    timeline = Table("TIME", "EVENT", box=None, pad_edge=False)
    timeline.add_column("DETAIL", overflow="fold")
    for entry in rollout.get("timeline") or []:
        timeline.add_row(timestamp(entry["at"]), escape(entry["event"]), escape(entry.get("detail") or ""))
    parts.append(timeline)
    return Group(*parts)


# -- functions and invocations ------------------------------------------------------
_INVOCATION_STYLES = {"queued": "cyan", "running": "yellow", "succeeded": "green", "dead": "red"}


def triggers_text(triggers: View) -> str:
    """``http /resize, events com.x.y, cron */5 * * * *``: how a function gets called."""
    parts = []
    if triggers.get("http"):
        parts.append(f"http {triggers['http']}")
    if triggers.get("events"):
        parts.append("events " + ", ".join(triggers["events"]))
    schedule = triggers.get("schedule") or {}
    if schedule.get("cron"):
        parts.append(f"cron {schedule['cron']} (UTC)")
    elif schedule.get("every") is not None:
        parts.append(f"every {format_duration(float(schedule['every']))}")
    return ", ".join(parts) or "spawn and internal calls only"


def starts_text(cold_starts: int, last: View | None) -> str:
    """``2; last forked in 3.1 ms, ready in 12.0 ms``: cold starts and the newest start-up."""
    text = str(cold_starts)
    if last:
        how = "forked" if last.get("how") == "fork" else "spawned"
        text += f"; last {how} in {last.get('launch_ms') or 0:.1f} ms, ready in {last.get('ready_ms') or 0:.1f} ms"
    return text


def functions_table(views: Sequence[View], *, now: float) -> Table:
    """``clearway functions``: one row per function of the apps' serving revisions
    (``views``: the API's ``GET /v1/apps/{name}/functions`` answers)."""
    table = Table(
        "APP", "FUNCTION", "READY", "IN FLIGHT", "QUEUED", "RUNNING", "DEAD", "NEXT RUN", box=None, pad_edge=False
    )
    table.add_column("TRIGGERS", overflow="fold")
    table.add_column("COLD STARTS", overflow="fold")
    table.add_column("LAST SCALE", overflow="fold")
    for view in views:
        for fn in view["functions"]:
            scaling = fn.get("scaling") or {}
            decisions = scaling.get("decisions") or []
            last = decisions[-1] if decisions else None
            counts = fn.get("invocations") or {}
            dead = int(counts.get("dead", 0))
            upcoming = fn.get("next_fire")
            table.add_row(
                escape(view["app"]),
                escape(fn["name"]),
                f"{fn.get('ready', 0)}/{fn.get('desired', 0)} (min {fn['min_replicas']}, max {fn['max_replicas']})",
                str(scaling.get("in_flight", 0)),
                str(counts.get("queued", 0)),
                str(counts.get("running", 0)),
                f"[red]{dead}[/]" if dead else "0",
                f"in {format_duration(max(0.0, upcoming - now))}" if upcoming is not None else "-",
                escape(triggers_text(fn["triggers"])),
                escape(starts_text(int(scaling.get("cold_starts") or 0), fn.get("last_start"))),
                escape(f"{last['from']} → {last['to']}: {last['reason']}") if last else "-",
            )
    return table


def invocation_state(state: str) -> str:
    style = _INVOCATION_STYLES.get(state)
    return f"[{style}]{escape(state)}[/]" if style else escape(state)


def invocations_table(invocations: Sequence[View]) -> Table:
    """``clearway invocations APP``: the newest first, with the error of each failure."""
    table = Table("ID", "FUNCTION", "KIND", "STATE", "ATTEMPTS", "CREATED", box=None, pad_edge=False)
    table.add_column("ERROR", overflow="fold")
    for inv in invocations:
        table.add_row(
            inv["id"],
            escape(inv["function"]),
            inv["kind"],
            invocation_state(inv["state"]),
            f"{inv['attempts']}/{inv['max_attempts']}",
            timestamp(inv["created_at"]),
            escape((inv.get("error") or "").splitlines()[0]) if inv.get("error") else "",
        )
    return table


def event_keys_table(keys: Sequence[View]) -> Table:
    """``clearway events keys APP``: the app's event keys, oldest first (no secrets in them)."""
    table = Table("ID", "NAME", "CREATED", "LAST USED", box=None, pad_edge=False)
    for key in keys:
        used = key.get("last_used_at")
        table.add_row(
            key["id"], escape(key["name"]), timestamp(key["created_at"]), timestamp(used) if used is not None else "[dim]never[/]"
        )
    return table


def invocation_detail(inv: View, *, now: float) -> Table:
    """``clearway invocations show ID``: one invocation, its payload and outcome."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    facts.add_row("invocation", f"{inv['id']}  {escape(inv['app'])}/{escape(inv['function'])} ({inv['kind']})")
    facts.add_row("state", invocation_state(inv["state"]))
    facts.add_row("attempts", f"{inv['attempts']} of {inv['max_attempts']}")
    if inv.get("idempotency_key"):
        facts.add_row("key", escape(inv["idempotency_key"]))
    facts.add_row("created", timestamp(inv["created_at"]))
    if inv["state"] == "queued" and inv.get("next_attempt_at") is not None:
        facts.add_row("next attempt", f"in {format_duration(max(0.0, inv['next_attempt_at'] - now))}")
    if inv.get("finished_at") is not None:
        facts.add_row("finished", timestamp(inv["finished_at"]))
    if inv.get("error"):
        facts.add_row("error", escape(inv["error"]))
    if inv["state"] == "succeeded":
        facts.add_row("result", escape(json.dumps(inv.get("result"))))
    if "payload" in inv:
        facts.add_row("payload", escape(json.dumps(inv["payload"])))
    return facts
