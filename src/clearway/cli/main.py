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
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

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
    detach: bool,
) -> None:
    """Start the platform: control plane + gateway (adopting running apps)."""
    from clearway.control.server import Settings, run_foreground

    home = home_of(ctx)
    settings = Settings(port=port, host=host, api_port=api_port, domains=domains or None, keep_revisions=keep_revisions)
    if not detach:
        run_foreground(home.root, settings)
        return
    info = home.control_info()
    if info and _answers(home):
        out.print(f"clearway is already running (pid {info['pid']}); API {info['api_url']}")
        return
    home.create()
    args = [sys.executable, "-m", "clearway.cli.main", "--home", str(home.root), "up"]
    for flag, value in (("--port", port), ("--host", host), ("--api-port", api_port), ("--keep-revisions", keep_revisions)):
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
@click.option("--no-wait", is_flag=True, help="Return once the revision is accepted.")
@click.option("--json", "as_json", is_flag=True, help="Print the revision as JSON.")
@click.pass_context
@run_command
def deploy(ctx: click.Context, path: Path, app_file: str | None, env: tuple[str, ...], no_wait: bool, as_json: bool) -> None:
    """Deploy the app in PATH as a new revision; waits until it serves."""
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
    with err.status(f"uploading {root.name} and preparing its environment…"):
        archive = pack(root)
        accepted = client.request(
            "POST",
            "/v1/deploy",
            params={"app_file": app_file, "env": list(env)},
            content=archive,
            headers={"content-type": "application/gzip"},
            # Resolving and downloading a new dependency set can take minutes.
            timeout=900,
        )
    err.print(f"revision [bold]{accepted['revision']}[/] accepted", markup=True)
    if accepted.get("environment"):
        err.print(f"  {accepted['environment']['log']}", markup=False)
    if no_wait:
        if as_json:
            print_json(accepted)
        return
    revision = wait_for_revision(client, accepted["revision"])
    app = client.request("GET", f"/v1/apps/{revision['app']}")
    if as_json:
        print_json({"revision": revision, "urls": app["urls"]})
        return
    out.print(f"[green]✓[/] {revision['id']} is serving")
    for url in app["urls"]:
        out.print(f"  {url}")


def wait_for_revision(client: Client, rev_id: str) -> dict[str, Any]:
    with err.status(f"starting {rev_id}…") as status:
        while True:
            revision: dict[str, Any] = client.request("GET", f"/v1/revisions/{rev_id}")
            state = revision["state"]
            if state == "active":
                return revision
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
    """Show all apps, or one app's components, replicas and revisions."""
    client = client_of(ctx)
    if app is None:
        apps = client.request("GET", "/v1/apps")
        if as_json:
            print_json(apps)
            return
        if not apps:
            out.print("no apps yet: `clearway deploy PATH` deploys one")
            return
        table = Table("APP", "REVISION", "READY", box=None, pad_edge=False)
        table.add_column("URL", overflow="fold")
        for item in apps:
            ready = ", ".join(f"{c['name']} {c['ready']}/{c['desired']}" for c in item["components"]) or "-"
            table.add_row(item["name"], item["active_revision"] or "-", ready, " ".join(item["urls"]) or "-")
        out.print(table)
        return
    view = client.request("GET", f"/v1/apps/{app}")
    if as_json:
        print_json(view)
        return
    out.print(f"[bold]{view['name']}[/]  serving {view['active_revision'] or 'nothing yet'}")
    for url in view["urls"]:
        out.print(f"  {url}")
    comps = Table("COMPONENT", "KIND", "READY", box=None, pad_edge=False, title=None)
    for comp in view["components"]:
        comps.add_row(comp["name"], comp["kind"], f"{comp['ready']}/{comp['desired']}")
    out.print(comps)
    reps = Table("REPLICA", "STATE", "PID", "ENDPOINT", "RESTARTS", box=None, pad_edge=False)
    for rep in view["replicas"]:
        reps.add_row(rep["id"], rep["state"], str(rep["pid"] or "-"), rep["endpoint"] or "-", str(rep["restarts"]))
    out.print(reps)
    revs = Table("REVISION", "STATE", "CREATED", "NOTE", box=None, pad_edge=False)
    for rev in reversed(view["revisions"][-10:]):
        note = (rev["error"] or "").strip().splitlines()
        revs.add_row(rev["id"], rev["state"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rev["created_at"])), note[-1] if note else "")
    out.print(revs)


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
@click.argument("component")
@click.argument("replicas", type=click.IntRange(0, 1000))
@click.pass_context
@run_command
def scale(ctx: click.Context, app: str, component: str, replicas: int) -> None:
    """Set how many replicas COMPONENT of APP runs (kept across deploys)."""
    client = client_of(ctx)
    client.request("POST", f"/v1/apps/{app}/scale", json={"component": component, "replicas": replicas})
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
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
@run_command
def destroy(ctx: click.Context, app: str, yes: bool) -> None:
    """Stop an app and forget it (its revisions too)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"destroy {app} and all its revisions?", abort=True)
    client_of(ctx).request("DELETE", f"/v1/apps/{app}")
    out.print(f"{app} destroyed")


class _ConfigGroup(click.Group):
    """``clearway config APP`` is short for ``clearway config show APP``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["show", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_ConfigGroup)
def config() -> None:
    """An app's configuration and secrets, kept across deploys.

    \b
    clearway config APP                          list it (secrets show as (secret))
    clearway config set APP KEY=VALUE... [--secret]
    clearway config unset APP KEY...

    A change restarts the serving code as a new revision (zero downtime), and
    every later deploy gets it; a deploy's --env overrides it.
    """


@config.command("show")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (secrets' values are null).")
@click.pass_context
@run_command
def config_show(ctx: click.Context, app: str, as_json: bool) -> None:
    """List APP's configuration; secret values are never shown."""
    view = client_of(ctx).request("GET", f"/v1/apps/{app}/config")
    if as_json:
        print_json(view)
        return
    if not view["config"]:
        out.print(f"{app} has no configuration: `clearway config set {app} KEY=VALUE` adds some")
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
@click.pass_context
@run_command
def config_set(ctx: click.Context, app: str, pairs: tuple[str, ...], secret: bool, no_wait: bool) -> None:
    """Set configuration of APP; its serving code restarts with it."""
    values: dict[str, str] = {}
    for index, item in enumerate(pairs, start=1):
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"argument #{index} has no '=': write it as KEY=VALUE")
        values[key] = value
    _change_config(ctx, app, {"set": values, "secret": secret}, no_wait=no_wait)


@config.command("unset")
@click.argument("app")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@click.option("--no-wait", is_flag=True, help="Return once the new revision is accepted.")
@click.pass_context
@run_command
def config_unset(ctx: click.Context, app: str, keys: tuple[str, ...], no_wait: bool) -> None:
    """Remove configuration of APP; its serving code restarts without it."""
    _change_config(ctx, app, {"unset": list(keys)}, no_wait=no_wait)


def _change_config(ctx: click.Context, app: str, change: dict[str, Any], *, no_wait: bool) -> None:
    """Send the change (the API checks it) and wait for the revision it makes; never prints a value."""
    client = client_of(ctx)
    result = client.request("POST", f"/v1/apps/{app}/config", json=change)
    done = "; ".join(
        part
        for part in (
            f"set {', '.join(result['set'])}" + (" (secret)" if change.get("secret") else "") if result["set"] else "",
            f"unset {', '.join(result['unset'])}" if result["unset"] else "",
        )
        if part
    )
    err.print(f"{app}: {done}", markup=False)
    if result["shadowed"]:
        err.print(
            f"[yellow]note:[/] the serving deploy's --env still overrides {', '.join(result['shadowed'])}; "
            "deploy without it for the configuration to apply",
            markup=True,
        )
    if result["revision"] is None:
        out.print(f"stored; {app} has no serving revision: the next `clearway deploy` uses it")
        return
    err.print(f"revision [bold]{result['revision']}[/] accepted", markup=True)
    if no_wait:
        return
    wait_for_revision(client, result["revision"])
    out.print(f"[green]✓[/] {result['revision']} is serving")


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
