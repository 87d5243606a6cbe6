from clearway.control.credentials import ReplicaIdentity, mint_replica_token, read_replica_token

IDENTITY = ReplicaIdentity(app="hello", revision="hello-3", component="web", replica="hello-3-web-0")


def test_a_minted_token_names_its_replica() -> None:
    assert read_replica_token("api-secret", mint_replica_token("api-secret", IDENTITY)) == IDENTITY


def test_tokens_from_another_platform_or_tampered_are_refused() -> None:
    token = mint_replica_token("api-secret", IDENTITY)
    assert read_replica_token("other-secret", token) is None
    prefix, _body, signature = token.split(".")
    forged = mint_replica_token("attacker", ReplicaIdentity("hello", "hello-3", "web", "evil")).split(".")[1]
    assert read_replica_token("api-secret", f"{prefix}.{forged}.{signature}") is None
    assert read_replica_token("api-secret", "api-secret") is None
    assert read_replica_token("api-secret", "r..") is None
