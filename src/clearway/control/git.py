"""The platform as a git remote: ``git push clearway main`` builds, tests and deploys.

Repositories are bare, one per app, at ``$CLEARWAY_HOME/git/<app>.git``,
created on the first push (``git init --bare``) with force pushes allowed
(``receive.denyNonFastForwards=false``), pushes over HTTP enabled
(``http.receivepack=true``) and a cap on a pack's size
(``receive.maxInputSize``). The protocol is not ours: the real ``git
http-backend`` serves it, run as a CGI program for each request of the three
smart-HTTP routes (``GET /git/<app>.git/info/refs``, ``POST
.../git-upload-pack``, ``POST .../git-receive-pack``) with an environment made
from scratch — ``GIT_PROJECT_ROOT``, ``GIT_HTTP_EXPORT_ALL``, the CGI
variables, ``REMOTE_USER`` and nothing of the control plane's own environment
or secrets. A request body is streamed to a file (refused with 413 past
``UploadLimits.max_compressed``, like a ``clearway deploy`` upload, so a push
is never held in memory and a too-large one gets a clean answer rather than a
connection cut mid-response), then fed to the backend; the backend's output
is streamed back as it comes, which is what lets build output reach the
pusher while the push is still running.

**Why the API port, not the gateway's.** The gateway is the front door of
untrusted apps, on whatever address the operator exposed; the git remote takes
the operator's API token, so it lives where the rest of the operator's API
lives, on the loopback API port. Authentication is HTTP Basic with the API
token as the password (any user name), because that is what git's credential
machinery speaks: a missing or wrong token gets 401 with ``WWW-Authenticate:
Basic realm="clearway"``, so git asks its credential helper or the terminal.

**Building on push.** Each repository has a ``pre-receive`` hook (written by
`GitRemote.ensure_repo`, see ``control.git_hook``) run by ``git
receive-pack`` once the pack is received but before any ref moves. For every
ref update it calls ``POST /v1/git/<app>/push`` on the API. For every branch
(``refs/heads/*``) that is not being deleted the hook sends the pushed tree as
a gzipped tar (``git archive``: the hook runs inside git's quarantine, where
the new objects are visible; the control plane, outside it, could not read
them yet), and the control plane builds it exactly as ``clearway deploy``
builds an upload (``RevisionBuilder``: snapshot, environment, spec), plus the
test gate (``control.testgate``), then waits for the revision. Progress is
streamed back line by line; the hook prints it, so the pusher reads it as
``remote:`` lines, ending with the URLs. Any failure — a spec error, an
import error, unresolvable dependencies, failing tests, a revision that does
not start, another push having moved the branch meanwhile — makes the hook
exit non-zero: git rejects the push, the ref does not move, and what served
before still serves (a track's serving revision only ever changes to a
revision that became ready).

**Production goes out as a canary.** A push to the app's production branch
(``main`` unless ``clearway production-branch APP BRANCH`` chose another,
`Store.production_branch`) makes a revision with ``canary=True``: once ready it
gets a share of the traffic beside the stable revision, step by step, while
``control.rollouts`` compares the two (the app's ``CanaryPolicy``). The push
waits only until that rollout *starts* (the revision is ``CANARY``) and then
prints the plan — the steps, the minimum time and requests per step, the
earliest promotion — and is accepted: a rollout takes minutes, a ``git push``
should not. The first deploy, or one with no stable revision to compare with,
is served directly (``ACTIVE``). A canary that fails, or is rolled back before
the push ends, rejects it. A rollout rolled back *after* the push was
accepted leaves the branch pointing at the rolled-back commit: the repository
records what was pushed and accepted, not what serves; ``clearway rollout
status APP`` says what happened, and the next push goes out as a new canary.

**Every other branch is a preview.** It is built and tested exactly like
production, as a revision of its own track (``branch=<name>``, see
``control.store``), served at ``<branch_label>.<app>`` and at
``<sha7>.<app>`` with the previews' configuration; the push waits until it
serves (``ACTIVE`` within its branch: production is never touched) and prints
its URLs. Pushing the branch again replaces its preview the same way.
Deleting the branch (``git push clearway :feature-x``) tears the preview down
(`Store.end_branch`). Deleting the production branch is refused. Tags and
other refs are accepted and stored without building anything.

**Choosing another production branch** takes effect at the next push:
what production serves stays until the new branch is pushed, and the old
branch's next push makes a preview. A running preview of the new branch is
torn down at once: it could never end otherwise, since the production branch
cannot be deleted. The repository's HEAD follows, so a ``git clone`` checks
the new branch out. It waits for a push in progress (the app's build lock),
which read the branch when it began.

A push of several refs sends them one after the other; git's pre-receive
hook is all or nothing, so one rejected ref rejects the whole push, but refs
built before it stay deployed: push one branch at a time to keep the two in
step.

**The hook's credential.** The hook must not hold the operator's token: git's
environment reaches every hook and every program they start. Each
``git-receive-pack`` request mints a random *push token*, known only in memory
and only for that one request (it dies when the request ends), and bound to
that one app: it authorises ``POST /v1/git/<app>/push`` and nothing else. It
reaches the hook through the CGI environment (``CLEARWAY_PUSH_TOKEN``), with
the API's loopback URL.

Builds of one app are serialised by a per-app lock (`GitRemote.serialised`,
shared with the GitHub webhooks of ``control.webhooks``, which run the same
pipeline from a fetched commit); each is a row of the ``builds`` table
(``control.store.Build``: state, revision, output) that ``clearway builds
APP`` lists. Every push is in the audit log twice: the
``git-receive-pack`` call (principal ``operator``), and one row per ref update
naming the ref, the old and new commits and the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from clearway.backends.base import Backend
from clearway.control.environments import BuiltEnvironment
from clearway.control.faults import StorageFull, is_disk_full
from clearway.control.reconciler import Reconciler
from clearway.control.revisions import CHILD_PATH, RevisionBuilder
from clearway.control.rollouts import describe_plan
from clearway.control.store import Build, BuildState, Revision, RevisionState, Store
from clearway.control.testgate import has_tests, requirements_for, run_tests
from clearway.control.uploads import MiB
from clearway.exceptions import APIError
from clearway.spec.ids import check_name
from clearway.spec.model import AppSpec

__all__ = [
    "ZERO_SHA",
    "GitRemote",
    "PushTokens",
    "branch_of",
    "carries_archive",
    "unauthorized",
]

log = logging.getLogger("clearway.control")

#: git's "no commit": the old value of a created ref, the new value of a deleted one.
ZERO_SHA = "0" * 40
#: The last line of a push's progress stream: the hook's exit status.
ACCEPTED = "clearway-push: accepted"
REJECTED = "clearway-push: rejected"
#: How long a pushed revision may take to become ready before the push is rejected.
START_TIMEOUT = 900.0
#: How long deleting a preview branch waits for the data plane to stop routing to it.
TEARDOWN_TIMEOUT = 30.0
#: The three smart-HTTP services, and the methods they are called with.
SERVICES = {"info/refs": "GET", "git-upload-pack": "POST", "git-receive-pack": "POST"}

_HOOK = """#!/bin/sh
# Written by clearway (control.git): builds, tests and deploys pushed branches.
exec {python} -m clearway.control.git_hook
"""


def unauthorized(message: str) -> Response:
    """401 asking git for credentials (HTTP Basic, the API token as the password)."""
    return Response(
        message + "\n",
        status_code=401,
        media_type="text/plain",
        headers={"www-authenticate": 'Basic realm="clearway"'},
    )


@dataclass
class PushTokens:
    """The per-push credentials of running ``git-receive-pack`` requests (see the docstring)."""

    _live: dict[str, str] = field(default_factory=dict)

    def mint(self, app: str) -> str:
        token = secrets.token_urlsafe(32)
        self._live[token] = app
        return token

    def app_of(self, token: str) -> str | None:
        # A dict lookup, not a loop of comparisons: a token is 256 random bits.
        return self._live.get(token)

    def revoke(self, token: str) -> None:
        self._live.pop(token, None)


class GitRemote:
    """Serves ``/git/<app>.git`` with ``git http-backend`` and builds pushed branches."""

    def __init__(
        self,
        home: Path,
        *,
        store: Store,
        builder: RevisionBuilder,
        reconciler: Reconciler,
        backend: Backend,
        git: str | None = None,
    ) -> None:
        self.root = home / "git"
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.store = store
        self.builder = builder
        self.reconciler = reconciler
        self.backend = backend
        self.git = git or shutil.which("git") or "git"
        self.tokens = PushTokens()
        self.max_push = builder.limits.max_compressed
        self._locks: dict[str, asyncio.Lock] = {}

    # -- repositories --------------------------------------------------------------
    def repo(self, app: str) -> Path:
        return self.root / f"{app}.git"

    def git_env(self) -> dict[str, str]:
        """The whole environment of every git command: made from scratch, nothing of ours."""
        return {"PATH": CHILD_PATH, "HOME": str(self.root), "GIT_CONFIG_NOSYSTEM": "1", "LANG": "C.UTF-8"}

    async def run_git(self, *args: str, env: Mapping[str, str] | None = None) -> tuple[int, str]:
        """Run git with `git_env` (plus ``env``); its exit status and output. Cancelled
        (``asyncio.timeout``), it is killed."""
        proc = await asyncio.create_subprocess_exec(
            self.git,
            *args,
            env={**self.git_env(), **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace").strip()

    async def ensure_repo(self, app: str) -> Path:
        """The app's bare repository, created on first use, with the hook (re)written."""
        path = self.repo(app)
        if not (path / "HEAD").is_file():
            initial = self.store.production_branch(app)
            code, out = await self.run_git("init", "--bare", "--quiet", f"--initial-branch={initial}", str(path))
            if code != 0:
                raise APIError(500, f"cannot create the repository of {app}: {out}")
        for key, value in (
            ("receive.denyNonFastForwards", "false"),
            ("receive.denyDeletes", "false"),
            ("http.receivepack", "true"),
            ("receive.maxInputSize", str(self.max_push)),
        ):
            code, out = await self.run_git("--git-dir", str(path), "config", key, value)
            if code != 0:
                raise APIError(500, f"cannot configure the repository of {app}: {out}")
        hook = path / "hooks" / "pre-receive"
        hook.parent.mkdir(exist_ok=True)
        text = _HOOK.format(python=_shell_quote(sys.executable))
        if not hook.is_file() or hook.read_text() != text:
            tmp = hook.with_name(f".pre-receive.{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, hook)
        return path

    async def set_production_branch(self, app: str, branch: str) -> list[str]:
        """Make ``branch`` the one whose pushes go to ``app``'s production (see the module
        docstring); the preview revisions it tore down. `APIError` 422 for a name git
        would not take as a branch."""
        invalid = branch.startswith("-") or branch != branch.strip()
        if invalid or (await self.run_git("check-ref-format", "--branch", branch))[0] != 0:
            raise APIError(422, f"{branch[:100]!r} is not a valid git branch name (see `git check-ref-format --help`)")
        async with self.serialised(app, lambda _: None):
            self.store.set_production_branch(app, branch)
            ended = self.store.end_branch(app, branch, reason=f"{branch} became the production branch")
            if ended:
                self.reconciler.poke()
            path = self.repo(app)
            if (path / "HEAD").is_file():
                code, out = await self.run_git("--git-dir", str(path), "symbolic-ref", "HEAD", f"refs/heads/{branch}")
                if code != 0:
                    log.warning("could not point %s's HEAD at %s: %s", app, branch, out)
        return ended

    async def head(self, app: str, ref: str) -> str:
        """The commit ``ref`` points at in the app's repository (`ZERO_SHA`: none)."""
        code, out = await self.run_git("--git-dir", str(self.repo(app)), "rev-parse", "--verify", "--quiet", ref)
        return out if code == 0 else ZERO_SHA

    async def move_ref(self, app: str, ref: str, new: str, old: str) -> bool:
        """Point ``ref`` at ``new`` (delete it when ``new`` is `ZERO_SHA`) if it still is at
        ``old``, as git itself moves a pushed ref; False when it moved meanwhile."""
        where = ("--git-dir", str(self.repo(app)), "update-ref", "-m", "clearway")
        if new == ZERO_SHA:
            code, out = await self.run_git(*where, "-d", ref, *([old] if old != ZERO_SHA else []))
        else:
            code, out = await self.run_git(*where, ref, new, old if old != ZERO_SHA else "")
        if code != 0:
            log.warning("could not move %s of %s to %s: %s", ref, app, new[:12], out)
        return code == 0

    async def archive(self, app: str, commit: str) -> Path:
        """The tree of ``commit`` as a gzipped tar in a file of its own (what a push's hook
        sends), capped like a push; the caller deletes it."""
        fd, name = tempfile.mkstemp(prefix="archive-", dir=self.builder.work_root)
        proc = await asyncio.create_subprocess_exec(
            self.git,
            "--git-dir",
            str(self.repo(app)),
            "archive",
            "--format=tar.gz",
            commit,
            env=self.git_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                while chunk := await proc.stdout.read(65536):
                    size += len(chunk)
                    if size > self.max_push:
                        raise APIError(
                            413,
                            f"the tree of {commit[:7]} is larger than {self.max_push // MiB} MiB compressed: "
                            "leave data and build output out of the repository",
                        )
                    await asyncio.to_thread(handle.write, chunk)
            errors = (await proc.stderr.read()).decode(errors="replace").strip()
            if await proc.wait() != 0:
                raise APIError(422, f"git archive {commit[:7]} failed: {errors}")
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            os.unlink(name)
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise StorageFull(self.builder.work_root, what="exporting the commit") from exc
            raise
        return Path(name)

    # -- smart HTTP ----------------------------------------------------------------------
    async def serve(self, request: Request, app: str, service: str) -> Response:
        """Run ``git http-backend`` for one smart-HTTP request (already authenticated)."""
        try:
            check_name(app, "app")
        except ValueError as exc:
            return Response(f"{exc}\n", status_code=404, media_type="text/plain")
        query = request.url.query
        pushing = service == "git-receive-pack" or (service == "info/refs" and "service=git-receive-pack" in query)
        if pushing:
            await self.ensure_repo(app)
        elif not (self.repo(app) / "HEAD").is_file():
            return Response(f"no repository for {app} yet: push to it first\n", status_code=404, media_type="text/plain")
        body: Path | None = None
        token: str | None = None
        try:
            if SERVICES[service] == "POST":
                body = await self._spool(request)
            env = {
                **self.git_env(),
                "GIT_PROJECT_ROOT": str(self.root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "GIT_HTTP_MAX_REQUEST_BUFFER": str(self.max_push),
                "PATH_INFO": f"/{app}.git/{service}",
                "REQUEST_METHOD": request.method,
                "QUERY_STRING": query,
                "CONTENT_TYPE": request.headers.get("content-type", ""),
                "REMOTE_USER": "operator",
                "REMOTE_ADDR": request.client.host if request.client else "",
            }
            if body is not None:
                env["CONTENT_LENGTH"] = str(body.stat().st_size)
            for header in ("content-encoding", "git-protocol"):
                if header in request.headers:
                    env["HTTP_" + header.upper().replace("-", "_")] = request.headers[header]
            if service == "git-receive-pack":
                token = self.tokens.mint(app)
                host, port = request.scope["server"] or ("127.0.0.1", 0)
                env["CLEARWAY_PUSH_TOKEN"] = token
                env["CLEARWAY_API_URL"] = f"http://{host}:{port}"
            return await self._cgi(env, body, token)
        except BaseException:
            if token is not None:
                self.tokens.revoke(token)
            if body is not None:
                body.unlink(missing_ok=True)
            raise

    async def _spool(self, request: Request) -> Path:
        """The request body in a file of its own (see the module docstring); 413 past the cap."""
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"the push is larger than {self.max_push // MiB} MiB: leave data and build output out of the repository")
        if declared.isdigit() and int(declared) > self.max_push:
            raise too_large
        fd, name = tempfile.mkstemp(prefix="git-", dir=self.builder.work_root)
        size = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > self.max_push:
                        raise too_large
                    handle.write(chunk)
        except BaseException as exc:
            os.unlink(name)
            if isinstance(exc, OSError) and is_disk_full(exc):
                raise StorageFull(self.builder.work_root, what="receiving the push") from exc
            raise
        return Path(name)

    async def _cgi(self, env: dict[str, str], body: Path | None, token: str | None) -> Response:
        stdin = body.open("rb") if body is not None else None
        stderr = tempfile.TemporaryFile(dir=self.builder.work_root)  # noqa: SIM115 - closed by finish(), after the response
        proc = await asyncio.create_subprocess_exec(
            self.git,
            "http-backend",
            env=env,
            stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdout is not None
        stdout = proc.stdout

        def finish() -> None:
            if stdin is not None:
                stdin.close()
            if body is not None:
                body.unlink(missing_ok=True)
            if token is not None:
                self.tokens.revoke(token)
            stderr.seek(0)
            errors = stderr.read()[-4000:].decode(errors="replace").strip()
            stderr.close()
            if errors:
                log.warning("git http-backend: %s", errors)

        try:
            status, headers = await _read_cgi_headers(stdout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            finish()
            raise

        async def relay() -> AsyncIterator[bytes]:
            try:
                while chunk := await stdout.read(65536):
                    yield chunk
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                await proc.wait()
                finish()

        media_type = headers.pop("content-type", None)
        return StreamingResponse(relay(), status_code=status, headers=headers, media_type=media_type)

    # -- building a push -------------------------------------------------------------
    def push_stream(
        self,
        app: str,
        *,
        ref: str,
        old: str,
        new: str,
        upload: Path | None,
        audit: Callable[[str], None],
    ) -> AsyncIterator[bytes]:
        """The progress lines of one ref update, ending with `ACCEPTED` or `REJECTED`."""

        async def lines() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[str | None] = asyncio.Queue()

            async def work() -> bool:
                try:
                    return await self._update(app, ref=ref, old=old, new=new, upload=upload, say=queue.put_nowait)
                finally:
                    queue.put_nowait(None)

            task = asyncio.create_task(work(), name=f"git-push-{app}")
            try:
                while (line := await queue.get()) is not None:
                    yield (line + "\n").encode()
                try:
                    accepted = await task
                except Exception as exc:
                    log.exception("building the push of %s %s failed", app, ref)
                    yield f"error: {exc}\n".encode()
                    accepted = False
                audit(f"push {ref} {old[:12]}..{new[:12]}: {'accepted' if accepted else 'rejected'}")
                yield ((ACCEPTED if accepted else REJECTED) + "\n").encode()
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                if upload is not None:
                    await asyncio.to_thread(upload.unlink, missing_ok=True)

        return lines()

    async def _update(
        self, app: str, *, ref: str, old: str, new: str, upload: Path | None, say: Callable[[str], None]
    ) -> bool:
        branch = branch_of(ref)
        if branch is None:
            say(f"{ref} {'deleted' if new == ZERO_SHA else 'stored'}; only branches (refs/heads/*) are built")
            return True
        if new == ZERO_SHA and branch == self.store.production_branch(app):
            say(
                f"refusing to delete {branch}: it is {app}'s production branch. Choose another first "
                f"(`clearway production-branch {app} BRANCH`), or `clearway destroy {app}` removes the app"
            )
            return False
        if new != ZERO_SHA and upload is None:
            say("error: the hook sent no archive of the pushed commit")
            return False
        async with self.serialised(app, say):
            current = await self.head(app, ref)
            if current != old:
                say(
                    f"{branch} moved to {current[:7]} while this push waited: "
                    "`git pull` (or fetch and rebase) and push again"
                )
                return False
            if upload is None:
                await self.end_preview(app, branch, say)
                return True
            build = self.store.create_build(app, ref=ref, old_sha=old, new_sha=new)
            return await self.deploy(app, build=build, branch=branch, upload=upload, say=say)

    @contextlib.asynccontextmanager
    async def serialised(self, app: str, say: Callable[[str], None]) -> AsyncIterator[None]:
        """Hold the app's build lock: one build (or teardown) of an app at a time."""
        lock = self._locks.setdefault(app, asyncio.Lock())
        if lock.locked():
            say(f"waiting for another push to {app} to finish…")
        async with lock:
            yield

    async def end_preview(self, app: str, branch: str, say: Callable[[str], None]) -> None:
        """Tear down the preview of ``branch`` (its branch was deleted), and wait (a little)
        until the data plane no longer routes to it."""
        ended = self.store.end_branch(app, branch)
        if not ended:
            say(f"{branch} deleted (it had no running preview)")
            return
        self.reconciler.poke()
        try:
            async with asyncio.timeout(TEARDOWN_TIMEOUT):
                # Two passes: the first may have read the desired state before end_branch.
                await self.reconciler.wait_pass()
                await self.reconciler.wait_pass()
                gone = await self.backend.converged()
        except TimeoutError:
            gone = False
        later = "" if gone else " (the gateway stops routing to it in a moment)"
        say(f"{branch} deleted: its preview ({', '.join(ended)}) is torn down{later}")

    async def deploy(
        self, app: str, *, build: Build, branch: str, upload: Path, say: Callable[[str], None]
    ) -> bool:
        """Build, test and start the pushed commit of ``branch``: a canary of production,
        or that branch's preview. True once it serves (see the module docstring)."""
        number, new = build.number, build.new_sha
        preview = branch != self.store.production_branch(app)

        def note(line: str) -> None:
            say(line)
            self.store.update_build(app, number, log=line + "\n")

        started = time.monotonic()
        note(f"build {number} of {app}: {branch} at {new[:7]}; preparing the environment…")

        async def check(project: Path, environment: BuiltEnvironment, spec: AppSpec) -> None:
            if spec.name != app:
                raise APIError(
                    422,
                    f"app.py names the app {spec.name!r} but was pushed to {app}.git: push it to "
                    f"{spec.name}.git (`clearway git-url {spec.name}`) or rename the app",
                )
            note(environment.log)
            if not has_tests(project):
                note("no tests (no tests/ directory or test_*.py files): the test gate is skipped")
                return
            self.store.update_build(app, number, state=BuildState.TESTING)
            note("running the tests: python -m pytest -q")
            result = await run_tests(self.builder, project, python=str(environment.python))
            for line in result.summary.splitlines():
                note(f"  {line}")
            if not result.passed:
                raise _TestsFailed()
            note("tests passed")

        kept = f"nothing was deployed, {branch} stays where it was"
        try:
            revision, _ = await self.builder.build_with_environment(
                upload,
                app_file="app.py",
                env={},
                extra=requirements_for,
                check=check,
                branch=branch if preview else None,
                commit=new,
                canary=not preview,
            )
        except _TestsFailed:
            note(f"✗ tests failed: {kept}")
            self.store.update_build(app, number, state=BuildState.TESTS_FAILED)
            return False
        except APIError as exc:
            note(f"✗ {exc.message}")
            for line in (exc.details or "").strip().splitlines()[-40:]:
                note(f"  {line}")
            note(kept)
            self.store.update_build(app, number, state=BuildState.FAILED)
            return False
        self.store.update_build(app, number, state=BuildState.DEPLOYING, revision=revision.id)
        self.reconciler.poke()
        note(f"revision {revision.id} starting…")
        current = await self._started(app, revision.id, preview=preview, note=note)
        if current is None:
            self.store.update_build(app, number, state=BuildState.FAILED)
            return False
        elapsed = time.monotonic() - started
        if preview:
            note(f"✓ {revision.id} is serving preview {branch} ({elapsed:.1f}s)")
            urls = self.backend.urls(current.spec, branch=branch, commit=new)
        elif current.state is RevisionState.CANARY:
            note(f"✓ {revision.id} is ready ({elapsed:.1f}s) and goes out as a canary")
            note(describe_plan(current))
            note(f"follow it with `clearway rollout status {app}`; the push is accepted now")
            urls = [*self.backend.urls(current.spec), *self.backend.urls(current.spec, commit=new)]
        else:
            promoted = any(r.canary == revision.id for r in self.store.rollouts(app, limit=3))
            how = "its rollout promoted it already" if promoted else "no stable revision to compare it with, so it took all traffic"
            note(f"✓ {revision.id} is serving ({elapsed:.1f}s): {how}")
            urls = [*self.backend.urls(current.spec), *self.backend.urls(current.spec, commit=new)]
        for url in urls:
            note(f"  {url}")
        self.store.update_build(app, number, state=BuildState.DEPLOYED)
        return True

    async def _started(
        self, app: str, rev_id: str, *, preview: bool, note: Callable[[str], None]
    ) -> Revision | None:
        """Wait until the revision serves (a preview: ACTIVE; production: CANARY or
        ACTIVE); None, having said why, when it never will."""
        done = {RevisionState.ACTIVE} if preview else {RevisionState.ACTIVE, RevisionState.CANARY}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            current = self.store.revision(rev_id)
            state = current.state if current else RevisionState.FAILED
            if current is not None and state in done:
                return current
            if state is RevisionState.ROLLED_BACK:
                note(f"✗ the canary {rev_id} was rolled back; the stable revision keeps serving")
                for line in ((current.error if current else None) or "").strip().splitlines()[-40:]:
                    note(f"  {line}")
                note(f"`clearway rollout status {app}` shows why")
                return None
            if state in (RevisionState.FAILED, RevisionState.RETIRED) or time.monotonic() > deadline:
                error = (current.error if current else None) or f"it did not become ready within {START_TIMEOUT:.0f}s"
                note(f"✗ {rev_id} did not start; what served before keeps serving")
                for line in error.strip().splitlines()[-40:]:
                    note(f"  {line}")
                return None
            if self.reconciler.fault:
                note(f"✗ {rev_id} cannot make progress: {self.reconciler.fault}")
                return None
            # The revision's state lives in the store, moved by the reconciler: poll it.
            await asyncio.sleep(0.1)


def branch_of(ref: str) -> str | None:
    """The branch a ref names (``refs/heads/feature-x`` -> ``feature-x``); None for tags and others."""
    branch = ref.removeprefix("refs/heads/")
    return branch if branch != ref and branch else None


def carries_archive(ref: str, new: str) -> bool:
    """Whether the hook sends the pushed tree with this ref update: every branch not being deleted."""
    return branch_of(ref) is not None and new != ZERO_SHA


class _TestsFailed(Exception):
    """The test gate said no (its output was streamed already)."""


async def _read_cgi_headers(stdout: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status and headers of a CGI response (the lines before the first empty one)."""
    status = 200
    headers: dict[str, str] = {}
    while True:
        line = await stdout.readline()
        if not line:
            raise APIError(502, "git http-backend ended without answering")
        text = line.decode("latin-1").rstrip("\r\n")
        if not text:
            return status, headers
        name, _, value = text.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split(" ", 1)[0])
        else:
            headers[name.strip().lower()] = value.strip()


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"
