"""Trust, end to end: each attack of issue 5 run the way it happens — from inside
a deployed replica (the ``prober`` app in ``tests/e2e/apps``), or with real
uploads and forged credentials against the real platform."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.e2e.conftest import write_app
from tests.e2e.platform import Gate, Platform

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

APPS = Path(__file__).parent / "apps"
SECRET = "victim-secret-7f3a9"

VICTIM = """
@app.service(replicas=1, public=True, health="/healthz")
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"victim web"})
    return asgi


@app.service(replicas=1, health="/healthz"ALLOW)
def vault():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        caller = dict(scope["headers"]).get(b"x-clearway-caller", b"").decode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": ("vault for " + caller).encode()})
    return asgi
"""


def victim_app(allow: str = "") -> str:
    return VICTIM.replace("ALLOW", f", allow={allow}" if allow else "")


class Prober:
    """Drives the prober app's probes through the real gateway."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def probe(self, probe_name: str, /, **query: str) -> dict[str, Any]:
        response = self.platform.get("prober", f"/{probe_name}?{urllib.parse.urlencode(query)}")
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()  # type: ignore[no-any-return]

    def call(self, url: str, *, identity: bool, headers: dict[str, str] | None = None) -> dict[str, Any]:
        result = self.probe("call", url=url, identity="1" if identity else "0", headers=json.dumps(headers or {}))
        assert result["ok"], result
        return result["result"]  # type: ignore[no-any-return]


@pytest.fixture
def deployed(platform: Platform, tmp_path: Path) -> Prober:
    victim = write_app(tmp_path / "victim", victim_app(), name="victim")
    platform.cli("deploy", str(victim), "--env", f"VICTIM_SECRET={SECRET}")
    prober = tmp_path / "prober"
    shutil.copytree(APPS / "prober", prober)
    platform.cli("deploy", str(prober))
    return Prober(platform)


def _endpoint_of(platform: Platform, app: str, component: str) -> str:
    replicas = platform.status(app)["replicas"]
    endpoint = next(r["endpoint"] for r in replicas if r["component"] == component and r["endpoint"])
    assert endpoint.startswith("unix:"), endpoint
    return str(endpoint[len("unix:") :])


def test_a_replica_cannot_reach_the_platform_or_other_apps(platform: Platform, deployed: Prober) -> None:
    home = platform.home
    for target in ("token", "state.db", "keys/signing.pem", "gateway.json", "routes.json"):
        attempt = deployed.probe("read", path=str(home / target))
        assert not attempt["ok"], (target, attempt)
    relative = deployed.probe("read", path="../../token")  # the cwd used to be inside the home
    assert not relative["ok"], relative
    shadow = deployed.probe("read", path="/etc/shadow")
    assert not shadow["ok"], shadow

    victim_code = next((home / "code" / "victim").iterdir()) / "app.py"
    assert victim_code.exists()
    assert not deployed.probe("read", path=str(victim_code))["ok"]
    victim_logs = next((home / "logs" / "victim").glob("*.log"))
    assert not deployed.probe("read", path=str(victim_logs))["ok"]
    listing = deployed.probe("listdir", path=str(home))
    assert not listing["ok"] or "token" not in listing["result"], listing

    scan = deployed.probe("proc", needle=SECRET)
    assert scan["ok"] and scan["result"]["found"] == [], scan  # no other app's environment is visible
    # Its own pid namespace: the other apps' processes are not even listed.
    victim_pids = {r["pid"] for r in platform.status("victim")["replicas"]}
    assert not victim_pids & set(scan["result"]["pids"]), scan

    own_code = next((home / "code" / "prober").iterdir())
    assert not deployed.probe("write", path=str(own_code / "app.py"))["ok"]  # snapshots are read-only
    assert not deployed.probe("write", path=str(own_code / "new.py"))["ok"]

    # Replicas cannot be reached around the gateway.
    vault_socket = _endpoint_of(platform, "victim", "vault")
    assert not deployed.probe("connect", path=vault_socket)["ok"]


def test_the_replica_environment_is_minimal_and_holds_one_credential(
    platform: Platform, deployed: Prober
) -> None:
    env = deployed.probe("env")
    variables = env["env"]
    token = variables["CLEARWAY_REPLICA_TOKEN"]
    holders = [name for name, value in variables.items() if token in value]
    assert holders == ["CLEARWAY_REPLICA_TOKEN"], holders
    # Nothing of the control plane's environment (the test process's, here) leaks in.
    assert "PYTEST_CURRENT_TEST" not in variables and "COLUMNS" not in variables, sorted(variables)
    assert env["uid"] != 0


def test_service_calls_are_checked_by_the_callers_identity(
    platform: Platform, deployed: Prober, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{platform.port}"
    own = deployed.call(f"{base}/_services/prober-1/private/whoami", identity=True)
    assert own["status"] == 200, own
    whoami = json.loads(own["body"])
    assert whoami["caller"] == "prober/prober-1/web" and whoami["identity"] is None, whoami

    anonymous = deployed.call(f"{base}/_services/prober-1/private/whoami", identity=False)
    assert anonymous["status"] == 401, anonymous
    # From this machine but without a credential: the source address grants nothing.
    direct = httpx.get(f"{base}/_services/victim-1/vault/", timeout=30)
    assert direct.status_code == 401, direct.text

    for path in ("/_services/victim-1/vault/", "/_apps/victim/vault/"):
        denied = deployed.call(base + path, identity=True)
        assert denied["status"] == 403, (path, denied)
        assert "prober" in denied["body"] and "vault" in denied["body"], denied
    metrics = platform.cli("metrics").stdout
    assert any(
        line.startswith("clearway_gateway_denied_total{") and 'revision="victim-1"' in line
        for line in metrics.splitlines()
    ), metrics

    # The victim opens its vault to the prober's web component, and only to it.
    victim = write_app(tmp_path / "victim", victim_app('["prober.web"]'), name="victim")
    platform.cli("deploy", str(victim), "--env", f"VICTIM_SECRET={SECRET}")
    allowed = deployed.call(f"{base}/_apps/victim/vault/", identity=True)
    assert allowed == {"status": 200, "body": "vault for prober/prober-1/web"}, allowed


def test_a_stopped_or_forged_credential_is_refused(platform: Platform, deployed: Prober) -> None:
    env = deployed.probe("env")["env"]
    token, control = env["CLEARWAY_REPLICA_TOKEN"], env["CLEARWAY_CONTROL_URL"]
    bearer = {"authorization": f"Bearer {token}"}
    assert httpx.get(f"{control}/v1/replica", headers=bearer, timeout=30).status_code == 200
    private = f"http://127.0.0.1:{platform.port}/_services/prober-1/private/whoami"
    assert httpx.get(private, headers={"x-clearway-identity": token}, timeout=30).status_code == 200

    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA")
    assert httpx.get(f"{control}/v1/replica", headers={"authorization": f"Bearer {forged}"}, timeout=30).status_code == 401
    assert httpx.get(private, headers={"x-clearway-identity": forged}, timeout=30).status_code == 401
    operator = platform.home.joinpath("token").read_text().strip()
    assert httpx.get(f"{control}/v1/apps", headers=bearer, timeout=30).status_code == 401  # not an operator
    assert httpx.get(f"{control}/v1/apps", headers={"authorization": f"Bearer {operator}"}, timeout=30).status_code == 200

    platform.cli("scale", "prober", "web", "0")
    deadline = time.monotonic() + 60
    while any(r["component"] == "web" for r in platform.status("prober")["replicas"]):
        assert time.monotonic() < deadline, platform.status("prober")
    assert httpx.get(f"{control}/v1/replica", headers=bearer, timeout=30).status_code == 401
    assert httpx.get(private, headers={"x-clearway-identity": token}, timeout=30).status_code == 401


def test_a_weight_zero_revision_is_reachable_only_with_a_pin_credential(
    platform: Platform, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    gate = Gate()
    request.addfinalizer(gate.close)
    body = """
@app.service(replicas=2, public=True, health="/healthz")
def web():
    import os
    if os.environ["CLEARWAY_REPLICA_ID"].endswith(".1") and TEXT == "second":
GATE
    async def asgi(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": TEXT.encode()})
    return asgi
"""
    project = tmp_path / "demo"
    write_app(project, "TEXT = 'first'\n" + body.replace("GATE\n", gate.wait_code("        ")))
    platform.cli("deploy", str(project))
    write_app(project, "TEXT = 'second'\n" + body.replace("GATE\n", gate.wait_code("        ")))
    platform.cli("deploy", str(project), "--no-wait")
    # demo-2 has one ready replica and no traffic (weight 0) until the gate opens.
    deadline = time.monotonic() + 60
    while not any(r["revision"] == "demo-2" and r["state"] == "ready" for r in platform.status("demo")["replicas"]):
        assert time.monotonic() < deadline, platform.status("demo")
    pin = {"x-clearway-revision": "demo-2"}
    assert platform.get("demo").text == "first"
    forged = platform.get("demo", headers=pin)
    assert forged.status_code == 403 and "pin" in forged.text, forged.text
    header, _, value = platform.cli("pin-token", "demo-1").stdout.strip().partition(": ")
    wrong = platform.get("demo", headers={**pin, header: value})
    assert wrong.status_code == 403, wrong.text
    header, _, value = platform.cli("pin-token", "demo-2").stdout.strip().partition(": ")
    pinned = platform.get("demo", headers={**pin, header: value})
    assert pinned.status_code == 200 and pinned.text == "second", pinned.text
    gate.open()


def test_colliding_ids_and_symlink_changes_deploy_what_was_asked(platform: Platform, tmp_path: Path) -> None:
    def service(component: str, text: str) -> str:
        return f"""
@app.service(name={component!r}, replicas=1, public=True)
def web():
    async def asgi(scope, receive, send):
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": {text!r}.encode()}})
    return asgi
"""

    platform.cli("deploy", str(write_app(tmp_path / "b", service("x-2-y", "app b"), name="b")))
    first = write_app(tmp_path / "b-1-x", service("y", "app b-1-x"), name="b-1-x")
    platform.cli("deploy", str(first))
    platform.cli("deploy", str(first))  # revision b-1-x-2: replica b-1-x-2.y.0, never b-1.x-2-y.0
    assert platform.get("b").text == "app b"
    assert platform.get("b-1-x").text == "app b-1-x"

    project = tmp_path / "links"
    project.mkdir()
    (project / "one.py").write_text("TEXT = 'one'\n")
    (project / "two.py").write_text("TEXT = 'two'\n")
    (project / "impl.py").symlink_to("one.py")
    (project / "app.py").write_text(
        "import clearway as cw\napp = cw.App('links')\n"
        "@app.service(public=True)\n"
        "def web():\n"
        "    from impl import TEXT\n"
        "    async def asgi(scope, receive, send):\n"
        "        await send({'type': 'http.response.start', 'status': 200, 'headers': []})\n"
        "        await send({'type': 'http.response.body', 'body': TEXT.encode()})\n"
        "    return asgi\n"
    )
    platform.cli("deploy", str(project))
    assert platform.get("links").text == "one"
    (project / "impl.py").unlink()
    (project / "impl.py").symlink_to("two.py")  # only the link's target changes
    platform.cli("deploy", str(project))
    assert platform.get("links").text == "two"
    assert platform.status("links")["active_revision"] == "links-2"
