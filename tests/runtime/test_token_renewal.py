"""A replica renews its token over the replica channel, at half its lifetime."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clearway.runtime import ReplicaSpec, ReplicaState, Supervisor
from clearway.runtime.replica import token_lifetime
from tests.runtime.conditions import file_text, poll_until
from tests.runtime.conftest import FAST, SpecFactory, StatusLog

# Writes the token it currently holds to "token" whenever it changes.
TOKEN_WATCHER = """
import os, time
import clearway as cw

app = cw.App("t")

@app.worker()
def watcher():
    seen = None
    while True:
        token = os.environ.get("CLEARWAY_REPLICA_TOKEN")
        if token != seen:
            with open("token.tmp", "w") as f:
                f.write(token or "")
            os.replace("token.tmp", "token")
            seen = token
        time.sleep(0.01)
"""


def fake_jwt(subject: str, *, iat: float, exp: float) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'EdDSA'})}.{part({'sub': subject, 'iat': iat, 'exp': exp})}.c2ln"


class ControlPlane:
    """A stand-in for ``POST /v1/replica/token``: fails once, then hands out new tokens."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.answered: list[str] = []
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                plane.seen.append(self.headers.get("Authorization", ""))
                if self.path != "/v1/replica/token" or len(plane.seen) == 1:
                    self.send_response(503)  # the first call fails: the replica retries
                    self.end_headers()
                    return
                now = time.time()
                token = fake_jwt(f"renewed-{len(plane.answered)}", iat=now, exp=now + 3600)
                plane.answered.append(token)
                body = json.dumps({"token": token, "expires_at": now + 3600}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def control_plane() -> Iterator[ControlPlane]:
    plane = ControlPlane()
    plane.thread.start()
    yield plane
    plane.server.shutdown()
    plane.server.server_close()


def test_token_lifetime_is_read_from_the_payload() -> None:
    assert token_lifetime(fake_jwt("x", iat=100, exp=3700)) == (100.0, 3700.0)
    assert token_lifetime("not a token") is None


async def test_replica_renews_its_token_and_retries_failures(
    make_spec: SpecFactory, status_log: StatusLog, control_plane: ControlPlane
) -> None:
    now = time.time()
    first = fake_jwt("first", iat=now - 100, exp=now + 2)  # past half its life already

    def credentials(spec: ReplicaSpec, incarnation: str) -> str:
        return first

    spec = make_spec(
        TOKEN_WATCHER,
        component="watcher",
        kind="worker",
        env={"CLEARWAY_CONTROL_URL": control_plane.url},
    )
    token_file = spec.workdir / "token"
    async with Supervisor(on_change=status_log, config=FAST, credentials=credentials) as sup:
        await sup.start(spec)
        await sup.wait_for(spec.replica_id, ReplicaState.READY, within=20)
        await poll_until(
            lambda: "renewed-0" in (token_lifetime_subject(file_text(token_file)) or ""),
            within=20,
            what="the replica holds a renewed token",
        )
    assert control_plane.seen[:2] == [f"Bearer {first}", f"Bearer {first}"]
    assert file_text(spec.log_path).count("could not renew the replica token: HTTP 503") == 1


def token_lifetime_subject(token: str) -> str | None:
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    subject = data.get("sub")
    return subject if isinstance(subject, str) else None
