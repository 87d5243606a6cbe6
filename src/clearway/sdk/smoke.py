"""``python -m clearway.sdk.smoke APP_FILE``: run the app's smoke checks against a canary.

The control plane runs this isolated like the spec reader (``RevisionBuilder.
run_isolated``: the app's environment, a throwaway uid, nothing of the
platform's), so a smoke check is app code with no more reach than the app's
own replicas. It reaches the canary through the gateway, pinned to the
canary's revision with a pin token minted for that one revision: the canary
gets no user traffic yet, and the checks see exactly what users will.

Each check is called with an `SmokeClient`; any exception fails it (a failed
``assert`` is the usual way). The output is one line per check — ``✓ name``
or ``✗ name: reason`` with the check's own frames of the traceback — and the
exit code is 0 only when every check passed.

Environment: ``CLEARWAY_SMOKE_URL`` (the gateway, ``http://127.0.0.1:PORT``),
``CLEARWAY_SMOKE_HOST`` (the app's host), ``CLEARWAY_SMOKE_REVISION`` and
``CLEARWAY_SMOKE_PIN_TOKEN``.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import traceback
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clearway.exceptions import AppLoadError, SpecError
from clearway.sdk.loader import load_app

__all__ = ["SmokeClient", "SmokeResponse", "main"]

#: How long one smoke request may take.
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class SmokeResponse:
    status: int
    headers: dict[str, str]
    body: bytes = field(repr=False)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class SmokeClient:
    """HTTP to one revision of the app through the gateway (what a smoke check gets)."""

    def __init__(self, base_url: str, host: str, revision: str, pin_token: str) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self._address = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._headers = {
            "host": host,
            "x-clearway-revision": revision,
            "x-clearway-pin-token": pin_token,
        }
        self.revision = revision

    def request(
        self, method: str, path: str, *, body: bytes | None = None, json_body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> SmokeResponse:
        if not path.startswith("/"):
            raise ValueError(f"smoke request paths start with '/', got {path!r}")
        sent = {**(headers or {}), **self._headers}
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent.setdefault("content-type", "application/json")
        conn = http.client.HTTPConnection(*self._address, timeout=REQUEST_TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            return SmokeResponse(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def get(self, path: str, *, headers: dict[str, str] | None = None) -> SmokeResponse:
        return self.request("GET", path, headers=headers)

    def post(
        self, path: str, *, json: Any = None, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> SmokeResponse:
        return self.request("POST", path, body=body, json_body=json, headers=headers)


def _reason(exc: BaseException, app_root: Path) -> str:
    """The exception and the frames of the user's files (where the fix is)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(str(app_root))]
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text + where


def run(app_file: Path, client: SmokeClient) -> tuple[bool, list[str]]:
    app = load_app(app_file)
    root = app_file.resolve().parent
    lines: list[str] = []
    ok = True
    for name, (_, func) in app.smoke_checks.items():
        try:
            func(client)
        except Exception as exc:
            ok = False
            lines.append(f"✗ {name}: {_reason(exc, root)}")
        else:
            lines.append(f"✓ {name}")
    return ok, lines


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m clearway.sdk.smoke APP_FILE", file=sys.stderr)
        return 2
    client = SmokeClient(
        os.environ["CLEARWAY_SMOKE_URL"],
        os.environ["CLEARWAY_SMOKE_HOST"],
        os.environ["CLEARWAY_SMOKE_REVISION"],
        os.environ["CLEARWAY_SMOKE_PIN_TOKEN"],
    )
    try:
        ok, lines = run(Path(sys.argv[1]), client)
    except (AppLoadError, SpecError) as exc:
        print(f"✗ the app could not be loaded: {exc}")
        return 1
    print("\n".join(lines), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
