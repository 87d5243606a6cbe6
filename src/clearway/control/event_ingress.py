"""The events ingress: CloudEvents posted to an app become durable invocations.

``POST /v1/apps/<app>/events`` takes the CloudEvents 1.0 HTTP binding in its
three modes, read by the official ``cloudevents`` SDK: *binary* (``ce-*``
headers, the body is the event's data), *structured* (``content-type:
application/cloudevents+json``, the body is the whole event) and *batch*
(``application/cloudevents-batch+json``, a JSON array of structured events).
Any producer that speaks CloudEvents over HTTP can post there, with the
operator's token or, from inside the app, a replica token of that app.

Events are routed by their ``type``, matched exactly against the ``events=``
of the functions in the app's serving revision: each event becomes one
durable invocation (``control.invocations``) per function that subscribes
to it, stored in structured mode (JSON), which is how the dispatcher sends
it to the function's ``/_events`` route. A request is taken whole or not at
all: a malformed event anywhere in a batch is a 400, an event type nobody
subscribes to a 422, and then nothing is queued, so a producer can simply
send the batch again once it is fixed.

Each invocation's idempotency key is ``event:<source>:<id>``: the
CloudEvents spec makes ``source`` + ``id`` unique per event and lets a
producer re-send an event with the same id, so a re-sent event (a producer
that retried after a lost answer) is queued once per function, not twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloudevents.v1.conversion import to_structured

from clearway.control.store import InvocationKind, NewInvocation
from clearway.runtime.functions import parse_events as parse_http_events
from clearway.spec.model import FunctionSpec

__all__ = [
    "BATCH_CONTENT_TYPE",
    "MAX_BATCH",
    "MalformedEvents",
    "ReceivedEvent",
    "UnroutedEvents",
    "invocations_for",
    "parse_events",
]

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
#: Most events in one batch.
MAX_BATCH = 1000


class MalformedEvents(ValueError):
    """The request is not valid CloudEvents (HTTP binding); the message says what is wrong."""


class UnroutedEvents(ValueError):
    """No function of the app subscribes to some event's type."""


@dataclass(frozen=True)
class ReceivedEvent:
    """One event as the ingress keeps it."""

    id: str
    source: str
    type: str
    #: The whole event in structured mode (JSON text): what the function receives.
    structured: str


def parse_events(headers: Mapping[str, str], body: bytes) -> list[ReceivedEvent]:
    """The events of one request, in order; `MalformedEvents` when any is not valid.

    The HTTP binding itself is the function server's (`clearway.runtime.functions.parse_events`,
    the ``cloudevents`` SDK): what the ingress accepts is what a function would. The ingress
    adds its own limits: a batch holds 1 to `MAX_BATCH` events, and each has the attributes
    its idempotency key is made of.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    batch = lowered.get("content-type", "").split(";")[0].strip().lower() == BATCH_CONTENT_TYPE
    try:
        events = parse_http_events(lowered, body)
    except ValueError as exc:
        raise MalformedEvents(str(exc)) from None
    if batch and not events:
        raise MalformedEvents("the batch holds no events")
    if len(events) > MAX_BATCH:
        raise MalformedEvents(f"the batch holds {len(events)} events; send at most {MAX_BATCH} at once")
    return [
        _received(event, where=f"event {n} of the batch" if batch else "the event")
        for n, event in enumerate(events, 1)
    ]


def _received(event: Any, *, where: str) -> ReceivedEvent:
    for attribute in ("id", "source", "type"):
        value = event.get(attribute)
        if not isinstance(value, str) or not value:
            raise MalformedEvents(f"{where} has no valid {attribute!r} attribute (a non-empty string)")
    _, structured = to_structured(event)
    return ReceivedEvent(
        id=str(event["id"]), source=str(event["source"]), type=str(event["type"]), structured=structured.decode()
    )


def invocations_for(
    app: str, events: Sequence[ReceivedEvent], functions: Sequence[FunctionSpec], *, revision: str | None = None
) -> list[NewInvocation]:
    """One invocation per event and subscribed function (of ``revision``, or of
    whatever serves the app); `UnroutedEvents` when an event's type has no
    subscriber (and then none at all)."""
    subscribed = sorted({t for f in functions for t in f.events})
    unrouted = sorted({e.type for e in events if e.type not in subscribed})
    if unrouted:
        known = ", ".join(subscribed) or "none: no function has events="
        raise UnroutedEvents(
            f"no function of {app} receives events of type {', '.join(map(repr, unrouted))} "
            f"(types it receives: {known}); add it to a function's events= and deploy"
        )
    return [
        NewInvocation(
            app=app,
            function=function.name,
            kind=InvocationKind.EVENT,
            payload=event.structured,
            max_attempts=function.retries + 1,
            idempotency_key=f"event:{event.source}:{event.id}",
            revision=revision,
        )
        for event in events
        for function in functions
        if event.type in function.events
    ]
