"""Find and import the user's app file, and report failures usefully.

The app file is imported as a fresh module with its directory first on
``sys.path`` (so ``from hello.api import api`` works from the project root).
Failures become ``AppLoadError`` carrying the traceback trimmed to the user's
frames: the part of a stack a developer can act on.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path

from clearway.exceptions import AppLoadError, SpecError
from clearway.sdk.app import App

DEFAULT_APP_FILE = "app.py"


def resolve_app_file(path: Path, app_file: str | None = None) -> Path:
    """``path`` is a project directory (holding ``app.py``) or the app file itself."""
    if path.is_dir():
        candidate = path / (app_file or DEFAULT_APP_FILE)
        if not candidate.is_file():
            raise AppLoadError(
                f"no app file at {candidate}: create {candidate.name} defining "
                "`app = clearway.App(\"name\")`, or name the file with --file"
            )
        return candidate
    if path.is_file():
        return path
    raise AppLoadError(f"{path} does not exist: pass a project directory or an app file")


def _user_traceback(exc: BaseException) -> str:
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in f.filename and not f.filename.endswith("clearway/sdk/loader.py")
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(lines)


def load_app(app_file: Path) -> App:
    """Import ``app_file`` and return the one ``App`` it defines."""
    app_file = app_file.resolve()
    if not app_file.is_file():
        raise AppLoadError(
            f"no app file at {app_file}: create it, defining `app = clearway.App(\"name\")`"
        )
    root = str(app_file.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module_name = f"clearway_user_app_{abs(hash(str(app_file)))}"
    spec = importlib.util.spec_from_file_location(module_name, app_file)
    if spec is None or spec.loader is None:  # pragma: no cover - only for odd suffixes
        raise AppLoadError(f"{app_file} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SpecError:
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise AppLoadError(
            f"importing {app_file.name} failed: {type(exc).__name__}: {exc}",
            details=_user_traceback(exc),
        ) from None
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    if not apps:
        raise AppLoadError(
            f"{app_file} defines no clearway app: add `app = clearway.App(\"name\")` "
            "and decorate functions with @app.service or @app.worker"
        )
    if len(apps) > 1:
        names = ", ".join(a.name for a in apps)
        raise AppLoadError(f"{app_file} defines {len(apps)} apps ({names}): keep one app per file")
    return apps[0]
