"""The log writer: ``python -m clearway.runtime.logwriter PATH --max-bytes N --keep K``.

Why a process between a replica and its log file: when the replica's stdout
*was* the file, nothing could stop it growing between two checks of its size
(a replica writing 370 MB/s filled 100 MB before a 10 s rotation loop noticed),
and copy-and-truncate rotation needs as much free space again as the file
holds, so it could not free a full disk. Here the replica writes into a pipe and
this process, the only writer of ``PATH``, enforces the cap *before* each
write:

* it appends what it reads to ``PATH``; when a write would take ``PATH`` past
  ``max_bytes`` it first rotates by rename (``PATH.<keep>`` deleted,
  ``PATH.<n>`` -> ``PATH.<n+1>``, ``PATH`` -> ``PATH.1``) and opens a new
  ``PATH``. Disk use is bounded by ``(keep + 1) * max_bytes`` at all times
  (plus the supervisor's own short lines, which it appends to ``PATH``
  directly); rename needs no free space.
* on ``ENOSPC``/``EDQUOT`` it deletes the rotated copies and tries again; if
  that is not enough, it drops output (the replica never blocks on a full disk)
  and, once a write succeeds again, writes one line saying how many bytes were
  dropped.
* it runs in its own session, so it survives a crash of the control plane and
  is not reached by signals sent to the replica's process group; it exits at
  end of file, when every process holding the pipe's write end (the replica
  and anything it started) is gone.

The replica cannot touch its log: it holds only the pipe. A slow disk slows a
replica that logs faster than the disk writes (the pipe fills), which is the
back-pressure a file would have given too.

It imports nothing but the standard library, so the launcher may run this file
directly (``python -I -S .../logwriter.py``) without loading clearway.

``--from-stdin`` starts a *spare* writer that learns its destination from the
first line of its input (``PATH<TAB>MAX_BYTES<TAB>KEEP``): the fork launcher
keeps one started, so a forked replica does not wait for a new interpreter to
start before it may run. The launcher writes that line into the pipe before
any process that could write to it exists, so nobody else can choose it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys

__all__ = ["LogWriter", "main"]

_CHUNK = 64 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class LogWriter:
    """Appends to ``path`` under a size cap, rotating by rename. Not thread-safe."""

    def __init__(self, path: str, *, max_bytes: int, keep: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = max(0, keep)
        self.dropped = 0
        self._fd: int | None = None
        self._open()

    def _open(self) -> bool:
        """Open ``path`` if it is not open; False when that failed (no space for an inode)."""
        if self._fd is None:
            try:
                self._fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
                )
            except OSError as error:
                if error.errno not in _NO_SPACE:
                    raise
                self.free_space()
                try:
                    self._fd = os.open(
                        self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
                    )
                except OSError:
                    return False
        return True

    def _size(self) -> int:
        # fstat, not a counter: the supervisor appends its own lines to the same file.
        assert self._fd is not None
        return os.fstat(self._fd).st_size

    def _rotated(self, n: int) -> str:
        return f"{self.path}.{n}"

    def rotate(self) -> None:
        if self.keep == 0:
            _unlink(self.path)
        else:
            _unlink(self._rotated(self.keep))
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(self._rotated(n), self._rotated(n + 1))
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, self._rotated(1))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._open()

    def free_space(self) -> None:
        """Delete every rotated copy (the disk is full)."""
        for n in range(1, self.keep + 1):
            _unlink(self._rotated(n))

    def write(self, data: bytes) -> None:
        """Append ``data`` under the cap; drops it (counted) if the disk stays full."""
        if self.dropped:
            notice = f"[clearway log] disk full: {self.dropped} bytes of output were dropped\n"
            dropped, self.dropped = self.dropped, 0
            if not self._append(notice.encode()):
                self.dropped = dropped + len(data)
                return
        while data:
            piece, data = data[: self.max_bytes], data[self.max_bytes :]
            if not self._append(piece):
                self.dropped += len(piece) + len(data)
                return

    def _append(self, data: bytes) -> bool:
        if not self._open():
            return False
        if self._size() + len(data) > self.max_bytes and self._size() > 0:
            self.rotate()
            if self._fd is None:
                return False
        freed = False
        view = memoryview(data)
        while view:
            assert self._fd is not None
            try:
                written = os.write(self._fd, view)
            except OSError as error:
                if error.errno not in _NO_SPACE:
                    raise
                if freed:
                    return False
                self.free_space()
                freed = True
                continue
            view = view[written:]
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clearway.runtime.logwriter")
    parser.add_argument("path", nargs="?")
    parser.add_argument("--max-bytes", type=int)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--from-stdin", action="store_true", help="read PATH, MAX_BYTES, KEEP from the first line")
    args = parser.parse_args(argv)
    source = sys.stdin.fileno()
    pending = b""
    if args.from_stdin:
        while b"\n" not in pending:
            data = os.read(source, _CHUNK)
            if not data:
                return 0  # never given a destination: the launcher let it go
            pending += data
        header, pending = pending.split(b"\n", 1)
        path, max_bytes, keep = header.decode("utf-8", "surrogateescape").split("\t")
        args.path, args.max_bytes, args.keep = path, int(max_bytes), int(keep)
    if args.path is None or args.max_bytes is None:
        parser.error("PATH and --max-bytes are required (or --from-stdin)")
    writer = LogWriter(args.path, max_bytes=args.max_bytes, keep=args.keep)
    if pending:
        writer.write(pending)
    while True:
        try:
            data = os.read(source, _CHUNK)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        if not data:
            writer.close()
            return 0
        try:
            writer.write(data)
        except OSError:
            # Anything but a full disk (the file system went read-only, the directory
            # vanished): keep draining the pipe so the replica never blocks, count it.
            writer.dropped += len(data)


if __name__ == "__main__":
    sys.exit(main())
