"""Isolation of every replica: a bubblewrap view of the file system, and its own uid.

Why always, not only with ``sandbox=True``: app code is untrusted by the
platform. Run as the platform's user with the host's file system in view, a
replica could read the operator token, ``state.db``, the signing key, other
apps' code, environments and logs, and signal or inspect (``/proc/<pid>/environ``)
every other process. So every replica starts as::

    bwrap <view> -- setpriv --reuid U --regid G --clear-groups --no-new-privs \\
        --inh-caps=-all --bounding-set=-all -- python -m clearway.runtime.replica

``setpriv`` only when the platform runs as root and the replica has a uid (each
app gets its own); it needs bwrap to keep ``CAP_SETUID``/``CAP_SETGID`` for the
child (``--cap-add``), and drops every capability, and the ability to regain
any (``no_new_privs``: setuid binaries no longer elevate), before exec. Without
root there is no uid to switch to: bwrap runs in a user namespace
(``--unshare-user``) and the mount namespace alone hides the platform's files.

What each view shows:

* **default** (every replica): the host's ``/`` read-only, with every ``hide``
  path (the platform's home: tokens, keys, state, other apps' code, workdirs
  and sockets) replaced by an empty tmpfs; a private ``/tmp``; fresh ``/proc``
  (its own pid namespace, so only its own processes) and a minimal ``/dev``;
  the ``read_only`` paths (code snapshot, interpreter, venv, import roots)
  bound back read-only and the ``writable`` ones (its workdir) read-write, at
  their host paths. Ancestors of those paths that the replica's uid could not
  traverse on the host (``/root`` holding a pyenv interpreter) are replaced by
  a tmpfs first, so the bound paths are reachable and the rest stays unseen.
* **strict** (``sandbox=True``): no host ``/`` at all. Only the system
  directories (``/usr`` and the ``/bin``, ``/lib*``, ``/sbin`` links or
  directories), the few ``/etc`` files programs need to run and resolve names,
  and the paths above. ``/home``, ``/root``, ``/var``, ``/srv``, ``/opt``... do
  not exist.

A function's warm parent (`clearway.runtime.forking`) runs in the view of its
replicas with one difference: its writable path is the directory that holds
their workdirs, so the replicas it forks, which inherit its namespaces, find
theirs. They share its ``/tmp``, hostname and pid namespace: replicas of one
function of one revision, under one uid.

``network=False`` (with either view) adds an empty network namespace (loopback
only): a service still accepts connections on the unix socket it inherited,
but cannot reach anything, not even the control plane or other services.

What it protects against: reading or writing the platform's state and other
apps' files (mount namespace + uid + file modes), seeing or signalling other
processes (pid namespace, uid), keeping or regaining privileges (setpriv), and
with ``strict`` reading anything of the host that is not needed to run Python.
What it does not: it shares the host kernel, so a kernel exploit escapes it
(gVisor and Firecracker put a second kernel in the way); in the default view
the host's world-readable files stay readable.

Signals: bubblewrap does not forward signals to the sandboxed process
(containers/bubblewrap#369), and dies at once on SIGTERM, which would make the
supervisor believe the replica had stopped while it is still draining. The
launcher therefore starts bwrap with SIGTERM *ignored* (an ignored signal stays
ignored across exec); the supervisor signals the whole process group, which
reaches the replica inside, and the replica restores the default SIGTERM
disposition before installing its own handler. bwrap exits when its child
does, with its exit code. No ``--die-with-parent``: replicas outlive a crash
of the control plane.
"""

from __future__ import annotations

import os
import shutil
import site
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from clearway.exceptions import RuntimeStartError
from clearway.runtime.spec import ReplicaSpec

__all__ = ["Isolation", "find_bwrap", "import_roots", "isolated_argv", "replica_isolation"]

#: System directories shown by the strict view (as links when they are links on the host).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: /etc entries a program needs to run, resolve names and verify TLS; bound when present.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/alternatives",
    "/etc/mime.types",
)

_SETPRIV = "/usr/bin/setpriv"


@dataclass(frozen=True)
class Isolation:
    uid: int | None
    """Switch to this uid/gid when running as root; None: keep ours."""
    gid: int | None
    hide: tuple[Path, ...]
    """Each replaced by an empty tmpfs in the view (the platform home)."""
    read_only: tuple[Path, ...]
    """Bound read-only (code snapshot, interpreter prefix, venv, import roots)."""
    writable: tuple[Path, ...]
    """Bound read-write (the workdir)."""
    workdir: Path
    """The cwd inside."""
    strict: bool = False
    """sandbox=True: no host "/" at all, only system dirs and the above."""
    network: bool = True
    """False adds ``--unshare-net``: an empty network namespace (loopback only)."""
    hostname: str | None = None


def find_bwrap() -> str:
    """The path to ``bwrap``; raises `RuntimeStartError` saying how to install it."""
    path = shutil.which("bwrap")
    if path is None:
        raise RuntimeStartError(
            "every replica runs under bubblewrap, but no `bwrap` is on PATH. Install it "
            "(Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`) "
            "and start the replica again."
        )
    return path


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _drops_privileges(isolation: Isolation) -> bool:
    return _running_as_root() and isolation.uid is not None


def _blocks_traversal(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (with no supplementary groups) cannot search directory ``path``."""
    try:
        info = path.stat()
    except OSError:
        return False
    if info.st_uid == uid:
        return not info.st_mode & stat.S_IXUSR
    if info.st_gid == gid:
        return not info.st_mode & stat.S_IXGRP
    return not info.st_mode & stat.S_IXOTH


def _masks(isolation: Isolation, bound: list[Path]) -> list[Path]:
    """Ancestors of bound paths the replica's uid could not traverse: each becomes a tmpfs."""
    if not _drops_privileges(isolation) or isolation.strict:
        return []  # strict: the tree is built by bwrap (0755 directories), nothing to mask
    assert isolation.uid is not None
    gid = isolation.gid if isolation.gid is not None else isolation.uid
    covered = (Path("/tmp"), *isolation.hide)  # already fresh tmpfs in the view
    found: set[Path] = set()
    for path in bound:
        for ancestor in reversed(path.parents):
            if ancestor == Path("/") or ancestor in bound:
                continue
            if any(ancestor == c or c in ancestor.parents for c in covered):
                continue
            if _blocks_traversal(ancestor, isolation.uid, gid):
                found.add(ancestor)
                break  # everything below is rebuilt inside the tmpfs
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def _parents_to_create(isolation: Isolation, bound: list[Path], masks: list[Path]) -> list[Path]:
    """Directories bwrap would create on its own on the way to a bound path, in a tmpfs.

    bwrap creates them 0700 (owned by root): a replica running under its own uid
    could not reach its code. So they are made explicitly, 0755."""
    fresh = [Path("/tmp"), *isolation.hide, *masks]
    found: set[Path] = set()
    for path in bound:
        for ancestor in path.parents:
            if ancestor == Path("/") or any(ancestor == b or b in ancestor.parents for b in bound):
                continue
            if any(ancestor == s or s in ancestor.parents for s in map(Path, _SYSTEM_DIRS)):
                continue
            in_fresh = any(f in ancestor.parents for f in fresh)
            if isolation.strict or in_fresh:
                found.add(ancestor)
    return sorted(found)


def _strict_root() -> list[str]:
    args: list[str] = []
    for name in _SYSTEM_DIRS:
        path = Path(name)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), name]
        elif path.is_dir():
            args += ["--ro-bind", name, name]
    args += ["--perms", "0755", "--dir", "/etc"]  # bwrap would make it 0700
    for name in _ETC_FILES:
        args += ["--ro-bind-try", name, name]
    return args


def isolated_argv(isolation: Isolation, command: list[str]) -> list[str]:
    """Wrap ``command`` so it runs inside the view described in the module docstring."""
    hide = [p for p in dict.fromkeys(isolation.hide) if p.exists()]
    binds = [(p, "--ro-bind") for p in dict.fromkeys(isolation.read_only)]
    binds += [(p, "--bind") for p in dict.fromkeys(isolation.writable)]
    masks = _masks(isolation, [p for p, _ in binds])
    # One list ordered by depth, since later mounts win: a hidden path inside a bound
    # one stays hidden, and a bound path inside a hidden (or masked) one is shown again.
    mounts = [(Path("/tmp"), "--tmpfs", 0)] + [(p, "--tmpfs", 0) for p in (*hide, *masks)]
    mounts += [(p, how, 2) for p, how in binds]
    mounts += [(p, "--dir", 1) for p in _parents_to_create(isolation, [p for p, _ in binds], masks)]
    mounts.sort(key=lambda m: (len(m[0].parts), m[2], str(m[0])))
    argv = [find_bwrap()]
    argv += _strict_root() if isolation.strict else ["--ro-bind", "/", "/"]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for path, how, _ in mounts:
        if how == "--tmpfs" and path == Path("/tmp"):
            argv += ["--perms", "1777", how, str(path)]  # everyone's, sticky, as on any host
        elif how == "--tmpfs":
            argv += [how, str(path)]
        elif how == "--dir":
            argv += ["--perms", "0755", how, str(path)]
        else:
            argv += [how, str(path), str(path)]
    argv += [
        "--chdir", str(isolation.workdir),
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
    ]  # fmt: skip
    if isolation.hostname:
        argv += ["--hostname", isolation.hostname[:63]]
    if not isolation.network:
        argv.append("--unshare-net")
    if _drops_privileges(isolation):
        assert isolation.uid is not None
        gid = isolation.gid if isolation.gid is not None else isolation.uid
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
        argv += [
            _SETPRIV,
            "--reuid", str(isolation.uid), "--regid", str(gid), "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all",
            "--",
        ]  # fmt: skip
    else:
        if not _running_as_root():
            argv.append("--unshare-user")
        argv.append("--")
    return argv + command


def import_roots(python: str) -> list[Path]:
    """What the interpreter needs: its real prefix, the venv it is called through, our
    site-packages, and clearway's own import root (an editable install points outside
    both). Not ``sys.path`` as a whole: it holds the current directory."""
    import clearway

    roots = {
        Path(python).resolve().parent.parent,
        Path(python).absolute().parent.parent,
        Path(sys.prefix),
        Path(sys.base_prefix),
        *(Path(p) for p in site.getsitepackages()),
        Path(clearway.__file__).resolve().parent.parent,
    }
    return sorted(r.resolve() for r in roots if r.is_dir())


def replica_isolation(spec: ReplicaSpec) -> Isolation:
    """The isolation a replica of ``spec`` runs under."""
    workdir = spec.workdir.resolve()
    return Isolation(
        uid=spec.uid,
        gid=spec.gid if spec.gid is not None else spec.uid,
        hide=tuple(p.resolve() for p in spec.hide),
        read_only=(*import_roots(spec.python), spec.code_dir.resolve()),
        writable=(workdir,),
        workdir=workdir,
        strict=spec.sandbox,
        network=spec.network,
        hostname=spec.replica_id,
    )
