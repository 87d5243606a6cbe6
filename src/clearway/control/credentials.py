"""Credentials the control plane issues: replica, pin and platform tokens.

Replicas get a channel to the control plane (``CLEARWAY_CONTROL_URL``) and an
identity the gateway checks on internal routes, so each needs a credential of
its own — never the operator's. Both kinds are JWTs (PyJWT, EdDSA over
Ed25519: a well-kept format, verifiable by anyone holding the public key, so
the gateway verifies without asking us):

* a **replica token** (aud ``clearway:replica``) names the replica (sub), its
  app, revision, component and *incarnation* (``inc``: random per process
  start). It is minted at every process start and never stored. It expires
  after an hour and is renewed over the replica channel; a token whose
  incarnation is no longer the one running is refused by the control plane and
  the gateway, so a stopped or restarted replica's token is dead at once.
* a **pin token** (aud ``clearway:pin``) lets its bearer pin a request to one
  revision of one app with ``x-clearway-revision`` (smoke checks of a revision
  at weight 0, before it gets traffic). Only the operator gets them.
* a **platform token** (aud ``clearway:platform``, sub ``control-plane``) is
  the control plane's own identity at the gateway. The control plane delivers
  durable invocations (spawned, event and cron ones) *through the gateway*, to
  a function's internal route, rather than to a replica socket directly, so
  that held requests, scale from zero and per-revision metrics apply to them
  exactly as to any other call. On an internal route the gateway lets this
  identity past every ``allow`` rule (the platform is trusted) and tells the
  function ``x-clearway-caller: platform``; on a public route it grants
  nothing. What a leaked one could do: reach any internal route, of any app,
  until it expires. So it never leaves the control plane's memory (it is not
  written to disk, a log or a replica's environment), and it lives minutes
  (``PLATFORM_TOKEN_TTL``), not an hour: the control plane mints a fresh one
  when the one it holds is near its end.

The signing key is the platform's own (``$CLEARWAY_HOME/keys/signing.pem``),
created on first start and *not* derived from the operator token: rotating
one must not affect the other, and the gateway only ever sees the public half.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ISSUER = "clearway"
REPLICA_AUDIENCE = "clearway:replica"
PIN_AUDIENCE = "clearway:pin"
PLATFORM_AUDIENCE = "clearway:platform"
#: The ``sub`` of every platform token (the gateway checks it).
PLATFORM_SUBJECT = "control-plane"
#: The header the gateway reads a pin token from.
PIN_HEADER = "x-clearway-pin-token"
#: Lifetime of replica and pin tokens, in seconds.
TOKEN_TTL = 3600
#: Lifetime of a platform token, in seconds: short, since it opens every internal route.
PLATFORM_TOKEN_TTL = 300
#: The only algorithm accepted: never let a token choose its own verification.
_ALGORITHMS = ["EdDSA"]


class ReplicaLike(Protocol):
    """What minting needs from a replica spec (``clearway.runtime.ReplicaSpec``)."""

    @property
    def replica_id(self) -> str: ...
    @property
    def app(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def component(self) -> str: ...


@dataclass(frozen=True)
class ReplicaIdentity:
    """Who a valid replica token names."""

    replica: str
    app: str
    revision: str
    component: str
    incarnation: str
    expires_at: int

    @property
    def replica_id(self) -> str:
        """So an identity can be handed back to minting (renewal)."""
        return self.replica


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: int


@dataclass(frozen=True)
class PinGrant:
    """What a valid pin token allows: pinning requests of ``app`` to ``revision``."""

    app: str
    revision: str
    expires_at: int


class SigningKey:
    """The platform's Ed25519 key: mints tokens and verifies replica tokens."""

    def __init__(self, private: Ed25519PrivateKey, *, clock: Callable[[], float] = time.time) -> None:
        self._private = private
        self._public: Ed25519PublicKey = private.public_key()
        self._clock = clock

    @classmethod
    def load_or_create(cls, keys_dir: Path, *, clock: Callable[[], float] = time.time) -> SigningKey:
        """The key in ``keys_dir/signing.pem``, created (0600, with its public half) on first use.

        Creation is race-safe: the key is written to a unique file and linked
        into place, so two starting processes agree on one key.
        """
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys_dir.chmod(0o700)
        private_path = keys_dir / "signing.pem"
        if not private_path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            tmp = keys_dir / f".signing.{secrets.token_hex(8)}.pem"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):  # another process won the race
                os.link(tmp, private_path)
            tmp.unlink()
        private_path.chmod(0o600)
        loaded = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ValueError(f"{private_path} is not an Ed25519 key; move it away to get a new one")
        signing = cls(loaded, clock=clock)
        public_path = keys_dir / "signing.pub.pem"
        public_pem = signing.public_pem()
        if not public_path.exists() or public_path.read_bytes() != public_pem:
            tmp_pub = keys_dir / f".signing.{secrets.token_hex(8)}.pub.pem"
            tmp_pub.write_bytes(public_pem)
            tmp_pub.chmod(0o644)
            os.replace(tmp_pub, public_path)
        return signing

    def public_pem(self) -> bytes:
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # -- replica tokens ----------------------------------------------------------
    def mint_replica_token(self, replica: ReplicaLike, incarnation: str, *, ttl: int = TOKEN_TTL) -> IssuedToken:
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "aud": REPLICA_AUDIENCE,
            "sub": replica.replica_id,
            "app": replica.app,
            "rev": replica.revision,
            "comp": replica.component,
            "inc": incarnation,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_hex(12),
        }
        return IssuedToken(jwt.encode(claims, self._private, algorithm="EdDSA"), now + ttl)

    def replica_token_minter(self) -> Callable[[Any, str], str]:
        """The ``(spec, incarnation) -> token`` callback the backend calls at every process start."""

        def mint(spec: ReplicaLike, incarnation: str) -> str:
            return self.mint_replica_token(spec, incarnation).token

        return mint

    def read_replica_token(self, token: str) -> ReplicaIdentity | None:
        """The identity a replica token names, or None unless signature, audience,
        issuer and expiry all hold. Whether the incarnation still runs is the
        caller's check (it needs the backend)."""
        claims = self._decode(token, REPLICA_AUDIENCE, ("sub", "app", "rev", "comp", "inc"))
        if claims is None:
            return None
        return ReplicaIdentity(
            replica=claims["sub"],
            app=claims["app"],
            revision=claims["rev"],
            component=claims["comp"],
            incarnation=claims["inc"],
            expires_at=int(claims["exp"]),
        )

    # -- pin tokens --------------------------------------------------------------
    def mint_pin_token(self, app: str, revision: str, *, ttl: int = TOKEN_TTL) -> IssuedToken:
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "aud": PIN_AUDIENCE,
            "sub": "operator",
            "app": app,
            "rev": revision,
            "iat": now,
            "exp": now + ttl,
        }
        return IssuedToken(jwt.encode(claims, self._private, algorithm="EdDSA"), now + ttl)

    # -- platform tokens ---------------------------------------------------------
    def mint_platform_token(self, *, ttl: int = PLATFORM_TOKEN_TTL) -> IssuedToken:
        """The control plane's own identity at the gateway (see the module docstring).

        Keep it in memory only, and mint a new one before ``expires_at``.
        """
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "aud": PLATFORM_AUDIENCE,
            "sub": PLATFORM_SUBJECT,
            "iat": now,
            "exp": now + ttl,
            "jti": secrets.token_hex(12),
        }
        return IssuedToken(jwt.encode(claims, self._private, algorithm="EdDSA"), now + ttl)

    def read_pin_token(self, token: str) -> PinGrant | None:
        """What a pin token allows, or None (the gateway does the same check itself)."""
        claims = self._decode(token, PIN_AUDIENCE, ("app", "rev"))
        if claims is None:
            return None
        return PinGrant(app=claims["app"], revision=claims["rev"], expires_at=int(claims["exp"]))

    def _decode(self, token: str, audience: str, required: tuple[str, ...]) -> dict[str, Any] | None:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public,
                algorithms=_ALGORITHMS,
                audience=audience,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "iss", "aud", *required]},
            )
        except jwt.PyJWTError:
            return None
        if not all(isinstance(claims.get(name), str) for name in required):
            return None
        return claims
