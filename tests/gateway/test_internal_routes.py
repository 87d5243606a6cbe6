"""Internal routes: identity and policy decided from header values alone (no sockets),
and the source address granting nothing in either direction."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from clearway.control.credentials import SigningKey
from clearway.gateway import AllowRule, GatewaySettings, RoutesError, RouteTable
from clearway.gateway._identity import (
    Caller,
    Denial,
    IdentityVerifier,
    check_caller,
    check_pin,
    cookie_pin,
    load_public_key,
)
from clearway.gateway._metrics import Metrics
from clearway.gateway._proxy import ClientConnection, ProxyContext
from clearway.gateway._router import EndpointRegistry, Router
from clearway.gateway._upstream import UpstreamConnection
from clearway.tasks import TaskSupervisor

from .memory_transport import RecordingTransport
from .token_issuer import TokenIssuer

ENDPOINT = "unix:/tmp/cw-never/replica.sock"
IDENTITIES = {"shop-1.web.0": "inc-a", "other-1.web.0": "inc-b"}
ALLOW = (AllowRule("shop", "shop-1", None),)


def table(internal: object = True, allow: object = None) -> RouteTable:
    route: dict[str, object] = {
        "app": "shop",
        "host": "127.0.0.1",
        "prefix": "/_services/shop-1/pricing",
        "strip_prefix": True,
        "internal": internal,
        "targets": [{"revision": "shop-1", "weight": 100, "endpoints": [ENDPOINT]}],
    }
    if allow is not None:
        route["allow"] = allow
    return RouteTable.from_json({"version": 1, "identities": IDENTITIES, "routes": [route]})


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer()


@pytest.fixture
def verifier(issuer: TokenIssuer, tmp_path: Path) -> IdentityVerifier:
    key = load_public_key(issuer.write_public_key(tmp_path / "pub.pem"))
    return IdentityVerifier(key, identities=IDENTITIES)


def test_allowed_caller(issuer: TokenIssuer, verifier: IdentityVerifier) -> None:
    token = issuer.replica("shop-1.web.0", "inc-a").encode()
    caller = check_caller(verifier, token, ALLOW, "app 'shop'")
    assert isinstance(caller, Caller) and caller.header == b"shop/shop-1/web"


@pytest.mark.parametrize(
    ("mint", "status", "reason"),
    [
        (lambda i: None, 401, "missing"),
        (lambda i: TokenIssuer().replica("shop-1.web.0", "inc-a"), 401, "invalid"),  # another key
        (lambda i: i.replica("shop-1.web.0", "inc-a", lifetime=-60), 401, "expired"),
        (lambda i: i.replica("shop-1.web.0", "inc-old"), 401, "revoked"),  # a stopped incarnation
        (lambda i: i.replica("shop-1.web.0", "inc-a", aud="clearway:pin"), 401, "invalid"),
        (lambda i: i.pin("shop", "shop-1"), 401, "invalid"),  # a pin token is no identity
        (lambda i: i.replica("other-1.web.0", "inc-b"), 403, "not-allowed"),
        (lambda i: "not a jwt", 401, "invalid"),
        (lambda i: i.replica("shop-1.web.0", "inc-a", comp="web\r\nx-evil: 1"), 401, "invalid"),
    ],
)
def test_refused_callers(
    issuer: TokenIssuer, verifier: IdentityVerifier, mint: Callable[[TokenIssuer], str | None], status: int, reason: str
) -> None:
    token = mint(issuer)
    decision = check_caller(verifier, token.encode() if token else None, ALLOW, "app 'shop' at 127.0.0.1/x")
    assert isinstance(decision, Denial)
    assert (decision.status, decision.reason) == (status, reason)
    if reason == "not-allowed":
        assert "other/other-1/web (replica other-1.web.0) may not call app 'shop' at 127.0.0.1/x" in decision.message


def test_the_platform_passes_every_allow_rule(issuer: TokenIssuer, verifier: IdentityVerifier) -> None:
    token = issuer.platform().encode()
    for allow in (ALLOW, (), (AllowRule("other", None, None),)):
        caller = check_caller(verifier, token, allow, "app 'shop'")
        assert isinstance(caller, Caller) and caller.platform and caller.header == b"platform"
        assert caller.describe() == "the platform (control plane)"
    verifier.set_identities({})  # not in the identities table: only its expiry ends it
    assert verifier.caller(token) is caller


@pytest.mark.parametrize(
    ("mint", "reason"),
    [
        (lambda i: TokenIssuer().platform(), "invalid"),  # another key
        (lambda i: i.platform(lifetime=-60), "expired"),
        (lambda i: i.platform(sub="shop-1.web.0"), "invalid"),  # the audience alone makes no platform
        (lambda i: i.platform(aud=["clearway:platform", "clearway:replica"]), "invalid"),
        (lambda i: i.platform(iss="someone"), "invalid"),
    ],
)
def test_refused_platform_tokens(
    issuer: TokenIssuer, verifier: IdentityVerifier, mint: Callable[[TokenIssuer], str], reason: str
) -> None:
    decision = check_caller(verifier, mint(issuer).encode(), ALLOW, "app 'shop'")
    assert isinstance(decision, Denial) and (decision.status, decision.reason) == (401, reason)


def test_the_platform_token_is_no_pin_token(issuer: TokenIssuer, verifier: IdentityVerifier) -> None:
    denial = check_pin(verifier, issuer.platform().encode(), "shop", "shop-2")
    assert denial is not None and (denial.status, denial.reason) == (403, "pin-token-invalid")


def test_the_control_planes_platform_token_is_what_the_gateway_accepts(tmp_path: Path) -> None:
    signing = SigningKey.load_or_create(tmp_path)
    verifier = IdentityVerifier(load_public_key(tmp_path / "signing.pub.pem"))
    issued = signing.mint_platform_token()
    caller = check_caller(verifier, issued.token.encode(), (), "app 'shop'")
    assert isinstance(caller, Caller) and caller.platform and caller.expires == issued.expires_at
    expired = SigningKey.load_or_create(tmp_path, clock=lambda: 1_000.0).mint_platform_token()
    assert isinstance(denial := verifier.caller(expired.token.encode()), Denial) and denial.reason == "expired"


def test_cache_honours_expiry_and_the_identities_table(issuer: TokenIssuer, tmp_path: Path) -> None:
    now = [1_000.0]
    key = load_public_key(issuer.write_public_key(tmp_path / "pub.pem"))
    verifier = IdentityVerifier(key, identities=IDENTITIES, clock=lambda: now[0], max_cached=2)
    # The fake clock is far behind the real one: the token is current by both until we move it.
    token = issuer.replica("shop-1.web.0", "inc-a", lifetime=3600).encode()
    caller = verifier.caller(token)
    assert isinstance(caller, Caller) and verifier.cached == 1
    assert verifier.caller(token) is caller  # a cache hit: the same object
    now[0] = caller.expires
    assert isinstance(expired := verifier.caller(token), Denial) and expired.reason == "expired"
    now[0] = 1_000.0
    assert isinstance(verifier.caller(token), Caller)
    verifier.set_identities({"other-1.web.0": "inc-b"})  # the replica stopped
    assert verifier.cached == 0
    assert isinstance(revoked := verifier.caller(token), Denial) and revoked.reason == "revoked"
    verifier.set_identities(IDENTITIES)
    for index in range(3):  # bounded: the oldest entries go first
        assert isinstance(verifier.caller(issuer.replica("shop-1.web.0", "inc-a", n=index).encode()), Caller)
    assert verifier.cached == 2


def test_pins(issuer: TokenIssuer, verifier: IdentityVerifier) -> None:
    assert check_pin(verifier, issuer.pin("shop", "shop-2").encode(), "shop", "shop-2") is None
    missing = check_pin(verifier, None, "shop", "shop-2")
    assert missing is not None and (missing.status, missing.reason) == (403, "pin-without-token")
    other = check_pin(verifier, issuer.pin("shop", "shop-1").encode(), "shop", "shop-2")
    assert other is not None and other.reason == "pin-token-mismatch"
    replica_token = issuer.replica("shop-1.web.0", "inc-a").encode()
    wrong_kind = check_pin(verifier, replica_token, "shop", "shop-1")
    assert wrong_kind is not None and (wrong_kind.status, wrong_kind.reason) == (403, "pin-token-invalid")


@pytest.mark.parametrize(
    ("header", "revision"),
    [
        (b"clearway-revision=shop-2", "shop-2"),
        (b"a=1; clearway-revision=shop-2; b=2", "shop-2"),
        (b'a=1;clearway-revision="shop-2"', "shop-2"),
        (b"clearway-revision=shop-2; clearway-revision=shop-1", "shop-2"),  # the most specific comes first
        (b"xclearway-revision=shop-2", None),  # another cookie whose name ends the same
        (b"Clearway-Revision=shop-2", None),  # cookie names are case-sensitive
        (b"clearway-revision=", None),
        (b"session=clearway-revision=shop-2", None),  # in another cookie's value
    ],
)
def test_cookie_pin(header: bytes, revision: str | None) -> None:
    assert cookie_pin(header) == revision


def test_no_key_refuses_everything(issuer: TokenIssuer) -> None:
    verifier = IdentityVerifier(None, identities=IDENTITIES)
    decision = check_caller(verifier, issuer.replica("shop-1.web.0", "inc-a").encode(), ALLOW, "x")
    assert isinstance(decision, Denial) and (decision.status, decision.reason) == (401, "no-key")


def send_from(peer: str, headers: bytes, verifier: IdentityVerifier) -> tuple[bytes, bytes]:
    """What the client and the replica receive when ``peer`` sends a request to the internal route."""
    loop = asyncio.get_running_loop()
    settings = GatewaySettings()
    endpoints = EndpointRegistry(settings, loop)
    metrics = Metrics()
    routes = table(allow=[{"app": "shop", "revision": "shop-1", "component": None}])
    ctx = ProxyContext(
        loop=loop,
        settings=settings,
        router=Router(routes, endpoints, metrics, random.Random(1)),
        metrics=metrics,
        supervisor=TaskSupervisor(logging.getLogger("test")),
        access_log=None,
        verifier=verifier,
    )
    endpoint = endpoints.get(ENDPOINT)
    replica = RecordingTransport(("", 0))
    upstream = UpstreamConnection(endpoint)
    upstream.connection_made(replica)  # type: ignore[arg-type]
    endpoint.release(upstream)  # an idle pooled connection, so no socket is needed
    client = RecordingTransport((peer, 40000))
    connection = ClientConnection(ctx)
    connection.connection_made(client)  # type: ignore[arg-type]
    connection.data_received(
        b"GET /_services/shop-1/pricing/discount HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n" + headers + b"\r\n"
    )
    return client.data, replica.data


@pytest.mark.timeout(10)
@pytest.mark.parametrize("peer", ["127.0.0.1", "203.0.113.9"])
async def test_the_source_address_grants_nothing(
    peer: str, issuer: TokenIssuer, verifier: IdentityVerifier
) -> None:
    to_client, to_replica = send_from(peer, b"", verifier)
    assert to_client.startswith(b"HTTP/1.1 401 ") and b'www-authenticate: Bearer realm="clearway"' in to_client
    assert to_replica == b""
    token = issuer.replica("shop-1.web.0", "inc-a").encode()
    to_client, to_replica = send_from(peer, b"x-clearway-identity: " + token + b"\r\n", verifier)
    assert to_client == b""  # the answer comes from the replica
    assert to_replica.startswith(b"GET /discount HTTP/1.1\r\n")
    assert b"x-clearway-caller: shop/shop-1/web\r\n" in to_replica and token not in to_replica


def test_routes_file_fields_round_trip_and_are_validated() -> None:
    routes = table(allow=[{"app": "shop", "revision": None, "component": "web"}])
    assert routes.routes[0].allow == (AllowRule("shop", None, "web"),)
    assert routes.identities == IDENTITIES
    assert RouteTable.from_json(routes.to_json()) == routes
    with pytest.raises(RoutesError, match="internal must be true or false"):
        table("yes")
    with pytest.raises(RoutesError, match="allow is only meaningful on an internal route"):
        table(internal=False, allow=[])
    with pytest.raises(RoutesError, match=r"allow\[0\] has unknown field"):
        table(allow=[{"app": "shop", "revison": "shop-1"}])
    with pytest.raises(RoutesError, match="identities must be an object"):
        RouteTable.from_json({"version": 1, "identities": ["x"]})
