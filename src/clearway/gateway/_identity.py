"""Who is calling, and may they: replica and platform identities, internal-route policy, pin grants.

Why this exists: a private service used to be reachable by any process on the
machine, because the gateway trusted the loopback source address.  Now a
caller proves *which replica it is* with the credential the platform gave it
(``x-clearway-identity``: a replica JWT, EdDSA, audience ``clearway:replica``)
and each internal route says which callers it accepts.  Likewise the revision
pin header, when it names a revision that gets no share of the route's traffic
(weight 0: a canary before it gets traffic, or a name the route does not
know), is honoured only with a pin token the platform issued to an operator
(``x-clearway-pin-token``, audience ``clearway:pin``).

A pin to a revision that *does* get a share (weight > 0) needs no token, by
header or by the ``clearway-revision`` cookie (:func:`cookie_pin`): any
client may land there by chance, so choosing it opens nothing that was
closed - it only keeps a client on one side of a split, which is what a
browser needs during a rollout (its page and the requests the page makes
answered by the same revision).  What stays protected is exactly what was:
a revision that gets no traffic.  A cookie naming such a revision is ignored
rather than refused, so a cookie left over from a rolled-back canary falls
back to the normal split instead of breaking a user's browsing; a header is
explicit, so its refusal is a 403.

The control plane has an identity of its own: a **platform token**
(audience ``clearway:platform``, subject ``control-plane``, same key).  It
exists because the control plane delivers durable invocations (spawned, event
and cron ones) through the gateway, to a function's internal route, instead of
to a replica's socket: that way held requests, scale from zero and the
per-revision metrics apply to them as to any other call, with no second path
to keep in step.  On an internal route it passes every ``allow`` rule (the
platform is trusted; a policy says which *apps* may call a service) and the
app sees ``x-clearway-caller: platform``.  On a public route it grants
nothing: the identity header is stripped there as always, and it is no pin
token.  What a leaked platform token could do: reach any internal route of
any app until it expires.  It is kept in the control plane's memory only and
lives minutes (``SigningKey.mint_platform_token``), and it is not tied to the
identities table (nothing to revoke it by), so its short life is its limit.

Decisions and their reasons:

* **Two checks for a replica token**: its signature and expiry (PyJWT, against
  the public key given with ``--identity-key``), *and* its (replica,
  incarnation) pair being in the route table's ``identities``.  The second
  makes a stopped replica's token useless at once, though it has not expired.
* **A cache of verified tokens**, keyed by the token string: an Ed25519
  verification costs tens of microseconds, a request through the gateway
  about thirty in all, so a keep-alive client must not pay one per request.
  A hit costs one dict lookup and one comparison with the token's expiry.
  Entries are checked against the identities table when it changes
  (:meth:`IdentityVerifier.set_identities` drops revoked ones), so a hit never
  needs the table.  The cache is bounded (oldest entries are dropped first).
  Failures are not cached: a forged token pays a verification every time,
  which is the forger's cost, not the honest callers'.
* **401 vs 403**: no credential, or one that is forged, expired or revoked,
  is a 401 (the caller must get a credential); a valid caller the route does
  not allow is a 403 that names caller and target (the policy must change).
  A pin header to a weight-0 revision without a valid pin token is a 403.
* Nothing here touches sockets: :func:`check_caller`, :func:`check_pin` and
  :func:`cookie_pin` take header values and return a decision, so the policy
  is tested directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from clearway.exceptions import ClearwayError

from ._routes import AllowRule

__all__ = [
    "CALLER_HEADER",
    "IDENTITY_HEADER",
    "PIN_COOKIE",
    "PIN_TOKEN_HEADER",
    "Caller",
    "Denial",
    "IdentityKeyError",
    "IdentityVerifier",
    "PinGrant",
    "check_caller",
    "check_pin",
    "cookie_pin",
]

#: The caller's replica (or platform) JWT (stripped before forwarding).
IDENTITY_HEADER = b"x-clearway-identity"
#: The operator's pin JWT that makes the pin header count (stripped before forwarding).
PIN_TOKEN_HEADER = b"x-clearway-pin-token"
#: Set by the gateway on internal routes: ``app/revision/component`` of the verified
#: caller, or ``platform`` for the control plane.
CALLER_HEADER = b"x-clearway-caller"
#: The cookie that keeps a client on one weighted revision (forwarded to the app unchanged).
PIN_COOKIE = b"clearway-revision"

ISSUER = "clearway"
REPLICA_AUDIENCE = "clearway:replica"
PIN_AUDIENCE = "clearway:pin"
PLATFORM_AUDIENCE = "clearway:platform"
#: The ``sub`` a platform token must carry.
PLATFORM_SUBJECT = "control-plane"
#: ``x-clearway-caller`` for requests the platform itself makes.
PLATFORM_CALLER = b"platform"
ALGORITHMS = ["EdDSA"]
#: Verified tokens kept; a gateway sees one token per running replica (they
#: are renewed about hourly), so this is far more than a machine needs.
MAX_CACHED_TOKENS = 4096
#: The audiences an ``x-clearway-identity`` token may carry (checked again after decoding).
_IDENTITY_AUDIENCES = [REPLICA_AUDIENCE, PLATFORM_AUDIENCE]
#: What app, revision and component names look like (``clearway.spec.ids`` is stricter).
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


class IdentityKeyError(ClearwayError):
    """The public key for verifying replica and pin tokens cannot be read."""


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified identity: a replica (from the claims of its token), or the platform.

    For the platform, app, revision and component are empty and ``platform`` is true.
    """

    replica: str
    incarnation: str
    app: str
    revision: str
    component: str
    #: The token's ``exp`` (seconds since the epoch).
    expires: float
    #: ``app/revision/component`` (or ``platform``) as sent upstream in ``x-clearway-caller``.
    header: bytes
    #: The control plane (a platform token): passes every allow rule of an internal route.
    platform: bool = False

    def describe(self) -> str:
        if self.platform:
            return "the platform (control plane)"
        return f"{self.app}/{self.revision}/{self.component} (replica {self.replica})"


@dataclass(frozen=True, slots=True)
class PinGrant:
    """A verified pin token: it lets its holder reach ``revision`` of ``app``."""

    app: str
    revision: str
    expires: float


@dataclass(frozen=True, slots=True)
class Denial:
    """A refused request: the status, a metrics label, and the message for the client."""

    status: int
    #: Short and from a fixed set, so that it can be a metrics label.
    reason: str
    message: str


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM file ``path`` (raises :class:`IdentityKeyError`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise IdentityKeyError(f"cannot read the identity key {path}: {exc.strerror or exc}") from exc
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise IdentityKeyError(
            f"the identity key {path} is not a PEM public key ({exc}); "
            "pass the platform's keys/signing.pub.pem"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityKeyError(
            f"the identity key {path} is a {type(key).__name__}, not an Ed25519 key; "
            "pass the platform's keys/signing.pub.pem"
        )
    return key


class IdentityVerifier:
    """Verifies replica, platform and pin tokens, caching the good ones."""

    __slots__ = ("_callers", "_clock", "_identities", "_key", "_max_cached", "_pins")

    def __init__(
        self,
        key: Ed25519PublicKey | None,
        *,
        identities: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        max_cached: int = MAX_CACHED_TOKENS,
    ) -> None:
        self._key = key
        self._identities: Mapping[str, str] = identities if identities is not None else {}
        self._clock = clock
        self._max_cached = max_cached
        self._callers: dict[bytes, Caller] = {}
        self._pins: dict[bytes, PinGrant] = {}

    @property
    def has_key(self) -> bool:
        return self._key is not None

    @property
    def cached(self) -> int:
        """Tokens in the cache (for tests and introspection)."""
        return len(self._callers) + len(self._pins)

    def set_identities(self, identities: Mapping[str, str]) -> None:
        """Honour replica tokens of exactly these (replica -> incarnation) pairs from now on.

        Platform tokens are not in the table; they stay honoured until they expire.
        """
        self._identities = identities
        self._callers = {
            token: caller
            for token, caller in self._callers.items()
            if caller.platform or identities.get(caller.replica) == caller.incarnation
        }

    def set_key(self, key: Ed25519PublicKey | None) -> None:
        """Verify with ``key`` from now on; if it differs (rotation), forget every cached verification."""
        if _raw(key) == _raw(self._key):
            return
        self._key = key
        self._callers.clear()
        self._pins.clear()

    def caller(self, token: bytes) -> Caller | Denial:
        """The replica (or the platform) ``token`` identifies, or why it identifies nobody (401)."""
        caller = self._callers.get(token)
        if caller is not None:
            if caller.expires > self._clock():
                return caller
            del self._callers[token]
            return _unauthenticated("expired", "The x-clearway-identity token has expired; renew it.")
        claims = self._decode(token, _IDENTITY_AUDIENCES, "x-clearway-identity token")
        if isinstance(claims, tuple):
            return _unauthenticated(*claims)
        audience = claims["aud"]
        if audience == PLATFORM_AUDIENCE:
            return self._platform(token, claims)
        if audience != REPLICA_AUDIENCE:
            # PyJWT accepts a list naming one of ours; a token we minted never has one.
            return _unauthenticated("invalid", "The x-clearway-identity token has an audience list; it needs one audience.")
        fields = _string_claims(claims, ("sub", "inc", "app", "rev", "comp"))
        if fields is None:
            return _unauthenticated(
                "invalid", "The x-clearway-identity token lacks the sub, inc, app, rev or comp claim."
            )
        replica, incarnation, app, revision, component = fields
        if not all(_NAME.fullmatch(v) for v in (app, revision, component)):
            # They go into an upstream header: never let a claim carry CR/LF or worse.
            return _unauthenticated("invalid", "The x-clearway-identity token names no valid app, rev or comp.")
        if self._identities.get(replica) != incarnation:
            return _unauthenticated(
                "revoked",
                f"The x-clearway-identity token of replica {replica} is no longer valid: "
                "that replica (incarnation) is not running any more.",
            )
        caller = Caller(
            replica=replica,
            incarnation=incarnation,
            app=app,
            revision=revision,
            component=component,
            expires=float(claims["exp"]),
            header=f"{app}/{revision}/{component}".encode("ascii"),
        )
        _remember(self._callers, token, caller, self._max_cached)
        return caller

    def _platform(self, token: bytes, claims: Mapping[str, Any]) -> Caller | Denial:
        if claims.get("sub") != PLATFORM_SUBJECT:
            return _unauthenticated("invalid", f"The platform token's subject is not {PLATFORM_SUBJECT!r}.")
        caller = Caller(
            replica=PLATFORM_SUBJECT,
            incarnation="",
            app="",
            revision="",
            component="",
            expires=float(claims["exp"]),
            header=PLATFORM_CALLER,
            platform=True,
        )
        _remember(self._callers, token, caller, self._max_cached)
        return caller

    def pin(self, token: bytes) -> PinGrant | Denial:
        """The pin ``token`` grants, or why it grants nothing."""
        grant = self._pins.get(token)
        if grant is not None:
            if grant.expires > self._clock():
                return grant
            del self._pins[token]
            return _pin_denied("pin-token-expired", "The x-clearway-pin-token has expired; ask for a new one.")
        claims = self._decode(token, PIN_AUDIENCE, "x-clearway-pin-token")
        if isinstance(claims, tuple):
            return _pin_denied(f"pin-token-{claims[0]}", claims[1])
        fields = _string_claims(claims, ("app", "rev"))
        if fields is None:
            return _pin_denied("pin-token-invalid", "The x-clearway-pin-token lacks the app or rev claim.")
        grant = PinGrant(app=fields[0], revision=fields[1], expires=float(claims["exp"]))
        _remember(self._pins, token, grant, self._max_cached)
        return grant

    def _decode(self, token: bytes, audience: str | list[str], what: str) -> dict[str, Any] | tuple[str, str]:
        """The verified claims, or (reason, message) saying why there are none."""
        if self._key is None:
            return ("no-key", "This gateway was started without --identity-key, so it cannot verify credentials.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=ALGORITHMS,
                audience=audience,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            return ("expired", f"The {what} has expired; get a new one.")
        except jwt.InvalidTokenError as exc:
            return ("invalid", f"The {what} is not valid ({exc}).")
        # ``exp`` is checked by PyJWT against the real clock; the cache checks
        # it against ours, so a token must also be current by ours.
        if float(claims["exp"]) <= self._clock():
            return ("expired", f"The {what} has expired; get a new one.")
        return claims


def check_caller(
    verifier: IdentityVerifier,
    token: bytes | None,
    allow: tuple[AllowRule, ...],
    target: str,
) -> Caller | Denial:
    """Decide an internal-route request carrying identity ``token`` (None: no header).

    The platform passes every rule; a replica needs one of ``allow`` to accept it.

    ``target`` names the route in messages (``"app 'shop', path /_services/..."``).
    """
    if token is None:
        return _unauthenticated(
            "missing",
            f"{target} is internal: send the replica's credential (CLEARWAY_REPLICA_TOKEN) "
            "in the x-clearway-identity header.",
        )
    caller = verifier.caller(token)
    if isinstance(caller, Denial) or caller.platform:
        return caller
    for rule in allow:
        if rule.allows(caller.app, caller.revision, caller.component):
            return caller
    return Denial(
        403,
        "not-allowed",
        f"{caller.describe()} may not call {target}: the service's policy does not allow "
        f"app {caller.app!r} (revision {caller.revision}, component {caller.component}). "
        "Allow the caller in the service's spec.",
    )


def check_pin(verifier: IdentityVerifier, token: bytes | None, app: str, revision: str) -> Denial | None:
    """Whether a request may be pinned to ``revision`` of ``app``, which gets no share of its traffic (None: yes).

    A pin to a revision with weight > 0 needs no token and does not come here.
    """
    if token is None:
        return _pin_denied(
            "pin-without-token",
            f"Revision {revision} of app {app!r} gets no share of its traffic: pinning a request to it "
            "needs a pin token in the x-clearway-pin-token header (`clearway pin-token REVISION`, "
            "or `POST /v1/revisions/{id}/pin-token`).",
        )
    grant = verifier.pin(token)
    if isinstance(grant, Denial):
        return grant
    if grant.app != app or grant.revision != revision:
        return _pin_denied(
            "pin-token-mismatch",
            f"The x-clearway-pin-token is for app {grant.app!r} revision {grant.revision}, "
            f"not app {app!r} revision {revision}.",
        )
    return None


def cookie_pin(cookie: bytes) -> str | None:
    """The revision the ``clearway-revision`` cookie names in a Cookie header value, if any.

    The proxy calls this only for headers containing ``clearway-revision=``.
    Cookie names are case-sensitive (RFC 6265); the first one wins, as the
    browser sends the most specific cookie first.
    """
    for pair in cookie.split(b";"):
        name, equals, value = pair.partition(b"=")
        if equals and name.strip() == PIN_COOKIE:
            value = value.strip()
            if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            return value.decode("latin-1") or None
    return None


def _unauthenticated(reason: str, message: str) -> Denial:
    return Denial(401, reason, message)


def _pin_denied(reason: str, message: str) -> Denial:
    return Denial(403, reason, message)


def _string_claims(claims: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str, ...] | None:
    values = tuple(claims.get(name) for name in names)
    if all(isinstance(v, str) and v for v in values):
        return values  # type: ignore[return-value]  # all str, checked above
    return None


def _raw(key: Ed25519PublicKey | None) -> bytes | None:
    return key.public_bytes_raw() if key is not None else None


def _remember(cache: dict[bytes, Any], token: bytes, value: Any, limit: int) -> None:
    while len(cache) >= limit:
        del cache[next(iter(cache))]  # the oldest entry (dicts keep insertion order)
    cache[token] = value
