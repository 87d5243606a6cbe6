"""`clearway pin-token` and `clearway audit` against a real platform (real CLI,
real control plane, real gateway): what they print, their errors, and that the
audit log names who did what without ever showing a secret."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from tests.e2e.conftest import write_app
from tests.e2e.platform import Platform, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SECRET = "env-value-6d1f0c"
SERVICE = """
@app.service(replicas=1, public=True, health="/healthz")
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    return asgi
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One platform for the module, with app ``alpha`` deployed (with a secret env value),
    scaled and pinned, and app ``beta`` deployed and destroyed."""
    root = tmp_path_factory.mktemp("commands")
    running = Platform(home=root / "home", port=free_port())
    running.up()
    try:
        running.cli("deploy", str(write_app(root / "alpha", SERVICE, name="alpha")), "--env", f"API_KEY={SECRET}")
        running.cli("scale", "alpha", "web", "2")
        running.cli("deploy", str(write_app(root / "beta", SERVICE, name="beta")))
        running.cli("destroy", "beta", "--yes")
        yield running
    finally:
        running.down()


def api(platform: Platform) -> str:
    return str(json.loads(platform.home.joinpath("control.json").read_text())["api_url"])


def test_pin_token_prints_a_header_the_gateway_honours(platform: Platform) -> None:
    result = platform.cli("pin-token", "alpha-1")
    header, sep, token = result.stdout.strip().partition(": ")
    assert (header, sep) == ("x-clearway-pin-token", ": ") and "\n" not in result.stdout.strip(), result.stdout
    public_key = platform.home.joinpath("keys", "signing.pub.pem").read_bytes()
    claims = jwt.decode(token, public_key, algorithms=["EdDSA"], audience="clearway:pin", issuer="clearway")
    assert (claims["app"], claims["rev"]) == ("alpha", "alpha-1"), claims
    assert claims["exp"] - claims["iat"] == 3600, claims

    pinned = platform.get("alpha", headers={"x-clearway-revision": "alpha-1", header: token})
    assert pinned.status_code == 200 and pinned.text == "ok", pinned.text
    # alpha-1 has all the traffic: a pin to it opens nothing, so the token is not needed ...
    assert platform.get("alpha", headers={"x-clearway-revision": "alpha-1"}).status_code == 200
    # ... but outside the split it is, and the gateway reads this one: it is alpha-1's.
    unpinned = platform.get("alpha", headers={"x-clearway-revision": "alpha-9"})
    assert unpinned.status_code == 403 and "needs a pin token" in unpinned.text, unpinned.text
    mismatch = platform.get("alpha", headers={"x-clearway-revision": "alpha-9", header: token})
    assert mismatch.status_code == 403 and "is for app 'alpha' revision alpha-1" in mismatch.text, mismatch.text

    as_json: dict[str, Any] = json.loads(platform.cli("pin-token", "alpha-1", "--json", "--ttl", "120").stdout)
    assert as_json["header"] == "x-clearway-pin-token" and as_json["expires_at"] > 0, as_json
    short = jwt.decode(as_json["token"], options={"verify_signature": False})
    assert short["exp"] - short["iat"] == 120, short


def test_pin_token_for_an_unknown_revision_says_so(platform: Platform) -> None:
    result = platform.cli("pin-token", "alpha-99", check=False)
    assert result.returncode == 1 and result.stdout == "", result
    assert "no revision 'alpha-99'" in result.stderr and "clearway status" in result.stderr, result.stderr
    too_short = platform.cli("pin-token", "alpha-1", "--ttl", "5", check=False)
    assert too_short.returncode == 2, too_short  # usage error, before any call


def test_audit_shows_who_did_what_and_never_a_secret(platform: Platform) -> None:
    wrong = "not-the-token-3b9e"
    refused = httpx.post(
        f"{api(platform)}/v1/apps/alpha/scale",
        json={"component": "web", "replicas": 5},
        headers={"authorization": f"Bearer {wrong}"},
        timeout=30,
    )
    assert refused.status_code == 401, refused.text
    pin = platform.cli("pin-token", "alpha-1").stdout.strip().partition(": ")[2]

    entries: list[dict[str, Any]] = json.loads(platform.cli("audit", "--json").stdout)
    calls = [(e["principal"], e["method"], e["path"], e["status"], e["app"]) for e in entries]
    assert ("operator", "POST", "/v1/deploy", 202, "alpha") in calls, calls
    assert ("operator", "POST", "/v1/apps/alpha/scale", 200, "alpha") in calls, calls
    assert ("operator", "POST", "/v1/deploy", 202, "beta") in calls, calls
    assert ("operator", "DELETE", "/v1/apps/beta", 200, "beta") in calls, calls
    assert ("anonymous", "POST", "/v1/apps/alpha/scale", 401, "alpha") in calls, calls
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)  # newest last
    deploy = next(e for e in entries if e["path"] == "/v1/deploy" and e["app"] == "alpha")
    assert "API_KEY" in (deploy["detail"] or ""), deploy  # the key is recorded, not its value
    scaled = next(e for e in entries if e["path"] == "/v1/apps/alpha/scale" and e["status"] == 200)
    assert scaled["detail"] == "web=2", scaled

    table = platform.cli("audit").stdout
    for expected in ("operator", "anonymous", "POST /v1/deploy", "DELETE /v1/apps/beta", "401"):
        assert expected in table, (expected, table)

    only_alpha: list[dict[str, Any]] = json.loads(platform.cli("audit", "--app", "alpha", "--json").stdout)
    assert only_alpha and {e["app"] for e in only_alpha} == {"alpha"}, only_alpha
    assert any(e["status"] == 401 for e in only_alpha), only_alpha
    limited: list[dict[str, Any]] = json.loads(platform.cli("audit", "-n", "2", "--json").stdout)
    assert limited == entries[-2:], limited

    token = platform.home.joinpath("token").read_text().strip()
    everything = "\n".join(
        [json.dumps(entries), table, json.dumps(only_alpha), platform.cli("audit", "--app", "alpha").stdout]
    )
    for secret in (SECRET, token, wrong, pin):
        assert secret not in everything, f"the audit output shows a secret ({secret[:6]}...)"
