"""``python -m clearway.sdk.inspect APP_FILE``: print the app's spec as JSON.

The control plane runs this in a child process, in the environment the app
will run in, rather than importing user code into itself: a user's import-time
side effects, crashes or hangs must never take the control plane down.

Output on stdout is one JSON object: ``{"ok": true, "spec": {...}}`` or
``{"ok": false, "error": "...", "location": "file:line" | null, "details": "traceback" | null}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from clearway.exceptions import AppLoadError, SpecError
from clearway.sdk.loader import load_app


def _relative(location: str | None, root: Path) -> str | None:
    """``/tmp/upload-x/app.py:3`` -> ``app.py:3``: the path the user knows."""
    if location is None:
        return None
    prefix = str(root) + os.sep
    return location[len(prefix) :] if location.startswith(prefix) else location


def inspect_app(app_file: Path) -> dict[str, Any]:
    root = app_file.resolve().parent
    try:
        spec = load_app(app_file).spec()
    except SpecError as exc:
        return {"ok": False, "error": exc.message, "location": _relative(exc.location, root), "details": None}
    except AppLoadError as exc:
        return {"ok": False, "error": exc.message, "location": None, "details": exc.details}
    data = spec.model_dump(mode="json")
    for component in data["components"]:
        if component.get("source"):
            component["source"]["file"] = _relative(component["source"]["file"], root)
    return {"ok": True, "spec": data}


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m clearway.sdk.inspect APP_FILE", file=sys.stderr)
        raise SystemExit(2)
    result = inspect_app(Path(sys.argv[1]))
    # The user's code may have printed to stdout: the JSON goes on the last line.
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
