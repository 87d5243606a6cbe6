"""Packing a project directory for upload: a gzipped tar, minus what never ships.

Version-control data, virtualenvs, caches and bytecode are left out, plus any
pattern listed in a ``.clearwayignore`` file (one glob per line).
"""

from __future__ import annotations

import fnmatch
import io
import tarfile
from pathlib import Path

ALWAYS_IGNORED = (".git", ".hg", ".venv", "venv", "__pycache__", "node_modules", ".mypy_cache",
                  ".pytest_cache", ".ruff_cache", "*.pyc", ".clearway")


def ignore_patterns(root: Path) -> list[str]:
    patterns = list(ALWAYS_IGNORED)
    ignore_file = root / ".clearwayignore"
    if ignore_file.is_file():
        for line in ignore_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line.rstrip("/"))
    return patterns


def pack(root: Path) -> bytes:
    patterns = ignore_patterns(root)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        for part in parts:
            if any(fnmatch.fnmatch(part, p) for p in patterns):
                return None
        if any(fnmatch.fnmatch(info.name, p) for p in patterns):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0  # same code, same archive, same content digest
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(root.iterdir()):
            archive.add(path, arcname=path.name, filter=keep)
    return buffer.getvalue()
