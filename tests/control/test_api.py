"""The API through its ASGI interface (httpx), a real store and builder, and a fake backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from clearway.cli.packaging import pack
from clearway.control.api import create_api
from clearway.control.credentials import SigningKey
from clearway.control.environments import EnvironmentBuilder
from clearway.control.reconciler import Reconciler
from clearway.control.revisions import RevisionBuilder
from clearway.control.store import Store
from tests.control.conftest import fill
from tests.control.fake_backend import FakeBackend
from tests.control.projects import project

pytestmark = pytest.mark.timeout(60)

TOKEN = "operator-token"
OPERATOR = {"authorization": f"Bearer {TOKEN}"}


@dataclass
class Platform:
    http: httpx.AsyncClient
    store: Store
    backend: FakeBackend
    signing: SigningKey
    tmp: Path

    async def deploy(self, name: str = "hello", env: list[str] | None = None) -> dict[str, str]:
        body = pack(project(self.tmp, name))
        response = await self.http.post(
            "/v1/deploy", params={"app_file": "app.py", "env": env or []}, content=body, headers=OPERATOR
        )
        assert response.status_code == 202, response.text
        result: dict[str, str] = response.json()
        return result


async def make_platform(tmp_path: Path, home: Path, *, envs_home: Path | None = None) -> AsyncGenerator[Platform, None]:
    store = Store(home / "state.db")
    backend = FakeBackend()
    signing = SigningKey.load_or_create(home / "keys")
    api = create_api(
        store=store,
        backend=backend,
        reconciler=Reconciler(store, backend),
        builder=RevisionBuilder(store, home, environments=EnvironmentBuilder(envs_home) if envs_home else None),
        token=TOKEN,
        signing=signing,
        on_shutdown=lambda: None,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://control") as http:
        yield Platform(http, store, backend, signing, tmp_path)
    store.close()


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    home = tmp_path / "home"
    home.mkdir()
    async for value in make_platform(tmp_path, home):
        yield value


async def test_a_deploy_is_audited_with_env_keys_but_never_values(platform: Platform) -> None:
    accepted = await platform.deploy(env=["API_KEY=s3cret-value"])
    refused = await platform.http.post("/v1/apps/hello/scale", json={"component": "web", "replicas": 2})
    assert refused.status_code == 401
    bad_env = await platform.http.post("/v1/deploy", params={"env": ["BAD KEY=other-secret"]}, content=b"", headers=OPERATOR)
    assert bad_env.status_code == 422 and "BAD KEY" in bad_env.json()["error"]
    entries = (await platform.http.get("/v1/audit", headers=OPERATOR)).json()
    assert [(e["principal"], e["method"], e["path"], e["status"]) for e in entries] == [
        ("operator", "POST", "/v1/deploy", 202),
        ("anonymous", "POST", "/v1/apps/hello/scale", 401),
        ("operator", "POST", "/v1/deploy", 422),
    ]
    assert entries[0]["app"] == "hello" and accepted["revision"] in entries[0]["detail"]
    assert "API_KEY" in entries[0]["detail"]
    audit_text = repr(entries)
    assert "s3cret-value" not in audit_text and "other-secret" not in audit_text and TOKEN not in audit_text
    only_hello = (await platform.http.get("/v1/audit", params={"app": "hello", "limit": 1}, headers=OPERATOR)).json()
    assert [e["status"] for e in only_hello] == [401]


async def test_a_pin_token_is_issued_to_the_operator_only(platform: Platform) -> None:
    rev = (await platform.deploy())["revision"]
    issued = (await platform.http.post(f"/v1/revisions/{rev}/pin-token", headers=OPERATOR)).json()
    assert issued["header"] == "x-clearway-pin-token" and issued["expires_at"] > 0
    claims = jwt.decode(issued["token"], platform.signing.public_pem(), algorithms=["EdDSA"], audience="clearway:pin")
    assert (claims["app"], claims["rev"]) == ("hello", rev)
    replica = platform.signing.mint_replica_token(_Replica(rev), "inc-1").token
    platform.backend.incarnations["hello-1.web.0"] = "inc-1"
    denied = await platform.http.post(f"/v1/revisions/{rev}/pin-token", headers={"authorization": f"Bearer {replica}"})
    assert denied.status_code == 401
    assert (await platform.http.post("/v1/revisions/nope-1/pin-token", headers=OPERATOR)).status_code == 404


@dataclass(frozen=True)
class _Replica:
    revision: str
    replica_id: str = "hello-1.web.0"
    app: str = "hello"
    component: str = "web"


async def test_a_replica_token_works_only_while_its_incarnation_runs(platform: Platform) -> None:
    rev = (await platform.deploy())["revision"]
    token = platform.signing.mint_replica_token(_Replica(rev), "inc-1").token
    auth = {"authorization": f"Bearer {token}"}
    platform.backend.incarnations["hello-1.web.0"] = "inc-1"
    me = await platform.http.get("/v1/replica", headers=auth)
    assert me.status_code == 200 and me.json()["replica"] == "hello-1.web.0"
    renewed = (await platform.http.post("/v1/replica/token", headers=auth)).json()
    again = platform.signing.read_replica_token(renewed["token"])
    assert again is not None and again.incarnation == "inc-1" and renewed["expires_at"] == again.expires_at
    # Restarted: the old process's token (and its renewal) is dead at once.
    platform.backend.incarnations["hello-1.web.0"] = "inc-2"
    assert (await platform.http.get("/v1/replica", headers=auth)).status_code == 401
    assert (await platform.http.post("/v1/replica/token", headers=auth)).status_code == 401
    del platform.backend.incarnations["hello-1.web.0"]  # stopped
    assert (await platform.http.get("/v1/replica", headers=auth)).status_code == 401
    # The operator token is not a replica token, and a replica token opens nothing else.
    assert (await platform.http.get("/v1/replica", headers=OPERATOR)).status_code == 401
    platform.backend.incarnations["hello-1.web.0"] = "inc-1"
    assert (await platform.http.get("/v1/apps", headers=auth)).status_code == 401
    entries = (await platform.http.get("/v1/audit", headers=OPERATOR)).json()
    assert ("hello-1.web.0", "/v1/replica/token", 200) in [(e["principal"], e["path"], e["status"]) for e in entries]


async def test_an_oversized_upload_is_refused_before_it_is_read(platform: Platform) -> None:
    response = await platform.http.post(
        "/v1/deploy", content=b"x", headers={**OPERATOR, "content-length": str(1 << 40)}
    )
    assert response.status_code == 413


async def test_a_full_disk_is_507_naming_the_filesystem(tmp_path: Path, small_tmpfs: Path) -> None:
    # Environments (tens of MiB) live outside the 4 MiB file system this test fills.
    platform = make_platform(tmp_path, small_tmpfs, envs_home=tmp_path / "envs-home")
    p = await anext(platform)
    try:
        await p.deploy()
        filler = fill(small_tmpfs)
        answers = [
            await p.http.post("/v1/apps/hello/scale", json={"component": "web", "replicas": n}, headers=OPERATOR)
            for n in range(1, 40)
        ]
        full = [a for a in answers if a.status_code == 507]
        assert full, [a.status_code for a in answers]
        message = full[0].json()["error"]
        assert str(small_tmpfs) in message and "bytes free" in message
        deploy = await p.http.post("/v1/deploy", content=pack(project(tmp_path, "other")), headers=OPERATOR)
        assert deploy.status_code == 507, deploy.text
        filler.unlink()
        assert (await p.http.post("/v1/apps/hello/scale", json={"component": "web", "replicas": 2}, headers=OPERATOR)).status_code == 200
    finally:
        await platform.aclose()
