"""A real clearway platform for end-to-end tests: ``clearway up --detach`` in a
temporary ``CLEARWAY_HOME`` on a free port, driven through the real CLI and real
HTTP through the real gateway. Nothing here is faked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Platform:
    home: Path
    port: int

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "clearway.cli.main", "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "200"},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"clearway {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def status(self, app: str) -> dict[str, Any]:
        return json.loads(self.cli("status", app, "--json").stdout)  # type: ignore[no-any-return]

    def get(self, app: str, path: str = "/", **kwargs: Any) -> httpx.Response:
        headers = {"host": f"{app}.localhost", **kwargs.pop("headers", {})}
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=30, **kwargs)

    def api(self) -> httpx.Client:
        """A client of the control plane's REST API, with the operator token."""
        info = json.loads((self.home / "control.json").read_text())
        token = self.home.joinpath("token").read_text().strip()
        return httpx.Client(base_url=info["api_url"], headers={"authorization": f"Bearer {token}"}, timeout=30)

    def control_pid(self) -> int:
        return int(json.loads((self.home / "control.json").read_text())["pid"])

    def up(self) -> None:
        # Two gateway workers whatever the machine: the suite runs the multi-process gateway.
        self.cli("up", "--detach", "--port", str(self.port), "--gateway-workers", "2")

    def down(self) -> None:
        if (self.home / "control.json").exists():
            self.cli("down", check=False)
        # Belt and braces: nothing of this test may outlive it.
        for pid in all_pids_under(self.home):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def all_pids_under(home: Path) -> list[int]:
    """Processes whose command line mentions this home (replicas, gateway, control plane)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in cmdline or str(home).encode() in environ:
            pids.append(int(entry.name))
    return pids


@dataclass
class Load:
    """Requests in a loop on a background thread, counting every failure."""

    platform: Platform
    app: str
    path: str = "/"
    #: Failures `wait_for` lets pass (a fault test that allows a few says which, and checks them).
    tolerate: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    bodies: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 300  # bounded, whatever happens
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    response = client.get(
                        f"http://127.0.0.1:{self.platform.port}{self.path}",
                        headers={"host": f"{self.app}.localhost"},
                    )
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    self.ok += 1
                    self.bodies.append(response.text)
                else:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")

    def wait_for(self, count: int, *, within: float = 60) -> None:
        """Wait until ``count`` more requests have succeeded; fail if they do not within ``within`` seconds.

        A load that stopped flowing must fail the test: "0 failed requests" only
        means something when requests were made throughout.
        """
        target = self.ok + count
        deadline = time.monotonic() + within
        while self.ok < target and time.monotonic() < deadline and len(self.failures) <= self.tolerate:
            self._stop.wait(0.01)
        if len(self.failures) > self.tolerate:
            raise AssertionError(f"requests failed under load: {self.failures[:5]}")
        if self.ok < target:
            raise AssertionError(
                f"only {self.ok} requests succeeded, {target} expected: the load stopped flowing"
            )

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)


class Gate:
    """A gate replicas wait on over HTTP: ``GET http://127.0.0.1:<port>/`` answers
    503 until the test calls `open`, then 200.

    Replicas are isolated (private /tmp, the test's files out of sight, another
    uid), so a file cannot be the gate; loopback TCP is what they share with us.
    """

    def __init__(self) -> None:
        import http.server

        opened = self._opened = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if opened.is_set() else 503)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def open(self) -> None:
        self._opened.set()

    def wait_code(self, indent: str = "    ") -> str:
        """Python lines that block until the gate opens (for a generated app file)."""
        return (
            f"{indent}import time, urllib.request, urllib.error\n"
            f"{indent}while True:\n"
            f"{indent}    try:\n"
            f"{indent}        urllib.request.urlopen({self.url!r}, timeout=5)\n"
            f"{indent}        break\n"
            f"{indent}    except (urllib.error.URLError, OSError):\n"
            f"{indent}        time.sleep(0.05)\n"
        )

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def wait_for(what: str, probe: Callable[[], Any], *, within: float = 90) -> Any:
    """``probe()`` until it returns something truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {within:g} s"
        time.sleep(0.1)
