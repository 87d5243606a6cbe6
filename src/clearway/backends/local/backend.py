"""``LocalBackend``: one machine, OS processes, clearway's gateway.

Each pass of ``apply``:

1. turns every wanted (revision, component, index) into a ``ReplicaSpec`` with a
   stable id ``<revision>.<component>.<index>`` (`clearway.spec.ids`), its code
   and interpreter resolved from the revision's artifact (``artifacts``), and starts
   the ones not running — each isolated (its app's uid, the platform's home
   hidden) and, for services, listening on a unix socket in a directory only
   the platform's user can open, so nothing reaches a replica around the gateway;
2. marks running replicas that are no longer wanted as *draining*;
3. builds the gateway's route table from *ready*, non-draining replicas and, if
   it changed, publishes it under a new generation;
4. stops a draining replica only once the gateway reports a generation at least
   the one that removed it — so no request is ever routed to a stopping
   process, which is what makes deploys and scale-downs zero-downtime.

Routes to a sharded service with ``affinity`` carry its shard count, where a
request's key is, and the endpoint of each shard's owner (``set_shard_owners``,
fed by the control plane from the shard locks; only ready, non-draining
owners), so the gateway sends a key to its owner (key affinity).

The route table also carries the identities of the replicas running now
(replica id -> incarnation) and, per internal route, who may call it: the
gateway checks each caller's token against both, so a stopped replica's
credential is refused as soon as the table that drops it is loaded.

Stops run as named tasks (SIGTERM, drain, SIGKILL after the grace period can
take seconds) so a pass never blocks on them; ``close`` awaits them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearway.backends.base import (
    ComponentLoad,
    ComponentObservation,
    DesiredState,
    ReplicaInfo,
    ReplicaStart,
    RevisionObservation,
    TrafficSample,
    Workload,
)
from clearway.backends.local.artifacts import ArtifactStore
from clearway.backends.local.gateway import GatewayProcess
from clearway.backends.local.records import ReplicaRecords
from clearway.backends.local.startups import StartupMetrics
from clearway.exceptions import RuntimeStartError
from clearway.runtime import (
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    Supervisor,
    follow_log,
    rotate_log,
    tail_log,
)
from clearway.runtime.forking import ForkLauncher
from clearway.runtime.functions import HEALTH_PATH as FUNCTION_HEALTH_PATH
from clearway.spec.ids import branch_label, commit_label
from clearway.spec.ids import replica_id as make_replica_id
from clearway.spec.model import AppSpec, FunctionSpec, ServiceSpec, parse_affinity

log = logging.getLogger("clearway.backends.local")

#: The header that pins a request to one revision (previews, canary checks).
PIN_HEADER = "x-clearway-revision"

#: Where replicas reach services, public or private, with their identity token:
#: ``http://127.0.0.1:<gateway port>/_services/<revision>/<service>/...`` is
#: pinned to the caller's revision (during a deploy new code talks to new code);
#: ``/_apps/<app>/<service>/...`` follows that app's traffic (cross-app calls).
INTERNAL_HOST = "127.0.0.1"
INTERNAL_PREFIX = "/_services"
APPS_PREFIX = "/_apps"

#: Size at which the gateway's own log and its access log are rotated, and copies kept.
PLATFORM_LOG_MAX_BYTES = 50 * 1024 * 1024
PLATFORM_LOG_KEEP = 3

#: How long ``converged`` waits for the gateway to load a new route table.
CONVERGE_TIMEOUT = 10.0

#: How long a restarted control plane waits for adopted replicas' first probes.
ADOPT_SETTLE_TIMEOUT = 10.0

_FAILED_STATES = {ReplicaState.CRASHLOOP, ReplicaState.FAILED}


@dataclass(frozen=True)
class LocalConfig:
    home: Path
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    domains: tuple[str, ...] = ("localhost",)
    #: Given to every replica as CLEARWAY_CONTROL_URL: its channel to the control plane.
    control_url: str | None = None
    #: Mints a replica's CLEARWAY_REPLICA_TOKEN at each process start (spec, incarnation).
    replica_token: Callable[[ReplicaSpec, str], str] | None = None
    #: The public key the gateway verifies replica and pin tokens with.
    identity_key: Path | None = None
    #: Gateway worker processes (None: one per core; see `clearway.gateway` ``--workers``).
    gateway_workers: int | None = None
    #: Where service replicas' unix sockets live (default: see `default_sockets_dir`).
    sockets_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)


def default_sockets_dir(home: Path) -> Path:
    """A short directory for replica sockets, private to the platform's user.

    Unix socket paths are limited to 107 bytes, and ``$CLEARWAY_HOME`` can be
    long, so the sockets live under ``/run/clearway`` (root) or ``/tmp``,
    in a directory named after the home so two platforms never share one.
    """
    tag = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]
    if os.geteuid() == 0 and Path("/run").is_dir():
        return Path("/run/clearway") / tag
    return Path("/tmp") / f"clearway-{os.geteuid()}" / tag


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


class LocalBackend:
    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self.home = config.home
        (self.home / "replicas").mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.records = ReplicaRecords(self.home / "state.db")
        self.artifacts = ArtifactStore(self.home)
        self.gateway = GatewayProcess(
            self.home,
            host=config.gateway_host,
            port=config.gateway_port,
            identity_key=config.identity_key,
            workers=config.gateway_workers,
        )
        self.sockets_dir = config.sockets_dir or default_sockets_dir(self.home)
        if self.sockets_dir.parent.name == "clearway" or self.sockets_dir.parent.name.startswith("clearway-"):
            _private_dir(self.sockets_dir.parent)
        _private_dir(self.sockets_dir)
        self.supervisor = Supervisor(
            on_change=self._on_change, credentials=config.replica_token, launcher=ForkLauncher()
        )
        self._specs: dict[str, ReplicaSpec] = {}
        self._statuses: dict[str, ReplicaStatus] = {}
        self._draining: dict[str, int] = {}
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._wanted: dict[str, dict[str, int]] = {}
        self._workloads: dict[str, Workload] = {}
        self._routes: list[dict[str, Any]] | None = None
        self._published_identities: dict[str, str] = {}
        #: The last desired state applied (a change of shard owners republishes with it).
        self._desired: DesiredState | None = None
        #: (app, sharded service) -> shard -> the replica id owning it (`set_shard_owners`).
        self._shard_owners: dict[tuple[str, str], dict[int, str]] = {}
        self._generation = 0
        self._changed = asyncio.Event()
        self._start_errors: dict[str, str] = {}
        self._startups = StartupMetrics()

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        try:
            self._generation = int(json.loads(self.gateway.routes_path.read_text()).get("generation", 0))
        except (OSError, ValueError):
            self._generation = 0
        await self.gateway.start_or_adopt(self._table([]))
        self.gateway.on_exit = self._gateway_exited
        adopted_ids: list[str] = []
        for record in self.records.all():
            self._specs[record.spec.replica_id] = record.spec
            adopted = False
            if record.pid is not None and record.pid_start_time is not None:
                adopted = await self.supervisor.adopt(
                    record.spec, record.pid, record.pid_start_time, record.incarnation
                )
            if adopted:
                log.info("re-adopted replica %s (pid %s)", record.spec.replica_id, record.pid)
                adopted_ids.append(record.spec.replica_id)
            else:
                log.info("replica %s is gone; it will be started again if still wanted", record.spec.replica_id)
                self.records.delete(record.spec.replica_id)
                del self._specs[record.spec.replica_id]
        # Publish no route table until adopted replicas have answered a probe:
        # an early table would show them as not ready and hold their traffic.
        await self._settled(adopted_ids, limit=ADOPT_SETTLE_TIMEOUT)

    async def _settled(self, replica_ids: list[str], *, limit: float) -> None:
        async def wait() -> None:
            while any(
                (s := self._statuses.get(r)) is None or s.state is ReplicaState.STARTING for r in replica_ids
            ):
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(wait(), limit)
        except TimeoutError:
            log.warning("some adopted replicas did not answer their probes within %.0fs", limit)

    async def close(self, *, stop_workloads: bool) -> None:
        for task in list(self._stopping.values()):
            await task
        await self.supervisor.close(stop_replicas=stop_workloads)
        if stop_workloads:
            await self.gateway.stop()
            self.records.close()
            # Every replica removed its socket when it stopped; the directory goes too.
            with contextlib.suppress(OSError):
                self.sockets_dir.rmdir()
        await self.gateway.close()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """``callback`` runs (synchronously) whenever a replica changes state."""
        self._listeners.append(callback)

    def _on_change(self, status: ReplicaStatus) -> None:
        previous = self._statuses.get(status.replica_id)
        if status.start_seconds is not None and (previous is None or previous.start_seconds is None):
            self._startups.observe(self._specs.get(status.replica_id), status)
        self._statuses[status.replica_id] = status
        self._changed.set()
        self.records.put_status(status)
        for callback in self._listeners:
            callback()

    # -- desired state ----------------------------------------------------------
    def _replica_spec(self, workload: Workload, component: str, index: int) -> ReplicaSpec:
        comp = workload.spec.component(component)
        replica_id = make_replica_id(workload.revision, component, index)
        gateway_url = f"http://{INTERNAL_HOST}:{self.config.gateway_port}"
        env = {**workload.env, **comp.env, **self.config.extra_env}
        env["CLEARWAY_GATEWAY_URL"] = gateway_url
        for service in _listeners(workload.spec):
            variable = "CLEARWAY_SERVICE_" + service.name.upper().replace("-", "_") + "_URL"
            env[variable] = f"{gateway_url}{INTERNAL_PREFIX}/{workload.revision}/{service.name}"
        if self.config.control_url:
            env["CLEARWAY_CONTROL_URL"] = self.config.control_url
        is_service = isinstance(comp, ServiceSpec)
        is_function = isinstance(comp, FunctionSpec)
        socket_name = hashlib.sha256(replica_id.encode()).hexdigest()[:20] + ".sock"
        return ReplicaSpec(
            replica_id=replica_id,
            app=workload.app,
            revision=workload.revision,
            component=component,
            index=index,
            kind="service" if is_service else "function" if is_function else "worker",
            code_dir=self.artifacts.code_dir(workload.app, workload.artifact),
            app_file=workload.app_file,
            python=self.artifacts.python(workload.artifact),
            # A function's replicas keep their workdirs side by side: its warm parent's view
            # holds that directory (clearway.runtime.forking).
            workdir=(
                self.home / "replicas" / f"{workload.revision}.{component}" / replica_id
                if is_function
                else self.home / "replicas" / replica_id
            ),
            log_path=self.home / "logs" / workload.app / f"{replica_id}.log",
            env=env,
            health_path=comp.health if isinstance(comp, ServiceSpec) else FUNCTION_HEALTH_PATH if is_function else None,
            interface=comp.interface if isinstance(comp, ServiceSpec) else "auto",
            grace_period=comp.grace_period,
            memory_mb=comp.resources.memory_mb,
            cpu=comp.resources.cpu,
            sandbox=comp.sandbox,
            network=comp.network,
            startup_timeout=comp.startup_timeout,
            uid=workload.uid,
            gid=workload.uid,
            hide=(self.home, self.sockets_dir),
            socket_path=self.sockets_dir / socket_name if is_service or is_function else None,
        )

    def _gateway_exited(self) -> None:
        log.error("the gateway (pid %s) exited; starting a new one (see %s)", self.gateway.pid, self.gateway.log_path)
        for callback in self._listeners:
            callback()

    async def apply(self, desired: DesiredState) -> None:
        if not self.gateway.running:
            # It crashed or was killed: the route table is on disk, so a new
            # gateway serves exactly what the old one did.
            await self.gateway.start_or_adopt(self._table(self._routes or []))
            self.gateway.on_exit = self._gateway_exited
        self._rotate_platform_logs()
        wanted: dict[str, ReplicaSpec] = {}
        self._desired = desired
        self._workloads = {w.revision: w for w in desired.workloads}
        self._wanted = {w.revision: dict(w.replicas) for w in desired.workloads}
        for workload in desired.workloads:
            for component, count in workload.replicas.items():
                for index in range(count):
                    spec = self._replica_spec(workload, component, index)
                    wanted[spec.replica_id] = spec
        # Every function may be asked for a replica at any moment, at zero replicas too:
        # its warm parent stays ready for as long as the revision runs.
        self.supervisor.launcher.retain(
            self._replica_spec(workload, fn.name, 0) for workload in desired.workloads for fn in workload.spec.functions
        )

        for replica_id, spec in wanted.items():
            self._draining.pop(replica_id, None)
            if replica_id in self._specs or replica_id in self._stopping:
                continue
            self._specs[replica_id] = spec
            self.records.put_spec(spec)
            spec.workdir.mkdir(parents=True, exist_ok=True)
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting replica %s", replica_id)
            try:
                await self.supervisor.start(spec)
            except RuntimeStartError as exc:
                # Nothing a retry can fix (e.g. sandbox=True without bubblewrap):
                # report it as the replica's failure so the deploy fails with it.
                self._start_errors[replica_id] = str(exc)

        newly_unwanted = [r for r in self._specs if r not in wanted and r not in self._draining]
        for replica_id in newly_unwanted:
            self._draining[replica_id] = -1  # excluded from the table published next
        await self._publish(desired)
        for replica_id in newly_unwanted:
            # The generation just published is the first without this replica.
            self._draining[replica_id] = self._generation

        if self._draining:
            loaded = await self.gateway.generation()
            for replica_id, needed in list(self._draining.items()):
                if loaded is not None and loaded >= needed:
                    del self._draining[replica_id]
                    self._stop_later(replica_id)

    async def converged(self) -> bool:
        """Wait (bounded) until the gateway has loaded the latest route table."""
        deadline = asyncio.get_running_loop().time() + CONVERGE_TIMEOUT
        while True:
            loaded = await self.gateway.generation()
            if loaded is not None and loaded >= self._generation:
                return True
            if asyncio.get_running_loop().time() > deadline:
                log.warning("the gateway has not loaded route generation %d yet", self._generation)
                return False
            await asyncio.sleep(0.01)

    async def set_shard_owners(self, app: str, component: str, owners: Mapping[int, str]) -> None:
        owners = dict(owners)
        if self._shard_owners.get((app, component), {}) == owners:
            return
        if owners:
            self._shard_owners[(app, component)] = owners
        else:
            self._shard_owners.pop((app, component), None)
        if self._desired is not None and self.gateway.running:
            await self._publish(self._desired)  # else the next apply publishes them

    def replica_incarnation(self, replica_id: str) -> str | None:
        # A replica being stopped still runs, and still speaks for itself: it resigns its
        # leadership and releases its locks and shards on the way out (clearway.sdk.coordination).
        # Its token dies with the process.
        if replica_id not in self._specs:
            return None
        status = self._statuses.get(replica_id)
        if status is None or status.pid is None or status.state.is_terminal:
            return None
        return status.incarnation

    def _rotate_platform_logs(self) -> None:
        # The gateway appends to these files (O_APPEND), so copy-and-truncate
        # rotation is safe while it runs; replica logs are the supervisor's.
        for path in (self.gateway.log_path, self.gateway.access_log):
            rotate_log(path, max_bytes=PLATFORM_LOG_MAX_BYTES, keep=PLATFORM_LOG_KEEP)

    def _stop_later(self, replica_id: str) -> None:
        async def stop() -> None:
            try:
                if replica_id not in self._start_errors:
                    await self.supervisor.stop(replica_id)
            except Exception:
                log.exception("stopping replica %s failed", replica_id)
            finally:
                self._specs.pop(replica_id, None)
                self._statuses.pop(replica_id, None)
                self._start_errors.pop(replica_id, None)
                self.records.delete(replica_id)
                self._stopping.pop(replica_id, None)

        log.info("stopping drained replica %s", replica_id)
        self._stopping[replica_id] = asyncio.create_task(stop(), name=f"stop-replica:{replica_id}")

    # -- routes -----------------------------------------------------------------
    def _endpoints(self, revision: str, component: str) -> list[str]:
        endpoints = []
        for replica_id, spec in self._specs.items():
            if spec.revision != revision or spec.component != component or replica_id in self._draining:
                continue
            status = self._statuses.get(replica_id)
            if status is not None and status.state is ReplicaState.READY and status.socket_path:
                endpoints.append(f"unix:{status.socket_path}")
        return sorted(endpoints)

    def _affinity(self, app: str, service: _Listener) -> dict[str, Any]:
        """The key-affinity fields of a route to ``service`` (none unless it is sharded with affinity)."""
        if not service.shards or service.affinity is None:
            return {}
        kind, where = parse_affinity(service.affinity)
        owners = {}
        for shard, replica_id in sorted(self._shard_owners.get((app, service.name), {}).items()):
            status = self._statuses.get(replica_id)
            if (
                replica_id in self._specs
                and replica_id not in self._draining
                and status is not None
                and status.state is ReplicaState.READY
                and status.socket_path
            ):
                owners[str(shard)] = f"unix:{status.socket_path}"
        return {
            "shards": service.shards,
            "affinity": {"header": where} if kind == "header" else {"path": where, "under": service.base},
            "owners": owners,
        }

    def _build_routes(self, desired: DesiredState) -> list[dict[str, Any]]:
        routes: dict[tuple[str, str], dict[str, Any]] = {}
        hosts = [(app, app, targets, app in desired.sticky) for app, targets in sorted(desired.traffic.items())]
        hosts += [(a.app, f"{a.label}.{a.app}", a.targets, False) for a in desired.aliases]
        for app, host, targets, sticky in hosts:
            for target in targets:
                workload = self._workloads.get(target.revision)
                if workload is None:
                    continue
                for service in _listeners(workload.spec):
                    if service.path is None:
                        continue
                    route = routes.setdefault(
                        (host, service.path),
                        {
                            "app": app,
                            "host": host,
                            "prefix": service.path,
                            "strip_prefix": False,
                            "timeout": service.timeout,
                            "pin_header": PIN_HEADER,
                            **service.labels,
                            **self._affinity(app, service),
                            **({"sticky": True} if sticky else {}),
                            "targets": [],
                        },
                    )
                    route["targets"].append(
                        {
                            "revision": target.revision,
                            "weight": target.weight,
                            "endpoints": self._endpoints(target.revision, service.name),
                        }
                    )
        internal: list[dict[str, Any]] = []
        for workload in sorted(self._workloads.values(), key=lambda w: w.revision):
            for service in _listeners(workload.spec):
                # Its own revision may always call it; others only as the spec allows.
                allow = [{"app": workload.app, "revision": workload.revision, "component": None}]
                allow += [_allow_rule(entry) for entry in service.allow]
                internal.append(
                    {
                        "app": workload.app,
                        "host": INTERNAL_HOST,
                        "prefix": f"{INTERNAL_PREFIX}/{workload.revision}/{service.name}",
                        "strip_prefix": True,
                        "timeout": service.timeout,
                        "pin_header": PIN_HEADER,
                        **service.labels,
                        **self._affinity(workload.app, service),
                        "internal": True,
                        "allow": allow,
                        "targets": [
                            {
                                "revision": workload.revision,
                                "weight": 100,
                                "endpoints": self._endpoints(workload.revision, service.name),
                            }
                        ],
                    }
                )
        # App-level internal routes follow each app's traffic split (cross-app calls).
        for app, targets in sorted(desired.traffic.items()):
            by_service: dict[str, dict[str, Any]] = {}
            for target in targets:
                workload = self._workloads.get(target.revision)
                if workload is None:
                    continue
                for service in _listeners(workload.spec):
                    route = by_service.setdefault(
                        service.name,
                        {
                            "app": app,
                            "host": INTERNAL_HOST,
                            "prefix": f"{APPS_PREFIX}/{app}/{service.name}",
                            "strip_prefix": True,
                            "timeout": service.timeout,
                            "pin_header": PIN_HEADER,
                            **service.labels,
                            **self._affinity(app, service),
                            "internal": True,
                            "allow": [{"app": app, "revision": None, "component": None}],
                            "targets": [],
                        },
                    )
                    if target.weight > 0:
                        route["allow"] += [
                            rule for rule in map(_allow_rule, service.allow) if rule not in route["allow"]
                        ]
                    route["targets"].append(
                        {
                            "revision": target.revision,
                            "weight": target.weight,
                            "endpoints": self._endpoints(target.revision, service.name),
                        }
                    )
            internal.extend(by_service[name] for name in sorted(by_service))
        return [*routes.values(), *internal]

    def _identities(self) -> dict[str, str]:
        """Replica id -> incarnation of every replica process running now."""
        return {
            replica_id: status.incarnation
            for replica_id in self._specs
            if replica_id not in self._draining
            and (status := self._statuses.get(replica_id)) is not None
            and status.incarnation is not None
            and status.pid is not None
        }

    def _table(self, routes: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "version": 1,
            "generation": self._generation,
            "domains": list(self.config.domains),
            "routes": routes,
            "identities": self._identities(),
        }

    async def _publish(self, desired: DesiredState) -> None:
        routes = self._build_routes(desired)
        identities = self._identities()
        if routes == self._routes and identities == self._published_identities:
            return
        self._generation += 1
        self._routes = routes
        self._published_identities = identities
        self.gateway.write_routes(self._table(routes))
        self.gateway.reload()

    # -- observation ------------------------------------------------------------
    def observe(self) -> Mapping[str, RevisionObservation]:
        result: dict[str, RevisionObservation] = {}
        for revision, wanted in self._wanted.items():
            components: dict[str, ComponentObservation] = {}
            for component, count in wanted.items():
                ready, error, last_error = 0, None, None
                for index in range(count):
                    replica_id = make_replica_id(revision, component, index)
                    status = self._statuses.get(replica_id)
                    if status is None:
                        start_error = self._start_errors.get(replica_id)
                        if start_error and error is None:
                            error = start_error
                        continue
                    if status.last_error and last_error is None:
                        last_error = status.last_error
                    if status.state is ReplicaState.READY:
                        ready += 1
                    elif status.state in _FAILED_STATES and error is None:
                        error = status.last_error or f"replica {status.replica_id} is {status.state.value}"
                components[component] = ComponentObservation(
                    desired=count, ready=ready, error=error, last_error=last_error
                )
            result[revision] = RevisionObservation(revision=revision, components=components)
        return result

    def replicas(self, app: str) -> list[ReplicaInfo]:
        infos = []
        for replica_id, spec in sorted(self._specs.items()):
            if spec.app != app:
                continue
            status = self._statuses.get(replica_id)
            state = status.state.value if status else "pending"
            if replica_id in self._draining or replica_id in self._stopping:
                state = "draining"
            infos.append(
                ReplicaInfo(
                    id=replica_id,
                    revision=spec.revision,
                    component=spec.component,
                    state=state,
                    pid=status.pid if status else None,
                    endpoint=f"unix:{status.socket_path}" if status and status.socket_path else None,
                    restarts=status.restarts if status else 0,
                    error=status.last_error if status else None,
                    started_by=status.started_by if status else None,
                    launch_ms=_ms(status.launch_seconds) if status else None,
                    start_ms=_ms(status.start_seconds) if status else None,
                )
            )
        return infos

    def last_starts(self, app: str) -> Mapping[tuple[str, str], ReplicaStart]:
        return self._startups.last(app)

    def urls(self, spec: AppSpec, *, branch: str | None = None, commit: str | None = None) -> list[str]:
        port = "" if self.config.gateway_port == 80 else f":{self.config.gateway_port}"
        if branch is None and commit is None:
            hosts = [spec.name]
        else:
            hosts = [f"{branch_label(branch)}.{spec.name}"] if branch is not None else []
            hosts += [f"{commit_label(commit)}.{spec.name}"] if commit is not None else []
        urls = []
        for host in hosts:
            for listener in _listeners(spec):
                if listener.path is not None:
                    path = listener.path if listener.path.endswith("/") else listener.path + "/"
                    urls.append(f"http://{host}.{self.config.domains[0]}{port}{path}")
        return urls

    async def logs(
        self, app: str, *, revision: str | None, component: str | None, tail: int, follow: bool
    ) -> AsyncIterator[str]:
        specs = [
            s
            for s in self._specs.values()
            if s.app == app
            and (revision is None or s.revision == revision)
            and (component is None or s.component == component)
        ]
        if not specs:
            # Nothing running (e.g. a failed deploy): show the newest logs on disk.
            folder = self.home / "logs" / app
            paths = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)[-3:] if folder.exists() else []
            for path in paths:
                for line in tail_log(path, tail):
                    yield f"[{path.stem}] {line}"
            return
        for spec in sorted(specs, key=lambda s: s.replica_id):
            for line in tail_log(spec.log_path, tail):
                yield f"[{spec.replica_id}] {line}"
        if follow:
            queue: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)

            async def pump(spec: ReplicaSpec) -> None:
                async for line in follow_log(spec.log_path, lines=0):
                    await queue.put(f"[{spec.replica_id}] {line}")

            tasks = [asyncio.create_task(pump(s), name=f"follow-log:{s.replica_id}") for s in specs]
            try:
                while True:
                    yield await queue.get()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def metrics(self) -> str:
        """The gateway's metrics, then the replicas' start-up times."""
        return await self.gateway.metrics() + self._startups.exposition()

    async def traffic(self) -> Mapping[str, TrafficSample]:
        """The gateway's request counters per revision (for the canary analysis); {} if it does not answer."""
        return await self.gateway.stats()

    async def load(self) -> list[ComponentLoad]:
        """The gateway's load per (app, revision, component) (for the autoscaler); [] if it does not answer."""
        return await self.gateway.load()

    async def wait_held(self, after: int, within: float) -> int:
        """The gateway's hold sequence number once a request is held, or after ``within`` (see ``Backend``)."""
        seq = await self.gateway.wait_held(after, within)
        return after if seq is None else seq


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


#: Seconds the gateway's timeout for a function exceeds the function's own.
FUNCTION_TIMEOUT_MARGIN = 5.0


@dataclass(frozen=True)
class _Listener:
    """A component the gateway routes to: a service, or a function (which has its own counters)."""

    name: str
    #: The public path prefix; None: reachable through internal routes only.
    path: str | None
    timeout: float
    allow: list[str]
    #: Extra route fields: a function's routes name it, so the gateway counts its load apart.
    labels: dict[str, str]
    #: A sharded service's shard count and ``affinity`` (`ServiceSpec`), and its path (an affinity's base).
    shards: int | None = None
    affinity: str | None = None
    base: str = "/"


def _listeners(spec: AppSpec) -> list[_Listener]:
    found = [
        _Listener(s.name, s.path if s.public else None, s.timeout, s.allow, {}, s.shards, s.affinity, s.path)
        for s in spec.services
    ]
    found += [
        # The gateway waits a little longer than the function's own timeout, so that the
        # function's 504 (which carries an error id) is what the caller gets.
        _Listener(f.name, f.http, f.timeout + FUNCTION_TIMEOUT_MARGIN, f.allow, {"component": f.name})
        for f in spec.functions
    ]
    return found


def _allow_rule(entry: str) -> dict[str, str | None]:
    """``"app"`` or ``"app.component"`` (``ServiceSpec.allow``) as a gateway allow rule."""
    app, _, component = entry.partition(".")
    return {"app": app, "revision": None, "component": component if component not in ("", "*") else None}
