"""A fencing store the replicas of a deployed app write to: one real shared resource.

Replicas are separate processes in separate sandboxes; what they share with the
test is loopback TCP (as for `tests.e2e.platform.Gate`). So the resource their
lock holders write to is a small HTTP server in the test process:
``POST /`` with ``{"resource", "client", "token"}`` is one write, applied the
moment it *arrives* through a `tests.coordination.history.FencedResource`
(refused when its token is lower than the highest that resource has accepted)
and recorded, with the arrival time (``time.monotonic()`` of this process), in
the history the checker reads. The answer is ``{"accepted": bool}``.

What it proves: writes really arrive in this order from the processes that
made them, and the fenced store really refuses the stale ones — a check of
the tokens the replicas carry, not of a replay that could reorder them. What
it does not: that any other store fences (that is the store's job), or that a
network between a holder and its store keeps no write in flight forever.

`catch` makes a deterministic pause possible: the next write to a resource is
applied, then its answer is held back until `let_go`. The writer is then known
to be a holder, blocked mid-action (it cannot release), so the test can
SIGSTOP it there, let its lease expire, and SIGCONT it *between two writes of
one action* — exactly the window fencing exists for.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass

from tests.coordination.history import FencedResource, History, Write


@dataclass(frozen=True)
class Caught:
    client: str
    resource: str
    token: int


class FencedStore:
    def __init__(self) -> None:
        self._history = History(margin=0.0)  # holds the writes only
        self._resources: dict[str, FencedResource] = {}
        self._last_accepted: dict[str, float] = {}
        self._mutex = threading.Lock()
        self._catching: str | None = None
        self._caught: Caught | None = None
        self._let_go = threading.Event()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                accepted, held = store._write(str(body["resource"]), str(body["client"]), int(body["token"]))
                if held:
                    store._let_go.wait(timeout=120)  # bounded, whatever the test does
                answer = json.dumps({"accepted": accepted}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fenced-store", daemon=True)
        self._thread.start()

    def _write(self, resource: str, client: str, token: int) -> tuple[bool, bool]:
        with self._mutex:
            fenced = self._resources.setdefault(resource, FencedResource(resource, self._history))
            at = time.monotonic()
            accepted = fenced.write(client, token, at)
            if accepted:
                self._last_accepted[resource] = at
            held = accepted and self._catching == resource and self._caught is None
            if held:
                self._caught = Caught(client, resource, token)
            return accepted, held

    # -- what the test drives and reads ----------------------------------------------------

    def catch(self, resource: str) -> None:
        """Hold back the answer to the next accepted write to ``resource`` until `let_go`."""
        with self._mutex:
            self._catching, self._caught = resource, None
            self._let_go.clear()

    def caught(self) -> Caught | None:
        with self._mutex:
            return self._caught

    def let_go(self) -> None:
        with self._mutex:
            self._catching = None
        self._let_go.set()

    def writes(self) -> list[Write]:
        """Every write so far, accepted or refused, in the order they arrived."""
        with self._mutex:
            return list(self._history.writes)

    def highest(self, resource: str) -> int:
        """The highest token ``resource`` accepted (0: none yet)."""
        with self._mutex:
            fenced = self._resources.get(resource)
            return fenced.highest if fenced is not None else 0

    def written_since(self, at: float, resources: list[str]) -> bool:
        """Whether every one of ``resources`` accepted a write after ``at``."""
        with self._mutex:
            return all(self._last_accepted.get(r, -1.0) > at for r in resources)

    def close(self) -> None:
        self._let_go.set()
        self._server.shutdown()
        self._server.server_close()
