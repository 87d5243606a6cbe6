"""The declarative app spec: the one contract between the SDK and every engine.

An ``App`` written with the SDK serialises to an ``AppSpec`` (JSON, versioned
by ``api_version``, with a published JSON Schema in ``schema/app.schema.json``).
The local runtime and the Kubernetes backend both consume this spec and nothing
else, so nothing in it may assume one machine: no ports, no paths on disk, no
process ids — those are the engines' business.
"""

from clearway.spec.model import (
    API_VERSION,
    AppSpec,
    CanaryPolicy,
    ComponentSpec,
    FunctionSpec,
    Interface,
    Resources,
    ScheduleSpec,
    Server,
    ServiceSpec,
    SmokeCheck,
    SourceLocation,
    WorkerSpec,
    json_schema,
)

__all__ = [
    "API_VERSION",
    "AppSpec",
    "CanaryPolicy",
    "ComponentSpec",
    "FunctionSpec",
    "Interface",
    "Resources",
    "ScheduleSpec",
    "Server",
    "ServiceSpec",
    "SmokeCheck",
    "SourceLocation",
    "WorkerSpec",
    "json_schema",
]
