"""Which hot path runs: the mypyc-compiled modules, or the same modules as Python.

``scripts/compile`` (run by ``scripts/install``) compiles the gateway's
per-request modules with mypyc into extension modules beside their sources
(``_proxy.py`` → ``_proxy.cpython-311-x86_64-linux-gnu.so``) and records the
SHA-256 of each compiled source in ``_compiled.json``.  Python's import system
prefers an extension module to a ``.py`` of the same name, so nothing else in
the package knows or cares which one it got.

Why mypyc, and only for these modules (measured, ``bench/gateway_micro.py``
and ``bench/gateway.py``; figures in the README): what is left of a request's
cost is many small Python operations - attribute reads, comparisons, list
appends, bound-method calls between the client and upstream protocols - with
no single hotspot to rewrite.  mypyc turns the strictly typed classes into C
structs with a vtable, so those operations become C field reads and direct
calls, for about a third less CPU per request, from the code we already test.
Cython would need the hot path written a second time, in its own dialect.

Why the pure modules must stay a working fallback, and when they are used:

* ``CLEARWAY_PURE_PYTHON=1`` in the environment: always (``scripts/install``
  then builds nothing; benchmarks use it to compare the two in one run);
* a module's source no longer matches the hash recorded at build time (an
  edited ``_proxy.py`` in a development checkout): running the stale
  extension would run code that is no longer in the tree, so *all* the
  compiled modules are set aside (they call each other natively and must
  come from one build) until ``scripts/compile`` runs again;
* no build at all (no compiler, an interpreter the build was not made for):
  the extension files do not exist or do not match this interpreter's suffix.

Only ``scripts/compile`` should build them: extension files with no
``_compiled.json`` beside them (a hand-run ``mypyc``) are imported as found,
unchecked.  The hashes cover the compiled modules' own sources only; what they
import from modules that are not compiled is called through Python, as before.

The fallback is a meta-path finder placed in front of the normal ones, which
loads the listed modules from their ``.py`` files.  It must be installed
before any of them is imported, so ``clearway.gateway`` imports this module
first.  ``tests/gateway/test_compiled.py`` checks which one is loaded: CI
builds the compiled modules and runs the whole suite against them.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED_MODULES", "PURE_ENV", "PURE_REASON", "is_compiled", "use_compiled"]

#: Set to ``1`` to run (and build) the pure-Python hot path.
PURE_ENV = "CLEARWAY_PURE_PYTHON"
#: What ``scripts/compile`` writes: ``{"modules": {"_proxy": "<sha256 of _proxy.py>", ...}}``.
MANIFEST = Path(__file__).with_name("_compiled.json")
_PACKAGE = __name__.rpartition(".")[0]


def _manifest() -> dict[str, str]:
    try:
        data = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return {}
    modules = data.get("modules") if isinstance(data, dict) else None
    if not isinstance(modules, dict):
        return {}
    return {str(name): str(digest) for name, digest in modules.items()}


def _stale(modules: dict[str, str]) -> str | None:
    """Why the built modules must not be used, or None when they match their sources."""
    here = MANIFEST.parent
    for name, digest in modules.items():
        try:
            source = (here / f"{name}.py").read_bytes()
        except OSError:
            return f"{name}.py is missing"
        if hashlib.sha256(source).hexdigest() != digest:
            return f"{name}.py changed since it was compiled; run scripts/compile"
    return None


class _PureFinder:
    """Finds the listed modules as their ``.py`` sources, ahead of any extension module."""

    def __init__(self, names: Sequence[str]) -> None:
        self._paths = {f"{_PACKAGE}.{name}": MANIFEST.parent / f"{name}.py" for name in names}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._paths.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _decide() -> tuple[tuple[str, ...], str]:
    """(the modules compiled in this tree, why the pure ones run - empty when they do not)."""
    modules = _manifest()
    names = tuple(modules)
    if not modules:
        return names, "not compiled (no scripts/compile build)"
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        reason = f"{PURE_ENV} is set"
    else:
        stale = _stale(modules)
        if stale is None:
            return names, ""
        reason = stale
    sys.meta_path.insert(0, _PureFinder(names))
    return names, reason


#: The modules compiled by the last build (empty when there is none).
COMPILED_MODULES, PURE_REASON = _decide()


def is_compiled(module: ModuleType) -> bool:
    """True when ``module`` was loaded from an extension module (a compiled build)."""
    origin = getattr(module, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def use_compiled() -> bool:
    """True when every module of the build is running compiled."""
    if not COMPILED_MODULES:
        return False
    return all(is_compiled(sys.modules.get(f"{_PACKAGE}.{name}") or ModuleType(name)) for name in COMPILED_MODULES)
