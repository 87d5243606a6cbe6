"""What isolation costs a replica's start-up: spawn -> first successful readiness probe.

Run:  python bench/replica_start.py [--rounds 10] [--uid 499000] [--breakdown]

The same Starlette hello app is started, stopped and started again, the variants
alternating within every round (the order rotates from round to round, so no
variant always runs right after another's shut-down):

  (a) baseline: ``python -m clearway.runtime.replica`` spawned directly, as the
      platform did before every replica was isolated: no bwrap, no setpriv, no
      log writer (stdout and stderr straight to the log file), the environment
      from `replica_environment`, the listening unix socket as fd 3;
  (b) default isolation under its own uid, through the real `Supervisor`
      (bwrap with the host's ``/`` read-only, setpriv to the uid, the ``sh``
      prologue, the log writer, a cgroup when the host offers one);
  (c) ``sandbox=True`` under its own uid, through the real `Supervisor`;
  (d) with ``--breakdown`` only: (a) wrapped in the default view's bwrap and
      setpriv argv (`isolated_argv`), spawned directly, to tell what bwrap and
      setpriv cost from what the supervisor's launch machinery costs.

The clock starts when the process is about to be spawned (for (b) and (c): on
entry to the launcher, which builds the bwrap argv and starts the log writer)
and stops when a readiness probe succeeds. Every variant probes the same way:
`probe_http` on the unix socket, ``ProbePolicy().readiness_interval`` between
attempts. The socket is bound before the clock starts (the supervisor does so
in `start`, before it launches). CPU is that of the replica's process tree
(bwrap, setpriv and the interpreter) at the moment it is ready: steadier than
wall time on a busy machine. The log writer's own CPU is not in it.

Wall time is what users feel, but on a small shared machine it moves with
whatever else runs, hence the alternation, the medians and the minimums; the
ratios, not the absolute figures, are the result. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from clearway.runtime import ReplicaSpec, ReplicaState, ReplicaStatus, Supervisor
from clearway.runtime.isolation import isolated_argv, replica_isolation
from clearway.runtime.launcher import LISTEN_FD, LaunchedProcess, LaunchRequest, SpawnLauncher
from clearway.runtime.probes import ProbePolicy, probe_http
from clearway.runtime.spec import LISTEN_FD_ENV_VAR, replica_environment

# bench/ is not a package: share the helpers of the nginx comparison.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import cpu_seconds

APP = textwrap.dedent(
    """\
    import clearway as cw

    app = cw.App("hello")


    @app.service(health="/")
    def web():
        from starlette.applications import Starlette
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def hello(request):
            return PlainTextResponse("hello")

        return Starlette(routes=[Route("/", hello)])
    """
)

#: A uid in the range the platform gives apps (`clearway.control.store.DEFAULT_UID_BASE`
#: upwards) that no app of a running platform is likely to have.
DEFAULT_UID = 499_000
STARTUP_TIMEOUT = 60.0


@dataclass(frozen=True)
class Sample:
    wall: float
    """Seconds from spawn to the first successful readiness probe."""
    cpu: float
    """CPU seconds of the replica's process tree at that moment."""


class TimedLauncher:
    """The real `SpawnLauncher`, noting when each replica's launch begins."""

    def __init__(self) -> None:
        self.inner = SpawnLauncher()
        self.launched_at: dict[str, float] = {}

    async def launch(self, request: LaunchRequest) -> LaunchedProcess:
        self.launched_at[request.spec.replica_id] = time.perf_counter()
        return await self.inner.launch(request)


class Bench:
    def __init__(self, root: Path, uid: int | None) -> None:
        # Laid out like the local backend: code, workdirs and logs in the platform's
        # home, sockets in a directory of their own, both hidden from replicas.
        self.home = root / "home"
        self.sockets = root / "sockets"
        self.code = self.home / "apps" / "hello" / "code"
        self.code.mkdir(parents=True)
        (self.code / "app.py").write_text(APP)
        self.sockets.mkdir(mode=0o700)
        self.uid = uid
        self.launcher = TimedLauncher()
        self.ready: dict[str, tuple[float, float]] = {}
        self.supervisor = Supervisor(launcher=self.launcher, on_change=self._on_change)
        self.count = 0

    def spec(self, variant: str, **changes: object) -> ReplicaSpec:
        self.count += 1
        replica_id = f"hello-{self.count}-{variant}.web.0"
        spec = ReplicaSpec(
            replica_id=replica_id,
            app="hello",
            revision="1",
            component="web",
            index=0,
            kind="service",
            code_dir=self.code,
            app_file="app.py",
            workdir=self.home / "replicas" / replica_id,
            log_path=self.home / "logs" / "hello" / f"{replica_id}.log",
            health_path="/",
            startup_timeout=STARTUP_TIMEOUT,
            hide=(self.home, self.sockets),
            socket_path=self.sockets / f"{self.count}.sock",
        )
        return replace(spec, **changes)  # type: ignore[arg-type]

    def _on_change(self, status: ReplicaStatus) -> None:
        if status.state is ReplicaState.READY and status.replica_id not in self.ready:
            assert status.pid is not None
            self.ready[status.replica_id] = (time.perf_counter(), cpu_seconds(status.pid))

    # -- (b), (c): through the supervisor ---------------------------------------------

    async def supervised(self, variant: str, **changes: object) -> Sample:
        spec = self.spec(variant, uid=self.uid, gid=self.uid, **changes)
        await self.supervisor.start(spec)
        try:
            await self.supervisor.wait_for(
                spec.replica_id, ReplicaState.READY, within=STARTUP_TIMEOUT
            )
        finally:
            await self.supervisor.stop(spec.replica_id)
        ready_at, cpu = self.ready[spec.replica_id]
        return Sample(ready_at - self.launcher.launched_at[spec.replica_id], cpu)

    # -- (a), (d): spawned directly ----------------------------------------------------

    async def direct(self, variant: str, *, isolated: bool) -> Sample:
        spec = self.spec(variant, uid=self.uid if isolated else None)
        spec.workdir.mkdir(parents=True)
        if isolated and spec.uid is not None and os.geteuid() == 0:
            os.chown(spec.workdir, spec.uid, spec.uid)
            spec.workdir.chmod(0o700)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        assert spec.socket_path is not None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(spec.socket_path))
        spec.socket_path.chmod(0o600)
        listener.listen(1024)
        env = replica_environment(spec, incarnation=secrets.token_hex(8))
        env[LISTEN_FD_ENV_VAR] = str(LISTEN_FD)
        argv = [spec.python, "-m", "clearway.runtime.replica"]
        if isolated:
            # As the launcher does: bwrap dies on SIGTERM, so it starts with SIGTERM ignored.
            argv = [
                "/bin/sh",
                "-c",
                'trap "" TERM; exec "$@"',
                "sh",
                *isolated_argv(replica_isolation(spec), argv),
            ]
        socket_copy = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (
                os.POSIX_SPAWN_OPEN,
                1,
                str(spec.log_path),
                os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                0o640,
            ),
            (os.POSIX_SPAWN_DUP2, 1, 2),
            (os.POSIX_SPAWN_DUP2, socket_copy, LISTEN_FD),
        ]
        try:
            started = time.perf_counter()
            # posix_spawn returns as soon as the child exists (vfork-style): it does not block.
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True)  # noqa: ASYNC221
        finally:
            os.close(socket_copy)
        try:
            await self._await_ready(pid, spec)
            ready_at = time.perf_counter()
            cpu = cpu_seconds(pid)
        finally:
            await _terminate(pid)
            listener.close()
            spec.socket_path.unlink()
        return Sample(ready_at - started, cpu)

    @staticmethod
    async def _await_ready(pid: int, spec: ReplicaSpec) -> None:
        """The supervisor's readiness loop, plus: fail at once if the process exits."""
        assert spec.socket_path is not None
        policy = ProbePolicy()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT
        while True:
            remaining = deadline - loop.time()
            result = await probe_http(
                spec.socket_path, spec.health_path, within=max(0.01, min(policy.timeout, remaining))
            )
            if result.ok:
                return
            exited = os.waitpid(pid, os.WNOHANG) != (0, 0)  # noqa: ASYNC222 (WNOHANG: no wait)
            if exited or deadline <= loop.time():
                log = spec.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"{spec.replica_id} never got ready ({result.detail}); its log:\n{log}"
                )
            await asyncio.sleep(policy.readiness_interval)


async def _terminate(pid: int) -> None:
    """SIGTERM the process group, SIGKILL it after 10 s, reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: no wait)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        await asyncio.sleep(0.02)


def _summary(label: str, samples: list[Sample], baseline: list[Sample] | None) -> str:
    walls = [s.wall for s in samples]
    cpus = [s.cpu for s in samples]
    line = (
        f"  {label:<34} {statistics.median(walls):6.3f} s {min(walls):6.3f} s"
        f" {statistics.median(cpus):6.3f} s"
    )
    if baseline is None:
        line += "      1.00x   1.00x   1.00x"
    else:
        base_walls = [s.wall for s in baseline]
        base_cpus = [s.cpu for s in baseline]
        line += (
            f"      {statistics.median(walls) / statistics.median(base_walls):4.2f}x"
            f"   {min(walls) / min(base_walls):4.2f}x"
            f"   {statistics.median(cpus) / statistics.median(base_cpus):4.2f}x"
        )
    return line + "\n      [" + " ".join(f"{w:.3f}" for w in walls) + "]"


async def run(rounds: int, warmup: int, uid: int | None, breakdown: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="cw-start-"))
    bench = Bench(root, uid)
    variants: dict[str, tuple[str, Callable[[], Awaitable[Sample]]]] = {
        "base": (
            "(a) baseline: no bwrap, no setpriv",
            lambda: bench.direct("base", isolated=False),
        ),
        "iso": ("(b) default isolation", lambda: bench.supervised("iso")),
        "sbx": ("(c) sandbox=True", lambda: bench.supervised("sbx", sandbox=True)),
    }
    if breakdown:
        variants["bw"] = (
            "(d) bwrap+setpriv argv, direct",
            lambda: bench.direct("bw", isolated=True),
        )
    samples: dict[str, list[Sample]] = {key: [] for key in variants}
    order = list(variants)
    try:
        for round_ in range(-warmup, rounds):
            shift = round_ % len(order)
            for key in order[shift:] + order[:shift]:
                sample = await variants[key][1]()
                if round_ >= 0:
                    samples[key].append(sample)
            if round_ >= 0:
                print(
                    f"  round {round_ + 1}/{rounds}: "
                    + "  ".join(f"{key} {samples[key][-1].wall:.3f}s" for key in order),
                    flush=True,
                )
    finally:
        await bench.supervisor.close(stop_replicas=True)
        bench.launcher.inner.close()
        shutil.rmtree(root, ignore_errors=True)

    who = f"uid {uid}" if uid is not None else "the platform's own uid (not root: no setpriv)"
    print()
    print("Replica start-up, spawn -> first successful readiness probe (Starlette hello app)")
    print(
        f"  {rounds} rounds after {warmup} warm-up round(s), variants alternated; (b)-(d) under {who}"
    )
    print(
        f"  {os.cpu_count()} CPU(s), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"  {'':<34} {'median':>8} {'min':>8} {'CPU':>8}    vs (a): median    min    CPU")
    for key, (label, _) in variants.items():
        print(_summary(label, samples[key], None if key == "base" else samples["base"]))
    ratio = statistics.median(s.wall for s in samples["iso"]) / statistics.median(
        s.wall for s in samples["base"]
    )
    verdict = "met" if ratio <= 1.2 else "NOT met"
    print(f"\nGoal, default isolation within 20% of baseline (medians): {ratio:.2f}x, {verdict}")
    print(
        "  (CPU: the replica's process tree when ready; the log writer of (b) and (c) is not in it)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="timed starts of each variant (default 10)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--uid", type=int, default=DEFAULT_UID, help=f"the app's uid (default {DEFAULT_UID})"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="add (d): bwrap+setpriv without the supervisor"
    )
    args = parser.parse_args()
    if shutil.which("bwrap") is None:
        print("bwrap is missing: run scripts/system-packages", file=sys.stderr)
        return 1
    uid = args.uid if os.geteuid() == 0 else None
    asyncio.run(run(args.rounds, args.warmup, uid, args.breakdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
