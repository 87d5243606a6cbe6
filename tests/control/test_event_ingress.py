"""The events ingress: CloudEvents (binary, structured, batch) in, one invocation per subscriber out."""

from __future__ import annotations

import base64
import json

import pytest

from clearway.control.event_ingress import (
    MalformedEvents,
    UnroutedEvents,
    invocations_for,
    parse_events,
)
from clearway.control.store import InvocationKind
from clearway.spec import FunctionSpec

pytestmark = pytest.mark.timeout(30)

STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCH = {"content-type": "application/cloudevents-batch+json"}


def event(n: int = 1, type_: str = "com.example.order.created", **extra: object) -> dict[str, object]:
    return {"specversion": "1.0", "id": f"e{n}", "source": "/shop", "type": type_, **extra}


def test_binary_mode_keeps_the_data_and_its_content_type() -> None:
    [received] = parse_events(
        {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "/shop", "ce-type": "com.x", "content-type": "application/json"},
        b'{"order": 7}',
    )
    assert (received.id, received.source, received.type) == ("e1", "/shop", "com.x")
    stored = json.loads(received.structured)
    assert stored["data"] == {"order": 7} and stored["datacontenttype"] == "application/json"


def test_binary_data_that_is_not_text_travels_as_base64() -> None:
    [received] = parse_events(
        {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "/s", "ce-type": "t", "content-type": "application/octet-stream"},
        b"\x00\xff",
    )
    assert base64.b64decode(json.loads(received.structured)["data_base64"]) == b"\x00\xff"


def test_structured_and_batch_modes() -> None:
    [one] = parse_events(STRUCTURED, json.dumps(event(data={"a": 1})).encode())
    assert json.loads(one.structured)["data"] == {"a": 1}
    batch = parse_events(BATCH, json.dumps([event(1), event(2, "com.example.order.paid")]).encode())
    assert [(e.id, e.type) for e in batch] == [("e1", "com.example.order.created"), ("e2", "com.example.order.paid")]


@pytest.mark.parametrize(
    ("headers", "body", "says"),
    [
        ({"content-type": "application/json"}, b'{"a": 1}', "not a valid CloudEvent"),
        (STRUCTURED, b"not json", "not a valid CloudEvent"),
        (STRUCTURED, json.dumps({"specversion": "1.0", "type": "t", "source": "s"}).encode(), "not a valid CloudEvent"),
        (STRUCTURED, json.dumps(event(type_=5)).encode(), "no valid 'type'"),
        (STRUCTURED, json.dumps(event(specversion="0.9")).encode(), "not a valid CloudEvent"),
        (BATCH, b"{}", "JSON array"),
        (BATCH, b"[]", "no events"),
        (BATCH, json.dumps([event(1), {"specversion": "1.0"}]).encode(), "event 2 of the batch"),
    ],
)
def test_malformed_events_are_refused_saying_what_is_wrong(headers: dict[str, str], body: bytes, says: str) -> None:
    with pytest.raises(MalformedEvents, match=says):
        parse_events(headers, body)


FUNCTIONS = [
    FunctionSpec(name="on-created", events=["com.example.order.created"], retries=1),
    FunctionSpec(name="audit", events=["com.example.order.created", "com.example.order.paid"]),
    FunctionSpec(name="resize"),
]


def test_each_event_goes_to_every_function_subscribed_to_its_type() -> None:
    events = parse_events(BATCH, json.dumps([event(1), event(2, "com.example.order.paid")]).encode())
    new = invocations_for("shop", events, FUNCTIONS)
    assert [(n.function, n.idempotency_key, n.max_attempts) for n in new] == [
        ("on-created", "event:/shop:e1", 2),
        ("audit", "event:/shop:e1", 4),
        ("audit", "event:/shop:e2", 4),
    ]
    assert all(n.kind is InvocationKind.EVENT for n in new)


def test_an_event_nobody_receives_refuses_the_whole_request() -> None:
    events = parse_events(BATCH, json.dumps([event(1), event(2, "com.example.unknown")]).encode())
    with pytest.raises(UnroutedEvents) as refused:
        invocations_for("shop", events, FUNCTIONS)
    assert "'com.example.unknown'" in str(refused.value)
    assert "(types it receives: com.example.order.created, com.example.order.paid)" in str(refused.value)
