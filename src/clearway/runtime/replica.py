"""The replica process: ``python -m clearway.runtime.replica``.

This is what runs inside every replica. It reads its `ReplicaSpec` from the
``CLEARWAY_REPLICA_SPEC`` environment variable, imports the user's app from the
code snapshot and runs one component:

* a **service** function is called once to get the web app, which is served
  by the server `clearway.runtime.servers` chooses (``server=`` in the spec;
  ``auto``: granian for a WSGI app when its environment has it, else uvicorn) on the
  listening unix socket the supervisor created and passed as fd 3. Creating
  the socket in the supervisor means its path is known before the process
  starts, only the platform's user can connect to it (the replica cannot even
  see the file), and it survives restarts.
  On SIGTERM the server stops accepting, lets in-flight requests finish for most
  of the grace period, runs the app's lifespan shutdown and exits 0. A sharded
  service (``shards=N``) also owns its share of the shards, in a thread beside
  the server (`clearway.sdk.sharding.ShardOwnership`), and leaves them on SIGTERM.
* a **function** is served the same way, with the web app built by
  `clearway.runtime.functions.function_app` from the function and its
  ``FunctionSpec`` (found in the loaded app by the component's name).
* a **worker** function is called (``async def`` ones under ``asyncio.run``);
  SIGTERM raises ``SystemExit(0)`` in it, so ``finally`` blocks and context
  managers run. A worker that returns has exited (code 0) and is restarted.

When ``CLEARWAY_CONTROL_URL`` and ``CLEARWAY_REPLICA_TOKEN`` are set, a daemon
thread renews the token at about half its lifetime over the replica channel
(``POST /v1/replica/token``) and puts the new one in ``os.environ``, where the
SDK reads it. Renewal never crashes the replica: failures are printed and
retried with backoff until the token expires, and after.

Everything goes to stdout/stderr, a pipe to the replica's log writer,
so a traceback printed here is what the supervisor reports as the replica's
``last_error``. The exit code says which stage failed (`clearway.runtime.exit_codes.ExitCode`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import os
import signal
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from types import FrameType
from typing import Any

from clearway.exceptions import AppLoadError, SpecError
from clearway.runtime.coordinated import lead, run_sharded
from clearway.runtime.exit_codes import ExitCode
from clearway.runtime.functions import function_app
from clearway.runtime.interface import BadAppObject, detect_interface
from clearway.runtime.servers import ServerUnavailable, choose, prepare
from clearway.runtime.spec import (
    LISTEN_FD_ENV_VAR,
    SPEC_ENV_VAR,
    TOKEN_ENV_VAR,
    Interface,
    ReplicaSpec,
)
from clearway.sdk.loader import load_app
from clearway.sdk.sharding import ShardedWorker, ShardOwnership
from clearway.spec.model import FunctionSpec, Server, ServiceSpec, WorkerSpec

__all__ = ["TokenRenewer", "main", "token_lifetime"]

#: How long before trying again after a failed renewal: doubles from the first to the last.
RENEW_RETRY_FIRST = 1.0
RENEW_RETRY_MAX = 60.0
#: How long a stopping sharded service waits for its leave (the revoke of its lease) to end.
SHARD_LEAVE_TIMEOUT = 3.0


def _say(message: str) -> None:
    print(f"[clearway] {message}", file=sys.stderr, flush=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(ExitCode.OK)


def main() -> int:
    # The sandbox prologue starts us with SIGTERM ignored (see clearway.runtime.sandbox);
    # an ignored disposition is inherited across exec, so take SIGTERM back first.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    try:
        spec = ReplicaSpec.from_json(os.environ[SPEC_ENV_VAR])
    except (KeyError, ValueError, TypeError) as error:
        _say(f"cannot read the replica spec from ${SPEC_ENV_VAR}: {error!r}")
        return ExitCode.BAD_SPEC
    os.chdir(spec.workdir)
    TokenRenewer.from_environment()
    sys.path.insert(0, str(spec.code_dir))
    _say(f"replica {spec.replica_id} (pid {os.getpid()}) loading {spec.app_file}")
    try:
        app = load_app(spec.code_dir / spec.app_file)
    except AppLoadError as error:
        _say(f"could not load the app: {error.message}")
        if error.details:
            print(error.details, file=sys.stderr, end="", flush=True)
        return ExitCode.APP_LOAD
    except SpecError as error:
        _say(f"could not load the app: {error}")
        return ExitCode.APP_LOAD
    component = app.components.get(spec.component)
    if component is None:
        _say(
            f"the app defines no component named {spec.component!r} "
            f"(it defines: {', '.join(sorted(app.components)) or 'none'})"
        )
        return ExitCode.BAD_COMPONENT
    if spec.kind == "service":
        listen_fd = int(os.environ[LISTEN_FD_ENV_VAR])
        shards = None
        if isinstance(component.spec, ServiceSpec) and component.spec.shards:
            shards = ShardOwnership(
                spec.component, shards=component.spec.shards, ttl=component.spec.lease_ttl,
                replica=spec.replica_id, say=_say,
            )  # fmt: skip
        requested = component.spec.server if isinstance(component.spec, ServiceSpec) else "auto"
        return _serve(
            component.target, interface=spec.interface, server=requested, grace=spec.grace_period,
            listen_fd=listen_fd, shards=shards,
        )  # fmt: skip
    if spec.kind == "function":
        if not isinstance(component.spec, FunctionSpec):
            _say(f"component {spec.component!r} is a {component.spec.kind}, not a function")
            return ExitCode.BAD_COMPONENT
        try:
            server = choose(component.spec.server, kind="function")
            prepared = prepare(
                function_app(component.target, component.spec), server=server, interface="asgi",
                grace=spec.grace_period,
            )  # fmt: skip
        except ServerUnavailable as error:
            _say(str(error))
            return ExitCode.SERVER_START
        except Exception:
            _say(f"cannot serve function {spec.component!r}:")
            traceback.print_exc()
            return ExitCode.APP_LOAD
        return prepared.serve(int(os.environ[LISTEN_FD_ENV_VAR]))
    if isinstance(component.spec, WorkerSpec) and component.spec.singleton:
        return lead(component.target, spec.component, ttl=component.spec.lease_ttl)
    if isinstance(component.spec, WorkerSpec) and component.spec.shards:
        sharded = ShardedWorker(
            component.target, spec.component, shards=component.spec.shards, ttl=component.spec.lease_ttl,
            replica=spec.replica_id, say=_say,
        )  # fmt: skip
        return run_sharded(sharded)
    return _work(component.target)


def _serve(
    target: Callable[[], Any],
    *,
    interface: Interface,
    server: Server,
    grace: float,
    listen_fd: int,
    shards: ShardOwnership | None = None,
) -> int:
    try:
        returned = target()
    except Exception:
        _say("the service function raised:")
        traceback.print_exc()
        return ExitCode.APP_LOAD
    try:
        speaks = detect_interface(returned) if interface == "auto" else interface
        chosen = choose(server, kind="service", interface=speaks)
        prepared = prepare(returned, server=chosen, interface=interface, grace=grace)
    except BadAppObject as error:
        _say(str(error))
        return ExitCode.BAD_COMPONENT
    except ServerUnavailable as error:
        _say(str(error))
        return ExitCode.SERVER_START
    if shards is None:
        return prepared.serve(listen_fd)
    # A sharded service: own shards beside the server, and leave them the moment SIGTERM
    # arrives (the gateway already sends this replica nothing), not after the drain.
    shards.start()
    try:
        return prepared.serve(listen_fd, on_exit=shards.leave)
    finally:
        shards.leave()
        if not shards.join(SHARD_LEAVE_TIMEOUT):
            _say(f"still leaving the shards after {SHARD_LEAVE_TIMEOUT:g}s; their lease expires on its own")


def _work(target: Callable[[], Any]) -> int:
    try:
        if inspect.iscoroutinefunction(target):
            asyncio.run(target())
        else:
            target()
    except SystemExit:
        raise
    except BaseException:
        _say("the worker raised:")
        traceback.print_exc()
        return ExitCode.APP_ERROR
    _say("the worker function returned")
    return ExitCode.OK


def token_lifetime(token: str) -> tuple[float, float] | None:
    """(iat, exp) read from a JWT's payload, unverified (it is our own), or None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["iat"]), float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def _describe(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        try:
            body = error.read()[:200].decode("utf-8", "replace")
        except Exception:
            body = ""
        return f"HTTP {error.code} {body}".strip()
    return repr(error)


class TokenRenewer:
    """Renews ``CLEARWAY_REPLICA_TOKEN`` at half its lifetime, in a daemon thread."""

    def __init__(self, control_url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.control_url = control_url.rstrip("/")
        self._clock = clock
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="clearway-token-renewal", daemon=True)

    @classmethod
    def from_environment(cls) -> TokenRenewer | None:
        url = os.environ.get("CLEARWAY_CONTROL_URL")
        if not url or not os.environ.get(TOKEN_ENV_VAR):
            return None
        renewer = cls(url)
        renewer.thread.start()
        return renewer

    def stop(self) -> None:
        self._stop.set()

    def next_renewal(self, token: str) -> float:
        """Seconds from now until ``token`` should be renewed (half its lifetime)."""
        lifetime = token_lifetime(token)
        if lifetime is None:
            return RENEW_RETRY_MAX
        iat, exp = lifetime
        # At least a second apart, whatever the token says: never a busy loop.
        return max(1.0, iat + (exp - iat) / 2 - self._clock())

    def renew_once(self) -> str:
        """Exchange the current token for a new one; raises on any failure."""
        token = os.environ[TOKEN_ENV_VAR]
        request = urllib.request.Request(
            f"{self.control_url}/v1/replica/token",
            data=b"{}",
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            new = json.loads(response.read())["token"]
        if not isinstance(new, str) or not new:
            raise ValueError(f"the control plane answered without a token: {new!r}")
        os.environ[TOKEN_ENV_VAR] = new
        return new

    def _run(self) -> None:
        retry = RENEW_RETRY_FIRST
        delay = self.next_renewal(os.environ.get(TOKEN_ENV_VAR, ""))
        while not self._stop.wait(delay):
            try:
                new = self.renew_once()
            except Exception as error:  # never let renewal take the replica down
                _say(
                    f"could not renew the replica token: {_describe(error)}; retrying in {retry:g}s"
                )
                delay, retry = retry, min(retry * 2, RENEW_RETRY_MAX)
                continue
            retry = RENEW_RETRY_FIRST
            delay = self.next_renewal(new)


if __name__ == "__main__":
    sys.exit(main())
