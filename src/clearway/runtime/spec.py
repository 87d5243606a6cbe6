"""What the control plane asks the runtime to run: one `ReplicaSpec` per replica.

The spec is the whole contract between the control plane and the runtime. It is
frozen so that a running replica's description can never drift from what was
launched, and it is plain data (paths, strings, numbers) so that it crosses the
process boundary as JSON: the supervisor hands it to ``python -m
clearway.runtime.replica`` in the ``CLEARWAY_REPLICA_SPEC`` environment variable.

The replica's environment is *built* here rather than inherited from the
supervisor, so a replica never sees the control plane's own secrets or
``PYTHONPATH``: a small base (``PATH`` of the interpreter and the system, ``HOME``, ``LANG``, unbuffered output),
then the spec's env (user variables and platform ones such as
``CLEARWAY_CONTROL_URL``), then the replica's identity and credential, which
the user cannot override because the SDK and the platform rely on them.
Nothing else of the parent's environment leaks in.

The credential (``CLEARWAY_REPLICA_TOKEN``) appears exactly once: the JSON spec
handed to the replica leaves out ``env`` (the replica reads its variables from
its environment), so a secret in the env is never present twice.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "INCARNATION_ENV_VAR",
    "LISTEN_FD_ENV_VAR",
    "SPEC_ENV_VAR",
    "TOKEN_ENV_VAR",
    "Interface",
    "Kind",
    "ReplicaSpec",
    "replica_environment",
]

#: The environment variable that carries the JSON-encoded spec to the replica.
SPEC_ENV_VAR = "CLEARWAY_REPLICA_SPEC"
#: The environment variable naming the inherited listening socket's fd number.
LISTEN_FD_ENV_VAR = "CLEARWAY_LISTEN_FD"
#: The environment variable holding the replica's credential (a JWT), renewed in place.
TOKEN_ENV_VAR = "CLEARWAY_REPLICA_TOKEN"
#: The environment variable naming this process's incarnation.
INCARNATION_ENV_VAR = "CLEARWAY_REPLICA_INCARNATION"

_PATH_FIELDS = ("code_dir", "workdir", "log_path")

Kind = Literal["service", "worker", "function"]
Interface = Literal["auto", "asgi", "wsgi"]


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica of one component of one revision of an app."""

    replica_id: str
    """Unique and stable across restarts, e.g. ``"hello-3.web.0"``."""
    app: str
    revision: str
    component: str
    index: int
    kind: Kind
    code_dir: Path
    """Immutable snapshot of the app's code; put first on ``sys.path``."""
    app_file: str
    """The file defining the ``cw.App``, relative to ``code_dir``."""
    workdir: Path
    """The replica's own writable directory: its cwd and ``HOME``. Created by the runtime
    (owned by ``uid``/``gid``, mode 0700, when ``uid`` is set)."""
    log_path: Path
    """stdout and stderr go here through a log writer that rotates it (`clearway.runtime.logwriter`)."""
    env: Mapping[str, str] = field(default_factory=dict)
    """User and platform variables, merged over the runtime's base env."""
    health_path: str | None = None
    """Path answered with 2xx/3xx when healthy; None: any HTTP answer counts."""
    interface: Interface = "auto"
    grace_period: float = 10.0
    """Seconds between SIGTERM and SIGKILL on stop."""
    memory_mb: int | None = None
    cpu: float | None = None
    """CPU limit in cores (1.5 = one and a half cores), enforced as a CFS quota."""
    sandbox: bool = False
    """Strict view: no host ``/``, only system dirs, code, venv, workdir, private /tmp
    (`clearway.runtime.isolation`). Every replica runs isolated; this narrows the view."""
    python: str = sys.executable
    startup_timeout: float = 60.0
    """Seconds from spawn to the first successful readiness probe."""
    uid: int | None = None
    """Run as this uid when the platform runs as root (each app its own); None: ours."""
    gid: int | None = None
    """Run with this gid (defaults to ``uid``)."""
    hide: tuple[Path, ...] = ()
    """Host paths replaced by an empty tmpfs in the replica's view (the platform home)."""
    socket_path: Path | None = None
    """Services and functions: the unix socket the supervisor binds and passes as fd 3 (< 108 bytes)."""
    network: bool = True
    """With ``sandbox``: False gives the replica an empty network namespace."""

    def to_json(self) -> str:
        """The spec for the replica process, *without* ``env`` (see the module docstring)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        del data["env"]
        for name in _PATH_FIELDS:
            data[name] = str(data[name])
        data["hide"] = [str(p) for p in self.hide]
        data["socket_path"] = None if self.socket_path is None else str(self.socket_path)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReplicaSpec:
        data = json.loads(text)
        for name in _PATH_FIELDS:
            data[name] = Path(data[name])
        data["hide"] = tuple(Path(p) for p in data.get("hide", ()))
        if data.get("socket_path") is not None:
            data["socket_path"] = Path(data["socket_path"])
        return cls(**data)


def replica_environment(
    spec: ReplicaSpec, *, incarnation: str | None = None, token: str | None = None
) -> dict[str, str]:
    """The complete environment a replica process starts with.

    ``token`` (minted per process start) replaces any ``CLEARWAY_REPLICA_TOKEN`` in
    ``spec.env``.
    """
    env = {
        "PATH": f"{Path(spec.python).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(spec.workdir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
    }
    env.update(spec.env)
    env.update(
        {
            "CLEARWAY_APP": spec.app,
            "CLEARWAY_REVISION": spec.revision,
            "CLEARWAY_COMPONENT": spec.component,
            "CLEARWAY_REPLICA_ID": spec.replica_id,
            SPEC_ENV_VAR: spec.to_json(),
        }
    )
    if incarnation is not None:
        env[INCARNATION_ENV_VAR] = incarnation
    if token is not None:
        env[TOKEN_ENV_VAR] = token
    return env
