"""Artifact references → paths on this machine.

The control plane hands backends `Artifact` references (digests), never host
paths, so the Kubernetes backend can fetch the same artifact on another
machine. On this machine both halves already live in ``$CLEARWAY_HOME``, put
there by the control plane when it built the revision:

* code ``<digest>`` of app ``<app>``   → ``code/<app>/<digest>``
* environment ``sha256:<hex>``          → ``envs/<hex>/bin/python``
* no environment (revisions from before per-app environments) → the
  platform's own interpreter, as those revisions always ran.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from clearway.backends.base import Artifact


@dataclass(frozen=True)
class ArtifactStore:
    home: Path
    #: The interpreter of revisions without an environment of their own.
    platform_python: str = sys.executable

    def code_dir(self, app: str, artifact: Artifact) -> Path:
        return self.home / "code" / app / artifact.code

    def python(self, artifact: Artifact) -> str:
        if artifact.env is None:
            return self.platform_python
        return str(self.home / "envs" / artifact.env.removeprefix("sha256:") / "bin" / "python")
