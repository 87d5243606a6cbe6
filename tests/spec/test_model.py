import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from clearway.spec import AppSpec, ServiceSpec, WorkerSpec, json_schema

ROOT = Path(__file__).resolve().parents[2]


def test_spec_round_trips_through_json() -> None:
    spec = AppSpec(
        name="shop",
        env={"A": "1"},
        components=[
            ServiceSpec(name="api", replicas=2, public=True, path="/api/", health="/healthz"),
            WorkerSpec(name="orders"),
        ],
    )
    again = AppSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.component("api").path == "/api"  # type: ignore[union-attr]
    assert again.api_version == "clearway.dev/v1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "Bad_Name"}, "is not a valid name"),
        ({"name": "ok", "components": [{"kind": "service", "name": "web", "path": "api"}]}, "must be a URL path"),
        ({"name": "ok", "components": [{"kind": "service", "name": "web", "replicas": -1}]}, "greater than or equal to 0"),
        (
            {"name": "ok", "components": [{"kind": "service", "name": "a"}, {"kind": "worker", "name": "a"}]},
            "two components are named 'a'",
        ),
        (
            {
                "name": "ok",
                "components": [
                    {"kind": "service", "name": "a", "public": True},
                    {"kind": "service", "name": "b", "public": True},
                ],
            },
            "both claim path '/'",
        ),
        ({"name": "ok", "surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_say_what_to_change(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        AppSpec.model_validate(fields)
    assert message in str(info.value)


def test_published_schema_matches_the_model() -> None:
    """``schema/app.schema.json`` is regenerated with ``clearway schema > schema/app.schema.json``."""
    published = json.loads((ROOT / "schema" / "app.schema.json").read_text())
    assert published == json_schema()
    assert published["properties"]["api_version"]["const"] == "clearway.dev/v1"
