from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.platform import Platform, free_port


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    running = Platform(home=tmp_path / "home", port=free_port())
    running.up()
    try:
        yield running
    finally:
        running.down()


def write_app(root: Path, body: str, *, name: str = "demo") -> Path:
    """A small project whose app.py is ``body`` (with ``cw`` and ``app`` defined)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(f"import clearway as cw\napp = cw.App({name!r})\n{body}")
    return root


ASGI_APP = """
@app.service(replicas={replicas}, public=True, health="/healthz")
def web():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b"ok" if scope["path"] == "/healthz" else {text!r}.encode()
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": body}})
    return asgi
"""


def asgi_app(text: str, replicas: int = 2) -> str:
    """A public ASGI service answering ``text`` (``/healthz``: ok), for ``write_app``."""
    return ASGI_APP.format(text=text, replicas=replicas)
