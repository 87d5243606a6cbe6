"""The routes file: parsing, validation and the errors it gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clearway.gateway import RoutesError, RouteTable, load_routes

EXAMPLE = {
    "version": 1,
    "generation": 17,
    "domains": ["localhost", "apps.example.com"],
    "routes": [
        {
            "app": "hello", "host": "hello", "prefix": "/", "strip_prefix": False, "timeout": 60.0,
            "pin_header": "x-clearway-revision",
            "targets": [
                {"revision": "hello-3", "weight": 90, "endpoints": ["unix:/run/cw/hello-3.web.0.sock", "127.0.0.1:40124"]},
                {"revision": "hello-4", "weight": 10, "endpoints": []},
            ],
        }
    ],
}


def test_parses_the_documented_example(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(EXAMPLE))
    table = load_routes(path)
    assert table.generation == 17
    assert table.domains == ("localhost", "apps.example.com")
    (route,) = table.routes
    assert [t.revision for t in route.targets] == ["hello-3", "hello-4"]
    assert route.targets[0].endpoints == ("unix:/run/cw/hello-3.web.0.sock", "127.0.0.1:40124")
    assert route.component == ""  # not said: counted for the revision as a whole
    assert RouteTable.from_json(table.to_json()) == table


def test_a_route_may_name_its_component() -> None:
    data = json.loads(json.dumps(EXAMPLE))
    data["routes"][0]["component"] = "resize"
    table = RouteTable.from_json(data)
    assert table.routes[0].component == "resize"
    assert RouteTable.from_json(table.to_json()) == table


def test_a_public_route_may_be_sticky() -> None:
    data = json.loads(json.dumps(EXAMPLE))
    assert RouteTable.from_json(data).routes[0].sticky is False
    data["routes"][0]["sticky"] = True
    table = RouteTable.from_json(data)
    assert table.routes[0].sticky is True
    assert RouteTable.from_json(table.to_json()) == table


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"version": 2}, "version 2"),
        ({"routes": [{"app": "a", "host": "a", "prefix": "nope", "targets": []}]}, "prefix must start"),
        ({"routes": [{"app": "a", "host": "a", "targets": [{"revision": "r", "weight": -1}]}]}, "weight"),
        ({"routes": [{"app": "a", "host": "a", "targets": [{"revision": "r", "weight": 1, "endpoints": ["x"]}]}]}, "127.0.0.1:40123"),
        ({"routes": [{"app": "a", "host": "a", "targets": [{"revision": "r", "weight": 1, "endpoints": ["unix:rel.sock"]}]}]}, "absolute socket path"),
        ({"routes": [{"app": "a", "host": "a", "targets": [{"revision": "r", "weight": 1, "endpoints": ["unix:/" + "a" * 107]}]}]}, "longer than 107 bytes"),
        ({"routes": [{"app": "a", "host": "a", "component": 3, "targets": []}]}, r"routes\[0\]\.component must be a string"),
        ({"routes": [{"app": "a", "host": "a", "component": "web\nx", "targets": []}]}, "must be a component name"),
        ({"routes": [{"app": "a", "host": "a", "sticky": "yes", "targets": []}]}, r"routes\[0\]\.sticky must be true or false"),
        (
            {"routes": [{"app": "a", "host": "a", "internal": True, "sticky": True, "targets": []}]},
            "sticky is only meaningful on a public route",
        ),
    ],
)
def test_refuses_bad_tables_with_a_clear_error(patch: dict[str, object], message: str) -> None:
    with pytest.raises(RoutesError, match=message):
        RouteTable.from_json({**EXAMPLE, **patch})


def test_unreadable_file_is_a_routes_error(tmp_path: Path) -> None:
    with pytest.raises(RoutesError, match="cannot read"):
        load_routes(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RoutesError, match="not valid JSON"):
        load_routes(tmp_path / "bad.json")
