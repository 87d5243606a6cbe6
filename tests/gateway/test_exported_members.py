"""The public API of clearway.gateway is exactly what __init__ re-exports."""

import clearway.gateway


def test_exported_members() -> None:
    assert sorted(clearway.gateway.__all__) == [
        "Affinity", "AllowRule", "Gateway", "GatewaySettings", "GatewayState", "IdentityKeyError", "ListenError", "Route",
        "RouteTable", "RoutesError", "Target", "compiled", "load_routes",
    ]
    assert isinstance(clearway.gateway.compiled, bool)
    for name in clearway.gateway.__all__:
        if name == "compiled":
            continue
        assert getattr(clearway.gateway, name).__module__.startswith("clearway.gateway.")
