"""``clearway up``: the control-plane process.

It owns the store, the reconciler, the REST API and the local backend (which
owns the gateway and the replicas). Shutdown comes in two kinds, on purpose:

* ``clearway down`` (``POST /v1/shutdown``) or Ctrl-C / SIGTERM on a foreground
  ``up``: stop every replica and the gateway, then exit — the user asked for
  the platform to go away;
* a crash (``kill -9``): replicas and the gateway keep serving; the next ``up``
  adopts them. Nothing is lost because desired state is in SQLite and replica
  facts are in the backend's records.

Settings given to the first ``up`` (ports, domains, revisions kept) are stored, so a plain
``clearway up`` after a crash comes back exactly as it was. The gateway's
address is also kept outside ``state.db`` (the running gateway's
``gateway.json``, else ``platform.json`` of the last ``up``), so the gateway
keeps its port whatever happened to the database.

Before anything starts, the store checks the state's integrity (see
``control.store``): damaged state or lost commits stop ``up`` with the
recovery command, never a silent start from an empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from clearway.backends.local import LocalBackend, LocalConfig
from clearway.backends.local.backend import APPS_PREFIX, INTERNAL_HOST, INTERNAL_PREFIX
from clearway.control.api import create_api
from clearway.control.credentials import SigningKey
from clearway.control.git import GitRemote
from clearway.control.home import Home
from clearway.control.invocations import Dispatcher, FunctionCaller, PlatformToken
from clearway.control.reconciler import Reconciler
from clearway.control.retention import DEFAULT_KEEP_REVISIONS, Retention
from clearway.control.revisions import Ownership, RevisionBuilder
from clearway.control.schedules import Scheduler
from clearway.control.shard_owners import ShardOwners
from clearway.control.smoke import SmokeChecks
from clearway.control.store import DEFAULT_UID_BASE, Store
from clearway.control.uploads import UploadLimits
from clearway.control.webhooks import GitHubWebhooks
from clearway.coordination import connect as connect_coordinator
from clearway.exceptions import CoordinationError, RuntimeStartError
from clearway.tasks import TaskSupervisor

log = logging.getLogger("clearway.control")


@dataclass(frozen=True)
class Settings:
    """What ``clearway up`` was asked for; ``None`` means "as last time, or default"."""

    port: int | None = None
    host: str | None = None
    api_port: int | None = None
    domains: tuple[str, ...] | None = None
    #: First uid handed to an app (the spec-reading child runs as the one below).
    uid_base: int = DEFAULT_UID_BASE
    upload_limits: UploadLimits = field(default_factory=UploadLimits)
    #: Revisions per app whose code and environment are kept for rollback.
    keep_revisions: int | None = None
    #: Where locks and leases live: "embedded" (the control plane) or "etcd://host:port".
    coordination: str | None = None
    #: Gateway worker processes (None: one per core).
    gateway_workers: int | None = None


#: Gateway port when nothing says otherwise.
DEFAULT_PORT = 8080


def _resolve(store: Store, home: Home, settings: Settings) -> tuple[str, int, int, tuple[str, ...]]:
    """Flags win; then the store; then the running or last gateway (files outside
    the store, so a recovered or lost database cannot move the gateway); then defaults."""
    last = home.last_gateway()
    host = settings.host or store.get_meta("gateway_host") or (last[0] if last else None) or "127.0.0.1"
    stored_port = store.get_meta("gateway_port")
    if settings.port is not None:
        port = settings.port
    elif stored_port:
        port = int(stored_port)
    else:
        port = last[1] if last else DEFAULT_PORT
    stored_domains = store.get_meta("domains")
    domains = settings.domains or (tuple(stored_domains.split(",")) if stored_domains else ("localhost",))
    api_port = settings.api_port if settings.api_port is not None else int(store.get_meta("api_port") or 0)
    return host, port, api_port, domains


def _bind(host: str, port: int, what: str, flag: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeStartError(
            f"cannot listen for the {what} on {host}:{port}: {exc.strerror} — stop the other "
            f"program or choose another port with {flag}"
        ) from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM/SIGINT belong to the
    control plane, which stops the apps before the API goes away."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ControlPlane:
    def __init__(self, home: Home, settings: Settings) -> None:
        self.home = home
        self.settings = settings
        self._stop = asyncio.Event()
        self._stop_workloads = True

    def request_shutdown(self, *, stop_workloads: bool = True) -> None:
        self._stop_workloads = stop_workloads
        self._stop.set()

    async def run(self) -> None:
        self.home.create()
        lock = self.home.lock_path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self.home.control_info() or {}
            raise RuntimeStartError(
                f"a control plane is already running for {self.home.root} (pid {info.get('pid', '?')}): "
                "`clearway down` stops it, or set CLEARWAY_HOME to run another one"
            ) from None
        try:
            await self._run()
        finally:
            lock.close()

    async def _run(self) -> None:
        token = self.home.token(create=True)
        assert token is not None
        signing = SigningKey.load_or_create(self.home.keys)
        store = Store(self.home.db_path, uid_base=self.settings.uid_base, witness=self.home.witness_path)
        aborted = store.abort_unfinished_builds(
            "the control plane stopped during this build; the push was not accepted: push again"
        )
        if aborted:
            log.warning("%d build(s) were cut off by the last stop and are marked failed", aborted)
        host, port, api_port, domains = _resolve(store, self.home, self.settings)
        api_sock = _bind("127.0.0.1", api_port, "API", "--api-port")
        if api_port == 0 and api_sock.getsockname()[1] == port:
            # The kernel may hand out the gateway's port, free until the gateway
            # binds it: take another one (the first is held open meanwhile).
            other = _bind("127.0.0.1", 0, "API", "--api-port")
            api_sock.close()
            api_sock = other
        api_port = api_sock.getsockname()[1]
        api_url = f"http://127.0.0.1:{api_port}"
        for key, value in (
            ("gateway_host", host),
            ("gateway_port", str(port)),
            ("api_port", str(api_port)),
            ("domains", ",".join(domains)),
        ):
            store.set_meta(key, value)
        self.home.write_platform_settings({"host": host, "port": port, "domains": list(domains)})
        # As last time when not asked: a restart after a crash must not change the data plane.
        recorded_workers = store.get_meta("gateway_workers")
        gateway_workers = self.settings.gateway_workers or (int(recorded_workers) if recorded_workers else None)
        if gateway_workers is not None:
            store.set_meta("gateway_workers", str(gateway_workers))

        backend = LocalBackend(
            LocalConfig(
                home=self.home.root,
                gateway_host=host,
                gateway_port=port,
                domains=domains,
                control_url=api_url,
                replica_token=signing.replica_token_minter(),
                identity_key=self.home.keys / "signing.pub.pem",
                gateway_workers=gateway_workers,
            )
        )
        tasks = TaskSupervisor(log)
        try:
            await backend.start()
        except BaseException:
            api_sock.close()
            await backend.close(stop_workloads=False)
            store.close()
            raise
        builder = RevisionBuilder(
            store,
            self.home.root,
            ownership=Ownership.detect(self.settings.uid_base),
            limits=self.settings.upload_limits,
        )
        keep = self.settings.keep_revisions
        if keep is None:
            keep = int(store.get_meta("keep_revisions") or DEFAULT_KEEP_REVISIONS)
        store.set_meta("keep_revisions", str(keep))
        retention = Retention(store, self.home.root, builder.environments, builder.artifact_lock, keep=keep)
        coordination = self.settings.coordination or store.get_meta("coordination") or "embedded"
        try:
            coordinator = connect_coordinator(coordination, home=self.home.root)
            await coordinator.start()
        except (ValueError, CoordinationError) as exc:
            api_sock.close()
            await backend.close(stop_workloads=False)
            store.close()
            raise RuntimeStartError(
                f"cannot use {coordination!r} for coordination: {exc}. Give `clearway up --coordination` "
                "`embedded` or the address of a running etcd (etcd://host:2379)"
            ) from None
        store.set_meta("coordination", coordination)

        async def collect() -> None:
            await retention.collect()

        smoke = SmokeChecks(
            builder,
            signing,
            gateway_url=f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}",
            domain=domains[0],
        )
        reconciler = Reconciler(store, backend, after_activation=collect, smoke=smoke)
        backend.subscribe(reconciler.poke)
        remote = GitRemote(self.home.root, store=store, builder=builder, reconciler=reconciler, backend=backend)
        # Durable invocations and schedules (control.invocations): through the gateway's internal routes, as the platform.
        platform_token = PlatformToken(signing.mint_platform_token)
        caller = FunctionCaller(
            f"http://{INTERNAL_HOST}:{port}",
            platform_token.get,
            apps_prefix=APPS_PREFIX,
            revisions_prefix=INTERNAL_PREFIX,
        )
        dispatcher = Dispatcher(store, caller)
        scheduler = Scheduler(store, on_queued=dispatcher.poke)
        api = create_api(
            store=store,
            backend=backend,
            reconciler=reconciler,
            builder=builder,
            token=token,
            signing=signing,
            on_shutdown=self.request_shutdown,
            git=remote,
            webhooks=GitHubWebhooks(store=store, remote=remote, tasks=tasks),
            dispatcher=dispatcher,
            coordinator=coordinator,
        )
        server = _EmbeddedServer(
            uvicorn.Config(api, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)

        info: dict[str, object] = {
            "pid": os.getpid(),
            "api_url": api_url,
            "gateway_host": host,
            "gateway_port": port,
            "domains": list(domains),
            "started_at": time.time(),
        }
        tasks.start_forever("reconciler", reconciler.run)
        tasks.start_forever("autoscaler", reconciler.autoscale)
        tasks.start_forever("invocations", dispatcher.run)
        tasks.start_forever("schedules", scheduler.run)
        shard_owners = ShardOwners(coordinator, backend, lambda: reconciler.sharded_services)
        tasks.start_forever("shard owners", shard_owners.run)
        api_task = tasks.start_forever("api", lambda: server.serve(sockets=[api_sock]))
        try:
            while not server.started:
                if api_task.done():
                    raise RuntimeStartError(
                        f"the API server stopped while starting; see {self.home.logs / 'control.log'}"
                    )
                await asyncio.sleep(0.01)
            self.home.write_control_info(info)
            log.info("control plane ready: API %s, gateway %s:%s", api_url, host, port)
            await self._stop.wait()
        finally:
            log.info("shutting down (stopping apps: %s)", self._stop_workloads)
            server.should_exit = True
            await tasks.close()
            await dispatcher.caller.aclose()
            await reconciler.rollouts.close()
            await backend.close(stop_workloads=self._stop_workloads)
            await coordinator.close()
            store.close()
            with contextlib.suppress(FileNotFoundError):
                self.home.control_path.unlink()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run_foreground(home: Path | None, settings: Settings) -> None:
    """Run the control plane in this process until ``down``, Ctrl-C or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plane = ControlPlane(Home.from_env(home), settings)
    try:
        import uvloop

        uvloop.run(plane.run())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(plane.run())
