"""The test gate: a pushed project's tests run before anything is deployed.

A project *has tests* when it holds a ``tests/`` directory or ``test_*.py``
files at its top level (pytest's own default discovery would find them). For
such a project, ``pytest`` is added to the resolution of its environment
(`TEST_REQUIREMENTS`, through ``EnvironmentBuilder.ensure(extra=...)``): the
tests run with the app's own interpreter and pinned packages, exactly those
its replicas will import, not with the platform's. A project without tests
gets no pytest, so its environment stays what ``clearway deploy`` builds.
Because the extra requirement is part of the input digest, a pushed project
with tests and the same project deployed with ``clearway deploy`` resolve to
two environments (the second without pytest): the cache keeps both.

The tests are untrusted code like the app, so they run exactly where the spec
is read (``RevisionBuilder.run_isolated``, see ``control.revisions``): the
spec-reading uid, ``$CLEARWAY_HOME`` hidden, the staged project read-only, a
throwaway writable workdir as ``HOME`` and current directory, and a minimal
environment. Hence ``-p no:cacheprovider`` (the project directory is
read-only) and ``PYTHONPATH`` set to the project (so ``import app`` works from
``tests/``). They get `TEST_TIMEOUT` seconds; a timeout is a failure.

The result keeps the last `SUMMARY_LINES` lines of pytest's output: what the
pusher sees as ``remote:`` lines and ``clearway builds APP --log N`` shows.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from clearway.control.revisions import RevisionBuilder

__all__ = ["SUMMARY_LINES", "TEST_REQUIREMENTS", "TEST_TIMEOUT", "TestResult", "has_tests", "run_tests"]

#: Added to the environment's resolution of a project that has tests.
TEST_REQUIREMENTS: tuple[str, ...] = ("pytest",)
#: How long a project's whole test run may take.
TEST_TIMEOUT = 600.0
#: How much of pytest's output is kept and shown.
SUMMARY_LINES = 40


@dataclass(frozen=True)
class TestResult:
    __test__ = False  # not a pytest test class, whatever its name says

    passed: bool
    #: The last `SUMMARY_LINES` lines of pytest's output (or why it did not run).
    summary: str


def has_tests(project: Path) -> bool:
    """Whether ``project`` holds a ``tests/`` directory or top-level ``test_*.py`` files."""
    return (project / "tests").is_dir() or any(p.is_file() for p in project.glob("test_*.py"))


def requirements_for(project: Path) -> tuple[str, ...]:
    """What the test gate adds to ``project``'s environment: pytest, when it has tests."""
    return TEST_REQUIREMENTS if has_tests(project) else ()


async def run_tests(builder: RevisionBuilder, project: Path, *, python: str) -> TestResult:
    """Run ``python -m pytest -q`` on ``project``, isolated (see the module docstring)."""
    root = await asyncio.to_thread(os.path.realpath, project)
    code, out, err = await builder.run_isolated(
        project,
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--color=no", root],
        python=python,
        what="the project's tests",
        time_limit=TEST_TIMEOUT,
        extra_env={"PYTHONPATH": root},
    )
    text = (out + err).decode(errors="replace").replace(root + "/", "")
    lines = text.rstrip().splitlines()[-SUMMARY_LINES:]
    if code is None:
        lines.append(f"the tests took longer than {TEST_TIMEOUT:.0f}s and were stopped")
    elif code == 5:
        # pytest's "no tests collected": a tests/ directory without tests passes.
        return TestResult(True, "\n".join(lines))
    return TestResult(code == 0, "\n".join(lines))
