"""The `Load` helper fails when too few requests flowed or any failed, so that
"0 failed requests" in the zero-downtime tests always means something.

Run against a real HTTP server of the test's own (not the platform): one that
answers a few requests and then stops answering, and one that starts failing.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.platform import Load, Platform

pytestmark = pytest.mark.timeout(30)


class Server:
    """Answers ``healthy`` requests with 200, then each later one per ``after``:
    "hang" blocks it until `release`, "fail" answers 500."""

    def __init__(self, *, healthy: int, after: str) -> None:
        self.served = 0
        self.released = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.served += 1
                if server.served > healthy:
                    if after == "hang":
                        server.released.wait()
                        return  # closes the connection without an answer
                    self.send_response(500)
                else:
                    self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[type[Server]]:
    started: list[Server] = []

    class Started(Server):
        def __init__(self, *, healthy: int, after: str) -> None:
            super().__init__(healthy=healthy, after=after)
            started.append(self)

    yield Started
    for server in started:
        server.close()


def target(tmp_path: Path, server: Server) -> Platform:
    """What `Load` needs of a platform: where to send requests (``home`` is unused)."""
    return Platform(home=tmp_path / "unused", port=server.port)


def test_a_load_that_stops_flowing_fails(tmp_path: Path, serve: type[Server]) -> None:
    server = serve(healthy=5, after="hang")
    with Load(target(tmp_path, server), "demo") as load:
        load.wait_for(5, within=10)  # it did flow at first
        with pytest.raises(AssertionError, match="the load stopped flowing"):
            load.wait_for(10, within=1)
        assert load.failures == []  # nothing failed: it only stopped, and that is caught too
        server.release()  # lets the blocked request end, so the load thread can stop
    assert load.ok == 5


def test_a_load_with_failed_requests_fails(tmp_path: Path, serve: type[Server]) -> None:
    server = serve(healthy=3, after="fail")
    with Load(target(tmp_path, server), "demo") as load, pytest.raises(
        AssertionError, match=r"requests failed under load: .*500"
    ):
        load.wait_for(1000, within=10)


def test_a_flowing_load_passes(tmp_path: Path, serve: type[Server]) -> None:
    server = serve(healthy=10**9, after="fail")
    with Load(target(tmp_path, server), "demo") as load:
        load.wait_for(50, within=10)
        load.wait_for(50, within=10)
    assert load.failures == [] and load.ok >= 100
