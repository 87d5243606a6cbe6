"""The access log: one line per request, written without slowing requests down.

Lines are appended to an in-memory list and written to the file by a
supervised task once a second (or when 256 KiB are pending), so a request
never waits on the disk.  The format is the familiar combined-like shape with
the gateway's own facts appended as ``key=value`` fields::

    127.0.0.1 - - [02/Jan/2025:10:00:00 +0000] "GET /path HTTP/1.1" 200 5 0.412ms app=hello revision=hello-3 upstream=127.0.0.1:40123 request_id=...

The timestamp is formatted once per second, not once per request.  The
request target comes from a parser that rejects control characters and
spaces, so a line cannot be forged by a client.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TextIO

__all__ = ["AccessLog"]

_FLUSH_BYTES = 256 * 1024


class AccessLog:
    """Buffered writer of access-log lines to one file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lines: list[str] = []
        self._pending = 0
        self._second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now))
        return self._stamp

    def log(
        self,
        client: str,
        method: bytes,
        target: bytes,
        version: str,
        status: int,
        sent: int,
        duration: float,
        app: str,
        revision: str,
        upstream: str,
        request_id: bytes,
    ) -> None:
        line = (
            f'{client} - - [{self._timestamp()}] "{method.decode("latin-1")} '
            f'{target.decode("latin-1")} HTTP/{version}" {status} {sent} {duration * 1000:.3f}ms '
            f"app={app or '-'} revision={revision or '-'} upstream={upstream or '-'} "
            f"request_id={request_id.decode('latin-1')}\n"
        )
        self._lines.append(line)
        self._pending += len(line)
        if self._pending >= _FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            lines, self._lines, self._pending = self._lines, [], 0
            self._file.write("".join(lines))
            self._file.flush()

    async def run_flusher(self, interval: float = 1.0) -> None:
        """Flush once per ``interval`` until cancelled (a supervised task)."""
        while True:
            await asyncio.sleep(interval)
            self.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()
