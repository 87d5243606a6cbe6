"""Building and caching each app's Python environment with uv.

An app declares its dependencies the standard ways, read in this order:

* ``uv.lock`` (with ``pyproject.toml``): the lock's pins, exported with
  ``uv export --frozen`` (nothing is re-resolved against the lock's wishes);
* ``pyproject.toml``: ``[project] dependencies`` and ``requires-python``;
* ``requirements.txt``;
* none of them: an environment with only what the replica runtime needs.

Every environment also gets granian (`SERVER_REQUIREMENTS`), the faster HTTP
server that services run on under ``server="auto"`` (`clearway.runtime.servers`),
when the app's requirements allow it. When they do not (an app pinning an old
granian, or a package granian needs), the environment is resolved without it
and the build's log says so in one line, with uv's reason: those services run
on uvicorn, which is always there. A service that asks for ``server="granian"``
then fails the deploy, once its spec is read (`check_servers`).

Whatever the source, the app's requirements are resolved *together with*
`REPLICA_REQUIREMENTS`, what ``python -m clearway.runtime.replica`` (and the
spec-reading child) import inside the app's environment. One resolution means
the app's pins win wherever they are compatible with clearway's minimums, and a
conflict fails the deploy with uv's own explanation plus a line saying which
requirement is clearway's.

clearway itself is not installed into the environment: its wheel would drag in
the control plane's dependencies (fastapi, httpx, click, rich...) and those
would shadow or clash with the app's. The replica runtime is pure Python, so a
``clearway`` symlink in the environment's site-packages points at the platform's
own package, which the isolation already binds read-only (``import_roots``).
The design first called for a ``clearway.pth`` naming clearway's import root;
a symlink is used instead because, with clearway installed as a wheel, that root
is the platform's whole site-packages, and a ``.pth`` would put every control
plane package on the app's path, the leak the environment exists to stop.
The Kubernetes backend will ship a small runtime wheel instead.

The cache has two levels, so the common case costs nothing:

1. the *input digest* (sha256 over the dependency files' bytes, the interpreter
   version and `REPLICA_REQUIREMENTS`) names, in ``envs/.inputs/``, the
   environment those inputs resolved to last time: an unchanged dependency set
   (a code-only redeploy) runs no resolver and downloads nothing;
2. the *environment digest* (sha256 over the resolved, pinned set and the
   interpreter version) names the environment, ``envs/<hex>/``: different
   inputs that resolve the same share one environment.

Environments are built in ``envs/.staging`` and renamed into place, under a
lock per digest, so concurrent deploys of the same dependencies build once and
nobody ever sees half an environment. They are owned by the platform and
readable by all (0755): they hold only public packages, and every app uid must
be able to run its own; no app can write them.

uv runs with the control plane's ``UV_*`` variables (index URL, find-links,
cache directory, offline mode), ``HOME`` (the default cache's location),
``PATH`` (where interpreters are found), the machine's TLS trust and proxy
settings (`NETWORK_VARIABLES`: a host behind a TLS-inspecting proxy or with a
private CA cannot reach an index without them) and nothing else, with
``UV_PYTHON_DOWNLOADS=never`` and ``--no-config`` (an app's ``uv.toml`` does
not steer the platform). It installs wheels only (``--no-build``): building
an sdist runs the package's code, and uv runs as the platform's user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from clearway.control.faults import StorageFull, is_disk_full
from clearway.exceptions import APIError
from clearway.runtime.servers import GRANIAN_REQUIREMENT
from clearway.spec.model import AppSpec

__all__ = [
    "REPLICA_REQUIREMENTS",
    "SERVER_REQUIREMENTS",
    "BuiltEnvironment",
    "Dependencies",
    "EnvironmentBuilder",
    "check_servers",
    "env_digest",
    "find_uv",
    "has_granian",
    "input_digest",
    "normalise_pins",
    "read_dependencies",
]

#: What the replica runtime imports inside the app's environment, with the
#: oldest versions it works with: pydantic (the spec model the SDK validates
#: with; 2.9 for ``val_json_bytes``, how functions take ``bytes`` as base64),
#: uvicorn with uvloop and httptools (``loop="uvloop"``, ``http="httptools"``),
#: a2wsgi (WSGI apps), cloudevents (the events functions receive,
#: ``cloudevents.v1.http``). Checked by importing ``clearway.runtime.replica``
#: and what uvicorn loads for that configuration.
REPLICA_REQUIREMENTS: tuple[str, ...] = (
    "pydantic>=2.9",
    "uvicorn>=0.29",
    "uvloop>=0.19; sys_platform != 'win32'",
    "httptools>=0.6",
    "a2wsgi>=1.10",
    "cloudevents>=2.2",
)

#: Added to REPLICA_REQUIREMENTS when the app's requirements allow it (see the module docstring).
SERVER_REQUIREMENTS: tuple[str, ...] = (GRANIAN_REQUIREMENT,)

#: The version of the interpreter the platform runs on ("3.11.7").
PLATFORM_PYTHON_VERSION = ".".join(str(part) for part in sys.version_info[:3])

#: How long one uv command may take (a cold resolve and download of a big set).
UV_TIMEOUT = 900.0

#: How the machine reaches package indexes: CA bundles and proxies, honoured by uv.
NETWORK_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
)
#: The most of uv's output kept for an error's details.
_MAX_OUTPUT = 64 * 1024
#: Written into every environment: what it was built from (for people and GC).
MANIFEST = "clearway-env.json"


def find_uv() -> str:
    """The uv binary: the one the ``uv`` package ships, else ``uv`` on PATH."""
    try:
        from uv import find_uv_bin

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise APIError(
            503,
            "clearway builds app environments with uv, which is not installed: "
            "`pip install uv` into clearway's environment (it is a dependency of clearway)",
        )
    return found


@dataclass(frozen=True)
class Dependencies:
    """What a project declares, read from its files (never by running them)."""

    #: "uv.lock", "pyproject.toml", "requirements.txt" or "none".
    source: str
    #: File name -> bytes of every file the declaration was read from (the input digest).
    files: dict[str, bytes] = field(default_factory=dict)
    #: pyproject's ``[project] dependencies`` (the other sources are read by uv).
    requirements: tuple[str, ...] = ()
    requires_python: str | None = None


def read_dependencies(project: Path) -> Dependencies:
    """Which of the standard declarations ``project`` uses (see the module docstring)."""
    pyproject = project / "pyproject.toml"
    lock = project / "uv.lock"
    requirements = project / "requirements.txt"
    if pyproject.is_file():
        raw = pyproject.read_bytes()
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise APIError(422, f"pyproject.toml cannot be read: fix it ({exc})") from None
        table = data.get("project", {})
        requires_python = table.get("requires-python") if isinstance(table, dict) else None
        if requires_python is not None and not isinstance(requires_python, str):
            raise APIError(422, "pyproject.toml: [project] requires-python must be a string such as \">=3.11\"")
        if lock.is_file():
            return Dependencies(
                "uv.lock", {"pyproject.toml": raw, "uv.lock": lock.read_bytes()}, (), requires_python
            )
        deps = table.get("dependencies", []) if isinstance(table, dict) else []
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise APIError(422, "pyproject.toml: [project] dependencies must be a list of requirement strings")
        if deps or requires_python or not requirements.is_file():
            return Dependencies("pyproject.toml", {"pyproject.toml": raw}, tuple(deps), requires_python)
    if requirements.is_file():
        return Dependencies("requirements.txt", {"requirements.txt": requirements.read_bytes()})
    return Dependencies("none")


def input_digest(deps: Dependencies, python_version: str, extra: tuple[str, ...] = ()) -> str:
    """sha256 over what decides the resolution: the files, the interpreter, clearway's needs
    (and the ``extra`` requirements a build adds, such as the test gate's pytest)."""
    h = hashlib.sha256()
    h.update(f"clearway-env-inputs/1\0{deps.source}\0{python_version}\0".encode())
    for requirement in (*REPLICA_REQUIREMENTS, *SERVER_REQUIREMENTS):
        h.update(requirement.encode() + b"\0")
    if extra:
        h.update(b"extra\0" + "\0".join(extra).encode() + b"\0")
    for name in sorted(deps.files):
        h.update(name.encode() + b"\0" + hashlib.sha256(deps.files[name]).digest())
    return h.hexdigest()


def normalise_pins(compiled: str) -> list[str]:
    """uv's pinned output as sorted lines without comments, blanks or case differences."""
    pins = set()
    for raw in compiled.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition("==")
        pins.add(f"{name.strip().lower().replace('_', '-')}=={rest.strip()}" if sep else line)
    return sorted(pins)


def env_digest(pins: list[str], python_version: str) -> str:
    """sha256 over the resolved set and the interpreter: the environment's name."""
    h = hashlib.sha256()
    h.update(f"clearway-env/1\0{python_version}\0".encode())
    for pin in pins:
        h.update(pin.encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class BuiltEnvironment:
    digest: str
    """``sha256:<hex>``: the artifact reference revisions and backends use."""
    path: Path
    python: Path
    """The environment's interpreter (``bin/python``)."""
    python_version: str
    reused: bool
    """True when an unchanged dependency set found its environment: no resolver ran."""
    log: str
    """What happened, in a few lines (and uv's output when something was built)."""
    granian: bool = True
    """Whether `SERVER_REQUIREMENTS` are in it (else its WSGI services run on uvicorn)."""
    without_granian: str = ""
    """Why granian is not in it: uv's explanation (empty when it is)."""


def has_granian(pins: list[str]) -> bool:
    """Whether the pinned set holds a granian the replica runtime drives."""
    from packaging.requirements import Requirement

    wanted = Requirement(GRANIAN_REQUIREMENT)
    for pin in pins:
        name, sep, version = pin.partition("==")
        if sep and name == "granian":
            return wanted.specifier.contains(version, prereleases=True)
    return False


def _fallback_line(reason: str) -> str:
    """One line for the deploy's output; uv's reason is many ("Because …" is the gist)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    short = next((line for line in lines if "ecause" in line), lines[-1] if lines else "")
    if len(short) > 240:
        short = short[:237] + "..."
    return (
        f"granian is not in this environment: the app's dependencies exclude {GRANIAN_REQUIREMENT}"
        + (f" ({short})" if short else "")
        + "; WSGI services with server='auto' run on uvicorn (through a2wsgi)"
    )


def check_servers(spec: AppSpec, environment: BuiltEnvironment) -> None:
    """Fail a deploy whose services ask for granian when its environment could not get it."""
    if environment.granian:
        return
    asking = [c.name for c in spec.listeners if c.server == "granian"]
    if asking:
        names = ", ".join(repr(name) for name in asking)
        raise APIError(
            422,
            f"{names} ask{'s' if len(asking) == 1 else ''} for server='granian', but granian cannot "
            f"be installed beside this app's dependencies ({GRANIAN_REQUIREMENT} conflicts with them): "
            "relax the pins uv names below, or use server='auto' (uvicorn when granian cannot be had)",
            details=environment.without_granian or None,
        )


@dataclass(frozen=True)
class _Interpreter:
    path: str
    version: str


def _version_of(python: str) -> str:
    import subprocess

    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


class EnvironmentBuilder:
    """Builds (or finds) the environment of a project; see the module docstring."""

    def __init__(self, home: Path, *, python: str | None = None) -> None:
        self.root = home / "envs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.inputs = self.root / ".inputs"
        self.staging = self.root / ".staging"
        self.locks = self.root / ".locks"
        for private in (self.inputs, self.staging, self.locks):
            private.mkdir(mode=0o700, exist_ok=True)
        self.logs = home / "logs" / "builds"
        self.logs.mkdir(parents=True, exist_ok=True)
        base = python or getattr(sys, "_base_executable", None) or sys.executable
        self.base = _Interpreter(base, PLATFORM_PYTHON_VERSION if python is None else _version_of(base))
        #: Environments a build is handing to a revision not stored yet: GC keeps them.
        self._pinned: dict[str, int] = {}

    # -- references ---------------------------------------------------------------
    def path_of(self, digest: str) -> Path:
        return self.root / digest.removeprefix("sha256:")

    def existing(self) -> list[str]:
        """Digests (``sha256:<hex>``) of every environment on disk."""
        return [f"sha256:{p.name}" for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir()]

    def is_pinned(self, digest: str) -> bool:
        return self._pinned.get(digest, 0) > 0

    @contextlib.contextmanager
    def pinned(self, digest: str) -> Iterator[None]:
        """Keep ``digest`` from garbage collection until the revision using it is stored."""
        self._pinned[digest] = self._pinned.get(digest, 0) + 1
        try:
            yield
        finally:
            self._pinned[digest] -= 1
            if not self._pinned[digest]:
                del self._pinned[digest]

    def remove(self, digest: str) -> None:
        """Delete an environment (GC) and the input entries that lead to it."""
        path = self.path_of(digest)
        if path.is_dir():
            trash = self.staging / f"gc-{path.name}-{os.getpid()}"
            os.rename(path, trash)  # one step: nobody sees half an environment
            shutil.rmtree(trash, ignore_errors=True)
        for entry in self.inputs.iterdir():
            with contextlib.suppress(OSError):
                if entry.read_text().strip() == digest:
                    entry.unlink()

    # -- building -----------------------------------------------------------------
    def uv_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.startswith("UV_")}
        for name in ("HOME", "PATH", *NETWORK_VARIABLES):
            if name in os.environ:
                env[name] = os.environ[name]
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        return env

    async def _uv(self, *args: str, cwd: Path) -> tuple[int, str]:
        """Run uv; (exit code, combined output tail)."""
        proc = await asyncio.create_subprocess_exec(
            find_uv(),
            *args,
            cwd=cwd,
            env=self.uv_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(UV_TIMEOUT):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return -1, f"uv {args[0]} took longer than {UV_TIMEOUT:.0f}s and was stopped"
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")[-_MAX_OUTPUT:]

    async def interpreter(self, requires_python: str | None) -> _Interpreter:
        """The platform's interpreter, or one that satisfies ``requires-python``."""
        if requires_python is None:
            return self.base
        try:
            spec = SpecifierSet(requires_python)
        except InvalidSpecifier:
            raise APIError(
                422, f"requires-python {requires_python!r} is not a version specifier: write it like \">=3.11\""
            ) from None
        if spec.contains(self.base.version, prereleases=True):
            return self.base
        with tempfile.TemporaryDirectory(prefix="uv-", dir=self.staging) as scratch:
            code, out = await self._uv("python", "find", "--no-config", requires_python, cwd=Path(scratch))
            if code == 0 and out.strip():
                path = out.strip().splitlines()[-1]
                return _Interpreter(path, await asyncio.to_thread(_version_of, path))
            _, found = await self._uv(
                "python", "list", "--only-installed", "--no-config", cwd=Path(scratch)
            )
        raise APIError(
            422,
            f"install a Python that satisfies requires-python {requires_python!r}, or relax it: "
            f"the platform runs Python {self.base.version} and no other interpreter on this machine "
            "matches (clearway does not download interpreters)",
            details=f"interpreters found:\n{found.strip() or '(none)'}\n\n{out.strip()}",
        )

    async def ensure(self, project: Path, *, label: str = "app", extra: tuple[str, ...] = ()) -> BuiltEnvironment:
        """The environment for ``project`` (a code snapshot), built if needed.

        ``extra`` requirements are resolved with the app's and clearway's (the
        test gate adds ``pytest`` for a project that has tests). Raises
        `APIError` 422, with uv's output as details, when the dependencies
        cannot be resolved or installed; nothing is left behind.
        """
        deps = await asyncio.to_thread(read_dependencies, project)
        interpreter = await self.interpreter(deps.requires_python)
        key = input_digest(deps, interpreter.version, extra)
        known = self.inputs / key
        with contextlib.suppress(OSError):
            digest = known.read_text().strip()
            path = self.path_of(digest)
            if (path / MANIFEST).is_file():
                await asyncio.to_thread(_link_runtime, path)
                manifest = json.loads((path / MANIFEST).read_text())
                granian = has_granian(list(manifest.get("pins", [])))
                without = "" if granian else str(manifest.get("without_granian", ""))
                log = f"environment {digest[:19]} reused: dependencies unchanged ({deps.source}), no resolver run"
                return BuiltEnvironment(
                    digest,
                    path,
                    path / "bin" / "python",
                    interpreter.version,
                    reused=True,
                    log=log if granian else f"{log}\n{_fallback_line(without)}",
                    granian=granian,
                    without_granian=without,
                )
        try:
            return await self._resolve_and_build(deps, project, interpreter, known, label, extra)
        except APIError as exc:
            self._write_log(label, f"{exc.message}\n\n{exc.details or ''}")
            raise

    async def _resolve_and_build(
        self,
        deps: Dependencies,
        project: Path,
        interpreter: _Interpreter,
        known: Path,
        label: str,
        extra: tuple[str, ...] = (),
    ) -> BuiltEnvironment:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="resolve-", dir=self.staging) as scratch_name:
            scratch = Path(scratch_name)
            pins, compile_log, without = await self._resolve(deps, project, interpreter, scratch, extra)
            digest = "sha256:" + env_digest(pins, interpreter.version)
            compiled = scratch / "pinned.txt"
            compiled.write_text("\n".join(pins) + "\n")
            path = self.path_of(digest)
            built = False
            build_log = ""
            async with _digest_lock(self.locks / f"{path.name}.lock"):
                if not (path / MANIFEST).is_file():
                    build_log = await self._build(path, compiled, interpreter, deps, scratch, pins, without)
                    built = True
            await asyncio.to_thread(_link_runtime, path)
        _write_atomic(known, digest + "\n")
        took = time.monotonic() - started
        how = f"built in {took:.1f}s" if built else f"resolved in {took:.1f}s to an existing environment"
        log = f"environment {digest[:19]} {how} ({deps.source}, Python {interpreter.version})"
        granian = has_granian(pins)
        if not granian:
            log += "\n" + _fallback_line(without)
        self._write_log(label, "\n".join([log, compile_log, without, build_log]))
        return BuiltEnvironment(
            digest, path, path / "bin" / "python", interpreter.version, reused=False, log=log,
            granian=granian, without_granian=without,
        )  # fmt: skip

    def _write_log(self, label: str, text: str) -> None:
        with contextlib.suppress(OSError):
            (self.logs / f"{label}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log").write_text(text)

    async def _resolve(
        self, deps: Dependencies, project: Path, interpreter: _Interpreter, scratch: Path, extra: tuple[str, ...] = ()
    ) -> tuple[list[str], str, str]:
        """The pinned set of the app's requirements plus clearway's, uv's output, and why
        granian is not in it (empty when it is); or a 422 saying why there is no set."""
        app_in = scratch / "app.in"
        if deps.source == "uv.lock":
            for name, data in deps.files.items():
                (scratch / name).write_bytes(data)
            code, out = await self._uv(
                "export", "--frozen", "--no-hashes", "--no-emit-project", "--no-dev",
                "--no-header", "--no-config", "--quiet", "--directory", str(scratch),
                "-o", str(app_in), cwd=scratch,
            )  # fmt: skip
            if code != 0:
                raise APIError(
                    422,
                    "fix uv.lock (run `uv lock` in the project and deploy again): it cannot be exported",
                    details=out,
                )
        elif deps.source == "pyproject.toml":
            app_in.write_text("\n".join(deps.requirements) + "\n")
        elif deps.source == "requirements.txt":
            # Read in place: `-r other.txt` lines are relative to the file.
            app_in.write_text(f"-r {project / 'requirements.txt'}\n")
        else:
            app_in.write_text("")
        runtime_in = scratch / "clearway-runtime.in"
        runtime_in.write_text("\n".join((*REPLICA_REQUIREMENTS, *extra)) + "\n")
        server_in = scratch / "clearway-server.in"
        server_in.write_text("\n".join(SERVER_REQUIREMENTS) + "\n")
        out_file = scratch / "compiled.txt"
        common = [
            "--python", interpreter.path, "--no-build", "--no-config", "--no-header",
            "--no-annotate", "--quiet",
        ]  # fmt: skip
        code, with_server = await self._uv(
            "pip", "compile", str(app_in), str(runtime_in), str(server_in), *common, "-o", str(out_file), cwd=scratch
        )
        if code == 0:
            return normalise_pins(out_file.read_text()), with_server, ""
        # Without the server: services then run on uvicorn (see the module docstring).
        code, out = await self._uv("pip", "compile", str(app_in), str(runtime_in), *common, "-o", str(out_file), cwd=scratch)
        if code == 0:
            return normalise_pins(out_file.read_text()), out, with_server.strip()
        # Is it the app's own set, or its clash with clearway's? One more resolve, on failure only.
        alone, _ = await self._uv("pip", "compile", str(app_in), *common, "-o", str(scratch / "alone.txt"), cwd=scratch)
        if alone == 0 and deps.source != "none":
            raise APIError(
                422,
                "allow versions that clearway's replica runtime can use: your dependencies ("
                f"{deps.source}) conflict with what it needs in your app's environment",
                details=f"{out.strip()}\n\nclearway's requirements (REPLICA_REQUIREMENTS): "
                + ", ".join(REPLICA_REQUIREMENTS),
            )
        raise APIError(
            422,
            f"fix the dependencies in {deps.source}: uv cannot resolve them (its explanation is below)",
            details=out.strip(),
        )

    async def _build(
        self,
        path: Path,
        compiled: Path,
        interpreter: _Interpreter,
        deps: Dependencies,
        scratch: Path,
        pins: list[str],
        without_granian: str = "",
    ) -> str:
        staging = Path(tempfile.mkdtemp(prefix="env-", dir=self.staging))
        try:
            venv = staging / "env"
            code, out = await self._uv(
                "venv", "--quiet", "--no-config", "--relocatable", "--python", interpreter.path, str(venv), cwd=scratch
            )
            if code == 0:
                code, more = await self._uv(
                    "pip", "sync", "--python", str(venv / "bin" / "python"), "--no-build", "--no-config",
                    "--quiet", str(compiled), cwd=scratch,
                )  # fmt: skip
                out += more
            if code != 0 and ("No space left on device" in out or "os error 28" in out):
                raise StorageFull(self.root, what="building the app's environment")
            if code != 0:
                raise APIError(
                    422,
                    f"check that every package in {deps.source} is available as a wheel for Python "
                    f"{interpreter.version} on this machine: installing the environment failed",
                    details=out.strip(),
                )
            manifest = {
                "python": interpreter.version,
                "interpreter": interpreter.path,
                "pins": pins,
                "without_granian": without_granian,
                "built_at": time.time(),
            }
            (venv / MANIFEST).write_text(json.dumps(manifest, indent=2))
            await asyncio.to_thread(_open_for_reading, venv)
            try:
                os.rename(venv, path)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and (path / MANIFEST).is_file():
                    return out  # another platform process built the same one
                if is_disk_full(exc):
                    raise StorageFull(self.root, what="building the app's environment") from exc
                raise
            return out
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(self.root, what="building the app's environment") from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python*/site-packages"))
    if not found:
        raise RuntimeError(f"{env} has no lib/python*/site-packages")
    return found[0]


def _link_runtime(env: Path) -> None:
    """Make ``import clearway`` in ``env`` find the platform's own package (see the docstring).

    Checked on every use, not only at build: a platform reinstalled elsewhere
    repoints its environments instead of leaving them broken.
    """
    import clearway

    package = Path(clearway.__file__).resolve().parent
    link = _site_packages(env) / "clearway"
    with contextlib.suppress(OSError):
        if link.is_symlink() and Path(os.readlink(link)) == package:
            return
    # A name of its own per call: builds run in threads of one process, and a
    # name shared by them let one thread remove another's link before its rename.
    tmp = link.with_name(f".clearway.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    tmp.symlink_to(package, target_is_directory=True)
    os.replace(tmp, link)


def _open_for_reading(root: Path) -> None:
    """Directories 0755 and files readable by all, writable by the platform alone."""
    for dirpath, _, filenames in os.walk(root):
        Path(dirpath).chmod(0o755)
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod((path.stat().st_mode | 0o444) & ~0o022)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def _digest_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive flock on ``path``, waited for in a thread (builds of one digest queue up)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
