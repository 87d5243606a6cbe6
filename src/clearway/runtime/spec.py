"""What the control plane asks the runtime to run: one `ReplicaSpec` per replica.

The spec is the whole contract between the control plane and the runtime. It is
frozen so that a running replica's description can never drift from what was
launched, and it is plain data (paths, strings, numbers) so that it crosses the
process boundary as JSON: the supervisor hands it to ``python -m
clearway.runtime.replica`` in the ``CLEARWAY_REPLICA_SPEC`` environment variable.

The replica's environment is *built* here rather than inherited from the
supervisor, so a replica never sees the control plane's own secrets or
``PYTHONPATH``: a small base (``PATH``, ``HOME``, ``LANG``, unbuffered output),
then the spec's env (user variables and platform ones such as
``CLEARWAY_CONTROL_URL``), then the replica's identity, which the user cannot
override because the SDK and the platform rely on it.
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
    "LISTEN_FD_ENV_VAR",
    "SPEC_ENV_VAR",
    "Interface",
    "Kind",
    "ReplicaSpec",
    "replica_environment",
]

#: The environment variable that carries the JSON-encoded spec to the replica.
SPEC_ENV_VAR = "CLEARWAY_REPLICA_SPEC"
#: The environment variable naming the inherited listening socket's fd number.
LISTEN_FD_ENV_VAR = "CLEARWAY_LISTEN_FD"

Kind = Literal["service", "worker"]
Interface = Literal["auto", "asgi", "wsgi"]


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica of one component of one revision of an app."""

    replica_id: str
    """Unique and stable across restarts, e.g. ``"hello-3-web-0"``."""
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
    """The replica's own writable directory: its cwd and ``HOME``. Created by the runtime."""
    log_path: Path
    """stdout and stderr are appended here; the supervisor rotates it."""
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
    """Run under bubblewrap: read-only root, private /tmp, only ``workdir`` writable."""
    python: str = sys.executable
    startup_timeout: float = 60.0
    """Seconds from spawn to the first successful readiness probe."""

    def to_json(self) -> str:
        data: dict[str, Any] = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("code_dir", "workdir", "log_path"):
            data[name] = str(data[name])
        data["env"] = dict(self.env)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReplicaSpec:
        data = json.loads(text)
        for name in ("code_dir", "workdir", "log_path"):
            data[name] = Path(data[name])
        return cls(**data)


def replica_environment(spec: ReplicaSpec, *, port: int | None) -> dict[str, str]:
    """The complete environment a replica process starts with."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
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
    if port is not None:
        env["PORT"] = str(port)
    return env
