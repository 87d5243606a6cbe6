"""The public API is exactly what ``clearway/__init__.py`` re-exports.

Adding a name here is a decision to support it; everything else is private.
"""

import clearway

EXPECTED = {
    "APIError",
    "App",
    "AppLoadError",
    "AppSpec",
    "AuthenticationError",
    "CanaryPolicy",
    "ClearwayError",
    "CloudEvent",
    "Component",
    "ControlPlaneError",
    "Cron",
    "DeployError",
    "Every",
    "Function",
    "FunctionError",
    "FunctionSpec",
    "Job",
    "Leadership",
    "Lock",
    "LockError",
    "LockTimeout",
    "NotRunningError",
    "Request",
    "Response",
    "RuntimeStartError",
    "ScheduleSpec",
    "ServiceSpec",
    "Shard",
    "SpecError",
    "WorkerSpec",
    "__version__",
    "identity_headers",
    "leader",
    "service_url",
    "shard_for",
}


def test_exported_members_are_exactly_the_public_api() -> None:
    assert set(clearway.__all__) == EXPECTED
    for name in clearway.__all__:
        assert hasattr(clearway, name), name


def test_every_exported_exception_is_a_clearway_error() -> None:
    # Every exported exception derives from the one base class users catch.
    not_exceptions = {
        "App", "AppSpec", "CanaryPolicy", "CloudEvent", "Component", "Cron", "Every", "Function", "FunctionSpec",
        "Job", "Request", "Response", "ScheduleSpec", "ServiceSpec", "WorkerSpec", "__version__",
        "identity_headers", "service_url", "Leadership", "Lock", "leader",
        "Shard", "shard_for",
    }
    for name in EXPECTED - not_exceptions:
        assert issubclass(getattr(clearway, name), clearway.ClearwayError), name


def test_every_holding_says_until_when_it_counts_on_itself() -> None:
    # A lock, a singleton's leadership and a shard expose their own deadline (monotonic),
    # read-only: the bound on their validity that a history of holdings is checked against.
    for holding in (clearway.Lock, clearway.Leadership, clearway.Shard):
        deadline = getattr(holding, "deadline", None)
        assert isinstance(deadline, property) and deadline.fset is None, holding


def test_importing_clearway_starts_nothing_heavy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, clearway; "
        "heavy = [m for m in ('fastapi', 'uvicorn', 'httptools', 'cloudevents', 'clearway.control', "
        "'clearway.runtime', 'clearway.gateway') if m in sys.modules]; print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == ""
