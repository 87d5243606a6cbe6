"""``clearway``: the command line.

Read commands take ``--json`` and then print exactly the API's JSON; otherwise
they print tables for people. Long steps show progress. Every error is printed
as one red line saying what to do, plus details (a traceback) when there are
some, and the exit status is 1 (2 for wrong usage).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from clearway.cli import render
from clearway.cli.client import Client
from clearway.cli.packaging import pack
from clearway.control.home import Home
from clearway.control.uploads import ENV_KEY
from clearway.exceptions import APIError, AppLoadError, ClearwayError, DeployError, SpecError
from clearway.runtime.process import is_alive

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: How long ``up --detach`` waits for the control plane to answer.
UP_TIMEOUT = 60.0


def fail(message: str, details: str | None = None) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", markup=True)
    if details:
        err.print(details.rstrip(), markup=False)
    raise SystemExit(1)


def run_command(func: Callable[..., None]) -> Callable[..., None]:
    """Turn clearway errors into a clean message and exit status 1."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except APIError as exc:
            fail(exc.message, exc.details)
        except (DeployError, AppLoadError) as exc:
            fail(exc.message, exc.details)
        except ClearwayError as exc:
            fail(str(exc))

    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def home_of(ctx: click.Context) -> Home:
    return Home.from_env(ctx.obj.get("home") if ctx.obj else None)


def client_of(ctx: click.Context) -> Client:
    return Client(home_of(ctx))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), envvar="CLEARWAY_HOME", help="Platform state directory (default ~/.clearway).")
@click.version_option(package_name="clearway")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """clearway: describe your app in Python; the platform runs it."""
    ctx.obj = {"home": home}


# -- platform -------------------------------------------------------------------
@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), help="Gateway port (default 8080, or as last time).")
@click.option("--host", help="Gateway address to listen on (default 127.0.0.1).")
@click.option("--domain", "domains", multiple=True, help="Domain apps are served under (repeatable; default localhost).")
@click.option("--api-port", type=click.IntRange(0, 65535), help="Control-plane API port (default: a free one, kept across restarts).")
@click.option("--keep-revisions", type=click.IntRange(1, 10_000), help="Revisions per app whose code and environment are kept for rollback (default 10, or as last time).")
@click.option(
    "--coordination",
    metavar="embedded|etcd://HOST:PORT",
    help="Where locks and leases live: the control plane itself (default) or an etcd server.",
)
@click.option(
    "--gateway-workers",
    type=click.IntRange(1, 256),
    help="Gateway worker processes (default: the number of cores, or as last time).",
)
@click.option("--detach", "-d", is_flag=True, help="Run in the background and return once it answers.")
@click.pass_context
@run_command
def up(
    ctx: click.Context,
    port: int | None,
    host: str | None,
    domains: tuple[str, ...],
    api_port: int | None,
    keep_revisions: int | None,
    coordination: str | None,
    gateway_workers: int | None,
    detach: bool,
) -> None:
    """Start the platform: control plane + gateway (adopting running apps)."""
    from clearway.control.server import Settings, run_foreground

    home = home_of(ctx)
    settings = Settings(
        port=port,
        host=host,
        api_port=api_port,
        domains=domains or None,
        keep_revisions=keep_revisions,
        coordination=coordination,
        gateway_workers=gateway_workers,
    )
    if not detach:
        run_foreground(home.root, settings)
        return
    info = home.control_info()
    if info and _answers(home):
        out.print(f"clearway is already running (pid {info['pid']}); API {info['api_url']}")
        return
    home.create()
    args = [sys.executable, "-m", "clearway.cli.main", "--home", str(home.root), "up"]
    for flag, value in (
        ("--port", port),
        ("--host", host),
        ("--api-port", api_port),
        ("--keep-revisions", keep_revisions),
        ("--coordination", coordination),
        ("--gateway-workers", gateway_workers),
    ):
        if value is not None:
            args += [flag, str(value)]
    for domain in domains:
        args += ["--domain", domain]
    log_path = home.logs / "control.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT
    with err.status("starting the control plane and the gateway…"):
        while True:
            code = proc.poll()
            if code is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                errors = [line for line in tail if "error:" in line]
                fail(
                    errors[-1].split("error:", 1)[1].strip() if errors else f"the control plane exited with code {code}",
                    None if errors else "\n".join(tail),
                )
            info = home.control_info()
            if info and info.get("pid") == proc.pid and _answers(home):
                break
            if time.monotonic() > deadline:
                fail(f"the control plane did not answer within {UP_TIMEOUT:.0f}s; see {log_path}")
            time.sleep(0.1)
    assert info is not None
    out.print(f"[green]clearway is up[/] (pid {info['pid']})")
    out.print(f"  gateway  http://*.{info['domains'][0]}:{info['gateway_port']}/")
    out.print(f"  API      {info['api_url']}  (token in {home.token_path})")
    out.print(f"  logs     {log_path}")


def _answers(home: Home) -> bool:
    try:
        client = Client(home, timeout=2.0)
        client.request("GET", "/v1/health")
        client.close()
    except ClearwayError:
        return False
    return True


@cli.command()
@click.pass_context
@run_command
def down(ctx: click.Context) -> None:
    """Stop every app, the gateway and the control plane."""
    home = home_of(ctx)
    client = Client(home)
    pid = int(client.info["pid"])
    client.request("POST", "/v1/shutdown")
    with err.status("stopping apps and the platform…"):
        deadline = time.monotonic() + 120
        while is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if is_alive(pid):
        fail(f"the control plane (pid {pid}) is still running after 120s; `kill {pid}` stops it")
    out.print("clearway is down")


# -- apps -------------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default=".")
@click.option("--file", "app_file", help="The app file inside PATH (default app.py).")
@click.option("--env", "-e", "env", multiple=True, metavar="KEY=VALUE", help="Environment for this revision (repeatable).")
@click.option("--canary", is_flag=True, help="Go out as a canary rollout (the app's canary policy) beside the serving revision.")
@click.option("--no-wait", is_flag=True, help="Return once the revision is accepted.")
@click.option("--json", "as_json", is_flag=True, help="Print the revision as JSON.")
@click.pass_context
@run_command
def deploy(
    ctx: click.Context, path: Path, app_file: str | None, env: tuple[str, ...], canary: bool, no_wait: bool, as_json: bool
) -> None:
    """Deploy the app in PATH as a new revision; waits until it serves.

    With --canary it waits until the new revision gets its first share of
    traffic; `clearway rollout status APP` follows the rest.
    """
    path = path.resolve()
    if not path.exists():
        fail(f"{path} does not exist: pass the directory of your project (it holds app.py)")
    if path.is_file():
        root, app_file = path.parent, path.name
    else:
        root, app_file = path, app_file or "app.py"
        if not (root / app_file).is_file():
            fail(f"no {app_file} in {root}: create it (`app = clearway.App(\"name\")`), or name the file with --file")
    for index, item in enumerate(env, start=1):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--env #{index} has no '=': write it as KEY=VALUE")
        if not ENV_KEY.fullmatch(key):
            fail(f"--env key {key[:64]!r} is not a valid variable name: use letters, digits and '_', not starting with a digit")
        if "\0" in value:
            fail(f"--env {key}: the value contains a NUL byte")
    client = client_of(ctx)
    params: dict[str, Any] = {"app_file": app_file, "env": list(env)}
    if canary:
        params["canary"] = "true"
    with err.status(f"uploading {root.name} and preparing its environment…"):
        archive = pack(root)
        accepted = client.request(
            "POST",
            "/v1/deploy",
            params=params,
            content=archive,
            headers={"content-type": "application/gzip"},
            # Resolving and downloading a new dependency set can take minutes.
            timeout=900,
        )
    err.print(f"revision [bold]{accepted['revision']}[/] accepted", markup=True)
    if accepted.get("environment"):
        err.print(f"  {accepted['environment']['log']}", markup=False)
    if accepted.get("canary"):
        err.print(render.plan_line(accepted["canary"]), markup=False)
    if no_wait:
        if as_json:
            print_json(accepted)
        return
    revision = wait_for_revision(client, accepted["revision"])
    app = client.request("GET", f"/v1/apps/{revision['app']}")
    if as_json:
        print_json({"revision": revision, "urls": app["urls"], "rollout": app.get("rollout")})
        return
    print_serving(revision, app.get("rollout"), canary=canary)
    for url in app["urls"]:
        out.print(f"  {url}")


def print_serving(revision: dict[str, Any], rollout: dict[str, Any] | None, *, canary: bool) -> None:
    """The last line of a command that waited for a new revision: serving, or a canary's first step."""
    if revision["state"] == "canary":
        out.print(f"[green]✓[/] {rich_escape(render.canary_outcome(revision, rollout))}", markup=True)
    elif canary:
        out.print(f"[green]✓[/] {revision['id']} is serving (no stable revision to compare it with: served directly)")
    else:
        out.print(f"[green]✓[/] {revision['id']} is serving")


def wait_for_canary(client: Client, rev_id: str) -> None:
    """Wait for a canary revision and say where its rollout is."""
    revision = wait_for_revision(client, rev_id)
    app = client.request("GET", f"/v1/apps/{revision['app']}")
    print_serving(revision, app.get("rollout"), canary=True)


def wait_for_revision(client: Client, rev_id: str) -> dict[str, Any]:
    """Wait until the revision serves: ``active``, or ``canary`` (its rollout's first share)."""
    with err.status(f"starting {rev_id}…") as status:
        while True:
            revision: dict[str, Any] = client.request("GET", f"/v1/revisions/{rev_id}")
            state = revision["state"]
            if state in ("active", "canary"):
                return revision
            if state == "rolled back":
                raise DeployError(
                    f"{rev_id} was rolled back; the previous revision keeps serving all traffic. "
                    f"`clearway rollout status {revision['app']}` shows why.",
                    details=revision.get("error"),
                )
            if state in ("failed", "retired"):
                raise DeployError(
                    f"{rev_id} did not start; the previous revision (if any) keeps serving. "
                    "Fix the error below and deploy again.",
                    details=revision.get("error"),
                )
            if revision.get("platform_error"):
                # The platform cannot move any revision on (a full disk): say so
                # rather than wait for a state change that cannot be recorded.
                raise DeployError(
                    f"{rev_id} cannot make progress: {revision['platform_error']}",
                    details="the previous revision (if any) keeps serving; deploy again once this is fixed",
                )
            progress = ", ".join(f"{n} {c['ready']}/{c['desired']}" for n, c in revision["components"].items())
            status.update(f"starting {rev_id}… {progress}")
            time.sleep(0.2)


@cli.command()
@click.argument("app", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def status(ctx: click.Context, app: str | None, as_json: bool) -> None:
    """Show all apps (phase, readiness, previews), or one app's components,
    replicas, rollout, previews, revisions, latest builds and history."""
    client = client_of(ctx)
    if app is None:
        apps = client.request("GET", "/v1/apps")
        if as_json:
            print_json(apps)
            return
        if not apps:
            out.print("no apps yet: `clearway deploy PATH` deploys one")
            return
        out.print(render.apps_table(apps))
        return
    view = client.request("GET", f"/v1/apps/{app}")
    if as_json:
        print_json(view)
        return
    out.print(render.app_detail(view))


@cli.command()
@click.argument("app")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
@click.option("--tail", "-n", type=click.IntRange(0, 100_000), default=100, show_default=True, help="Lines of history per replica.")
@click.option("--component", "-c", help="Only this component's replicas.")
@click.option("--revision", "-r", help="Only this revision's replicas.")
@click.option("--json", "as_json", is_flag=True, help='One JSON object a line: {"replica": ..., "line": ...}.')
@click.pass_context
@run_command
def logs(
    ctx: click.Context, app: str, follow: bool, tail: int, component: str | None, revision: str | None, as_json: bool
) -> None:
    """Print an app's replica logs."""
    client = client_of(ctx)
    params: dict[str, Any] = {"follow": follow, "tail": tail}
    if component:
        params["component"] = component
    if revision:
        params["revision"] = revision
    try:
        for line in client.stream_lines(f"/v1/apps/{app}/logs", params):
            if as_json:
                replica, _, text = line.partition("] ")
                sys.stdout.write(json.dumps({"replica": replica.lstrip("["), "line": text}) + "\n")
                sys.stdout.flush()
            else:
                out.print(line, markup=False)
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("app")
@click.argument("component", metavar="COMPONENT[=N]")
@click.argument("replicas", type=click.IntRange(0, 1000), required=False)
@click.option("--previews", is_flag=True, help="Set it for every preview of APP instead (default 1 each).")
@click.pass_context
@run_command
def scale(ctx: click.Context, app: str, component: str, replicas: int | None, previews: bool) -> None:
    """Set how many replicas COMPONENT of APP runs (kept across deploys).

    \b
    clearway scale shop web 3              production
    clearway scale shop web=2 --previews   every preview branch
    """
    name, sep, count = component.partition("=")
    if sep:
        if replicas is not None:
            raise click.UsageError(f"give the replicas once: `clearway scale {app} {name}={count}` or `clearway scale {app} {name} {count}`")
        if not count.isdigit() or not 0 <= int(count) <= 1000:
            raise click.UsageError(f"{component!r}: the replicas must be a whole number from 0 to 1000, as in {name}=2")
        component, replicas = name, int(count)
    if replicas is None:
        raise click.UsageError(f"how many replicas? `clearway scale {app} {component} N` (or {component}=N)")
    client = client_of(ctx)
    body: dict[str, Any] = {"component": component, "replicas": replicas}
    if previews:
        body["previews"] = True
    client.request("POST", f"/v1/apps/{app}/scale", json=body)
    if previews:
        # Previews come and go with their branches: nothing to wait for here.
        out.print(f"[green]✓[/] {app}/{component}: {replicas} replicas in each preview")
        return
    with err.status(f"scaling {app}/{component} to {replicas}…"):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            view = client.request("GET", f"/v1/apps/{app}")
            comp = next((c for c in view["components"] if c["name"] == component), None)
            if comp is None or comp["ready"] == replicas:
                break
            time.sleep(0.2)
        else:
            fail(f"{app}/{component} did not reach {replicas} ready replicas within 120s; `clearway status {app}` shows why")
    out.print(f"[green]✓[/] {app}/{component}: {replicas} replicas")


@cli.command()
@click.argument("app")
@click.option("--to", "revision", help="Revision to bring back (id or number; default: the previous one).")
@click.pass_context
@run_command
def rollback(ctx: click.Context, app: str, revision: str | None) -> None:
    """Serve an earlier revision again (its code, spec and environment)."""
    client = client_of(ctx)
    accepted = client.request("POST", f"/v1/apps/{app}/rollback", json={"revision": revision})
    wait_for_revision(client, accepted["revision"])
    out.print(f"[green]✓[/] {app} is serving {accepted['revision']} again")


@cli.command()
@click.argument("app")
@click.option("--canary", is_flag=True, help="Go out as a canary rollout (the app's canary policy), as deploy --canary does.")
@click.option("--no-wait", is_flag=True, help="Return once the new revision is accepted.")
@click.pass_context
@run_command
def restart(ctx: click.Context, app: str, canary: bool, no_wait: bool) -> None:
    """Replace every replica of APP with a fresh process, without downtime.

    A new revision of the same code starts beside the serving one and takes the
    traffic once ready, as a deploy does; the old replicas then drain.
    """
    client = client_of(ctx)
    accepted = client.request("POST", f"/v1/apps/{app}/restart", json={"canary": canary})
    err.print(f"revision [bold]{accepted['revision']}[/] accepted: the same code as {accepted['restarts']}", markup=True)
    if accepted.get("canary"):
        err.print(render.plan_line(accepted["canary"]), markup=False)
    if no_wait:
        return
    if canary:
        wait_for_canary(client, accepted["revision"])
        return
    wait_for_revision(client, accepted["revision"])
    out.print(f"[green]✓[/] {app} restarted: {accepted['revision']} replaces {accepted['restarts']} (same code)")


@cli.group()
def rollout() -> None:
    """Canary rollouts: a new revision earns its traffic step by step.

    \b
    clearway deploy --canary PATH       start one (every git push to production does)
    clearway rollout status APP         steps, analysis, smoke checks, timeline
    clearway rollout promote APP        skip the remaining steps: it serves all traffic
    clearway rollout abort APP          send all traffic back to the stable revision
    """


@rollout.command("status")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (the current rollout and the history).")
@click.pass_context
@run_command
def rollout_status(ctx: click.Context, app: str, as_json: bool) -> None:
    """Show APP's rollout: the running one, or else the last one."""
    found = client_of(ctx).request("GET", f"/v1/apps/{app}/rollout")
    if as_json:
        print_json(found)
        return
    shown = found["current"] or max(found["history"], key=lambda r: r["started_at"], default=None)
    if shown is None:
        out.print(f"{app} has had no rollout: `clearway deploy --canary` (or a git push) starts one")
        return
    if found["current"] is None:
        out.print("[dim]no rollout is running; the last one:[/]", markup=True)
    out.print(render.rollout_status(shown, now=time.time()))


@rollout.command("promote")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
@click.pass_context
@run_command
def rollout_promote(ctx: click.Context, app: str, as_json: bool) -> None:
    """Promote APP's canary now: it serves all traffic, the stable revision retires."""
    _end_rollout(ctx, app, "promote", as_json=as_json)


@rollout.command("abort")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
@click.pass_context
@run_command
def rollout_abort(ctx: click.Context, app: str, as_json: bool) -> None:
    """Abort APP's rollout now: all traffic goes back to the stable revision."""
    _end_rollout(ctx, app, "abort", as_json=as_json)


def _end_rollout(ctx: click.Context, app: str, action: str, *, as_json: bool) -> None:
    ended = client_of(ctx).request("POST", f"/v1/apps/{app}/rollout/{action}")
    if as_json:
        print_json(ended)
        return
    mark = "[green]✓[/]" if ended["state"] in ("promoted", "aborted") else "[yellow]![/]"
    out.print(f"{mark} {rich_escape(render.rollout_outcome(ended))}", markup=True)


@cli.command()
@click.argument("app")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@run_command
def destroy(ctx: click.Context, app: str, yes: bool) -> None:
    """Stop an app and forget it (its revisions too)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"destroy {app} and all its revisions?", abort=True)
    client_of(ctx).request("DELETE", f"/v1/apps/{app}")
    out.print(f"{app} destroyed")


class _DefaultGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to ``default``:
    ``clearway config APP`` is ``clearway config show APP``."""

    default = ""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = [self.default, *args]
        return super().parse_args(ctx, args)


class _ConfigGroup(_DefaultGroup):
    default = "show"


@cli.group(cls=_ConfigGroup)
def config() -> None:
    """An app's configuration and secrets, kept across deploys.

    \b
    clearway config APP                          list it (secrets show as (secret))
    clearway config set APP KEY=VALUE... [--secret]
    clearway config unset APP KEY...

    A change restarts the serving code as a new revision (zero downtime), and
    every later deploy gets it; a deploy's --env overrides it. With --preview
    each command works on the configuration of the app's previews (every
    pushed branch but production) instead: test databases, sandbox keys.
    """


_PREVIEW = click.option("--preview", is_flag=True, help="The previews' configuration, not production's.")
_CANARY = click.option(
    "--canary", is_flag=True, help="The new revision goes out as a canary rollout, as deploy --canary does."
)


def _scope(preview: bool) -> dict[str, str]:
    return {"scope": "preview"} if preview else {}


@config.command("show")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (secrets' values are null).")
@_PREVIEW
@click.pass_context
@run_command
def config_show(ctx: click.Context, app: str, as_json: bool, preview: bool) -> None:
    """List APP's configuration; secret values are never shown."""
    view = client_of(ctx).request("GET", f"/v1/apps/{app}/config", params=_scope(preview))
    if as_json:
        print_json(view)
        return
    if not view["config"]:
        which, flag = ("preview configuration", " --preview") if preview else ("configuration", "")
        out.print(f"{app} has no {which}: `clearway config set {app} KEY=VALUE{flag}` adds some")
        return
    table = Table("KEY", box=None, pad_edge=False)
    table.add_column("VALUE", overflow="fold")
    for entry in view["config"]:
        if entry["secret"]:
            table.add_row(entry["key"], "[dim](secret)[/]")
        else:
            table.add_row(entry["key"], rich_escape(entry["value"]))
    out.print(table)


@config.command("set")
@click.argument("app")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--secret", is_flag=True, help="Values never shown again (by config, status, the API or the audit log).")
@click.option("--no-wait", is_flag=True, help="Return once the new revision is accepted.")
@_PREVIEW
@_CANARY
@click.pass_context
@run_command
def config_set(
    ctx: click.Context, app: str, pairs: tuple[str, ...], secret: bool, no_wait: bool, preview: bool, canary: bool
) -> None:
    """Set configuration of APP; its serving code restarts with it."""
    values: dict[str, str] = {}
    for index, item in enumerate(pairs, start=1):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"argument #{index} has no '=': write it as KEY=VALUE")
        values[key] = value
    _change_config(ctx, app, {"set": values, "secret": secret, "canary": canary}, no_wait=no_wait, preview=preview)


@config.command("unset")
@click.argument("app")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@click.option("--no-wait", is_flag=True, help="Return once the new revision is accepted.")
@_PREVIEW
@_CANARY
@click.pass_context
@run_command
def config_unset(ctx: click.Context, app: str, keys: tuple[str, ...], no_wait: bool, preview: bool, canary: bool) -> None:
    """Remove configuration of APP; its serving code restarts without it."""
    _change_config(ctx, app, {"unset": list(keys), "canary": canary}, no_wait=no_wait, preview=preview)


def _change_config(ctx: click.Context, app: str, change: dict[str, Any], *, no_wait: bool, preview: bool) -> None:
    """Send the change (the API checks it) and wait for the revision it makes; never prints a value."""
    client = client_of(ctx)
    result = client.request("POST", f"/v1/apps/{app}/config", json=change, params=_scope(preview))
    done = "; ".join(
        part
        for part in (
            f"set {', '.join(result['set'])}" + (" (secret)" if change.get("secret") else "") if result["set"] else "",
            f"unset {', '.join(result['unset'])}" if result["unset"] else "",
        )
        if part
    )
    err.print(f"{app}{' previews' if preview else ''}: {done}", markup=False)
    if result.get("shadowed"):
        err.print(
            f"[yellow]note:[/] the serving deploy's --env still overrides {', '.join(result['shadowed'])}; "
            "deploy without it for the configuration to apply",
            markup=True,
        )
    # Production makes one revision; a preview change restarts every running preview.
    made: list[str] = result.get("revisions") or ([result["revision"]] if result["revision"] else [])
    if not made:
        if preview:
            out.print(f"stored; {app} has no running preview: the next push of a branch uses it")
        else:
            out.print(f"stored; {app} has no serving revision: the next `clearway deploy` uses it")
        return
    err.print(f"revision{'s' if len(made) > 1 else ''} [bold]{', '.join(made)}[/] accepted", markup=True)
    if result.get("canary"):
        err.print(render.plan_line(result["canary"]), markup=False)
    if no_wait:
        return
    if change.get("canary"):
        wait_for_canary(client, made[0])
        return
    for rev_id in made:
        wait_for_revision(client, rev_id)
        out.print(f"[green]✓[/] {rev_id} is serving")


@cli.command()
@click.argument("app")
@click.option("--log", "number", type=int, metavar="N", help="Print the output of build N.")
@click.option("--limit", "-n", type=click.IntRange(1, 1000), default=20, show_default=True, help="How many of the newest builds.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def builds(ctx: click.Context, app: str, number: int | None, limit: int, as_json: bool) -> None:
    """List the builds of APP's git pushes (status, revision), or one build's output."""
    client = client_of(ctx)
    if number is not None:
        build = client.request("GET", f"/v1/apps/{app}/builds/{number}")
        if as_json:
            print_json(build)
            return
        sys.stdout.write(build["log"])
        return
    found = client.request("GET", f"/v1/apps/{app}/builds", params={"limit": limit})
    if as_json:
        print_json(found)
        return
    if not found:
        out.print(f"no builds of {app} yet: `git push` to `clearway git-url {app}` makes one")
        return
    table = Table("BUILD", "STARTED", "COMMIT", "STATUS", "REVISION", box=None, pad_edge=False)
    for build in reversed(found):
        table.add_row(
            str(build["number"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(build["created_at"])),
            build["new_sha"][:7],
            build["state"],
            build["revision"] or "-",
        )
    out.print(table)


@cli.command("git-url")
@click.argument("app")
@click.pass_context
@run_command
def git_url(ctx: click.Context, app: str) -> None:
    """Print APP's git remote URL (on the API port; the token is the password).

    \b
    git remote add clearway "$(clearway git-url shop)"
    git config credential.helper '!f() { echo username=x; echo "password=$(cat ~/.clearway/token)"; }; f'
    """
    info = client_of(ctx).info
    sys.stdout.write(f"{info['api_url']}/git/{app}.git\n")


@cli.command("production-branch")
@click.argument("app")
@click.argument("branch", required=False)
@click.pass_context
@run_command
def production_branch(ctx: click.Context, app: str, branch: str | None) -> None:
    """Show APP's production branch, or make BRANCH the one whose pushes go to production.

    Pushes to it go out as canaries; every other branch is a preview. A change
    applies from the next push: production keeps serving until then, and a
    running preview of BRANCH is torn down. Default: main.
    """
    client = client_of(ctx)
    if branch is None:
        found = client.request("GET", f"/v1/apps/{app}/production-branch")
        out.print(found["branch"], markup=False)
        return
    changed = client.request("PUT", f"/v1/apps/{app}/production-branch", json={"branch": branch})
    if changed["before"] == changed["branch"]:
        out.print(f"{app}'s production branch is {branch} already", markup=False)
        return
    out.print(
        f"[green]✓[/] pushes to {rich_escape(branch)} now go to {app}'s production "
        f"({rich_escape(changed['before'])} pushes make previews); what serves now keeps serving until the next push",
        markup=True,
    )
    if changed["ended_previews"]:
        out.print(f"the preview of {branch} ({', '.join(changed['ended_previews'])}) is torn down", markup=False)


@cli.command()
@click.argument("app")
@click.option("--repository", metavar="URL", help="Build pushes and pull requests of this repository only (its clone URL; it may carry a read token). Default: the event's own repository, https only.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def webhook(ctx: click.Context, app: str, repository: str | None, as_json: bool) -> None:
    """Create (or replace) APP's GitHub webhook and print what to paste into GitHub.

    Pushes to the production branch (main, or `clearway production-branch`)
    deploy as canaries, other branches and pull requests become previews. The
    secret is shown only now; running this again makes a new one.
    GitHub must be able to reach the payload URL: expose the API's
    /v1/webhooks/ path through a reverse proxy or tunnel.
    """
    created = client_of(ctx).request("POST", f"/v1/apps/{app}/webhook", json={"repository": repository})
    if as_json:
        print_json(created)
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_row("Payload URL", created["url"])
    table.add_row("Content type", created["content_type"])
    table.add_row("Secret", created["secret"])
    table.add_row("Events", "pushes, pull requests")
    table.add_row("Repository", created["repository"] or "the event's own (https only; forks refused)")
    out.print(table)
    err.print("the secret is shown only now: paste it into the webhook's settings on GitHub")


# -- functions --------------------------------------------------------------------------
def _kwargs(data: str | None) -> dict[str, Any]:
    """``--data``: the keyword arguments, a JSON object."""
    if data is None:
        return {}
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc}); pass an object, as in --data '{{\"width\": 10}}'", param_hint="--data") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("the keyword arguments must be a JSON object, as in --data '{\"width\": 10}'", param_hint="--data")
    return parsed


#: How long ``invoke`` waits for the control plane: the longest function timeout and some.
_INVOKE_TIMEOUT = 3600.0 + 60.0


@cli.command()
@click.argument("app")
@click.argument("function")
@click.option("--data", "-d", metavar="JSON", help="The keyword arguments, a JSON object.")
@click.option("--async", "spawn", is_flag=True, help="Queue a durable invocation (retried on failure) and print its id.")
@click.option("--key", metavar="KEY", help="Idempotency key (with --async): one invocation per key, however often sent.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def invoke(ctx: click.Context, app: str, function: str, data: str | None, spawn: bool, key: str | None, as_json: bool) -> None:
    """Call FUNCTION of APP through the platform and print its answer.

    \b
    clearway invoke shop resize --data '{"width": 10, "height": 10}'
    clearway invoke shop report --async --key 2024-06-01
    """
    if key is not None and not spawn:
        raise click.UsageError("--key names a durable invocation: add --async")
    kwargs = _kwargs(data)
    client = Client(home_of(ctx), timeout=_INVOKE_TIMEOUT)
    if spawn:
        queued = client.request(
            "POST", f"/v1/apps/{app}/functions/{function}/spawn", json={"kwargs": kwargs, "idempotency_key": key}
        )
        if as_json:
            print_json(queued)
            return
        again = "" if queued["created"] else " (already queued with this key)"
        out.print(f"[green]✓[/] invocation {queued['id']} {queued['state']}{rich_escape(again)}", markup=True)
        err.print(f"follow it with `clearway invocations show {queued['id']}`")
        return
    answer = client.request("POST", f"/v1/apps/{app}/functions/{function}/invoke", json={"kwargs": kwargs})
    if as_json:
        print_json(answer)
    else:
        body = answer["body"]
        sys.stdout.write((body if isinstance(body, str) else json.dumps(body, indent=2)).rstrip("\n") + "\n")
    status = int(answer["status"])
    if status >= 400:
        body = answer["body"]
        message = body.get("error") if isinstance(body, dict) and body.get("error") else f"{function} answered {status}"
        error_id = body.get("error_id") if isinstance(body, dict) else None
        where = f" (error id {error_id}: `clearway logs {app} | grep {error_id}` shows the traceback)" if error_id else ""
        fail(f"{function} answered {status}: {message}{where}")


@cli.command()
@click.argument("app", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (a list, one entry per app).")
@click.pass_context
@run_command
def functions(ctx: click.Context, app: str | None, as_json: bool) -> None:
    """Show the functions of every app (or of APP): triggers, replicas, invocations, next scheduled run."""
    client = client_of(ctx)
    names = [app] if app else [a["name"] for a in client.request("GET", "/v1/apps")]
    views = [client.request("GET", f"/v1/apps/{name}/functions") for name in names]
    if as_json:
        print_json(views)
        return
    if not any(v["functions"] for v in views):
        which = f"{app} has no" if app else "no app has"
        out.print(f"{which} functions serving: `@app.function` declares one, `clearway deploy` serves it")
        return
    out.print(render.functions_table(views, now=time.time()))


@cli.group()
def events() -> None:
    """CloudEvents for an app's functions (those whose events= lists the type).

    \b
    clearway events send shop --type com.example.order.created --data '{"id": 7}'
    clearway events key shop --name billing    a key for an outside producer
    clearway events keys shop                  the app's keys (never their secrets)
    clearway events revoke shop KEY_ID         refuse that key from now on

    Any producer can post CloudEvents (binary, structured or batch mode) to the
    API's /v1/apps/APP/events with an event key of APP, which allows that and
    nothing else (or with the API token).
    """


@events.command("send")
@click.argument("app")
@click.option("--type", "event_type", required=True, help="The event's type (routes it to the functions that receive it).")
@click.option("--source", default="clearway-cli", show_default=True, help="The event's source (a URI reference).")
@click.option("--id", "event_id", help="The event's id (default: a new one); source + id name an event once.")
@click.option("--data", metavar="JSON", help="The event's data: JSON, or else sent as text.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def events_send(
    ctx: click.Context, app: str, event_type: str, source: str, event_id: str | None, data: str | None, as_json: bool
) -> None:
    """Post one CloudEvent (structured mode) to APP; each function receiving its type runs durably."""
    event: dict[str, Any] = {"specversion": "1.0", "id": event_id or uuid.uuid4().hex, "source": source, "type": event_type}
    if data is not None:
        try:
            event["data"] = json.loads(data)
            event["datacontenttype"] = "application/json"
        except ValueError:
            event["data"] = data
            event["datacontenttype"] = "text/plain"
    queued = client_of(ctx).request(
        "POST",
        f"/v1/apps/{app}/events",
        content=json.dumps(event).encode(),
        headers={"content-type": "application/cloudevents+json"},
    )
    if as_json:
        print_json(queued)
        return
    listed = ", ".join(f"{i['function']} ({i['id']}{'' if i['created'] else ', sent before'})" for i in queued["invocations"])
    out.print(f"[green]✓[/] event {event['id']} queued for {rich_escape(listed)}", markup=True)


@events.command("key")
@click.argument("app")
@click.option("--name", default="producer", show_default=True, help="What the key is for (1-64 of A-Z a-z 0-9 . _ -), shown in listings and the audit log.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def events_key(ctx: click.Context, app: str, name: str, as_json: bool) -> None:
    """Create an event key: it lets an outside producer post events to APP, and nothing else.

    The key is shown only now (the platform keeps its hash);
    `clearway events revoke APP KEY_ID` revokes it.
    """
    created = client_of(ctx).request("POST", f"/v1/apps/{app}/event-keys", json={"name": name})
    if as_json:
        print_json(created)
        return
    # Plain lines, never wrapped, so that the key and the example copy as they are.
    out.print(f"Key  {created['key']}\nURL  {created['url']}\nID   {created['id']} ({created['name']})", markup=False)
    out.print("\nPost a CloudEvent (binary mode; ce-type: a type one of its functions receives):\n", markup=False)
    out.print(
        f"curl -X POST '{created['url']}' \\\n"
        f"  -H 'Authorization: Bearer {created['key']}' \\\n"
        "  -H 'ce-specversion: 1.0' \\\n"
        "  -H 'ce-type: com.example.order.created' \\\n"
        "  -H 'ce-source: /my/producer' \\\n"
        '  -H "ce-id: $(uuidgen)" \\\n'
        "  -H 'content-type: application/json' \\\n"
        """  -d '{"id": 7}'""",
        markup=False,
    )
    err.print(f"the key is shown only now: give it to the producer; `clearway events revoke {app} {created['id']}` revokes it")


@events.command("keys")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def events_keys(ctx: click.Context, app: str, as_json: bool) -> None:
    """List APP's event keys: id, name, when created and last used (never the secrets)."""
    keys = client_of(ctx).request("GET", f"/v1/apps/{app}/event-keys")
    if as_json:
        print_json(keys)
        return
    if not keys:
        out.print(f"{app} has no event keys: `clearway events key {app}` creates one")
        return
    out.print(render.event_keys_table(keys))


@events.command("revoke")
@click.argument("app")
@click.argument("key_id", metavar="KEY_ID")
@click.pass_context
@run_command
def events_revoke(ctx: click.Context, app: str, key_id: str) -> None:
    """Revoke APP's event key KEY_ID: posts with it are refused from now on."""
    client_of(ctx).request("DELETE", f"/v1/apps/{app}/event-keys/{key_id}")
    out.print(f"[green]✓[/] event key {rich_escape(key_id)} of {rich_escape(app)} revoked", markup=True)


class _InvocationsGroup(_DefaultGroup):
    """``clearway invocations APP`` is short for ``clearway invocations list APP``."""

    default = "list"


@cli.group(cls=_InvocationsGroup)
def invocations() -> None:
    """Durable invocations (spawned, events, schedules) and the dead-letter list.

    \b
    clearway invocations APP [--dead]     the newest, or only the dead ones
    clearway invocations show ID          one, with its payload and result or error
    clearway invocations retry ID         queue a dead one again, with all its attempts
    """


@invocations.command("list")
@click.argument("app")
@click.option("--dead", is_flag=True, help="Only the dead ones (the dead-letter list).")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "dead"]), help="Only those in this state.")
@click.option("--function", "-f", help="Only this function's.")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=50, show_default=True, help="How many of the newest.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def invocations_list(
    ctx: click.Context, app: str, dead: bool, state: str | None, function: str | None, limit: int, as_json: bool
) -> None:
    """List APP's newest invocations."""
    if dead and state not in (None, "dead"):
        raise click.UsageError("--dead is --state dead: give one of them")
    params: dict[str, Any] = {"limit": limit}
    if dead or state:
        params["state"] = "dead" if dead else state
    if function:
        params["function"] = function
    found = client_of(ctx).request("GET", f"/v1/apps/{app}/invocations", params=params)
    if as_json:
        print_json(found)
        return
    if not found:
        which = "dead invocations" if dead or state == "dead" else "invocations"
        out.print(f"{app} has no {which}" + (f" of {function}" if function else ""))
        return
    out.print(render.invocations_table(found))


@invocations.command("show")
@click.argument("invocation_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def invocations_show(ctx: click.Context, invocation_id: str, as_json: bool) -> None:
    """Show one invocation: state, attempts, payload, result or error."""
    found = client_of(ctx).request("GET", f"/v1/invocations/{invocation_id}")
    if as_json:
        print_json(found)
        return
    out.print(render.invocation_detail(found, now=time.time()))


@invocations.command("retry")
@click.argument("invocation_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the invocation as JSON.")
@click.pass_context
@run_command
def invocations_retry(ctx: click.Context, invocation_id: str, as_json: bool) -> None:
    """Queue a dead invocation again, with all its attempts."""
    queued = client_of(ctx).request("POST", f"/v1/invocations/{invocation_id}/retry")
    if as_json:
        print_json(queued)
        return
    out.print(f"[green]✓[/] invocation {queued['id']} ({rich_escape(queued['function'])}) is queued again", markup=True)


@cli.command()
@click.pass_context
@run_command
def metrics(ctx: click.Context) -> None:
    """Print the gateway's per-revision metrics (Prometheus text format)."""
    sys.stdout.write(client_of(ctx).text("/v1/metrics"))


@cli.command("pin-token")
@click.argument("revision")
@click.option("--ttl", type=click.IntRange(60, 24 * 3600), default=3600, show_default=True, help="Seconds the token is valid.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (header, token, expires_at).")
@click.pass_context
@run_command
def pin_token(ctx: click.Context, revision: str, ttl: int, as_json: bool) -> None:
    """Print a header that lets requests pin REVISION (even at weight 0).

    \b
    curl -H "$(clearway pin-token hello-2)" -H 'x-clearway-revision: hello-2' http://hello.localhost:8080/
    """
    issued = client_of(ctx).request("POST", f"/v1/revisions/{revision}/pin-token", json={"ttl": ttl})
    if as_json:
        print_json(issued)
        return
    sys.stdout.write(f"{issued['header']}: {issued['token']}\n")


@cli.command()
@click.option("--app", help="Only calls about this app.")
@click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=50, show_default=True, help="How many of the newest calls.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
@click.pass_context
@run_command
def audit(ctx: click.Context, app: str | None, limit: int, as_json: bool) -> None:
    """Show state-changing API calls: when, who, what, and how they ended."""
    params: dict[str, Any] = {"limit": limit}
    if app:
        params["app"] = app
    entries = client_of(ctx).request("GET", "/v1/audit", params=params)
    if as_json:
        print_json(entries)
        return
    if not entries:
        out.print("no state-changing calls recorded yet")
        return
    table = Table("TIME", "WHO", "CALL", "STATUS", "APP", box=None, pad_edge=False)
    table.add_column("DETAIL", overflow="fold")
    for entry in entries:
        code = int(entry["status"])
        colour = "green" if code < 400 else "red"
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["at"])),
            entry["principal"],
            f"{entry['method']} {entry['path']}",
            f"[{colour}]{code}[/]",
            entry["app"] or "-",
            entry["detail"] or "",
        )
    out.print(table)


@cli.group()
def state() -> None:
    """Inspect and repair the platform's state database."""


@state.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@run_command
def recover(ctx: click.Context, yes: bool) -> None:
    """Move a damaged state.db aside and salvage what it holds.

    For when `clearway up` refuses to start because the state lost committed
    changes or fails SQLite's integrity check. Nothing is deleted: the damaged
    files are kept in state.damaged-<time>/.
    """
    from clearway.control.integrity import recover as recover_state

    home = home_of(ctx)
    if not home.db_path.exists() and not home.witness_path.exists():
        fail(f"no state in {home.root}: nothing to recover")
    if not yes and sys.stdin.isatty():
        click.confirm(f"move {home.db_path} aside and rebuild it from what can be read?", abort=True)
    report = recover_state(home.db_path, lock_path=home.lock_path)
    out.print(f"moved the damaged state to {report.moved_to}")
    for table_name, rows in sorted(report.rows.items()):
        out.print(f"  {table_name}: {rows} rows salvaged")
    for table_name, reason in sorted(report.lost_tables.items()):
        err.print(f"  [red]{table_name}: unreadable[/] ({reason})", markup=True)
    if report.stopped_strays:
        listed = ", ".join(f"{rid} (pid {pid})" for rid, pid in sorted(report.stopped_strays.items()))
        err.print(
            f"stopped {len(report.stopped_strays)} replicas the salvaged state has no record of: {listed}; "
            "`clearway up` starts again what the state still wants",
            markup=False,
        )
    if report.commits_vouched is not None and report.commits_salvaged < report.commits_vouched:
        err.print(
            f"[yellow]{report.commits_vouched - report.commits_salvaged} committed changes were lost[/]: "
            "check `clearway status` after `clearway up` and redeploy what is missing",
            markup=True,
        )
    out.print("[green]✓[/] state rebuilt: `clearway up` starts from it")


# -- local, no platform needed --------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path), default=".")
@click.option("--file", "app_file", help="The app file inside PATH (default app.py).")
@run_command
def spec(path: Path, app_file: str | None) -> None:
    """Print the app's declarative spec (JSON) without deploying it."""
    from clearway.sdk.loader import load_app, resolve_app_file

    try:
        app = load_app(resolve_app_file(path, app_file))
        print_json(app.spec().model_dump(mode="json"))
    except SpecError as exc:
        fail(str(exc))


@cli.command()
def schema() -> None:
    """Print the JSON Schema of the app spec."""
    from clearway.spec.model import json_schema

    print_json(json_schema())


def main() -> None:
    cli(prog_name="clearway")


if __name__ == "__main__":
    main()
