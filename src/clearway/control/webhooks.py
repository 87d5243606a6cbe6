"""GitHub webhooks: a push to GitHub deploys like a push to the platform.

``POST /v1/apps/<app>/webhook`` (the operator's token) creates the app's
webhook, or replaces it: a fresh random secret and, optionally, the one
repository it builds. The answer is the payload URL and the secret to paste
into the repository's settings on GitHub (content type ``application/json``,
events *pushes* and *pull requests*); the secret is shown that once. GitHub
then calls ``POST /v1/webhooks/github/<app>`` for every event, and the
platform runs the pipeline of ``control.git`` on the commit the event names:

* ``push`` of the production branch: a canary build; of any other branch: its
  preview; a deleted branch: its preview torn down. Tags are ignored.
* ``pull_request`` opened, reopened or synchronised: the preview of branch
  ``pr-<number>``, built from the pull request's head commit; closed: that
  preview torn down.
* ``ping`` (sent when the webhook is created on GitHub): 200; any other event:
  202 and ignored.

The commit is fetched into the app's bare repository under a private ref
(``refs/clearway/incoming/<build>``), exported with ``git archive`` and built
exactly like a pushed tree (`GitRemote.deploy`: test gate, canary or
preview), under the same per-app lock as pushes, so builds of one app never
overlap whichever way they came. Once a build is accepted
``refs/heads/<branch>`` is moved to its commit: the app's repository mirrors
what was deployed, and ``git fetch clearway`` shows it.

**Why HMAC, not the API token.** GitHub cannot hold our bearer token, and the
token opens the whole API; GitHub signs each delivery instead with the secret
both sides share: ``X-Hub-Signature-256`` is ``sha256=`` and the hex
HMAC-SHA256 of the raw body. The route takes no token, and believes a
delivery only when its signature matches, compared with
``hmac.compare_digest`` (constant time: the comparison leaks nothing about the
expected value). The signature covers the body, not a time, so a captured
delivery could be sent again; that is why an event only *triggers* a build and
the repository decides what is built: the pushed ref is fetched, and a build
goes ahead only when the ref still points at the event's commit. A replayed
(or late, or out-of-order) push finds the branch moved on and builds nothing;
a replayed branch deletion is ignored while the branch still exists. (A
replayed "pull request closed" does tear its preview down: the next push to
the pull request builds it again.)

**Why the registered repository.** The signature says GitHub sent the event,
not that its repository is the one the operator meant: the secret may have
been pasted into another repository, an organisation-wide hook, or leaked. A
webhook registered with ``--repository URL`` fetches from that URL only (it may
carry a read token for a private repository; the payload's ``clone_url`` must
name the same repository), and refuses events of any other. Without one, only
``https://`` URLs are fetched: never a file path or a local transport, which
would let a forged event read the platform's own disk (other apps'
repositories live under ``$CLEARWAY_HOME/git``). Fetches run with the git
environment of `GitRemote.git_env` plus the machine's TLS trust and proxy
settings (``control.environments.NETWORK_VARIABLES``), never the control
plane's own environment, without prompts, and with every transport but the
one allowed disabled.

**Why pull requests from forks are refused.** Anyone can open a pull request
on a public repository. Building it runs its author's code: the tests on the
test gate, then a preview under the app's domain with the previews'
configuration (sandbox keys, test databases). So a pull request is built only
when its head repository is the registered one (or, with none registered, the
event's own repository): branches pushed by people who can already push.

**Why 202 and a background build.** GitHub waits ten seconds for an answer and
does not retry a delivery that timed out; a build takes minutes. The
delivery is answered at once with the number of the build it started, and
the build runs as a supervised task (``clearway.tasks``): its output goes to
the ``builds`` table like a push's, read with ``clearway builds APP --log N``;
a build cut off by a shutdown is failed at the next start-up, like a push's.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import posixpath
import re
import secrets
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, ValidationError
from starlette.requests import Request

from clearway.control.environments import NETWORK_VARIABLES
from clearway.control.git import ZERO_SHA, GitRemote, branch_of
from clearway.control.store import Build, BuildState, Store
from clearway.control.uploads import MiB
from clearway.exceptions import APIError
from clearway.spec.ids import check_name
from clearway.tasks import TaskSupervisor

__all__ = [
    "MAX_BODY",
    "Delivery",
    "GitHubWebhooks",
    "Webhook",
    "WebhookRequest",
    "check_repository",
    "same_repository",
    "signature",
]

log = logging.getLogger("clearway.control")

#: The largest delivery accepted (GitHub caps payloads at 25 MB; a push's is a few KB).
MAX_BODY = 1 * MiB
SIGNATURE_HEADER = "x-hub-signature-256"
EVENT_HEADER = "x-github-event"
#: Where fetched commits wait for their build (one ref per build, deleted after).
INCOMING = "refs/clearway/incoming"
#: How long fetching one commit may take.
FETCH_TIMEOUT = 600.0
#: Pull request actions that (re)build the preview; "closed" tears it down.
BUILD_ACTIONS = frozenset({"opened", "reopened", "synchronize"})
#: Transports a registered repository may use (the one of its URL is enabled for its fetches).
SCHEMES = frozenset({"https", "http", "ssh", "git", "file"})

_SHA = Annotated[str, Field(pattern="^[0-9a-f]{40}$")]

#: What git refuses in a ref name (``git check-ref-format``), or what would change a refspec.
_BAD_REF = re.compile(r"[\x00-\x20\x7f:*?\[\\^~]|\.\.|//|@\{")


def _ref_name(value: str) -> str:
    """A ref as git allows it, and nothing that would change a refspec's meaning."""
    if _BAD_REF.search(value) or value.startswith(("-", "+", "/")) or value.endswith((".", "/", ".lock")):
        raise ValueError(f"{value!r} is not a ref name git accepts")
    return value


_REF = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_ref_name)]


@dataclass(frozen=True)
class Webhook:
    """An app's GitHub webhook: the shared secret and the repository it builds (None: any https one)."""

    app: str
    secret: str
    repository: str | None
    created_at: float

    @property
    def public_repository(self) -> str | None:
        """The repository without the credentials its URL may carry."""
        return None if self.repository is None else _public(self.repository)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Webhook:
        return cls(app=row["app"], secret=row["secret"], repository=row["repository"], created_at=row["created_at"])


class WebhookRequest(BaseModel):
    """``POST /v1/apps/<app>/webhook``: the repository the webhook builds (its clone URL), or
    None for any https repository GitHub names."""

    repository: Annotated[str | None, Field(max_length=2000)] = None


@dataclass(frozen=True)
class Delivery:
    """The answer to one delivery: its status, JSON body and a line for the audit log."""

    status: int
    body: dict[str, Any]

    @property
    def summary(self) -> str:
        return str(self.body.get("message", ""))


# -- the parts of GitHub's payloads we read (extra fields are ignored) --------------------
class _Repository(BaseModel):
    clone_url: Annotated[str, Field(min_length=1, max_length=2000)]


class _PushEvent(BaseModel):
    ref: _REF
    after: _SHA
    deleted: bool = False
    repository: _Repository


class _Head(BaseModel):
    sha: _SHA
    ref: _REF
    #: None when the fork it came from was deleted.
    repo: _Repository | None


class _PullRequest(BaseModel):
    head: _Head


class _PullRequestEvent(BaseModel):
    action: str
    number: Annotated[int, Field(ge=1)]
    pull_request: _PullRequest
    repository: _Repository


def signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` GitHub sends with ``body`` for ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def check_repository(url: str) -> str:
    """A repository URL a webhook may be registered with (stripped); APIError 422 otherwise."""
    url = url.strip()
    if not url or any(ord(c) < 33 for c in url) or url.startswith("-"):
        raise APIError(422, f"{url!r} is not a repository URL: give its clone URL, e.g. https://github.com/OWNER/REPO.git")
    if url.startswith("/"):
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in SCHEMES or (parts.scheme != "file" and not parts.hostname):
        raise APIError(
            422,
            f"{_public(url)} is not a repository URL clearway fetches from: give its clone URL "
            f"({', '.join(sorted(s + '://' for s in SCHEMES))} or an absolute path), "
            "e.g. https://github.com/OWNER/REPO.git",
        )
    return url


def same_repository(a: str, b: str) -> bool:
    """Whether two clone URLs name one repository (credentials, a trailing ``/`` or ``.git`` aside)."""
    return _canonical(a) == _canonical(b)


def _canonical(url: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme == "file" or url.startswith("/"):
        path = posixpath.normpath(urllib.parse.unquote(parts.path) if parts.scheme else url.strip())
        return "file://" + path.removesuffix("/").removesuffix(".git")
    host = (parts.hostname or "").lower() + (f":{parts.port}" if parts.port else "")
    path = parts.path.rstrip("/").removesuffix(".git")
    return f"{parts.scheme.lower()}://{host}{path}"


def _scheme(url: str) -> str:
    return "file" if url.startswith("/") else urllib.parse.urlsplit(url).scheme.lower()


def _public(url: str) -> str:
    """``url`` without its credentials, fit for logs and answers."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class _Job:
    """One build started by a delivery."""

    app: str
    build: Build
    branch: str
    #: The ref the build moves in the app's repository once accepted.
    ref: str
    #: Where the commit comes from: the URL and the ref there that must point at it.
    url: str
    source_ref: str


class GitHubWebhooks:
    """Registers webhooks and turns GitHub's deliveries into builds (see the module docstring)."""

    def __init__(self, *, store: Store, remote: GitRemote, tasks: TaskSupervisor) -> None:
        self.store = store
        self.remote = remote
        self.tasks = tasks

    # -- registration --------------------------------------------------------------
    def register(self, app: str, repository: str | None) -> Webhook:
        """Create or replace the webhook of ``app`` (which need not be deployed yet)."""
        try:
            check_name(app, "app")
        except ValueError as exc:
            raise APIError(422, str(exc)) from None
        checked = check_repository(repository) if repository is not None else None
        self.store.set_webhook(app, secret=secrets.token_hex(32), repository=checked)
        found = self.get(app)
        assert found is not None
        return found

    def get(self, app: str) -> Webhook | None:
        row = self.store.webhook(app)
        return None if row is None else Webhook.from_row(row)

    # -- deliveries ---------------------------------------------------------------------
    async def deliver(self, app: str, request: Request) -> Delivery:
        """Check one delivery of GitHub (size, signature) and act on its event."""
        hook = self.get(app)
        if hook is None:
            raise APIError(
                404, f"{app} has no GitHub webhook: `clearway webhook {app}` creates one (and prints its secret)"
            )
        body = await _read(request)
        given = request.headers.get(SIGNATURE_HEADER, "").strip()
        if not given:
            raise APIError(
                401,
                "missing X-Hub-Signature-256: set the webhook's secret on GitHub to the one "
                f"`clearway webhook {app}` printed (deliveries without one are refused)",
            )
        if not hmac.compare_digest(given.encode(), signature(hook.secret, body).encode()):
            raise APIError(
                401,
                f"X-Hub-Signature-256 does not match the body: the secret on GitHub is not {app}'s. "
                f"Run `clearway webhook {app}` for a new one and paste it into the webhook's settings",
            )
        event = request.headers.get(EVENT_HEADER, "")
        if event == "ping":
            return Delivery(200, {"message": f"pong: the webhook of {app} works"})
        if event not in ("push", "pull_request"):
            return Delivery(202, {"message": f"{event or 'unnamed'} events are ignored: clearway acts on push and pull_request"})
        payload = _payload(body, request.headers.get("content-type", ""))
        try:
            if event == "push":
                return await self._push(hook, _PushEvent.model_validate(payload))
            return await self._pull_request(hook, _PullRequestEvent.model_validate(payload))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
            raise APIError(422, f"not a GitHub {event} event: {problems}") from None

    async def _push(self, hook: Webhook, event: _PushEvent) -> Delivery:
        branch = branch_of(event.ref)
        if branch is None:
            return Delivery(202, {"message": f"{event.ref}: only branches are built; ignored"})
        url = self._source(hook, event.repository.clone_url, own=event.repository.clone_url)
        if event.deleted or event.after == ZERO_SHA:
            if branch == self.store.production_branch(hook.app):
                return Delivery(
                    202,
                    {"message": f"{branch} was deleted on GitHub; {hook.app} keeps serving (`clearway destroy {hook.app}` removes it)"},
                )
            return self._teardown(hook.app, branch, check=url)
        return await self._start(hook.app, branch=branch, commit=event.after, url=url, source_ref=event.ref)

    async def _pull_request(self, hook: Webhook, event: _PullRequestEvent) -> Delivery:
        branch = f"pr-{event.number}"
        if event.action == "closed":
            return self._teardown(hook.app, branch, check=None)
        if event.action not in BUILD_ACTIONS:
            return Delivery(202, {"message": f"pull request {event.action}: nothing to build; ignored"})
        head = event.pull_request.head
        if head.repo is None:
            raise APIError(403, f"pull request #{event.number} comes from a deleted fork: not built")
        url = self._source(hook, head.repo.clone_url, own=event.repository.clone_url)
        return await self._start(
            hook.app, branch=branch, commit=head.sha, url=url, source_ref=f"refs/heads/{head.ref}"
        )

    def _source(self, hook: Webhook, url: str, *, own: str) -> str:
        """The URL to fetch ``url``'s commits from, or APIError 403 (see the module docstring)."""
        if hook.repository is not None:
            if not same_repository(url, hook.repository):
                raise APIError(
                    403,
                    f"the webhook of {hook.app} builds {_public(hook.repository)} only, not {_public(url)}: "
                    f"pull requests from forks are not built; `clearway webhook {hook.app} --repository URL` "
                    "registers another repository",
                )
            return hook.repository
        if not same_repository(url, own):
            raise APIError(
                403,
                f"{_public(url)} is a fork of {_public(own)}: pull requests from forks are not built "
                "(their code would run on the platform); push the branch to the repository itself",
            )
        if _scheme(url) != "https":
            raise APIError(
                403,
                f"{_public(url)} is not an https:// URL: a webhook without a registered repository fetches "
                f"https only; `clearway webhook {hook.app} --repository URL` registers the repository",
            )
        return url

    async def _start(self, app: str, *, branch: str, commit: str, url: str, source_ref: str) -> Delivery:
        ref = f"refs/heads/{branch}"
        build = self.store.create_build(app, ref=ref, old_sha=await self.remote.head(app, ref), new_sha=commit)
        what = "production (canary)" if branch == self.store.production_branch(app) else "preview"
        self.store.update_build(
            app, build.number, log=f"GitHub: {source_ref} at {commit[:7]} of {_public(url)}: {branch}, {what}\n"
        )
        job = _Job(app=app, build=build, branch=branch, ref=ref, url=url, source_ref=source_ref)

        def failed(exc: BaseException) -> None:
            self.store.update_build(app, build.number, state=BuildState.FAILED, log=f"✗ the build failed: {exc}\n")

        self.tasks.start(f"webhook-build-{app}-{build.number}", self._build(job), on_failure=failed)
        return Delivery(
            202,
            {
                "message": f"build {build.number} of {app}: {branch} at {commit[:7]} ({what}); "
                f"`clearway builds {app} --log {build.number}` shows it",
                "app": app,
                "build": build.number,
                "branch": branch,
                "commit": commit,
            },
        )

    def _teardown(self, app: str, branch: str, *, check: str | None) -> Delivery:
        self.tasks.start(f"webhook-teardown-{app}-{branch}", self._end(app, branch, check=check))
        return Delivery(202, {"message": f"tearing down the preview of {branch}", "app": app, "branch": branch})

    # -- background work ----------------------------------------------------------
    def _fetch_args(self, url: str) -> tuple[list[str], dict[str, str]]:
        """git's ``-c`` options and extra environment for talking to ``url``: its transport only."""
        config = [
            "-c", "protocol.allow=never",
            "-c", f"protocol.{_scheme(url)}.allow=always",
            "-c", "credential.helper=",
            "-c", "fetch.fsckObjects=true",
        ]  # fmt: skip
        env = {name: os.environ[name] for name in NETWORK_VARIABLES if name in os.environ}
        env["GIT_TERMINAL_PROMPT"] = "0"
        return config, env

    async def _remote_git(self, *args: str, env: Mapping[str, str]) -> tuple[int, str]:
        """A git command that talks to another repository: bounded by `FETCH_TIMEOUT`."""
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                return await self.remote.run_git(*args, env=env)
        except TimeoutError:
            return -9, f"the repository did not answer within {FETCH_TIMEOUT:.0f}s"

    async def _build(self, job: _Job) -> None:
        app, number, commit = job.app, job.build.number, job.build.new_sha

        def note(line: str) -> None:
            self.store.update_build(app, number, log=line + "\n")

        def fail(line: str) -> None:
            self.store.update_build(app, number, state=BuildState.FAILED, log=line + "\n")

        async with self.remote.serialised(app, note):
            repo = str(await self.remote.ensure_repo(app))
            incoming = f"{INCOMING}/{number}"
            config, env = self._fetch_args(job.url)
            try:
                note(f"fetching {job.source_ref} from {_public(job.url)}…")
                code, out = await self._remote_git(
                    *config,
                    "--git-dir", repo,
                    "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules",
                    "--", job.url, f"+{job.source_ref}:{incoming}",
                    env=env,
                )  # fmt: skip
                if code != 0:
                    fail(f"✗ cannot fetch {job.source_ref} from {_public(job.url)}: nothing was deployed")
                    note("  " + out.replace(job.url, _public(job.url))[-4000:])
                    return
                tip = await self.remote.head(app, incoming)
                if tip != commit:
                    fail(
                        f"✗ {job.source_ref} is at {tip[:7]} now, not {commit[:7]}: this event is out of date "
                        "(a newer one builds the newer commit); nothing was deployed"
                    )
                    return
                old = await self.remote.head(app, job.ref)
                try:
                    upload = await self.remote.archive(app, commit)
                except APIError as exc:
                    fail(f"✗ {exc.message}")
                    return
                try:
                    accepted = await self.remote.deploy(
                        app, build=job.build, branch=job.branch, upload=upload, say=_quiet
                    )
                finally:
                    upload.unlink(missing_ok=True)
                if accepted and not await self.remote.move_ref(app, job.ref, commit, old):
                    note(f"warning: {job.ref} of {app}.git moved meanwhile; it was not moved to {commit[:7]}")
            finally:
                await self.remote.run_git("--git-dir", repo, "update-ref", "-d", incoming)

    async def _end(self, app: str, branch: str, *, check: str | None) -> None:
        """Tear down a preview; with ``check``, only if the branch is gone from that repository."""

        def say(line: str) -> None:
            log.info("%s (GitHub): %s", app, line)

        ref = f"refs/heads/{branch}"
        async with self.remote.serialised(app, say):
            if check is not None:
                config, env = self._fetch_args(check)
                code, out = await self._remote_git(*config, "ls-remote", "--heads", "--", check, ref, env=env)
                if code != 0 or out.strip():
                    say(f"{branch} still exists in {_public(check)} (or cannot be checked): its preview stays")
                    return
            await self.remote.end_preview(app, branch, say)
            old = await self.remote.head(app, ref)
            if old != ZERO_SHA:
                await self.remote.move_ref(app, ref, ZERO_SHA, old)


def _quiet(line: str) -> None:
    """A build from a webhook has no pusher to tell: its output is in the build's log."""


async def _read(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = APIError(
        413,
        f"the delivery is larger than {MAX_BODY // MiB} MiB: send only push and pull request events "
        "(the webhook's settings on GitHub)",
    )
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _payload(body: bytes, content_type: str) -> Any:
    """The event's JSON: the body, or its ``payload`` field when GitHub sends a form."""
    try:
        if content_type.split(";")[0].strip() == "application/x-www-form-urlencoded":
            fields = urllib.parse.parse_qs(body.decode(), max_num_fields=100)
            return json.loads(fields["payload"][0])
        return json.loads(body)
    except (ValueError, KeyError, IndexError):
        raise APIError(
            400, "the delivery is not JSON: set the webhook's content type to application/json on GitHub"
        ) from None
