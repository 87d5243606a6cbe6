"""Real project archives, as `clearway deploy` uploads them."""

from __future__ import annotations

import gzip
import io
import tarfile
import textwrap
from pathlib import Path

from clearway.cli.packaging import pack

HELLO = """
import clearway as cw

app = cw.App("{name}")

@app.service(replicas=1, public=True)
def web():
    return None
"""


def project(tmp_path: Path, name: str = "hello", extra: str = "", files: dict[str, str] | None = None) -> Path:
    root = tmp_path / f"project-{name}"
    root.mkdir(exist_ok=True)
    (root / "app.py").write_text(textwrap.dedent(HELLO.format(name=name)) + textwrap.dedent(extra))
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def archive(root: Path, dest: Path) -> Path:
    dest.write_bytes(pack(root))
    return dest


def tar_gz(dest: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A gzipped tar of exactly these members (for archives `pack` would never make)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    dest.write_bytes(gzip.compress(buffer.getvalue()))
    return dest


def file_member(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def link_member(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None
