"""The opt-in sandbox: running a replica under bubblewrap (``bwrap``).

bubblewrap builds a throwaway mount namespace without needing a daemon or an
image, which fits a platform that runs apps as plain processes. The replica sees:

* the host's root file system, read-only (so the interpreter, the installed
  packages and the code snapshot are all there, and none can be modified);
* a private, empty ``/tmp``, fresh ``/proc`` and a minimal ``/dev``;
* its ``workdir``, writable, and nothing else writable;
* its own pid, ipc and uts namespaces (it cannot see or signal other processes).

Deliberate omissions:

* No ``--die-with-parent``: a replica must survive a crash of the control plane.
* The network namespace is shared. Unsharing it would still let a service
  accept connections (it inherits its listening socket, bound outside), but the
  replica could no longer reach the control plane (``CLEARWAY_CONTROL_URL``),
  its database or the other services on loopback. Network isolation needs a
  proxy on an inherited unix socket; it is on the roadmap, not here.
* The log file is not mounted: stdout and stderr are file descriptors opened
  outside the sandbox and inherited.

Signals: bubblewrap does not forward signals to the sandboxed process
(containers/bubblewrap#369), and dies at once on SIGTERM, which would make the
supervisor believe the replica had stopped while it is still draining. The
launcher therefore starts bwrap with SIGTERM *ignored* (an ignored signal stays
ignored across exec); the supervisor signals the whole process group, which
reaches the replica inside, and the replica restores the default SIGTERM
disposition before installing its own handler. bwrap exits when its child does,
with its exit code.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from clearway.exceptions import RuntimeStartError
from clearway.runtime.spec import ReplicaSpec

__all__ = ["find_bwrap", "sandbox_argv"]


def find_bwrap() -> str:
    """The path to ``bwrap``; raises `RuntimeStartError` saying how to install it."""
    path = shutil.which("bwrap")
    if path is None:
        raise RuntimeStartError(
            "sandbox=True needs bubblewrap, but no `bwrap` is on PATH. Install it "
            "(Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`) "
            "or run the component without sandbox=True."
        )
    return path


def sandbox_argv(spec: ReplicaSpec, command: list[str], *, bwrap: str) -> list[str]:
    """Wrap ``command`` so it runs inside the sandbox described above."""
    code_dir = str(Path(spec.code_dir).resolve())
    workdir = str(Path(spec.workdir).resolve())
    # The interpreter's real prefix, the virtualenv it is called through, and
    # every import root (an editable install points outside both).
    readable = sorted(
        {
            str(Path(spec.python).resolve().parent.parent),
            str(Path(spec.python).absolute().parent.parent),
            *(str(Path(p).resolve()) for p in sys.path if p and Path(p).is_dir()),
        }
    )
    binds = [arg for path in readable for arg in ("--ro-bind", path, path)]
    return [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        # Re-expose what lives under /tmp on hosts (and in tests) that keep things there;
        # later mounts win, so these go after the private /tmp.
        *binds,
        "--ro-bind", code_dir, code_dir,
        "--bind", workdir, workdir,
        "--chdir", workdir,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--hostname", spec.replica_id[:63],
        "--",
        *command,
    ]  # fmt: skip
