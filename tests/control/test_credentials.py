"""Replica and pin tokens: signed with the platform's own key, scoped, expiring."""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from clearway.control.credentials import (
    PIN_AUDIENCE,
    PLATFORM_AUDIENCE,
    REPLICA_AUDIENCE,
    SigningKey,
)


@dataclass(frozen=True)
class Spec:
    replica_id: str = "hello-3.web.0"
    app: str = "hello"
    revision: str = "hello-3"
    component: str = "web"


def test_the_key_is_created_once_private_and_with_its_public_half(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = SigningKey.load_or_create(keys)
    again = SigningKey.load_or_create(keys)
    assert first.public_pem() == again.public_pem()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "signing.pem").stat().st_mode) == 0o600
    assert (keys / "signing.pub.pem").read_bytes() == first.public_pem()
    assert b"BEGIN PRIVATE KEY" in (keys / "signing.pem").read_bytes()  # PKCS8


def test_a_replica_token_carries_the_contract_claims(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    issued = key.mint_replica_token(Spec(), "inc-1")
    public = (tmp_path / "signing.pub.pem").read_bytes()
    claims = jwt.decode(issued.token, public, algorithms=["EdDSA"], audience=REPLICA_AUDIENCE)
    assert {k: claims[k] for k in ("iss", "sub", "app", "rev", "comp", "inc")} == {
        "iss": "clearway",
        "sub": "hello-3.web.0",
        "app": "hello",
        "rev": "hello-3",
        "comp": "web",
        "inc": "inc-1",
    }
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]
    identity = key.read_replica_token(issued.token)
    assert identity is not None
    assert (identity.replica, identity.incarnation, identity.expires_at) == ("hello-3.web.0", "inc-1", issued.expires_at)


def test_the_minting_callback_takes_a_spec_and_an_incarnation(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    token = key.replica_token_minter()(Spec(), "abc")
    identity = key.read_replica_token(token)
    assert identity is not None and identity.incarnation == "abc"


def test_foreign_expired_tampered_and_wrong_audience_tokens_are_refused(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path / "ours")
    other = SigningKey.load_or_create(tmp_path / "theirs")
    assert key.read_replica_token(other.mint_replica_token(Spec(), "i").token) is None
    past = SigningKey.load_or_create(tmp_path / "ours", clock=lambda: time.time() - 7200)
    assert key.read_replica_token(past.mint_replica_token(Spec(), "i").token) is None
    header, _body, signature = key.mint_replica_token(Spec(), "i").token.split(".")
    forged_body = other.mint_replica_token(Spec(replica_id="evil"), "i").token.split(".")[1]
    assert key.read_replica_token(f"{header}.{forged_body}.{signature}") is None
    pin = key.mint_pin_token("hello", "hello-3").token
    assert key.read_replica_token(pin) is None  # a pin token is not an identity
    assert key.read_pin_token(key.mint_replica_token(Spec(), "i").token) is None
    assert key.read_replica_token("not a token") is None
    unsigned = jwt.encode({"aud": REPLICA_AUDIENCE, "sub": "x"}, key="", algorithm="none")
    assert key.read_replica_token(unsigned) is None


def test_a_pin_token_names_app_and_revision(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    issued = key.mint_pin_token("hello", "hello-2", ttl=120)
    claims = jwt.decode(issued.token, key.public_pem(), algorithms=["EdDSA"], audience=PIN_AUDIENCE)
    assert (claims["sub"], claims["app"], claims["rev"], claims["exp"] - claims["iat"]) == ("operator", "hello", "hello-2", 120)
    grant = key.read_pin_token(issued.token)
    assert grant is not None and (grant.app, grant.revision) == ("hello", "hello-2")


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_a_key_file_that_is_not_ed25519_is_reported(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "signing.pem").write_bytes(content)
    with pytest.raises(ValueError):
        SigningKey.load_or_create(tmp_path)


def test_a_platform_token_is_short_lived_and_no_other_kind(tmp_path: Path) -> None:
    key = SigningKey.load_or_create(tmp_path)
    issued = key.mint_platform_token()
    public = (tmp_path / "signing.pub.pem").read_bytes()
    claims = jwt.decode(issued.token, public, algorithms=["EdDSA"], audience=PLATFORM_AUDIENCE)
    assert (claims["iss"], claims["sub"], claims["jti"] != "") == ("clearway", "control-plane", True)
    assert claims["exp"] - claims["iat"] == 300 and claims["exp"] == issued.expires_at
    assert key.mint_platform_token(ttl=30).expires_at <= time.time() + 31
    assert key.read_replica_token(issued.token) is None
    assert key.read_pin_token(issued.token) is None
