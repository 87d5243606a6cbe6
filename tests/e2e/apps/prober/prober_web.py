"""The prober's ASGI app (no framework: one less thing that could fail)."""

import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

import clearway as cw


def _attempt(action):
    try:
        return {"ok": True, "result": action()}
    except Exception as exc:  # the point is to report, not to crash
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _read(path):
    with open(path, "rb") as handle:
        return handle.read(4096).decode(errors="replace")


def _write(path):
    with open(path, "w") as handle:
        handle.write("pwned")
    return "written"


def _scan_proc(needle):
    """Every /proc/<pid>/environ this replica can read that holds ``needle``."""
    found, readable = [], 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                data = handle.read()
        except OSError:
            continue
        readable += 1
        if needle.encode() in data:
            found.append(int(entry))
    return {"found": found, "readable": readable, "pids": sorted(int(e) for e in os.listdir("/proc") if e.isdigit())}


def _connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
    return "connected"


def _http(url, headers):
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return {"status": response.status, "body": response.read(2000).decode(errors="replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(2000).decode(errors="replace")}


async def api(scope, receive, send):
    if scope["type"] != "http":
        return
    query = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
    path = scope["path"]
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    if path == "/healthz":
        result = {"ok": True}
    elif path == "/whoami":
        result = {"ok": True, "caller": headers.get("x-clearway-caller"), "identity": headers.get("x-clearway-identity")}
    elif path == "/read":
        result = _attempt(lambda: _read(query["path"]))
    elif path == "/write":
        result = _attempt(lambda: _write(query["path"]))
    elif path == "/listdir":
        result = _attempt(lambda: sorted(os.listdir(query["path"])))
    elif path == "/env":
        result = {"ok": True, "env": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid()}
    elif path == "/proc":
        result = _attempt(lambda: _scan_proc(query["needle"]))
    elif path == "/connect":
        result = _attempt(lambda: _connect_unix(query["path"]))
    elif path == "/call":
        extra = json.loads(query.get("headers", "{}"))
        if query.get("identity") == "1":
            extra.update(cw.identity_headers())
        result = _attempt(lambda: _http(query["url"], extra))
    else:
        result = {"ok": False, "error": f"no probe {path}"}
    body = json.dumps(result).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
