"""Turning an upload into an immutable revision.

A revision is code + spec + environment, frozen. The code is unpacked into a
content-addressed directory (``code/<sha256 prefix>``), so the same push twice
shares one copy and nothing can modify a revision's code after the fact; the
spec is read by importing the app in a *child* process (``clearway.sdk.inspect``)
so that the user's import-time crash, hang or ``sys.exit`` never reaches the
control plane. A spec error comes back with the user's ``file:line``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from clearway.control.store import Revision, Store
from clearway.exceptions import APIError
from clearway.spec.model import AppSpec

#: How long importing the user's app to read its spec may take.
INSPECT_TIMEOUT = 60.0


class RevisionBuilder:
    def __init__(self, store: Store, home: Path, *, python: str = sys.executable) -> None:
        self.store = store
        self.code_root = home / "code"
        self.code_root.mkdir(parents=True, exist_ok=True)
        self.python = python

    async def build(self, archive: tarfile.TarFile, *, app_file: str, env: dict[str, str]) -> Revision:
        if Path(app_file).is_absolute() or ".." in Path(app_file).parts:
            raise APIError(422, f"app_file {app_file!r} must be a path inside the project")
        staging = Path(tempfile.mkdtemp(prefix="upload-", dir=self.code_root))
        try:
            digest = await asyncio.to_thread(self._unpack, archive, staging)
            if not (staging / app_file).is_file():
                raise APIError(
                    422,
                    f"the project has no {app_file}: create it, defining `app = clearway.App(\"name\")`, "
                    "or name another file with --file",
                )
            spec = await self._inspect(staging, app_file)
            code_dir = self.code_root / digest
            if code_dir.exists():
                shutil.rmtree(staging)
            else:
                os.replace(staging, code_dir)
                # Immutable from here on: read-only for everyone but root.
                await asyncio.to_thread(_make_read_only, code_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.store.create_revision(spec, code_dir=code_dir, app_file=app_file, env=env)

    @staticmethod
    def _unpack(archive: tarfile.TarFile, target: Path) -> str:
        digest = hashlib.sha256()
        with archive:
            members = sorted(archive.getmembers(), key=lambda m: m.name)
            for member in members:
                digest.update(member.name.encode())
                if member.isfile():
                    handle = archive.extractfile(member)
                    if handle is not None:
                        digest.update(handle.read())
            try:
                archive.extractall(target, filter="data")
            except tarfile.FilterError as exc:
                raise APIError(400, f"the upload has an unsafe entry ({exc}); use `clearway deploy`") from None
        return digest.hexdigest()[:20]

    async def _inspect(self, code_dir: Path, app_file: str) -> AppSpec:
        proc = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "clearway.sdk.inspect",
            str(code_dir / app_file),
            cwd=code_dir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), INSPECT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise APIError(
                422,
                f"importing {app_file} took longer than {INSPECT_TIMEOUT:.0f}s: importing the app "
                "must not do work; move it into the service or worker function",
            ) from None
        result: dict[str, Any] | None = None
        for line in reversed(out.decode(errors="replace").splitlines()):
            if line.startswith("{"):
                try:
                    result = json.loads(line)
                except json.JSONDecodeError:
                    continue
                break
        if result is None:
            raise APIError(
                422,
                f"importing {app_file} ended the process (exit code {proc.returncode}) before clearway could read the app",
                details=err.decode(errors="replace")[-4000:] or None,
            )
        if not result["ok"]:
            message = result["error"]
            location = result.get("location")
            if location and location.startswith(str(code_dir)):
                location = location[len(str(code_dir)) + 1 :]
            raise APIError(422, f"{location}: {message}" if location else message, details=result.get("details"))
        return AppSpec.model_validate(result["spec"])


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            path.chmod(path.stat().st_mode & 0o555)
        for name in dirnames:
            path = Path(dirpath) / name
            path.chmod(path.stat().st_mode & 0o755)
