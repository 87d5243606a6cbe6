"""Configuration and secrets end to end: set once, kept across deploys, never shown again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import write_app
from tests.e2e.platform import Platform

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SECRET = "s3cret-7f1e9a-never-printed"

#: Echoes its two variables and its revision: "<GREETING>|<TOKEN>|<revision>".
ECHO_APP = """
@app.service(replicas=1, public=True, health="/healthz")
def web():
    import os

    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz":
            body = b"ok"
        else:
            body = "|".join(
                [os.environ.get("GREETING", "-"), os.environ.get("TOKEN", "-"), os.environ["CLEARWAY_REVISION"], VERSION]
            ).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return asgi
"""


def project(root: Path, version: str) -> Path:
    return write_app(root, f"VERSION = {version!r}\n{ECHO_APP}", name="cfg")


def echo(platform: Platform) -> list[str]:
    response = platform.get("cfg")
    assert response.status_code == 200, (response.status_code, response.text)
    return response.text.split("|")




def test_config_and_secrets_outlive_deploys_and_are_never_shown(platform: Platform, tmp_path: Path) -> None:
    # Before the first deploy: stored, and the first revision has it.
    stored = platform.cli("config", "set", "cfg", "GREETING=hello")
    assert "next `clearway deploy` uses it" in stored.stdout, stored
    platform.cli("deploy", str(project(tmp_path / "v1", "v1")))
    assert echo(platform) == ["hello", "-", "cfg-1", "v1"]

    # A secret: a new revision of the same code serves it, and the CLI waited for it.
    result = platform.cli("config", "set", "cfg", f"TOKEN={SECRET}", "--secret")
    assert "cfg-2 is serving" in result.stdout, result
    assert echo(platform) == ["hello", SECRET, "cfg-2", "v1"]
    status = platform.status("cfg")
    revisions = {r["id"]: r for r in status["revisions"]}
    assert revisions["cfg-2"]["artifact"] == revisions["cfg-1"]["artifact"], revisions

    # ... and its value is nowhere but in the replica.
    listing = platform.cli("config", "cfg").stdout
    assert "GREETING" in listing and "hello" in listing and "TOKEN" in listing and "(secret)" in listing, listing
    as_json = json.loads(platform.cli("config", "cfg", "--json").stdout)
    assert {e["key"]: (e["value"], e["secret"]) for e in as_json["config"]} == {
        "GREETING": ("hello", False),
        "TOKEN": (None, True),
    }
    with platform.api() as client:
        shown = {
            "config set": result.stdout + result.stderr,
            "config": listing,
            "status --json": platform.cli("status", "--json").stdout,
            "status cfg --json": json.dumps(status),
            "status cfg": platform.cli("status", "cfg").stdout,
            "GET /v1/apps/cfg": client.get("/v1/apps/cfg").text,
            "GET /v1/revisions/cfg-2": client.get("/v1/revisions/cfg-2").text,
            "GET /v1/apps/cfg/config": client.get("/v1/apps/cfg/config").text,
            "audit --json": platform.cli("audit", "--json", "-n", "1000").stdout,
            "metrics": platform.cli("metrics").stdout,
        }
    for where, text in shown.items():
        assert SECRET not in text, f"the secret's value appears in {where}"
    audit = json.loads(shown["audit --json"])
    assert any(e["detail"] and e["detail"].startswith("set TOKEN (secret)") for e in audit), audit

    # A code deploy keeps the configuration.
    platform.cli("deploy", str(project(tmp_path / "v2", "v2")))
    assert echo(platform) == ["hello", SECRET, "cfg-3", "v2"]

    # Unset removes it, from the same code.
    platform.cli("config", "unset", "cfg", "GREETING")
    assert echo(platform) == ["-", SECRET, "cfg-4", "v2"]

    # Rollback brings back the previous revision with its configuration.
    platform.cli("rollback", "cfg")
    assert echo(platform) == ["hello", SECRET, "cfg-3", "v2"]

    # A deploy's --env overrides the configuration.
    platform.cli("config", "set", "cfg", "GREETING=from-config", "--no-wait")
    platform.cli("deploy", str(project(tmp_path / "v3", "v3")), "--env", "GREETING=from-deploy")
    assert echo(platform) == ["from-deploy", SECRET, "cfg-6", "v3"]


def test_invalid_config_is_refused_with_no_new_revision(platform: Platform, tmp_path: Path) -> None:
    platform.cli("deploy", str(project(tmp_path / "v1", "v1")))
    with platform.api() as client:
        refused = client.post("/v1/apps/cfg/config", json={"set": {"1BAD-KEY": SECRET}})
        assert refused.status_code == 422, refused.text
        assert "'1BAD-KEY' is not a valid variable name" in refused.json()["error"], refused.text
        nul = client.post("/v1/apps/cfg/config", json={"set": {"OK": "a\u0000b"}, "secret": True})
        assert nul.status_code == 422 and "NUL" in nul.json()["error"], nul.text
        missing = client.post("/v1/apps/cfg/config", json={"unset": ["NOPE"]})
        assert missing.status_code == 404 and "no configuration NOPE" in missing.json()["error"], missing.text
        assert client.get("/v1/apps/cfg/config").json()["config"] == []
    cli = platform.cli("config", "set", "cfg", "1BAD-KEY=x", check=False)
    assert cli.returncode == 1 and "not a valid variable name" in cli.stderr, cli
    assert [r["id"] for r in platform.status("cfg")["revisions"]] == ["cfg-1"]
    audit = platform.cli("audit", "--json", "-n", "1000").stdout
    assert SECRET not in audit and "refused" in audit, audit
