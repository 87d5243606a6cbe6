"""Session-wide settings for the whole suite.

Tests never reach a package index: uv (which builds every app's environment)
runs offline, resolving from its cache, which ``scripts/install`` filled with
exactly the packages the replica runtime and the examples need. Packages a
test invents are built as wheels on the spot and found through
``UV_FIND_LINKS`` (see ``tests/wheels.py``).
"""

from __future__ import annotations

import os

os.environ["UV_OFFLINE"] = "1"
