"""Stands in for the control plane's token minting: a fresh Ed25519 key, real JWTs.

The gateway verifies with PyJWT against the public key file it is given, so
the tests mint tokens exactly as the control plane does (same library,
algorithm, issuer, audiences and claims), with whatever expiry or incarnation
an attack needs.  Nothing of the gateway is faked.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


class TokenIssuer:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    def write_public_key(self, path: Path) -> Path:
        path.write_bytes(
            self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key, algorithm="EdDSA")

    def replica(
        self,
        replica: str,
        incarnation: str,
        *,
        app: str | None = None,
        revision: str | None = None,
        component: str | None = None,
        lifetime: float = 3600,
        **extra: Any,
    ) -> str:
        """A replica token; app/revision/component default to what ``replica`` ("app-N.comp.i") names."""
        rev, comp, _index = replica.split(".")
        now = int(time.time())
        claims = {
            "iss": "clearway",
            "aud": "clearway:replica",
            "sub": replica,
            "app": app if app is not None else rev.rsplit("-", 1)[0],
            "rev": revision if revision is not None else rev,
            "comp": component if component is not None else comp,
            "inc": incarnation,
            "iat": now - 10,
            "exp": int(now + lifetime),
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra)
        return self._sign(claims)

    def pin(self, app: str, revision: str, *, lifetime: float = 3600) -> str:
        now = int(time.time())
        return self._sign(
            {
                "iss": "clearway",
                "aud": "clearway:pin",
                "sub": "operator",
                "app": app,
                "rev": revision,
                "iat": now - 10,
                "exp": int(now + lifetime),
            }
        )

    def platform(self, *, lifetime: float = 300, **extra: Any) -> str:
        """A platform token: the control plane's own identity (``SigningKey.mint_platform_token``)."""
        now = int(time.time())
        claims = {
            "iss": "clearway",
            "aud": "clearway:platform",
            "sub": "control-plane",
            "iat": now - 10,
            "exp": int(now + lifetime),
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra)
        return self._sign(claims)
