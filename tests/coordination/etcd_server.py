"""A real etcd server for tests: Debian's ``etcd`` (etcd-server), on free loopback ports.

Each `EtcdServer` has its own data directory and ports, never the service the
Debian package may have started. ``start`` returns once the server answers
``/health`` (polled with a deadline); ``stop`` ends it (SIGTERM, then SIGKILL);
``start`` again on the same data directory and ports is an etcd restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

#: Go's names of the machine architectures; etcd 3.4 refuses to run on one it does
#: not support officially (arm64 among them) unless ETCD_UNSUPPORTED_ARCH names it.
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def etcd_binary() -> str | None:
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    def __init__(self, data_dir: Path, *, name: str = "t") -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed: run scripts/system-packages (Debian's etcd-server)")
        self.binary = binary
        self.data_dir = data_dir
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, *, within: float = 20.0) -> None:
        assert self.process is None, "already running"
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        env = dict(os.environ)
        env.setdefault("ETCD_UNSUPPORTED_ARCH", _GOARCH.get(platform.machine(), platform.machine()))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--name", self.name,
                    "--data-dir", str(self.data_dir),
                    "--listen-client-urls", client,
                    "--advertise-client-urls", client,
                    "--listen-peer-urls", peer,
                    "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"{self.name}={peer}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + within
        while not self._healthy():
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"etcd exited at start; its log: {self.log}\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not answer within {within}s; its log: {self.log}")
            time.sleep(0.02)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.data_dir)
