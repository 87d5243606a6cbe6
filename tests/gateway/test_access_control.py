"""Access control, the way attacks happen: a real gateway process, real Unix-socket
replicas, real JWTs signed with a key generated here (and forged with another).

Each test is an attack or its legitimate twin: call a private service as
another app, with a forged, expired or stopped replica's credential, reach a
weight-0 revision with a pin header but no pin token, smuggle a second Host.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import raw_exchange
from .replica import Replica
from .test_cli import free_port
from .token_issuer import TokenIssuer

SERVICE = "/_services/shop-1/pricing"
IDENTITIES = {"shop-1.web.0": "inc-a", "other-1.web.0": "inc-b"}


def routes(public: Replica, canary: Replica, private: Replica, *, generation: int = 1, identities: dict[str, str] = IDENTITIES) -> dict[str, Any]:
    """The routes file: a public app with a weight-0 canary, and shop's internal pricing service."""
    return {
        "version": 1,
        "generation": generation,
        "domains": ["localhost"],
        "identities": identities,
        "routes": [
            {
                "app": "hello", "host": "hello",
                "targets": [
                    {"revision": "hello-1", "weight": 100, "endpoints": [public.address]},
                    {"revision": "hello-2", "weight": 0, "endpoints": [canary.address]},
                ],
            },
            {
                "app": "shop", "host": "127.0.0.1", "prefix": SERVICE, "strip_prefix": True,
                "internal": True,
                "allow": [{"app": "shop", "revision": "shop-1", "component": None}],
                "targets": [{"revision": "shop-1", "weight": 100, "endpoints": [private.address]}],
            },
        ],
    }


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str
    port: int
    routes_path: Path
    admin: httpx.AsyncClient

    async def reload(self, data: dict[str, Any]) -> None:
        """Write a new routes file as the control plane does, SIGHUP, wait until it is served."""
        tmp = self.routes_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.rename(self.routes_path)
        self.proc.send_signal(signal.SIGHUP)
        assert self.proc.stderr is not None
        while (await self.admin.get("http://gw/routes")).json()["generation"] != data["generation"]:
            await self.proc.stderr.readline()  # the reload's log line

    async def metrics(self) -> str:
        return (await self.admin.get("http://gw/metrics")).text


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
async def gateway(
    issuer: TokenIssuer, replica: Replica, replica2: Replica, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """``python -m clearway.gateway --identity-key ...``: r1 serves hello-1 and shop, r2 the hello-2 canary."""
    routes_path = tmp_path / "routes.json"
    routes_path.write_text(json.dumps(routes(replica, replica2, replica)))
    key = issuer.write_public_key(tmp_path / "signing.pub.pem")
    port = free_port()
    admin_socket = str(tmp_path / "gw.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clearway.gateway", "--listen", f"127.0.0.1:{port}",
        "--routes", str(routes_path), "--admin-socket", admin_socket, "--identity-key", str(key),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"READY\n"
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=admin_socket)) as admin:
        yield GatewayProcess(proc, f"http://127.0.0.1:{port}", port, routes_path, admin)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0


async def call(gw: GatewayProcess, client: httpx.AsyncClient, token: str | None, **headers: str) -> httpx.Response:
    if token is not None:
        headers["x-clearway-identity"] = token
    return await client.get(f"{gw.url}{SERVICE}/discount", headers={"host": "127.0.0.1:8080", **headers})


def forwarded(response: httpx.Response) -> dict[str, str]:
    """The headers the replica received (it echoes them)."""
    return dict(response.json()["headers"])


@pytest.mark.timeout(30)
async def test_allowed_caller_reaches_the_service_as_itself(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient
) -> None:
    token = issuer.replica("shop-1.web.0", "inc-a")
    for _ in range(3):  # the first verifies, the others hit the cache
        r = await call(gateway, client, token, **{"x-clearway-caller": "other/other-1/web"})
        assert r.status_code == 200, r.text
        assert r.json()["path"] == "/discount"
        headers = forwarded(r)
        assert headers["x-clearway-caller"] == "shop/shop-1/web"  # ours, not the client's
        assert "x-clearway-identity" not in headers
        assert token not in json.dumps(r.json())


@pytest.mark.timeout(30)
async def test_another_apps_replica_gets_403_and_is_counted(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient, replica: Replica
) -> None:
    r = await call(gateway, client, issuer.replica("other-1.web.0", "inc-b"))
    assert r.status_code == 403
    assert "other/other-1/web (replica other-1.web.0) may not call app 'shop'" in r.text
    assert replica.control.requests == []  # nothing reached the service
    metrics = await gateway.metrics()
    assert 'clearway_gateway_denied_total{app="shop",component="",reason="not-allowed",revision="shop-1"} 1.0' in metrics
    assert 'clearway_gateway_requests_total{app="shop",code="4xx",component="",revision="shop-1"} 1.0' in metrics


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("credential", "reason", "says"),
    [
        ("none", "missing", "send the replica's credential"),
        ("forged", "invalid", "not valid"),
        ("expired", "expired", "has expired"),
        ("revoked", "revoked", "no longer valid"),
    ],
)
async def test_no_valid_credential_gets_401(
    gateway: GatewayProcess,
    issuer: TokenIssuer,
    client: httpx.AsyncClient,
    replica: Replica,
    credential: str,
    reason: str,
    says: str,
) -> None:
    token = {
        "none": None,
        "forged": TokenIssuer().replica("shop-1.web.0", "inc-a"),  # right claims, another key
        "expired": issuer.replica("shop-1.web.0", "inc-a", lifetime=-60),
        "revoked": issuer.replica("shop-1.web.0", "inc-stopped"),  # an incarnation that no longer runs
    }[credential]
    r = await call(gateway, client, token)
    assert r.status_code == 401 and says in r.text
    assert r.headers["www-authenticate"] == 'Bearer realm="clearway"'
    assert replica.control.requests == []
    metrics = await gateway.metrics()
    assert f'clearway_gateway_denied_total{{app="shop",component="",reason="{reason}",revision="shop-1"}} 1.0' in metrics


@pytest.mark.timeout(30)
async def test_a_stopped_replicas_token_is_refused_after_the_reload_that_removes_it(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient, replica: Replica, replica2: Replica
) -> None:
    token = issuer.replica("shop-1.web.0", "inc-a")
    assert (await call(gateway, client, token)).status_code == 200  # verified and cached
    await gateway.reload(routes(replica, replica2, replica, generation=2, identities={"other-1.web.0": "inc-b"}))
    r = await call(gateway, client, token)
    assert r.status_code == 401 and "no longer valid" in r.text


@pytest.mark.timeout(30)
async def test_pin_needs_a_pin_token_for_that_revision(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient, replica2: Replica
) -> None:
    url = f"{gateway.url}/echo"
    pin = {"host": "hello.localhost", "x-clearway-revision": "hello-2"}
    r = await client.get(url, headers=pin)  # a pin header alone reaches nothing
    assert r.status_code == 403 and "needs a pin token" in r.text
    # A replica's own credential is no pin token.
    r = await client.get(url, headers={**pin, "x-clearway-pin-token": issuer.replica("shop-1.web.0", "inc-a")})
    assert r.status_code == 403
    r = await client.get(url, headers={**pin, "x-clearway-pin-token": issuer.pin("hello", "hello-1")})
    assert r.status_code == 403 and "not app 'hello' revision hello-2" in r.text
    r = await client.get(url, headers={**pin, "x-clearway-pin-token": TokenIssuer().pin("hello", "hello-2")})
    assert r.status_code == 403
    assert replica2.control.requests == []  # the canary saw nothing of all that

    r = await client.get(url, headers={**pin, "x-clearway-pin-token": issuer.pin("hello", "hello-2")})
    assert r.status_code == 200 and r.json()["replica"] == "r2"
    assert not {"x-clearway-revision", "x-clearway-pin-token"} & set(forwarded(r))
    metrics = await gateway.metrics()
    assert 'clearway_gateway_denied_total{app="hello",component="",reason="pin-without-token",revision="hello-2"} 1.0' in metrics
    assert 'clearway_gateway_denied_total{app="hello",component="",reason="pin-token-mismatch",revision="hello-2"} 1.0' in metrics


@pytest.mark.timeout(30)
async def test_public_routes_never_forward_trust_headers(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient
) -> None:
    token = issuer.replica("shop-1.web.0", "inc-a")
    r = await client.get(
        f"{gateway.url}/echo",
        headers={"host": "hello.localhost", "x-clearway-caller": "shop/shop-1/web", "x-clearway-identity": token},
    )
    assert r.status_code == 200
    assert not {"x-clearway-caller", "x-clearway-identity"} & set(forwarded(r))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "extra",
    [
        b"Host: hello.localhost\r\n",  # routed by one, read by the app as the other
        b"x-clearway-identity: a\r\nx-clearway-identity: b\r\n",
        b"x-clearway-pin-token: a\r\nX-Clearway-Pin-Token: b\r\n",
        b"x-clearway-revision: hello-1\r\nx-clearway-revision: hello-2\r\n",
    ],
)
async def test_duplicate_host_or_trust_headers_get_400(
    gateway: GatewayProcess, replica: Replica, extra: bytes
) -> None:
    answer = await raw_exchange(
        gateway.port, b"GET " + SERVICE.encode() + b"/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"more than one" in answer and b"Send exactly one" in answer
    assert replica.control.requests == []


@pytest.mark.timeout(30)
async def test_the_platform_passes_every_rule_of_an_internal_route(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient, replica: Replica, replica2: Replica
) -> None:
    """The control plane delivers durable invocations through the gateway with a platform token."""
    closed = routes(replica, replica2, replica, generation=2)
    closed["routes"][1]["allow"] = []  # no replica may call it
    await gateway.reload(closed)
    assert (await call(gateway, client, issuer.replica("shop-1.web.0", "inc-a"))).status_code == 403
    token = issuer.platform()
    r = await call(gateway, client, token, **{"x-clearway-caller": "shop/shop-1/web"})
    assert r.status_code == 200, r.text
    headers = forwarded(r)
    assert headers["x-clearway-caller"] == "platform"  # ours, not the client's
    assert "x-clearway-identity" not in headers and token not in json.dumps(r.json())
    for bad, says in ((TokenIssuer().platform(), "not valid"), (issuer.platform(lifetime=-60), "has expired")):
        r = await call(gateway, client, bad)
        assert r.status_code == 401 and says in r.text
    assert replica.control.requests == ["GET /discount"]


@pytest.mark.timeout(30)
async def test_a_platform_token_grants_nothing_on_public_routes(
    gateway: GatewayProcess, issuer: TokenIssuer, client: httpx.AsyncClient, replica2: Replica
) -> None:
    token = issuer.platform()
    r = await client.get(f"{gateway.url}/echo", headers={"host": "hello.localhost", "x-clearway-identity": token})
    assert r.status_code == 200 and r.json()["replica"] == "r1"
    assert not {"x-clearway-caller", "x-clearway-identity"} & set(forwarded(r))
    pin = {"host": "hello.localhost", "x-clearway-revision": "hello-2"}
    for credential in ({"x-clearway-identity": token}, {"x-clearway-pin-token": token}):
        r = await client.get(f"{gateway.url}/echo", headers={**pin, **credential})
        assert r.status_code == 403 and "pin" in r.text
    assert replica2.control.requests == []  # the weight-0 canary stays closed
