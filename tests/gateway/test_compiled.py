"""Which hot path the suite runs against: the mypyc-compiled modules, or the pure ones.

``scripts/test`` (what CI runs) builds the compiled modules and sets
``CLEARWAY_EXPECT_COMPILED=1``, so a build that silently fell back to Python
fails here instead of passing the whole suite against the wrong code.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import clearway.gateway
from clearway.gateway import _compiled, _proxy


def test_the_expected_hot_path_is_loaded() -> None:
    expected = os.environ.get("CLEARWAY_EXPECT_COMPILED")
    loaded = "compiled" if clearway.gateway.compiled else f"pure Python ({_compiled.PURE_REASON})"
    if expected is None:
        pytest.skip(f"CLEARWAY_EXPECT_COMPILED is not set; the gateway's hot path is {loaded}")
    assert clearway.gateway.compiled is (expected == "1"), f"the gateway's hot path is {loaded}"
    assert _compiled.is_compiled(_proxy) is clearway.gateway.compiled


def test_pure_python_runs_when_asked() -> None:
    code = (
        "import clearway.gateway as g, clearway.gateway._proxy as p, clearway.gateway._upstream as u;"
        "print(g.compiled, p.__file__.endswith('.py'), u.__file__.endswith('.py'))"
    )
    env = {**os.environ, _compiled.PURE_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]
