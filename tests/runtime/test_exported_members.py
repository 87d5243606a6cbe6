"""The runtime's public API is exactly what its __init__ re-exports."""

from __future__ import annotations

import subprocess
import sys

import clearway.runtime


def test_exported_members() -> None:
    exported = {name for name in dir(clearway.runtime) if not name.startswith("_")}
    modules = {
        "cgroups", "clock", "exit_codes", "functions", "interface", "launcher", "logs",
        "probes", "process", "restarts", "isolation", "logwriter", "replica", "spec", "status", "supervisor", "annotations", "forking", "warmparent", "warmprotocol", "coordinated", "servers",
    }  # fmt: skip
    assert exported - modules == set(clearway.runtime.__all__)
    for name in set(clearway.runtime.__all__) - {"StatusCallback", "Credentials"}:  # type aliases
        assert getattr(clearway.runtime, name).__module__.startswith("clearway.runtime.")


def test_importing_the_runtime_does_not_import_the_replica_entry_point() -> None:
    # `python -m clearway.runtime.replica` warns (and may misbehave) when the package's
    # import already imported it: nothing the package imports may import it.
    found = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import sys, clearway.runtime; print(sorted(m for m in sys.modules if m in ("
        "'clearway.runtime.replica', 'clearway.runtime.warmparent')))"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    assert found.stdout.strip() == "[]"
