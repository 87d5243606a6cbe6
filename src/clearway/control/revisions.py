"""Turning an upload into an immutable revision.

A revision is an artifact — code snapshot, Python environment and interpreter,
each named by its digest — plus spec and variables, frozen. The environment
is built (or found in the cache) by ``control.environments`` from the
project's declared dependencies *before* the spec is read, because reading it
imports ``app.py``, which may import the app's packages: the spec-reading
child runs with the environment's interpreter. The code is unpacked (under
limits, see ``control.uploads``) into a content-addressed snapshot,
``code/<app>/<digest>``, where the digest covers every name, type, mode,
symlink target and content: the same push twice shares one copy, a different
push never does, and what a deploy reports is what runs.

Snapshots are owned by root with the app's gid, directories 0750 and files
0640 (0750 when executable): the app's replicas can read their code, other
apps' uids cannot, and nobody but the platform can write it. ``code/`` is
0711 and ``code/<app>`` belongs to the app's group, so an app cannot even list
another app's snapshots. Identical concurrent uploads are safe: each unpacks
into a staging directory of its own and renames it into place; a rename that
loses the race to an identical snapshot simply drops its copy.

The spec is read by importing the app in a *child* process
(``clearway.sdk.inspect``) that runs isolated like a replica
(``clearway.runtime.isolation``): under a uid of its own (the app uid base
minus one), with ``$CLEARWAY_HOME`` hidden, the staging directory read-only,
a throwaway writable workdir and a minimal environment. The user's
import-time crash, hang, ``sys.exit`` or fork never reaches the control
plane: the child's pid namespace dies with its main process, and the output is
read until that process exits, not until every writer of the pipe is gone. A
spec error comes back with the user's ``file:line``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearway.control.environments import BuiltEnvironment, EnvironmentBuilder, check_servers
from clearway.control.faults import StorageFull, is_disk_full
from clearway.control.store import DEFAULT_UID_BASE, Revision, Store
from clearway.control.uploads import DIR_MODE, UploadLimits, unpack
from clearway.exceptions import APIError, RuntimeStartError
from clearway.runtime.isolation import Isolation, import_roots, isolated_argv
from clearway.spec.model import AppSpec

#: A build's extra check of the staged project, its environment and spec (see
#: `RevisionBuilder.build_with_environment`).
Check = Callable[[Path, BuiltEnvironment, AppSpec], Awaitable[None]]

#: How long importing the user's app to read its spec may take.
INSPECT_TIMEOUT = 60.0
#: After the spec-reading process exits, how long its output pipes may take to
#: drain. Output written before the exit is already in the pipe; this only
#: bounds the wait when a leaked process still holds the pipe open.
DRAIN_TIMEOUT = 2.0
#: The most of the child's stdout / stderr kept (the tail: the JSON is last).
_MAX_STDOUT = 1024 * 1024
_MAX_STDERR = 64 * 1024
#: PATH of the spec-reading child: nothing of the control plane's environment.
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Ownership:
    """Who files and processes of apps belong to.

    ``as_root``: the control plane runs as root, so snapshots get the app's
    group and the spec-reading child its own uid; otherwise everything stays
    ours and isolation rests on the mount namespace alone.
    """

    as_root: bool
    uid_base: int = DEFAULT_UID_BASE

    @classmethod
    def detect(cls, uid_base: int = DEFAULT_UID_BASE) -> Ownership:
        return cls(as_root=os.geteuid() == 0, uid_base=uid_base)

    @property
    def inspect_uid(self) -> int | None:
        return self.uid_base - 1 if self.as_root else None


class RevisionBuilder:
    def __init__(
        self,
        store: Store,
        home: Path,
        *,
        ownership: Ownership | None = None,
        limits: UploadLimits | None = None,
        environments: EnvironmentBuilder | None = None,
    ) -> None:
        self.store = store
        self.home = home
        self.code_root = home / "code"
        self.code_root.mkdir(parents=True, exist_ok=True)
        self.code_root.chmod(0o711)
        self.staging_root = self.code_root / ".staging"
        self.staging_root.mkdir(mode=0o700, exist_ok=True)
        self.work_root = home / "uploads"
        self.work_root.mkdir(mode=0o700, exist_ok=True)
        self.environments = environments or EnvironmentBuilder(home)
        #: Held while a snapshot is placed and its revision stored, and by garbage
        #: collection: it never deletes what a deploy is placing.
        self.artifact_lock = asyncio.Lock()
        self.ownership = ownership or Ownership.detect(store.uid_base)
        self.limits = limits or UploadLimits()

    async def build(self, upload: Path, *, app_file: str, env: dict[str, str]) -> Revision:
        """Unpack ``upload`` (a gzipped tar on disk), read its spec, store the revision."""
        revision, _ = await self.build_with_environment(upload, app_file=app_file, env=env)
        return revision

    async def build_with_environment(
        self,
        upload: Path,
        *,
        app_file: str,
        env: dict[str, str],
        extra: Callable[[Path], tuple[str, ...]] | None = None,
        check: Check | None = None,
        branch: str | None = None,
        commit: str | None = None,
        canary: bool = False,
    ) -> tuple[Revision, BuiltEnvironment]:
        """`build`, also saying how the environment was obtained (built or reused).

        For builds that do more than ``clearway deploy`` (a ``git push``'s test
        gate): ``extra(project)`` names requirements added to the
        environment's resolution, and ``check(project, environment, spec)``
        runs once the spec is read, before anything is stored; raising from it
        stops the build with nothing left behind. ``branch``, ``commit`` and
        ``canary`` go to `Store.create_revision` (a preview, the pushed commit,
        a rollout).
        """
        if Path(app_file).is_absolute() or ".." in Path(app_file).parts:
            raise APIError(422, f"app_file {app_file!r} must be a path inside the project")
        try:
            staging = Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging_root))
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(self.staging_root, what="unpacking the upload") from exc
            raise
        try:
            digest = await asyncio.to_thread(unpack, upload, staging, self.limits)
            if not (staging / app_file).is_file():
                raise APIError(
                    422,
                    f"the project has no {app_file}: create it, defining `app = clearway.App(\"name\")`, "
                    "or name another file with --file",
                )
            inspect_gid = self.ownership.inspect_uid
            await asyncio.to_thread(_own, staging, inspect_gid)
            environment = await self.environments.ensure(staging, extra=extra(staging) if extra else ())
            with self.environments.pinned(environment.digest):
                spec = await self._inspect(staging, app_file, python=str(environment.python))
                if "/" in spec.name or spec.name.startswith("."):
                    raise APIError(422, f"app name {spec.name!r} cannot name a directory")
                check_servers(spec, environment)
                if check is not None:
                    await check(staging, environment, spec)
                uid = self.store.allocate_uid(spec.name)
                gid = uid if self.ownership.as_root else None
                async with self.artifact_lock:
                    code_dir = await asyncio.to_thread(self._place, staging, spec.name, digest, gid)
                    revision = self.store.create_revision(
                        spec,
                        code_dir=code_dir,
                        app_file=app_file,
                        env=env,
                        env_digest=environment.digest,
                        python=environment.python_version,
                        branch=branch,
                        commit=commit,
                        canary=canary,
                    )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.store.add_event(spec.name, f"{revision.id}: {environment.log}")
        return revision, environment

    def _place(self, staging: Path, app: str, digest: str, gid: int | None) -> Path:
        """Move the staged snapshot to ``code/<app>/<digest>`` (or drop it if there already)."""
        app_dir = self.code_root / app
        app_dir.mkdir(mode=DIR_MODE, exist_ok=True)
        if gid is not None:
            os.chown(app_dir, 0, gid)
        app_dir.chmod(DIR_MODE)
        code_dir = app_dir / digest
        if code_dir.exists():
            shutil.rmtree(staging)
            return code_dir
        try:
            _own(staging, gid)
            os.rename(staging, code_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and code_dir.exists():
                # An identical upload won the race: its snapshot has the same content.
                shutil.rmtree(staging)
                return code_dir
            if is_disk_full(exc):
                raise StorageFull(app_dir, what="storing the code snapshot") from exc
            raise
        return code_dir

    def _child_isolation(self, code_dir: Path, uid: int | None, python: str) -> tuple[Path, Isolation]:
        """A throwaway workdir (the child's own) and the view a child reading or
        testing the project runs in; the caller deletes the workdir."""
        workdir = Path(tempfile.mkdtemp(prefix="inspect-", dir=self.work_root)).resolve()
        if uid is not None:
            os.chown(workdir, uid, uid)
        workdir.chmod(0o700)
        isolation = Isolation(
            uid=uid,
            gid=uid,
            hide=(self.home.resolve(),),
            read_only=(*import_roots(python), code_dir.resolve()),
            writable=(workdir,),
            workdir=workdir,
        )
        return workdir, isolation

    async def run_isolated(
        self,
        code_dir: Path,
        command: list[str],
        *,
        python: str,
        what: str,
        time_limit: float,
        extra_env: dict[str, str] | None = None,
        uid: int | None = None,
    ) -> tuple[int | None, bytes, bytes]:
        """Run ``command`` on the project in ``code_dir`` as the dedicated child uid,
        isolated like a replica, with a minimal environment and a throwaway workdir.

        The one way the control plane runs project code (reading the spec, the test
        gate): nothing of its own environment reaches the child. Returns
        (exit code or None on timeout, stdout, stderr). ``uid``: run as this uid
        instead (an app's own, for code stored readable only by it)."""
        uid = uid if uid is not None and self.ownership.as_root else self.ownership.inspect_uid
        workdir, isolation = await asyncio.to_thread(self._child_isolation, code_dir, uid, python)
        try:
            try:
                argv = isolated_argv(isolation, command)
            except RuntimeStartError as exc:
                raise APIError(503, f"cannot isolate {what}: {exc}") from None
            env = {
                "PATH": CHILD_PATH,
                "HOME": str(workdir),
                "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1",
                **(extra_env or {}),
            }
            return await _run_bounded(argv, env=env, time_limit=time_limit)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)

    async def _inspect(self, code_dir: Path, app_file: str, *, python: str) -> AppSpec:
        code, out, err = await self.run_isolated(
            code_dir,
            [python, "-m", "clearway.sdk.inspect", str(code_dir / app_file)],
            python=python,
            what=f"the import of {app_file}",
            time_limit=INSPECT_TIMEOUT,
        )
        if code is None:
            raise APIError(
                422,
                f"importing {app_file} took longer than {INSPECT_TIMEOUT:.0f}s: importing the app "
                "must not do work; move it into the service or worker function",
            )
        result: dict[str, Any] | None = None
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:
                    continue
                break
        if result is None:
            raise APIError(
                422,
                f"importing {app_file} ended the process (exit code {code}) before clearway could read the app",
                details=err.decode(errors="replace")[-4000:] or None,
            )
        if not result["ok"]:
            message = result["error"]
            location = result.get("location")
            if location and location.startswith(str(code_dir)):
                location = location[len(str(code_dir)) + 1 :]
            raise APIError(422, f"{location}: {message}" if location else message, details=result.get("details"))
        return AppSpec.model_validate(result["spec"])


class _Tail:
    """The last ``limit`` bytes of a stream: a chatty import cannot fill our memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    async def pump(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(65536):
            self.data += chunk
            if len(self.data) > self.limit:
                del self.data[: len(self.data) - self.limit]


async def _run_bounded(argv: list[str], *, env: dict[str, str], time_limit: float) -> tuple[int | None, bytes, bytes]:
    """Run ``argv``; (exit code or None on timeout, stdout tail, stderr tail).

    Ends when the process exits (or is killed at ``time_limit``), whatever its
    descendants do: a process that forked at import and holds stdout open
    must not keep us reading. Hence our own pipes rather than asyncio's: its
    ``Process.wait()`` also waits for every writer of the pipes to close them.
    What is left of the process group afterwards (bwrap's init of the pid
    namespace, with whatever the import leaked) is killed, which ends the
    namespace and everything in it.
    """
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    out, err = _Tail(_MAX_STDOUT), _Tail(_MAX_STDERR)
    transports: list[asyncio.ReadTransport] = []
    streams: list[asyncio.StreamReader] = []
    for fd in (out_r, err_r):
        stream = asyncio.StreamReader(limit=_MAX_STDOUT)
        transport, _ = await loop.connect_read_pipe(
            lambda stream=stream: asyncio.StreamReaderProtocol(stream),  # type: ignore[misc]
            os.fdopen(fd, "rb", buffering=0),
        )
        transports.append(transport)
        streams.append(stream)
    code: int | None
    try:
        async with asyncio.TaskGroup() as readers:
            pumps = [
                readers.create_task(out.pump(streams[0]), name="inspect-stdout"),
                readers.create_task(err.pump(streams[1]), name="inspect-stderr"),
            ]
            try:
                async with asyncio.timeout(time_limit):
                    code = await proc.wait()
            except TimeoutError:
                code = None
            finally:
                _kill_group(proc.pid)
                if proc.returncode is None:
                    await proc.wait()
            # Output written before the exit is in the pipes already; a leaked
            # writer (killed just above) can only delay EOF, never extend it.
            _, pending = await asyncio.wait(pumps, timeout=DRAIN_TIMEOUT)
            for task in pending:
                task.cancel()
    finally:
        for transport in transports:
            transport.close()
    return code, bytes(out.data), bytes(err.data)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _own(root: Path, gid: int | None) -> None:
    """Give ``root``'s tree to root:``gid`` (when we are root) with snapshot modes.

    Directories 0750, files 0640 or 0750 (as unpacked); symlinks are not
    followed. Without root nothing is chowned: the files are ours already.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if gid is not None:
            os.lchown(base, 0, gid)
        base.chmod(DIR_MODE)
        for name in (*dirnames, *filenames):
            path = base / name
            if path.is_symlink():
                if gid is not None:
                    os.lchown(path, 0, gid)
                continue
            if name in filenames:
                if gid is not None:
                    os.chown(path, 0, gid)
                path.chmod(0o750 if path.stat().st_mode & 0o100 else 0o640)
