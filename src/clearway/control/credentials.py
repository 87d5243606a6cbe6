"""Credentials: the operator's API token, and the replicas' own tokens.

Replicas get a channel to the control plane (``CLEARWAY_CONTROL_URL``) — the
road to locks, leader election and sharding — so they need credentials, but
never the operator's: a replica's token names the replica (app, revision,
component, id) and is signed with a key derived from the API token. The
control plane verifies it without storing anything, so the same scheme works
for pods on Kubernetes, and a leaked replica token grants only what the
``/v1/replica`` endpoints allow, never deploys or shutdowns.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ReplicaIdentity:
    app: str
    revision: str
    component: str
    replica: str


def _key(api_token: str) -> bytes:
    return hashlib.sha256(b"clearway replica tokens\0" + api_token.encode()).digest()


def mint_replica_token(api_token: str, identity: ReplicaIdentity) -> str:
    body = base64.urlsafe_b64encode(json.dumps(asdict(identity), sort_keys=True).encode()).decode().rstrip("=")
    signature = hmac.new(_key(api_token), body.encode(), hashlib.sha256).hexdigest()
    return f"r.{body}.{signature}"


def read_replica_token(api_token: str, token: str) -> ReplicaIdentity | None:
    """The identity a replica token names, or None when it is not one of ours."""
    prefix, _, rest = token.partition(".")
    body, _, signature = rest.partition(".")
    if prefix != "r" or not body or not signature:
        return None
    expected = hmac.new(_key(api_token), body.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return ReplicaIdentity(**data)
    except (ValueError, TypeError):
        return None
