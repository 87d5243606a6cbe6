"""Tiny wheels made on the spot, for tests that install packages with uv.

A wheel is a zip of the package, plus ``<name>-<version>.dist-info/`` with
``METADATA``, ``WHEEL`` and ``RECORD`` (every file's sha256 and size). That is
all uv needs, so tests never reach a package index: they put wheels in a
directory and point ``UV_FIND_LINKS`` at it.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(
    directory: Path,
    name: str,
    version: str,
    *,
    module: str | None = None,
    requires: tuple[str, ...] = (),
    requires_python: str | None = None,
) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``directory``; its module's
    ``__version__`` is ``version``."""
    directory.mkdir(parents=True, exist_ok=True)
    module = module or name.replace("-", "_")
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    if requires_python:
        metadata += f"Requires-Python: {requires_python}\n"
    files = {
        f"{module}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{dist}.dist-info/METADATA": metadata.encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: clearway-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    record += f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def demo_wheelhouse(directory: Path) -> Path:
    """``cwdemo`` 1.0 and 2.0, and a ``uvicorn`` 0.1.0 too old for clearway's replica runtime."""
    make_wheel(directory, "cwdemo", "1.0")
    make_wheel(directory, "cwdemo", "2.0")
    make_wheel(directory, "uvicorn", "0.1.0")
    return directory
