"""The warm parent: ``python -m clearway.runtime.warmparent``, the process replicas fork from.

A fresh interpreter that imports a function's module, its dependencies,
clearway and uvicorn takes hundreds of milliseconds before it can answer; a
fork of a process that has already done all that takes about a millisecond.
So for every function of every running revision the fork launcher
(`clearway.runtime.forking`) starts one warm parent, in the same sandbox a
replica of that function gets (bubblewrap, the app's uid, the revision's code
and environment), and this process:

1. imports the app and builds the function's ASGI app and its server
   (`clearway.runtime.servers.prepare`, uvicorn unless the function asks for
   granian): whatever a replica would import on its way to serving is
   imported here, once;
2. refuses to serve as a parent when importing the app left threads running
   (a fork copies only the calling thread: a lock another thread held stays
   held forever in the child), and says so; the launcher then spawns;
3. says ``{"ready": true}`` on its control socket (fd 4, a ``SOCK_SEQPACKET``
   pair with the launcher) and waits for fork requests. Each carries the
   replica's spec and environment as JSON and three descriptors: the
   replica's listening socket, the write end of its log pipe, and its
   *report* socket, a private channel to the launcher.

What a forked child redoes before it runs anything of the app (`_child`):
a session of its own (``setsid``: the supervisor signals it as a group);
default signal dispositions and no wakeup fd; none of the parent's
descriptors (the control socket, other children's report sockets) — only
its log pipe as stdout and stderr, its listening socket as fd 3; its own
environment (identity, credential) in place of the parent's; ``random``
reseeded (CPython reseeds it at fork too; numpy and others that keep their
own generators are the app's business); its own working directory; the token
renewal thread started anew (threads do not survive a fork); a new event loop
(the parent never creates one: the server makes its own in the child).

Then it says ``hello`` on its report socket. The kernel attaches the child's
credentials to that message, translated into the launcher's pid namespace:
that is how the launcher learns the child's *host* pid, which this process,
inside its own pid namespace, cannot know. The launcher moves the child into
the replica's cgroup and answers ``go``; the child closes its report socket
(the app never holds it) and serves.

Exit codes: this process is the children's parent, so it reaps them
(``SIGCHLD``) and writes ``{"exit": code}`` on each child's report socket;
the launcher resolves the replica's exit code from it. A refusal (a spec
for another revision, a failed fork) goes back on the same socket as
``{"error": ...}``: a replica forked from this parent never runs another
revision's code.

Lifetime: the children live in this process's pid namespace, so they cannot
outlive it (when it dies, bubblewrap's init ends the namespace and the
kernel kills them; the supervisor restarts them from a new parent). It
therefore stays while it has children, even when its launcher is gone (the
control plane crashed, or retired the revision by closing the control
socket): it then only reaps, and exits with the last child.

Everything it says on these channels comes from a process that has run the
app's code, so the launcher trusts it only about the app's own replicas: a
lie can misreport their exit codes or put one of the app's own processes in
a replica's cgroup, nothing more.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import gc
import json
import os
import random
import selectors
import signal
import socket
import sys
import threading
import traceback
from typing import Any

from clearway.exceptions import AppLoadError, SpecError
from clearway.runtime.exit_codes import ExitCode
from clearway.runtime.functions import function_app
from clearway.runtime.replica import TokenRenewer
from clearway.runtime.servers import PreparedServer, ServerUnavailable, choose, prepare
from clearway.runtime.spec import LISTEN_FD_ENV_VAR, SPEC_ENV_VAR, ReplicaSpec
from clearway.runtime.warmprotocol import CONTROL_FD, MAX_MESSAGE
from clearway.sdk.loader import load_app
from clearway.spec.model import FunctionSpec

__all__ = ["FIELDS_THAT_MUST_MATCH", "main"]

#: A child that has not heard ``go`` this long after its ``hello`` gives up.
GO_TIMEOUT = 30.0
#: Spec fields a fork request must share with the parent's own spec.
FIELDS_THAT_MUST_MATCH = (
    "app", "revision", "component", "kind", "code_dir", "app_file", "python",
    "uid", "gid", "sandbox", "network", "grace_period",
)  # fmt: skip
_LISTEN_FD = 3


def _say(message: str) -> None:
    print(f"[clearway warm parent] {message}", file=sys.stderr, flush=True)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the launcher is gone: nobody to tell
        sock.send(json.dumps(message).encode())


def main() -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # started with it ignored (see the launcher)
    control = socket.socket(fileno=CONTROL_FD)
    try:
        spec = ReplicaSpec.from_json(os.environ[SPEC_ENV_VAR])
    except (KeyError, ValueError, TypeError) as error:
        _send(control, {"error": f"cannot read the spec from ${SPEC_ENV_VAR}: {error!r}"})
        return ExitCode.BAD_SPEC
    os.chdir(spec.workdir)
    sys.path.insert(0, str(spec.code_dir))
    _say(f"{spec.replica_id} (pid {os.getpid()}) loading {spec.app_file}")
    try:
        server = _prepare(spec)
    except _Refusal as refusal:
        _say(str(refusal))
        _send(control, {"error": str(refusal)})
        return refusal.code
    # Objects that exist now are never collected in the children: without this, a child's
    # first collection would touch (and so copy) every page the parent's objects are on.
    gc.freeze()
    _say("ready to fork replicas")
    _send(control, {"ready": True})
    return _Parent(spec, server, control).run()


class _Refusal(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _prepare(spec: ReplicaSpec) -> PreparedServer:
    """Import the app and everything serving it needs; the prepared server."""
    try:
        app = load_app(spec.code_dir / spec.app_file)
    except AppLoadError as error:
        if error.details:
            print(error.details, file=sys.stderr, end="", flush=True)
        raise _Refusal(f"could not load the app: {error.message}", ExitCode.APP_LOAD) from None
    except SpecError as error:
        raise _Refusal(f"could not load the app: {error}", ExitCode.APP_LOAD) from None
    component = app.components.get(spec.component)
    if component is None or not isinstance(component.spec, FunctionSpec):
        raise _Refusal(f"the app defines no function named {spec.component!r}", ExitCode.BAD_COMPONENT)
    try:
        server = prepare(
            function_app(component.target, component.spec),
            server=choose(component.spec.server, kind="function"),
            interface="asgi",
            grace=spec.grace_period,
        )
    except ServerUnavailable as error:
        raise _Refusal(str(error), ExitCode.SERVER_START) from None
    except Exception:
        traceback.print_exc()
        raise _Refusal(f"cannot serve function {spec.component!r}", ExitCode.APP_LOAD) from None
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        raise _Refusal(
            f"importing the app started threads ({', '.join(others)}); forking a process with "
            "threads can deadlock its children, so replicas of this function are started "
            "fresh instead. Start threads when the function is first called, not at import.",
            ExitCode.APP_LOAD,
        )
    return server


class _Parent:
    """The fork loop: fork requests on the control socket, SIGCHLD on a wakeup pipe."""

    def __init__(self, spec: ReplicaSpec, server: PreparedServer, control: socket.socket) -> None:
        self.spec = spec
        self.server = server
        self.control: socket.socket | None = control
        #: Live children by pid (in our namespace), each with its report socket.
        self.children: dict[int, socket.socket] = {}
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()

    def run(self) -> int:
        signal.set_wakeup_fd(self.wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector
        assert self.control is not None
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "signal")
        while self.control is not None or self.children:
            for key, _ in self.selector.select():
                if key.data == "signal":
                    while True:
                        try:
                            if not os.read(self.wake_read, 512):
                                break
                        except BlockingIOError:
                            break
                    self._reap()
                else:
                    self._control_readable()
        _say("no launcher and no children left; exiting")
        return ExitCode.OK

    def _control_readable(self) -> None:
        assert self.control is not None
        fds = array.array("i")
        try:
            data, ancdata, _, _ = self.control.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(3 * fds.itemsize))
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            for fd in fds:
                os.close(fd)
            self.selector.unregister(self.control)
            self.control.close()
            self.control = None
            _say(f"the launcher is gone; staying for {len(self.children)} child(ren)")
            return
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            _say(f"ignored a control message with {len(fds)} descriptors instead of 3")
            return
        self._fork(data, fds[0], fds[1], fds[2])

    def _fork(self, data: bytes, listen_fd: int, log_fd: int, report_fd: int) -> None:
        report = socket.socket(fileno=report_fd)
        try:
            request = json.loads(data)
            spec = ReplicaSpec.from_json(request["spec"])
            env = {str(k): str(v) for k, v in request["env"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            _send(report, {"error": f"unreadable fork request: {error!r}"})
            report.close()
            os.close(listen_fd)
            os.close(log_fd)
            return
        mismatch = [
            name for name in FIELDS_THAT_MUST_MATCH if getattr(spec, name) != getattr(self.spec, name)
        ]
        if spec.workdir.parent != self.spec.workdir:
            mismatch.append("workdir")
        if mismatch:
            _send(report, {"error": f"this warm parent serves {self.spec.replica_id}; the request "
                                    f"differs in {', '.join(mismatch)}"})  # fmt: skip
            report.close()
            os.close(listen_fd)
            os.close(log_fd)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as error:
            _send(report, {"error": f"fork failed: {error}"})
            report.close()
            os.close(listen_fd)
            os.close(log_fd)
            return
        if pid == 0:
            code: int = ExitCode.APP_ERROR
            try:
                code = self._child(spec, env, listen_fd, log_fd, report)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else ExitCode.APP_ERROR
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(listen_fd)
        os.close(log_fd)
        self.children[pid] = report

    def _child(
        self, spec: ReplicaSpec, env: dict[str, str], listen_fd: int, log_fd: int, report: socket.socket
    ) -> int:
        """In the forked child: become the replica (see the module docstring), then serve."""
        os.setsid()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python sets it at start-up
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        self.selector.close()
        os.close(self.wake_read)
        os.close(self.wake_write)
        if self.control is not None:
            self.control.close()
        for sibling in self.children.values():
            sibling.close()
        # Move the received descriptors out of the way before putting them at 1, 2 and 3.
        log_fd = _above(log_fd)
        listen_fd = _above(listen_fd)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.dup2(listen_fd, _LISTEN_FD)
        os.close(log_fd)
        os.close(listen_fd)
        os.environ.clear()
        os.environ.update(env)
        os.environ[LISTEN_FD_ENV_VAR] = str(_LISTEN_FD)
        random.seed()
        report.send(b"hello")
        report.settimeout(GO_TIMEOUT)
        try:
            answer = report.recv(16)
        except OSError:
            answer = b""
        report.close()
        if answer != b"go":
            _say(f"replica {spec.replica_id}: the launcher did not let it start; exiting")
            return ExitCode.BAD_SPEC
        os.chdir(spec.workdir)
        _say(f"replica {spec.replica_id} (pid {os.getpid()}) forked from the warm parent")
        TokenRenewer.from_environment()
        return self.server.serve(_LISTEN_FD)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            report = self.children.pop(pid, None)
            if report is not None:
                _send(report, {"exit": os.waitstatus_to_exitcode(status)})
                report.close()


def _above(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
