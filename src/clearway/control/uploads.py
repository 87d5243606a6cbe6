"""Receiving a project upload and unpacking it under limits, into a digest.

An upload is untrusted input that a process running as root unpacks, so
nothing about it is taken on trust (issue 5 found a 1 MB gzip that expanded to
1 GiB in the control plane's memory):

* the body is streamed to a file on disk, never held in memory, and refused
  (413) past ``max_compressed`` bytes;
* the archive is read as a stream (gzip → tar, one pass) in a worker thread,
  counting the bytes actually *decompressed* — a header's size field is a
  claim, the decompressor's output is a fact — and refused past
  ``max_uncompressed`` bytes or ``max_members`` members, with memory bounded
  by one chunk (and by a cap on metadata headers, which tarfile reads whole);
* each member goes through tarfile's ``data`` filter (no absolute paths, no
  ``..``, no links out of the tree, no devices) and may not be written through
  a symlink or twice;
* the digest covers every member's name, type, mode, symlink target and
  content in an unambiguous encoding: SHA-256 over canonical JSON of sorted
  ``[name, type, mode, linkname, sha256(content)]`` rows. Names and contents
  can no longer trade bytes, and a symlink retargeted or a mode flipped is a
  different snapshot. The mode recorded is the one the snapshot gets
  (0640/0750 files, 0750 directories): what runs is what is hashed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from clearway.control.faults import StorageFull, is_disk_full
from clearway.exceptions import APIError
from clearway.spec.ids import ENV_NAME

MiB = 1024 * 1024

#: Environment variable names a revision may set (the spec's own rule).
ENV_KEY = ENV_NAME

#: Largest GNU long-name / pax header accepted: tarfile reads these whole into memory.
_MAX_META_HEADER = 1 * MiB
_CHUNK = 64 * 1024

FILE_MODE = 0o640
EXEC_MODE = 0o750
DIR_MODE = 0o750


@dataclass(frozen=True)
class UploadLimits:
    """What one ``POST /v1/deploy`` may bring."""

    #: The gzipped archive as sent.
    max_compressed: int = 256 * MiB
    #: The tar stream once decompressed (contents plus tar headers).
    max_uncompressed: int = 512 * MiB
    max_members: int = 20_000


def parse_env(items: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs, checked; errors name the key and never echo a value."""
    pairs: dict[str, str] = {}
    for index, item in enumerate(items, start=1):
        key, sep, value = item.partition("=")
        if not sep:
            raise APIError(422, f"env entry #{index} has no '=': write it as KEY=VALUE")
        check_env(key, value)
        pairs[key] = value
    return pairs


def check_env(key: str, value: str | None = None) -> None:
    """Refuse (422) a variable name or value no environment can hold; never echoes the value."""
    if not ENV_KEY.fullmatch(key):
        shown = key if len(key) <= 64 and key.isprintable() else f"{key[:64]!r}"
        raise APIError(
            422,
            f"env key {shown!r} is not a valid variable name: use letters, digits and '_', "
            "not starting with a digit",
        )
    if value is not None and "\0" in value:
        raise APIError(422, f"env {key}: the value contains a NUL byte, which no environment can hold")


async def receive(body: AsyncIterator[bytes], directory: Path, *, max_bytes: int) -> Path:
    """Stream a request body into a new file in ``directory``; the caller deletes it."""
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".tar.gz", dir=directory)
    path = Path(name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in body:
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(
                        413,
                        f"the upload is larger than {max_bytes // MiB} MiB compressed: leave data, "
                        "virtualenvs and build output out (list them in a .clearwayignore file)",
                    )
                handle.write(chunk)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise StorageFull(directory, what="receiving the upload") from exc
        raise
    return path


class _TooLarge(Exception):
    pass


class _CountingReader:
    """A read-only stream that counts what it hands out and stops past a limit."""

    def __init__(self, raw: gzip.GzipFile, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        data = self._raw.read(min(size, self._limit - self.count + 1))
        self.count += len(data)
        if self.count > self._limit:
            raise _TooLarge
        return data


class _CheckedTarInfo(tarfile.TarInfo):
    """Refuses metadata headers (long names, pax) big enough to exhaust memory:
    tarfile reads them into memory whole, before any member is seen."""

    _META_TYPES = frozenset(
        {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
    )

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in self._META_TYPES and self.size > _MAX_META_HEADER:
            raise APIError(400, f"the upload has a {self.size}-byte metadata header; use `clearway deploy`")
        # A private hook of tarfile (stable since Python 2): the only place to
        # see a header's size before tarfile reads the data it announces.
        return super()._proc_member(tarfile_)  # type: ignore[misc]


def unpack(archive: Path, target: Path, limits: UploadLimits) -> str:
    """Unpack the gzipped tar ``archive`` into the empty directory ``target``.

    Returns the snapshot digest (64 hex digits). Raises ``APIError`` 413 past
    the limits, 400 for anything that is not a safe archive, and
    ``StorageFull`` when the disk fills.
    """
    try:
        return _unpack(archive, target, limits)
    except _TooLarge:
        raise APIError(
            413,
            f"the project expands to more than {limits.max_uncompressed // MiB} MiB: leave data, "
            "virtualenvs and build output out (list them in a .clearwayignore file)",
        ) from None
    except (tarfile.TarError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise APIError(400, f"the upload is not a gzipped tar archive ({exc}); use `clearway deploy`") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageFull(target, what="unpacking the upload") from exc
        raise


def _unpack(archive: Path, target: Path, limits: UploadLimits) -> str:
    rows: list[list[Any]] = []
    content_hashes: dict[str, tuple[str, int]] = {}
    seen: set[str] = set()
    root = os.path.realpath(target)
    with gzip.open(archive, "rb") as raw:
        counted = _CountingReader(raw, limits.max_uncompressed)
        # Stream mode ("r|"): members are read in order, once, never seeked.
        with tarfile.open(fileobj=counted, mode="r|", tarinfo=_CheckedTarInfo) as tar:  # type: ignore[call-overload]
            members = 0
            for original in tar:
                members += 1
                if members > limits.max_members:
                    raise APIError(
                        413,
                        f"the upload has more than {limits.max_members} files: leave data, virtualenvs "
                        "and build output out (list them in a .clearwayignore file)",
                    )
                try:
                    member = tarfile.data_filter(original, root)
                except tarfile.FilterError as exc:
                    raise APIError(400, f"the upload has an unsafe entry ({exc}); use `clearway deploy`") from None
                name = os.path.normpath(member.name).rstrip("/")
                if name in ("", "."):
                    continue
                if name in seen:
                    raise APIError(400, f"the upload holds {name!r} twice; use `clearway deploy`")
                seen.add(name)
                dest = Path(root, name)
                parent = dest.parent
                parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                if os.path.realpath(parent) != str(parent):
                    raise APIError(400, f"the upload writes {name!r} through a symlink; use `clearway deploy`")
                if member.isdir():
                    dest.mkdir(mode=DIR_MODE, exist_ok=True)
                    dest.chmod(DIR_MODE)
                    rows.append([name, "dir", DIR_MODE, "", ""])
                elif member.isreg():
                    mode = EXEC_MODE if member.mode & 0o111 else FILE_MODE
                    source = tar.extractfile(original)
                    assert source is not None
                    digest = _write(source, dest, mode)
                    content_hashes[name] = (digest, mode)
                    rows.append([name, "file", mode, "", digest])
                elif member.issym():
                    os.symlink(member.linkname, dest)
                    rows.append([name, "symlink", 0o777, member.linkname, ""])
                elif member.islnk():
                    # A hard link to an earlier member becomes a copy: snapshots
                    # get their own modes, and a copy needs no trust in link counts.
                    linked = os.path.normpath(member.linkname)
                    if linked not in content_hashes:
                        raise APIError(400, f"the upload links {name!r} to {linked!r}, which is not a file before it")
                    digest, mode = content_hashes[linked]
                    with Path(root, linked).open("rb") as source_file:
                        _write(source_file, dest, mode)
                    content_hashes[name] = (digest, mode)
                    rows.append([name, "file", mode, "", digest])
                else:
                    raise APIError(400, f"the upload holds {name!r}, which is neither a file, a directory nor a link")
    target.chmod(DIR_MODE)
    rows.sort(key=lambda row: str(row[0]))
    canonical = json.dumps(rows, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write(source: IO[bytes], dest: Path, mode: int) -> str:
    digest = hashlib.sha256()
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise APIError(400, f"the upload writes {dest.name!r} over another entry; use `clearway deploy`") from None
    with os.fdopen(fd, "wb") as handle:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            handle.write(chunk)
        os.fchmod(handle.fileno(), mode)
    return digest.hexdigest()
