"""The runtime's public API is exactly what its __init__ re-exports."""

from __future__ import annotations

import clearway.runtime


def test_exported_members() -> None:
    exported = {name for name in dir(clearway.runtime) if not name.startswith("_")}
    modules = {
        "cgroups", "clock", "exit_codes", "functions", "interface", "launcher", "logs",
        "probes", "process", "restarts", "isolation", "logwriter", "replica", "spec", "status", "supervisor", "annotations", "forking", "warmparent",
    }  # fmt: skip
    assert exported - modules == set(clearway.runtime.__all__)
    for name in set(clearway.runtime.__all__) - {"StatusCallback", "Credentials"}:  # type aliases
        assert getattr(clearway.runtime, name).__module__.startswith("clearway.runtime.")
