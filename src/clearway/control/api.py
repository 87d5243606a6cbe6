"""The control plane's REST API (FastAPI, so the OpenAPI document is generated
from the same code that serves it: ``GET /openapi.json``).

Every route under ``/v1`` but ``/v1/health`` and ``/v1/schema`` needs
``Authorization: Bearer <token>``: the operator's API token (created on first
start, see ``control.home``) or, for ``/v1/replica`` and ``/v1/replica/token``
only, a replica's own token (see ``control.credentials``), accepted only while
that replica runs with the incarnation the token names. Errors are JSON
``{"error": ..., "details": ..., "location": ...}`` whose ``error`` says what
to do, because the CLI prints it as it is; a full disk is 507. Every
state-changing call is recorded in the audit log (``control.audit``).

An app's configuration (``/v1/apps/{name}/config``) may be set before its
first deploy, so that the first revision (and, later, a ``git push``) already
has its database URL or API key: the first deploy of that name picks it up.
Secret values are in no response, event or audit row (see ``control.store``).

``/git/<app>.git/...`` is the platform as a git remote (``control.git``): HTTP
Basic with the API token as the password, answered by ``git http-backend``.
Its pre-receive hook calls ``POST /v1/git/<app>/push`` with a per-push token
that is valid for that one push of that one app only; ``GET
/v1/apps/<app>/builds`` lists what pushes built.

Functions (`functions_api`): ``/v1/apps/<app>/functions/<fn>/invoke`` calls one
now, ``.../spawn`` queues a durable invocation (``/v1/invocations/<id>``
follows it, ``/v1/apps/<app>/invocations?state=dead`` is the dead-letter list),
``/v1/apps/<app>/events`` is the CloudEvents ingress, and
``/v1/replica/invocations`` lets an app spawn its own functions. The ingress
takes the operator's token, a replica token of that app, or an *event key*:
a revocable credential of an outside producer (``POST
/v1/apps/<app>/event-keys`` makes one, shown once as ``cwek_<id>_<secret>``;
only the SHA-256 of the secret is stored) that posts events to its one app and
is refused everywhere else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import clearway
from clearway.backends.base import Backend, RevisionObservation
from clearway.control.audit import AuditMiddleware, note
from clearway.control.autoscaler import Autoscaler
from clearway.control.coordination_api import app_holdings, coordination_api
from clearway.control.credentials import PIN_HEADER, TOKEN_TTL, ReplicaIdentity, SigningKey
from clearway.control.event_ingress import (
    MalformedEvents,
    UnroutedEvents,
    invocations_for,
    parse_events,
)
from clearway.control.faults import StorageFull
from clearway.control.git import SERVICES, GitRemote, carries_archive, unauthorized
from clearway.control.invocations import (
    MAX_PAYLOAD,
    TIMEOUT_MARGIN,
    Dispatcher,
    FunctionNotFound,
    Target,
    find_function,
)
from clearway.control.reconciler import Reconciler
from clearway.control.revisions import RevisionBuilder
from clearway.control.rollouts import describe_plan
from clearway.control.schedules import next_fire
from clearway.control.store import (
    RUNNING_STATES,
    BuildState,
    ConfigScope,
    EventKey,
    InvocationKind,
    InvocationState,
    NewInvocation,
    Revision,
    RevisionState,
    Rollout,
    Store,
)
from clearway.control.uploads import check_env, parse_env, receive
from clearway.control.webhooks import GitHubWebhooks, WebhookRequest
from clearway.coordination import Coordinator
from clearway.exceptions import APIError
from clearway.spec.ids import check_name
from clearway.spec.model import json_schema

log = logging.getLogger("clearway.control")


class ScaleRequest(BaseModel):
    component: str
    replicas: Annotated[int, Field(ge=0, le=1000)]
    #: Set the count every preview runs (default 1) rather than production's.
    previews: bool = False


class RollbackRequest(BaseModel):
    revision: str | None = None


#: Longest configuration value accepted (a whole environment must fit the kernel's limit).
MAX_CONFIG_VALUE = 64 * 1024


class ConfigChange(BaseModel):
    """Keys to set (all plain, or all secret) and keys to unset, in one change."""

    set_: Annotated[
        dict[str, Annotated[str, Field(max_length=MAX_CONFIG_VALUE)]], Field(alias="set", max_length=1000)
    ] = Field(default_factory=dict)
    unset: Annotated[list[str], Field(max_length=1000)] = Field(default_factory=list)
    secret: bool = False
    #: The new production revision goes out as a canary rollout, like ``deploy --canary``.
    canary: bool = False


class ProductionBranchRequest(BaseModel):
    branch: Annotated[str, Field(min_length=1, max_length=200)]


class RestartRequest(BaseModel):
    #: The replacement goes out as a canary rollout, like ``deploy --canary``.
    canary: bool = False


class PinTokenRequest(BaseModel):
    ttl: Annotated[int, Field(ge=60, le=24 * 3600)] = TOKEN_TTL


class InvokeRequest(BaseModel):
    """The keyword arguments of one call of a function (a JSON object)."""

    kwargs: dict[str, Any] = Field(default_factory=dict)


class SpawnRequest(InvokeRequest):
    #: An (app, function) runs at most one invocation per key: spawning again returns that one.
    idempotency_key: Annotated[str, Field(min_length=1, max_length=512)] | None = None


class ReplicaSpawnRequest(SpawnRequest):
    function: str


class EventKeyRequest(BaseModel):
    #: Tells the app's keys apart (who produces with it), in listings and the audit log.
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = "producer"


#: What an event key looks like: ``cwek_<id>_<secret>`` (the id is 8 hex digits,
#: the secret 32 random bytes, url-safe base64).
EVENT_KEY_PREFIX = "cwek_"
_EVENT_KEY = re.compile(r"cwek_([0-9a-f]{8})_([A-Za-z0-9_-]{16,128})")


def _secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_event_key(store: Store, app: str, name: str) -> tuple[str, str]:
    """A new event key of ``app``: its id and the key itself (shown this once)."""
    secret = secrets.token_urlsafe(32)
    key_id = store.create_event_key(app, name=name, secret_hash=_secret_hash(secret))
    return key_id, f"{EVENT_KEY_PREFIX}{key_id}_{secret}"


def read_event_key(store: Store, given: str) -> EventKey | None:
    """The stored key ``given`` is (of whichever app), or None when it is malformed,
    unknown, revoked or its secret is wrong."""
    match = _EVENT_KEY.fullmatch(given)
    if match is None:
        return None
    found = store.event_key(match.group(1))
    if found is None:
        return None
    if not hmac.compare_digest(_secret_hash(match.group(2)).encode(), found.secret_hash.encode()):
        return None
    return found


def basic_password(header: str) -> str:
    """The password of an ``Authorization: Basic`` header ("" when there is none)."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]


def _error(status: int, message: str, *, details: str | None = None, location: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "details": details, "location": location}, status_code=status)


def canary_plan(revision: Revision) -> dict[str, Any]:
    """What ``deploy --canary`` shows before it waits: the steps and the least time to promote."""
    policy = revision.spec.canary
    return {
        "steps": list(policy.steps),
        "min_duration": policy.min_duration,
        "min_requests": policy.min_requests,
        "minimum_seconds": policy.minimum_seconds,
        "smoke_checks": [c.name for c in revision.spec.smoke_checks],
        "sticky": policy.sticky,
        "summary": describe_plan(revision),
    }


def revision_phase(rev: Revision, rollout: Rollout | None) -> str:
    """A revision's place in the lifecycle, in the words ``clearway status`` shows."""
    if rev.state is RevisionState.CANARY:
        weight = rollout.weight if rollout is not None and rollout.canary == rev.id else 0
        return f"canary {weight}%"
    if rev.state is RevisionState.ACTIVE:
        return "preview" if rev.branch is not None else "serving"
    return rev.state.value


def app_phase(production: list[Revision], rollout: Rollout | None, builds: list[Any]) -> str:
    """The app's production lifecycle now: building, testing, starting, canary N%,
    serving, rolled back, failed, or none."""
    latest_build = builds[0] if builds else None
    if latest_build is not None and latest_build.state in (BuildState.BUILDING, BuildState.TESTING):
        return str(latest_build.state.value)
    if rollout is not None:
        return f"canary {rollout.weight}%"
    if not production:
        return "none"
    newest = max(production, key=lambda r: r.number)
    if newest.state is RevisionState.STARTING:
        return "starting"
    if newest.state in (RevisionState.ROLLED_BACK, RevisionState.FAILED):
        return newest.state.value
    return "serving" if any(r.state is RevisionState.ACTIVE for r in production) else "none"


def create_api(
    *,
    store: Store,
    backend: Backend,
    reconciler: Reconciler,
    builder: RevisionBuilder,
    token: str,
    signing: SigningKey,
    on_shutdown: Callable[[], None],
    git: GitRemote | None = None,
    webhooks: GitHubWebhooks | None = None,
    dispatcher: Dispatcher | None = None,
    coordinator: Coordinator | None = None,
) -> FastAPI:
    api = FastAPI(
        title="clearway control plane",
        version=clearway.__version__,
        description="Deploy, scale, roll back and observe apps. Authenticate with `Authorization: Bearer <token>` (the token is in $CLEARWAY_HOME/token).",
    )
    upload_dir: Path = builder.work_root

    def identify(authorization: str) -> str:
        """The audit principal of a request: never raises, never returns the token."""
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() == "basic":
            return "operator" if basic_password(authorization) == token else "anonymous"
        if scheme.lower() != "bearer" or not given:
            return "anonymous"
        if hmac.compare_digest(given.encode(), token.encode()):
            return "operator"
        if git is not None and git.tokens.app_of(given) is not None:
            return "operator"  # the hook of the operator's own push (control.git)
        if given.startswith(EVENT_KEY_PREFIX):
            key = read_event_key(store, given)
            return f"event key {key.id}" if key is not None else "anonymous"
        identity = signing.read_replica_token(given)
        return identity.replica if identity is not None else "anonymous"

    api.add_middleware(AuditMiddleware, store=store, identify=identify)

    def refused(request: Request, message: str) -> None:
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            note(request, detail=f"refused: {message}")

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        refused(request, exc.message)
        return _error(exc.status, exc.message, details=exc.details)

    @api.exception_handler(StorageFull)
    async def _storage_full(request: Request, exc: StorageFull) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc.message)
        refused(request, exc.message)
        return _error(507, exc.message)

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        refused(request, f"invalid request: {problems}")
        return _error(422, f"invalid request: {problems}")

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        refused(request, str(exc.detail))
        return _error(exc.status_code, str(exc.detail))

    async def authenticate(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise APIError(
                401,
                "missing or wrong API token: send `Authorization: Bearer <token>` with the token "
                "from $CLEARWAY_HOME/token (the clearway CLI does this for you)",
            )

    auth = [Depends(authenticate)]

    async def replica_identity(request: Request) -> ReplicaIdentity:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        identity = signing.read_replica_token(given) if scheme.lower() == "bearer" else None
        if identity is None:
            raise APIError(
                401,
                "missing, expired or wrong replica token: send `Authorization: Bearer $CLEARWAY_REPLICA_TOKEN` "
                "(the platform sets it in every replica's environment; renew it with POST /v1/replica/token)",
            )
        if backend.replica_incarnation(identity.replica) != identity.incarnation:
            # A stopped or restarted replica's token dies with its process.
            raise APIError(
                401,
                f"replica token of {identity.replica} is for a process that no longer runs "
                "(stopped or restarted); the running process has a token of its own",
            )
        note(request, app=identity.app)
        return identity

    def need_app(name: str) -> None:
        if store.app(name) is None:
            known = ", ".join(a.name for a in store.apps()) or "none yet"
            raise APIError(404, f"no app named {name!r} (apps: {known}); `clearway status` lists them")

    def app_view(name: str) -> dict[str, Any]:
        record = store.app(name)
        assert record is not None
        revisions = store.revisions(name)
        active = next((r for r in revisions if r.state is RevisionState.ACTIVE and r.branch is None), None)
        rollout = store.rollout(name)
        observed = backend.observe()
        production = [r for r in revisions if r.branch is None]
        spec = active.spec if active else (production[-1].spec if production else None)
        components = []
        if active is not None:
            wanted = reconciler.replicas_wanted(active, record)
            obs = observed.get(active.id)
            for comp in active.spec.components:
                seen = obs.components.get(comp.name) if obs else None
                components.append(
                    {
                        "name": comp.name,
                        "kind": comp.kind,
                        "desired": wanted[comp.name],
                        "ready": seen.ready if seen else 0,
                    }
                )
        builds = store.builds(name, limit=5)
        previews = [
            {
                "branch": r.branch,
                "revision": r.id,
                "commit": r.commit,
                "state": r.state.value,
                "urls": backend.urls(r.spec, branch=r.branch, commit=r.commit),
            }
            for r in revisions
            if r.branch is not None and r.state is RevisionState.ACTIVE
        ]
        return {
            "name": name,
            "phase": app_phase(production, rollout, builds),
            "active_revision": active.id if active else None,
            "urls": backend.urls(spec) if spec and active else [],
            "components": components,
            "rollout": rollout.to_json() if rollout else None,
            "previews": previews,
            "production_branch": store.production_branch(name),
            "builds": [b.to_json() for b in builds],
            "revisions": [_revision_view(r, observed, rollout) for r in revisions],
            "replicas": [r.to_json() for r in backend.replicas(name)],
            "events": store.events(name),
        }

    def _revision_view(
        rev: Revision, observed: Mapping[str, RevisionObservation], rollout: Rollout | None = None
    ) -> dict[str, Any]:
        view = rev.to_json()
        del view["spec"]
        view["phase"] = revision_phase(rev, rollout)
        obs = observed.get(rev.id)
        view["components"] = (
            {n: {"desired": c.desired, "ready": c.ready} for n, c in obs.components.items()}
            if obs
            else {}
        )
        return view

    @api.get("/v1/health", tags=["platform"])
    async def health() -> dict[str, str]:
        """Liveness of the control plane (no token needed)."""
        return {"status": "ok", "version": clearway.__version__}

    @api.get("/v1/schema", tags=["platform"])
    async def schema() -> dict[str, Any]:
        """The JSON Schema of the app spec."""
        return json_schema()

    @api.post("/v1/deploy", status_code=202, dependencies=auth, tags=["apps"])
    async def deploy(
        request: Request,
        app_file: str = "app.py",
        env: Annotated[list[str] | None, Query()] = None,
        canary: bool = False,
    ) -> dict[str, Any]:
        """Upload a project (gzipped tar) and start a new revision from it.

        Returns at once with the revision id; poll ``GET /v1/revisions/{id}``
        until its state is ``active`` or ``failed``. With ``canary=true`` a
        revision that becomes ready while another serves goes out as a rollout
        (state ``canary``; ``GET /v1/apps/{name}/rollout`` follows it); the
        answer's ``canary`` holds the plan (its steps and least time to promote).
        """
        pairs = parse_env(env or [])
        limit = builder.limits.max_compressed
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"the upload is larger than {limit // 2**20} MiB compressed: leave data, virtualenvs "
                "and build output out (list them in a .clearwayignore file)",
            )
        if pairs:
            note(request, detail=f"env keys: {', '.join(sorted(pairs))}")
        upload = await receive(request.stream(), upload_dir, max_bytes=limit)
        try:
            revision, environment = await builder.build_with_environment(
                upload, app_file=app_file, env=pairs, canary=canary
            )
        finally:
            upload.unlink(missing_ok=True)
        note(
            request,
            app=revision.app,
            detail=f"revision {revision.id}" + (f"; env keys: {', '.join(sorted(pairs))}" if pairs else ""),
        )
        reconciler.poke()
        return {
            "revision": revision.id,
            "app": revision.app,
            "state": revision.state.value,
            "environment": {"digest": environment.digest, "reused": environment.reused, "log": environment.log},
            "canary": canary_plan(revision) if canary else None,
        }

    @api.get("/v1/apps", dependencies=auth, tags=["apps"])
    async def list_apps() -> list[dict[str, Any]]:
        """Every app with its serving revision, URLs and readiness."""
        return [app_view(a.name) for a in store.apps()]

    @api.get("/v1/apps/{name}", dependencies=auth, tags=["apps"])
    async def get_app(name: str) -> dict[str, Any]:
        need_app(name)
        view = app_view(name)
        if coordinator is not None:
            # Who holds each lock and leads each singleton (clearway.control.coordination_api).
            view["locks"] = await app_holdings(coordinator, name)
        return view

    @api.delete("/v1/apps/{name}", dependencies=auth, tags=["apps"])
    async def delete_app(name: str) -> dict[str, str]:
        """Stop every replica of the app and forget it."""
        need_app(name)
        store.delete_app(name)
        reconciler.poke()
        await reconciler.wait_pass()
        if not await backend.converged():
            log.warning("deleted app %s; the gateway has not confirmed its new routes yet", name)
        return {"deleted": name}

    @api.get("/v1/revisions/{rev_id}", dependencies=auth, tags=["apps"])
    async def get_revision(rev_id: str) -> dict[str, Any]:
        rev = store.revision(rev_id)
        if rev is None:
            raise APIError(404, f"no revision {rev_id!r}; `clearway status APP` lists an app's revisions")
        return _revision_view(rev, backend.observe(), store.rollout(rev.app)) | {
            "spec": rev.spec.model_dump(mode="json"),
            # A fault keeping the platform from moving any revision on (a full
            # disk): `clearway deploy` shows it instead of waiting forever.
            "platform_error": reconciler.fault,
        }

    @api.post("/v1/revisions/{rev_id}/pin-token", dependencies=auth, tags=["apps"])
    async def pin_token(request: Request, rev_id: str, body: PinTokenRequest | None = None) -> dict[str, Any]:
        """A credential that lets its bearer pin requests to this revision.

        Send both ``x-clearway-revision: <id>`` and ``x-clearway-pin-token:
        <token>`` to the gateway: a revision at weight 0 (a deploy being
        checked) answers only pinned requests that carry a valid one.
        """
        rev = store.revision(rev_id)
        if rev is None:
            raise APIError(404, f"no revision {rev_id!r}; `clearway status APP` lists an app's revisions")
        issued = signing.mint_pin_token(rev.app, rev.id, ttl=(body or PinTokenRequest()).ttl)
        note(request, app=rev.app, detail=f"pin token for {rev.id}, expires {issued.expires_at}")
        return {"header": PIN_HEADER, "token": issued.token, "expires_at": issued.expires_at}

    @api.get("/v1/audit", dependencies=auth, tags=["platform"])
    async def audit(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        app: str | None = None,
    ) -> list[dict[str, Any]]:
        """State-changing API calls, newest last: who (operator or replica id), what, when, outcome."""
        return [entry.to_json() for entry in store.audit(limit=limit, app=app)]

    @api.post("/v1/apps/{name}/scale", dependencies=auth, tags=["apps"])
    async def scale(request: Request, name: str, body: ScaleRequest) -> dict[str, Any]:
        """Set a component's replica count; it sticks across deploys."""
        need_app(name)
        revs = store.revisions(name, states=set(RUNNING_STATES))
        known = {c.name for r in revs for c in r.spec.components}
        if body.component not in known:
            raise APIError(
                404,
                f"app {name!r} has no component {body.component!r} (components: {', '.join(sorted(known)) or 'none'})",
            )
        active = store.active(name)
        function = next((f for f in active.spec.functions if f.name == body.component), None) if active else None
        if function is not None and active is not None and not body.previews:
            # A function's replicas are the autoscaler's: this sets them now, and the
            # next request (or idle window) decides again.
            note(request, detail=f"{body.component}={body.replicas} (function, now)")
            decision = reconciler.autoscaler.force(
                active.id, function, body.replicas, reason="set by the operator (`clearway scale`)"
            )
            store.add_event(name, f"function {body.component} of {active.id}: {decision.replicas_from} -> "
                            f"{decision.replicas_to} replicas ({decision.reason})")
            reconciler.poke()
            return {"app": name, "component": body.component, "replicas": decision.replicas_to, "previews": False}
        where = " in previews" if body.previews else ""
        note(request, detail=f"{body.component}={body.replicas}{where}")
        store.set_scale(name, body.component, body.replicas, previews=body.previews)
        store.add_event(name, f"scaled {body.component} to {body.replicas}{where}")
        reconciler.poke()
        return {"app": name, "component": body.component, "replicas": body.replicas, "previews": body.previews}

    @api.get("/v1/apps/{name}/config", dependencies=auth, tags=["apps"])
    async def get_config(name: str, scope: ConfigScope = ConfigScope.PRODUCTION) -> dict[str, Any]:
        """The app's configuration (production's, or with ``scope=preview`` every
        preview's); secrets show ``"value": null``."""
        entries = store.config(name, scope)
        if not entries:
            need_app(name)
        return {"app": name, "scope": scope.value, "config": [e.to_json() for e in entries]}

    def same_artifact(base: Revision, *, canary: bool = False) -> Revision:
        """A new revision of ``base``'s code, environment, interpreter and spec, on the
        same track, under the app's configuration as it is now. Call it under the
        builder's artifact lock: garbage collection must not delete that artifact meanwhile."""
        return store.create_revision(
            base.spec,
            code_dir=base.code_dir,
            app_file=base.app_file,
            env=base.deploy_env,
            env_digest=base.env_digest,
            python=base.python,
            branch=base.branch,
            commit=base.commit,
            canary=canary,
        )

    @api.post("/v1/apps/{name}/config", status_code=202, dependencies=auth, tags=["apps"])
    async def change_config(
        request: Request, name: str, body: ConfigChange, scope: ConfigScope = ConfigScope.PRODUCTION
    ) -> dict[str, Any]:
        """Set and unset configuration; the serving code restarts with it as a new revision.

        The new revision has the artifact (code, environment, interpreter) and
        spec of the revision the app is heading to (the active one, or the one
        being started), runs through ``starting`` to ``active`` like any deploy
        and is returned at once; poll ``GET /v1/revisions/{id}``. Without any
        such revision (no deploy yet, or none serving) the configuration is only
        stored and ``revision`` is null: the next deploy uses it. The ``--env`` of
        the deploy the artifact came from still overrides the configuration:
        ``shadowed`` names the keys set here that it hides. With ``scope=preview``
        the change applies to previews: each running preview restarts with it
        (``revision`` is then the first of them, ``revisions`` lists them all).
        With ``canary`` the production revision goes out as a rollout (``canary``
        in the answer holds its plan), judged against the one it replaces.
        """
        for key, value in body.set_.items():
            check_env(key, value)
        for key in body.unset:
            check_env(key)
        if not body.set_ and not body.unset:
            raise APIError(422, "nothing to change: give keys to set (KEY=VALUE) or to unset")
        if body.canary and scope is ConfigScope.PREVIEW:
            raise APIError(422, "previews take a change at once, not as a canary: drop --canary or --preview")
        both = sorted(set(body.set_) & set(body.unset))
        if both:
            raise APIError(422, f"{', '.join(both)}: both set and unset in one change; do one or the other")
        known = {e.key for e in store.config(name, scope)}
        missing = sorted(set(body.unset) - known)
        if missing:
            raise APIError(
                404,
                f"{name} has no configuration {', '.join(missing)} to unset "
                f"(set: {', '.join(sorted(known)) or 'nothing'}); `clearway config {name}` lists it",
            )
        parts = []
        if body.set_:
            parts.append(f"set {', '.join(sorted(body.set_))}" + (" (secret)" if body.secret else ""))
        if body.unset:
            parts.append(f"unset {', '.join(sorted(body.unset))}")
        note(request, app=name, detail="; ".join(parts))
        running = [r for r in store.revisions(name, states=set(RUNNING_STATES))]
        # The revision each track is heading to: production's, or every preview branch's.
        bases: dict[str | None, Revision] = {}
        for rev in sorted(running, key=lambda r: r.started_at or 0):
            if (rev.branch is None) == (scope is ConfigScope.PRODUCTION):
                bases[rev.branch] = rev
        # Under the artifact lock: garbage collection must not delete the code or
        # environment the new revision is being made from.
        async with builder.artifact_lock:
            store.change_config(name, set_=body.set_, unset=body.unset, secret=body.secret, scope=scope)
            made = [same_artifact(base, canary=body.canary) for base in bases.values()]
        if made:
            note(request, detail=f"{'; '.join(parts)}; revisions {', '.join(r.id for r in made)}")
            reconciler.poke()
        revision = made[0] if made else None
        shadowed = sorted({k for b in bases.values() for k in set(body.set_) & set(b.deploy_env)})
        return {
            "app": name,
            "scope": scope.value,
            "revision": revision.id if revision else None,
            "revisions": [r.id for r in made],
            "state": revision.state.value if revision else None,
            "canary": canary_plan(revision) if revision is not None and body.canary else None,
            "set": sorted(body.set_),
            "unset": sorted(body.unset),
            "shadowed": shadowed,
        }

    @api.post("/v1/apps/{name}/rollback", status_code=202, dependencies=auth, tags=["apps"])
    async def rollback(request: Request, name: str, body: RollbackRequest | None = None) -> dict[str, Any]:
        """Bring back an earlier revision (default: the one before the active one).

        While a rollout runs, rolling back without naming a revision aborts it:
        the stable revision keeps (gets back) all the traffic at once.
        """
        need_app(name)
        if (body is None or not body.revision) and store.rollout(name) is not None:
            ended = reconciler.rollouts.abort(name, reason="rolled back by the operator (`clearway rollback`)")
            reconciler.poke()
            assert ended is not None
            note(request, detail=f"aborted the rollout of {ended.canary}; {ended.stable} keeps serving")
            return {"revision": ended.stable, "app": name, "state": RevisionState.ACTIVE.value, "rollout": ended.to_json()}
        revisions = [r for r in store.revisions(name) if r.branch is None]
        if body is not None and body.revision:
            target = next((r for r in revisions if r.id == body.revision or str(r.number) == body.revision), None)
            if target is None:
                raise APIError(404, f"app {name!r} has no revision {body.revision!r}; `clearway status {name}` lists them")
            if target.state in (RevisionState.FAILED, RevisionState.ROLLED_BACK):
                raise APIError(409, f"revision {target.id} {target.state.value} before: pick another one")
            if target.pruned_at is not None:
                raise APIError(
                    409,
                    f"deploy that code again, or roll back to a newer revision: the code of {target.id} was "
                    "deleted to free space (the platform keeps the last revisions of each app; "
                    "`clearway up --keep-revisions N` keeps more)",
                )
        else:
            # The revision that served most recently before the active one.
            candidates = [
                r
                for r in revisions
                if r.state is RevisionState.RETIRED and r.activated_at is not None and r.pruned_at is None
            ]
            if not candidates:
                raise APIError(409, f"app {name!r} has no earlier revision that served traffic to roll back to")
            target = max(candidates, key=lambda r: r.activated_at or 0)
        if target.state is RevisionState.ACTIVE:
            raise APIError(409, f"revision {target.id} is already serving")
        note(request, detail=f"to {target.id}")
        store.restart_revision(target.id)
        reconciler.poke()
        return {"revision": target.id, "app": name, "state": RevisionState.STARTING.value}

    @api.post("/v1/apps/{name}/restart", status_code=202, dependencies=auth, tags=["apps"])
    async def restart(request: Request, name: str, body: RestartRequest | None = None) -> dict[str, Any]:
        """Replace every replica of the serving revision, without downtime.

        The replacement is a new revision of the same code, environment and spec
        (``restarts`` names the one it replaces), started like any deploy: the
        old replicas serve until the new ones are ready, then drain. A new
        revision rather than a restart in place because that path already is
        zero-downtime, survives a control-plane crash midway, and shows in
        ``clearway status`` and the audit log; it is what a configuration change
        does too. Replicas pick up the app's configuration as it is now.

        Refused while another revision is starting or a rollout runs: their end
        would decide which code the restart restarts. Poll ``GET /v1/revisions/{id}``.
        With ``canary`` the replacement goes out as a rollout (``canary`` in the
        answer holds its plan): replacing processes can matter too (a warmed cache,
        a leaked resource), and the analysis compares the fresh ones with the old.
        """
        canary = body is not None and body.canary
        need_app(name)
        if store.rollout(name) is not None:
            raise APIError(
                409,
                f"a rollout of {name} is running: `clearway rollout promote {name}` or "
                f"`clearway rollout abort {name}` first, then restart",
            )
        production = [r for r in store.revisions(name, states=set(RUNNING_STATES)) if r.branch is None]
        starting = [r for r in production if r.state is RevisionState.STARTING]
        if starting:
            raise APIError(
                409,
                f"{starting[0].id} of {name} is starting: wait until it serves (or fails), then restart",
            )
        active = [r for r in production if r.state is RevisionState.ACTIVE]
        if not active:
            raise APIError(409, f"{name} has no serving revision to restart: `clearway deploy` it first")
        base = active[0]
        async with builder.artifact_lock:
            revision = same_artifact(base, canary=canary)
        note(request, detail=f"{base.id} replaced by {revision.id} (same code{', canary' if canary else ''})")
        reconciler.poke()
        return {
            "app": name,
            "revision": revision.id,
            "restarts": base.id,
            "state": revision.state.value,
            "canary": canary_plan(revision) if canary else None,
        }

    @api.get("/v1/apps/{name}/rollout", dependencies=auth, tags=["rollouts"])
    async def get_rollout(name: str, limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
        """The running rollout (``current``, null when none runs) and the newest ones (``history``)."""
        need_app(name)
        current = store.rollout(name)
        return {
            "current": current.to_json() if current else None,
            "history": [r.to_json() for r in store.rollouts(name, limit=limit)],
        }

    async def end_rollout(request: Request, name: str, *, promote: bool) -> dict[str, Any]:
        need_app(name)
        end = reconciler.rollouts.promote if promote else reconciler.rollouts.abort
        verb = "promoted" if promote else "aborted"
        ended = end(name, reason=f"{verb} by the operator (`clearway rollout {'promote' if promote else 'abort'}`)")
        if ended is None:
            raise APIError(409, f"{name} has no rollout running; `clearway rollout status {name}` shows the last one")
        note(
            request,
            detail=f"promoted {ended.canary} over {ended.stable}"
            if promote
            else f"aborted {ended.canary}; {ended.stable} keeps serving",
        )
        reconciler.poke()
        await reconciler.wait_pass()
        return ended.to_json()

    @api.post("/v1/apps/{name}/rollout/promote", dependencies=auth, tags=["rollouts"])
    async def promote_rollout(request: Request, name: str) -> dict[str, Any]:
        """Skip the remaining steps: the canary takes all traffic now and becomes the active revision."""
        return await end_rollout(request, name, promote=True)

    @api.post("/v1/apps/{name}/rollout/abort", dependencies=auth, tags=["rollouts"])
    async def abort_rollout(request: Request, name: str) -> dict[str, Any]:
        """Roll back now: all traffic to the stable revision; the canary stops."""
        return await end_rollout(request, name, promote=False)

    @api.get("/v1/apps/{name}/logs", dependencies=auth, tags=["apps"], response_class=PlainTextResponse)
    async def logs(
        name: str,
        follow: bool = False,
        tail: Annotated[int, Query(ge=0, le=100_000)] = 100,
        component: str | None = None,
        revision: str | None = None,
    ) -> Response:
        """Replica logs, each line prefixed with the replica id; ``follow`` streams."""
        need_app(name)

        async def lines() -> AsyncIterator[bytes]:
            async for line in backend.logs(name, revision=revision, component=component, tail=tail, follow=follow):
                yield (line if line.endswith("\n") else line + "\n").encode()

        return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")

    @api.get("/v1/replica", tags=["replicas"])
    # A default, not Annotated[...]: FastAPI resolves string annotations in the
    # module's globals, where the local ``replica_identity`` does not exist.
    async def replica_self(identity: ReplicaIdentity = Depends(replica_identity)) -> dict[str, Any]:  # noqa: B008
        """Who the calling replica is, and its component's spec (replica token only).

        The channel replicas use to reach the control plane; coordination
        (locks, leader election, sharding) will live under ``/v1/replica``.
        """
        revision = store.revision(identity.revision)
        component = None
        if revision is not None:
            try:
                component = revision.spec.component(identity.component).model_dump(mode="json")
            except KeyError:
                component = None
        return {
            "app": identity.app,
            "revision": identity.revision,
            "component": identity.component,
            "replica": identity.replica,
            "revision_state": revision.state.value if revision else None,
            "spec": component,
        }

    @api.post("/v1/replica/token", tags=["replicas"])
    async def replica_renew(identity: ReplicaIdentity = Depends(replica_identity)) -> dict[str, Any]:  # noqa: B008
        """A fresh token for the calling replica (replica token only).

        Tokens expire after an hour; a replica renews before then. Only the
        process running now can: the new token carries the same incarnation.
        """
        issued = signing.mint_replica_token(identity, identity.incarnation)
        return {"token": issued.token, "expires_at": issued.expires_at}

    if git is not None:
        remote = git

        def git_allowed(request: Request) -> bool:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() == "bearer":
                return hmac.compare_digest(given.encode(), token.encode())
            return hmac.compare_digest(basic_password(header).encode(), token.encode())

        async def git_service(request: Request, app: str, service: str) -> Response:
            if not git_allowed(request):
                refused(request, "missing or wrong API token")
                return unauthorized(
                    "clearway: missing or wrong API token; use it as the password: "
                    "git remote add clearway http://x:<token>@<API address>/git/APP.git "
                    "(the token is in $CLEARWAY_HOME/token)"
                )
            note(request, app=app)
            return await remote.serve(request, app, service)

        @api.get("/git/{app}.git/info/refs", tags=["git"], include_in_schema=False)
        async def git_info_refs(request: Request, app: str) -> Response:
            return await git_service(request, app, "info/refs")

        @api.post("/git/{app}.git/git-upload-pack", tags=["git"], include_in_schema=False)
        async def git_upload_pack(request: Request, app: str) -> Response:
            return await git_service(request, app, "git-upload-pack")

        @api.post("/git/{app}.git/git-receive-pack", tags=["git"], include_in_schema=False)
        async def git_receive_pack(request: Request, app: str) -> Response:
            return await git_service(request, app, "git-receive-pack")

        assert set(SERVICES) == {"info/refs", "git-upload-pack", "git-receive-pack"}

        @api.post("/v1/git/{name}/push", tags=["git"])
        async def git_push(
            request: Request,
            name: str,
            ref: Annotated[str, Query(max_length=1000)],
            old: Annotated[str, Query(pattern="^[0-9a-f]{40}$")],
            new: Annotated[str, Query(pattern="^[0-9a-f]{40}$")],
        ) -> Response:
            """One ref update of a running push, from the repository's hook (per-push token only).

            Streams progress lines; the last is ``clearway-push: accepted`` or
            ``clearway-push: rejected``. For a branch (not a deletion) the body
            is the pushed tree as a gzipped tar.
            """
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or remote.tokens.app_of(given) != name:
                raise APIError(401, f"missing or wrong push token: only the hook of a running push to {name} may call this")
            note(request, app=name, detail=f"push {ref} {old[:12]}..{new[:12]}")
            upload = None
            if carries_archive(ref, new):
                upload = await receive(request.stream(), upload_dir, max_bytes=remote.max_push)

            def audit_outcome(detail: str) -> None:
                note(request, detail=detail)

            return StreamingResponse(
                remote.push_stream(name, ref=ref, old=old, new=new, upload=upload, audit=audit_outcome),
                media_type="text/plain; charset=utf-8",
            )

        @api.get("/v1/apps/{name}/production-branch", dependencies=auth, tags=["git"])
        async def get_production_branch(name: str) -> dict[str, Any]:
            """The branch whose pushes go to the app's production (``main`` unless chosen)."""
            return {"app": name, "branch": store.production_branch(name)}

        @api.put("/v1/apps/{name}/production-branch", dependencies=auth, tags=["git"])
        async def set_production_branch(request: Request, name: str, body: ProductionBranchRequest) -> dict[str, Any]:
            """Choose the app's production branch, also before its first push.

            It takes effect at the next push; what production serves keeps serving. A
            running preview of the new branch is torn down (``ended_previews``): it
            could never end otherwise, as the production branch cannot be deleted.
            """
            try:
                check_name(name, "app name")
            except ValueError as exc:
                raise APIError(422, str(exc)) from None
            before = store.production_branch(name)
            ended = await remote.set_production_branch(name, body.branch)
            note(request, app=name, detail=f"{before} -> {body.branch}" + (f"; ended preview {', '.join(ended)}" if ended else ""))
            return {"app": name, "branch": body.branch, "before": before, "ended_previews": ended}

        @api.get("/v1/apps/{name}/builds", dependencies=auth, tags=["apps"])
        async def list_builds(name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> list[dict[str, Any]]:
            """The app's newest builds (pushes to its production branch), oldest first."""
            return [b.to_json() for b in store.builds(name, limit=limit)]

        @api.get("/v1/apps/{name}/builds/{number}", dependencies=auth, tags=["apps"])
        async def get_build(name: str, number: int) -> dict[str, Any]:
            """One build with its output (environment, test summary, start)."""
            found = store.build(name, number)
            if found is None:
                raise APIError(404, f"{name} has no build {number}; `clearway builds {name}` lists them")
            return found.to_json(with_log=True)

    if webhooks is not None:
        hooks = webhooks

        @api.post("/v1/apps/{name}/webhook", dependencies=auth, tags=["git"])
        async def create_webhook(request: Request, name: str, body: WebhookRequest | None = None) -> dict[str, Any]:
            """Create or replace the app's GitHub webhook (``control.webhooks``).

            The secret is in this answer only; creating the webhook again makes a new one.
            """
            hook = hooks.register(name, body.repository if body else None)
            note(request, app=name, detail="webhook " + ("for one repository" if hook.repository else "for any https repository"))
            return {
                "app": name,
                "url": f"{str(request.base_url).rstrip('/')}/v1/webhooks/github/{name}",
                "secret": hook.secret,
                "content_type": "application/json",
                "events": ["push", "pull_request"],
                "repository": hook.public_repository,
            }

        @api.post("/v1/webhooks/github/{name}", tags=["git"])
        async def github_webhook(request: Request, name: str) -> JSONResponse:
            """A delivery of GitHub (no token: ``X-Hub-Signature-256`` signs it). 202: a build started."""
            delivery = await hooks.deliver(name, request)
            note(request, app=name, detail=f"github {request.headers.get('x-github-event', '?')}: {delivery.summary}")
            return JSONResponse(delivery.body, status_code=delivery.status)

    if dispatcher is not None:
        functions_api(
            api,
            store=store,
            backend=backend,
            dispatcher=dispatcher,
            token=token,
            auth=auth,
            need_app=need_app,
            replica_identity=replica_identity,
            autoscaler=reconciler.autoscaler,
        )

    if coordinator is not None:
        coordination_api(
            api, coordinator=coordinator, auth=auth, need_app=need_app, replica_identity=replica_identity
        )

    @api.get("/v1/metrics", dependencies=auth, tags=["platform"], response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Gateway metrics per revision, in Prometheus text format."""
        return PlainTextResponse(await backend.metrics(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/shutdown", dependencies=auth, tags=["platform"])
    async def shutdown() -> dict[str, str]:
        """Stop every app, the gateway and the control plane (``clearway down``)."""
        on_shutdown()
        return {"status": "stopping"}

    return api


def functions_api(
    api: FastAPI,
    *,
    store: Store,
    backend: Backend,
    dispatcher: Dispatcher,
    token: str,
    auth: list[Any],
    need_app: Callable[[str], None],
    replica_identity: Callable[[Request], Awaitable[ReplicaIdentity]],
    autoscaler: Autoscaler | None = None,
) -> None:
    """The routes of functions: calls, durable invocations and the events ingress
    (``control.invocations``, ``control.schedules``, ``control.event_ingress``).

    The replica routes (``/v1/replica/invocations``) let an app's code spawn its
    own functions and follow those invocations, never another app's.
    """

    def function_target(app: str, function: str, *, caller_revision: str | None = None) -> Target:
        """Where a call of the function goes: the app's serving revision, or for a
        caller in a preview, that preview. Before the app's first revision serves,
        the function is looked up in the caller's (or the newest starting) revision."""
        need_app(app)
        caller = store.revision(caller_revision) if caller_revision is not None else None
        preview = caller.id if caller is not None and caller.branch is not None else None
        try:
            return find_function(store, app, function, revision=preview)
        except FunctionNotFound as exc:
            if not exc.waiting:
                raise APIError(404, f"{exc.reason}; `clearway functions {app}` lists them") from None
            starting = [r for r in store.revisions(app, states={RevisionState.STARTING}) if r.branch is None]
            for rev in [caller] if caller is not None else starting[::-1]:
                found = next((f for f in rev.spec.functions if f.name == function), None)
                if found is not None:
                    return Target(found)
            raise APIError(409, f"{exc.reason}: deploy it first (`clearway status {app}` shows why)") from None

    def encoded(kwargs: dict[str, Any]) -> str:
        payload = json.dumps(kwargs, separators=(",", ":"))
        if len(payload) > MAX_PAYLOAD:
            raise APIError(
                413, f"the arguments take {len(payload)} bytes as JSON; at most {MAX_PAYLOAD // 2**20} MiB: "
                "pass large data by reference (a URL, a key in your storage)",
            )
        return payload

    def spawn(app: str, function: str, target: Target, body: SpawnRequest) -> dict[str, Any]:
        invocation, created = store.enqueue_invocation(
            NewInvocation(
                app=app,
                function=function,
                kind=InvocationKind.SPAWN,
                payload=encoded(body.kwargs),
                max_attempts=target.spec.retries + 1,
                idempotency_key=body.idempotency_key,
                revision=target.revision,
            )
        )
        if created:
            dispatcher.poke()
        return {"id": invocation.id, "created": created, "state": invocation.state.value}

    async def read_capped(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length", "")
        too_big = APIError(413, f"the request is larger than {limit // 2**20} MiB: send fewer or smaller events")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @api.get("/v1/apps/{name}/functions", dependencies=auth, tags=["functions"])
    async def list_functions(name: str) -> dict[str, Any]:
        """The functions of the app's serving revision: triggers, replicas and invocations per state."""
        need_app(name)
        active = store.active(name)
        if active is None:
            return {"app": name, "revision": None, "functions": []}
        observed = backend.observe().get(active.id)
        counts = store.invocation_counts(name)
        marks = store.schedule_marks()
        # The newest start-up of each function's replicas: how, and how long (clearway.backends).
        starts = {comp: start for (rev, comp), start in backend.last_starts(name).items() if rev == active.id}
        views = []
        for fn in active.spec.functions:
            seen = observed.components.get(fn.name) if observed else None
            mark = marks.get((name, fn.name))
            views.append(
                {
                    "name": fn.name,
                    "triggers": {
                        "http": fn.http,
                        "events": list(fn.events),
                        "schedule": fn.schedule.model_dump(mode="json", exclude_none=True) if fn.schedule else None,
                    },
                    "next_fire": next_fire(fn.schedule, mark) if fn.schedule and mark is not None else None,
                    "min_replicas": fn.min_replicas,
                    "max_replicas": fn.max_replicas,
                    "max_concurrency": fn.max_concurrency,
                    "timeout": fn.timeout,
                    "retries": fn.retries,
                    "desired": seen.desired if seen else 0,
                    "ready": seen.ready if seen else 0,
                    "last_start": starts[fn.name].to_json() if fn.name in starts else None,
                    "invocations": {s.value: counts.get(fn.name, {}).get(s.value, 0) for s in InvocationState},
                    # The autoscaler's view: replicas wanted, in flight, held, idle time, decisions.
                    "scaling": autoscaler.status(active.id, fn.name) if autoscaler is not None else None,
                }
            )
        return {"app": name, "revision": active.id, "functions": views}

    @api.post("/v1/apps/{name}/functions/{function}/invoke", dependencies=auth, tags=["functions"])
    async def invoke(name: str, function: str, body: InvokeRequest | None = None) -> dict[str, Any]:
        """Call a function now, through the gateway, and wait for its answer (nothing is stored).

        The answer is the function's: ``status`` (its HTTP status), ``content_type``
        and ``body`` (the JSON it answered, or its text).
        """
        target = function_target(name, function)
        time_limit = target.spec.timeout + TIMEOUT_MARGIN
        try:
            response = await dispatcher.caller.call(
                name,
                function,
                body=encoded((body or InvokeRequest()).kwargs).encode(),
                content_type="application/json",
                time_limit=time_limit,
                revision=target.revision,
            )
        except httpx.TimeoutException:
            raise APIError(
                504,
                f"{name}/{function} did not answer within {time_limit:g} s (its timeout + {TIMEOUT_MARGIN:g} s): "
                f"`clearway logs {name}` shows where it was stuck; raise its timeout= if it needs longer",
            ) from None
        except httpx.TransportError as exc:
            raise APIError(502, f"the gateway at {dispatcher.caller.gateway_url} does not answer ({exc!r}): `clearway up` restarts it") from None
        content_type = response.headers.get("content-type", "")
        answer: Any = response.text
        if "json" in content_type:
            try:
                answer = response.json()
            except ValueError:
                answer = response.text  # says JSON, is not: shown as it is
        return {
            "app": name,
            "function": function,
            "status": response.status_code,
            "content_type": content_type,
            "body": answer,
        }

    @api.post("/v1/apps/{name}/functions/{function}/spawn", status_code=202, dependencies=auth, tags=["functions"])
    async def operator_spawn(request: Request, name: str, function: str, body: SpawnRequest | None = None) -> dict[str, Any]:
        """Queue a durable invocation: it runs with the function's retries; ``GET /v1/invocations/{id}`` follows it.

        With an ``idempotency_key`` the (app, function) holds at most one invocation
        for that key: spawning again answers that one (``created`` false).
        """
        answer = spawn(name, function, function_target(name, function), body or SpawnRequest())
        note(request, app=name, detail=f"{function}: invocation {answer['id']}" + ("" if answer["created"] else " (existing key)"))
        return answer

    @api.get("/v1/apps/{name}/invocations", dependencies=auth, tags=["functions"])
    async def list_invocations(
        name: str,
        state: InvocationState | None = None,
        function: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
    ) -> list[dict[str, Any]]:
        """The app's newest invocations, newest first; ``state=dead`` is the dead-letter list."""
        need_app(name)
        return [i.to_json(with_payload=False) for i in store.invocations(name, state=state, function=function, limit=limit)]

    @api.get("/v1/invocations/{invocation_id}", dependencies=auth, tags=["functions"])
    async def get_invocation(invocation_id: str) -> dict[str, Any]:
        """One invocation: its state, attempts, payload, and result or error."""
        found = store.invocation(invocation_id)
        if found is None:
            raise APIError(404, f"no invocation {invocation_id!r}; `clearway invocations APP` lists an app's")
        return found.to_json()

    @api.post("/v1/invocations/{invocation_id}/retry", dependencies=auth, tags=["functions"])
    async def retry_invocation(request: Request, invocation_id: str) -> dict[str, Any]:
        """Queue a dead invocation again, with all its attempts."""
        found = store.invocation(invocation_id)
        if found is None:
            raise APIError(404, f"no invocation {invocation_id!r}; `clearway invocations APP --dead` lists the dead ones")
        note(request, app=found.app, detail=f"retry {invocation_id}")
        if not store.retry_invocation(invocation_id):
            current = store.invocation(invocation_id)
            state = current.state.value if current else "gone"
            raise APIError(
                409,
                f"invocation {invocation_id} is {state}: only dead invocations are retried "
                f"(`clearway invocations show {invocation_id}` follows this one)",
            )
        dispatcher.poke()
        again = store.invocation(invocation_id)
        assert again is not None
        return again.to_json()

    @api.post("/v1/apps/{name}/event-keys", status_code=201, dependencies=auth, tags=["functions"])
    async def create_event_key_route(request: Request, name: str, body: EventKeyRequest | None = None) -> dict[str, Any]:
        """A new event key: an outside producer posts events to this app's
        ``/v1/apps/{name}/events`` with it (``Authorization: Bearer <key>``), and
        nothing else. The key is in this answer only; the platform keeps its hash.
        """
        need_app(name)
        key_name = (body or EventKeyRequest()).name
        key_id, key = create_event_key(store, name, key_name)
        note(request, app=name, detail=f"event key {key_id} ({key_name}) created")
        return {
            "id": key_id,
            "name": key_name,
            "key": key,
            "url": f"{str(request.base_url).rstrip('/')}/v1/apps/{name}/events",
        }

    @api.get("/v1/apps/{name}/event-keys", dependencies=auth, tags=["functions"])
    async def list_event_keys(name: str) -> list[dict[str, Any]]:
        """The app's event keys, oldest first: id, name, created_at, last_used_at (never the secret)."""
        need_app(name)
        return [k.to_json() for k in store.event_keys(name)]

    @api.delete("/v1/apps/{name}/event-keys/{key_id}", status_code=204, dependencies=auth, tags=["functions"])
    async def revoke_event_key(request: Request, name: str, key_id: str) -> Response:
        """Revoke one of the app's event keys: posts with it are refused (401) from now on."""
        if not store.revoke_event_key(name, key_id):
            raise APIError(404, f"{name} has no event key {key_id!r}; `clearway events keys {name}` lists them")
        note(request, app=name, detail=f"event key {key_id} revoked")
        return Response(status_code=204)

    @api.post("/v1/apps/{name}/events", status_code=202, tags=["functions"])
    async def post_events(request: Request, name: str) -> dict[str, Any]:
        """CloudEvents in (binary, structured or batch mode): one durable invocation per
        event and function subscribed to its type (``control.event_ingress``).

        The operator's token, a replica token of this app, or an event key of this
        app (``POST /v1/apps/{name}/event-keys``). 400: not valid CloudEvents;
        422: no function receives some event's type. Either way nothing is queued.
        """
        authorization = request.headers.get("authorization", "")
        scheme, _, given = authorization.partition(" ")
        caller: Revision | None = None
        by_key = ""
        if not authorization:
            raise APIError(
                401,
                f"no credential: post with `Authorization: Bearer <event key>` (`clearway events key {name}` "
                "creates one) or with the API token",
            )
        if scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode()):
            pass  # the operator
        elif scheme.lower() == "bearer" and given.startswith(EVENT_KEY_PREFIX):
            key = read_event_key(store, given)
            if key is None:
                raise APIError(
                    401,
                    "unknown, revoked or malformed event key: create a new one with "
                    f"`clearway events key {name}` (it is shown once) and post with `Authorization: Bearer <key>`",
                )
            if key.app != name:
                raise APIError(403, f"event key {key.id} belongs to another app ({key.app}): it may post events to {key.app} only")
            store.touch_event_key(key.id)
            by_key = f" (event key {key.id} {key.name!r})"
        else:
            identity = await replica_identity(request)
            if identity.app != name:
                raise APIError(403, f"replica {identity.replica} belongs to {identity.app}: it may post events to its own app only")
            caller = store.revision(identity.revision)
        need_app(name)
        body = await read_capped(request, MAX_PAYLOAD)
        try:
            events = parse_events(request.headers, body)
        except MalformedEvents as exc:
            raise APIError(400, str(exc)) from None
        # A preview's own events go to the preview's functions.
        preview = caller is not None and caller.branch is not None
        active = store.active(name, caller.branch if caller is not None and preview else None)
        if active is None:
            raise APIError(409, f"{name} has no serving revision to receive events yet; `clearway status {name}` shows why")
        try:
            new = invocations_for(name, events, active.spec.functions, revision=active.id if preview else None)
        except UnroutedEvents as exc:
            raise APIError(422, str(exc)) from None
        queued = store.enqueue_invocations(new)
        if any(created for _, created in queued):
            dispatcher.poke()
        note(request, app=name, detail=f"{len(events)} event(s) -> {len(queued)} invocation(s){by_key}")
        return {
            "events": len(events),
            "invocations": [
                {"id": i.id, "function": i.function, "created": created, "state": i.state.value} for i, created in queued
            ],
        }

    @api.post("/v1/replica/invocations", status_code=202, tags=["replicas"])
    async def replica_spawn(
        request: Request,
        body: ReplicaSpawnRequest,
        identity: ReplicaIdentity = Depends(replica_identity),  # noqa: B008
    ) -> dict[str, Any]:
        """Spawn a function of the calling replica's own app (``Function.spawn``; replica token only)."""
        target = function_target(identity.app, body.function, caller_revision=identity.revision)
        answer = spawn(identity.app, body.function, target, body)
        note(request, detail=f"{body.function}: invocation {answer['id']}" + ("" if answer["created"] else " (existing key)"))
        return answer

    @api.get("/v1/replica/invocations/{invocation_id}", tags=["replicas"])
    async def replica_invocation(
        invocation_id: str, identity: ReplicaIdentity = Depends(replica_identity)  # noqa: B008
    ) -> dict[str, Any]:
        """One invocation of the calling replica's own app (``Job.status``; replica token only)."""
        found = store.invocation(invocation_id)
        if found is None or found.app != identity.app:
            raise APIError(404, f"{identity.app} has no invocation {invocation_id!r}")
        return found.to_json()


__all__ = ["create_api"]
