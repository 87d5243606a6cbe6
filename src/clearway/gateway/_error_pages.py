"""The gateway's own responses: short text/plain errors that say what to do.

Someone reading a gateway error is usually a developer with curl, so every body
says what happened in one sentence and what to try in another - and never
reveals addresses of replicas or other internals.  Whatever the client sent
that we echo back (host, path) is truncated and stripped of control bytes.
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["error_response", "printable"]


def printable(value: bytes, limit: int = 200) -> str:
    """Client-sent bytes made safe to echo in an error message."""
    text = value[:limit].decode("latin-1")
    text = "".join(ch if " " <= ch < "\x7f" else "?" for ch in text)
    return text + ("..." if len(value) > limit else "")


def error_response(
    status: int,
    message: str,
    *,
    request_id: bytes = b"",
    keep_alive: bool = False,
    head_only: bool = False,
    extra_headers: bytes = b"",
) -> bytes:
    """A complete HTTP/1.1 response with a text/plain ``message`` body."""
    body = (message.rstrip() + "\n").encode("utf-8")
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode("ascii")),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"cache-control: no-store\r\n",
    ]
    if request_id:
        lines.append(b"x-request-id: " + request_id + b"\r\n")
    lines.append(b"connection: keep-alive\r\n" if keep_alive else b"connection: close\r\n")
    lines.append(extra_headers)
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)
