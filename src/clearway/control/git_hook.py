"""The ``pre-receive`` hook of every app repository (see ``control.git``).

git runs it (``python -m clearway.control.git_hook``, with the platform's
interpreter) after receiving a push and before moving any ref, with one line
``<old> <new> <ref>`` per ref update on stdin. For each it calls ``POST
/v1/git/<app>/push`` on the control plane with the per-push token git's
environment carries (``CLEARWAY_PUSH_TOKEN``; never the operator's token), and
prints the lines the control plane streams back, as they come: git relays
them to the pusher as ``remote:`` lines. For every branch that is not being
deleted (production, or a preview) the request body is ``git archive
--format=tar.gz <new>``, made here because only inside the hook (git's
quarantine environment) are the pushed objects readable; deletions, tags and
other refs send no body. Updates are sent one after the other, in the order
git gives them. The hook exits 1, so git rejects the whole push, when any
update is rejected.

Standard library only: it runs on every push and must start fast.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

ACCEPTED = "clearway-push: accepted"
ZERO_SHA = "0" * 40
#: A build (environment, tests, start) can take minutes; a dead control plane is seen at once.
TIMEOUT = 3600.0


def _archive(sha: str) -> Iterator[bytes]:
    proc = subprocess.Popen(
        ["git", "archive", "--format=tar.gz", sha], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        while chunk := proc.stdout.read(65536):
            yield chunk
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise RuntimeError(f"git archive {sha} failed")


def carries_archive(ref: str, new: str) -> bool:
    """Every pushed branch but a deletion is built (``control.git.carries_archive``, kept in step)."""
    return ref.startswith("refs/heads/") and len(ref) > len("refs/heads/") and new != ZERO_SHA


def update(app: str, old: str, new: str, ref: str) -> bool:
    """Send one ref update to the control plane and print its answer; True if accepted."""
    api = urllib.parse.urlsplit(os.environ["CLEARWAY_API_URL"])
    query = urllib.parse.urlencode({"ref": ref, "old": old, "new": new})
    conn = http.client.HTTPConnection(api.hostname or "127.0.0.1", api.port, timeout=TIMEOUT)
    headers = {"authorization": f"Bearer {os.environ['CLEARWAY_PUSH_TOKEN']}"}
    try:
        if carries_archive(ref, new):
            headers["content-type"] = "application/gzip"
            conn.request("POST", f"/v1/git/{app}/push?{query}", body=_archive(new), headers=headers, encode_chunked=True)
        else:
            conn.request("POST", f"/v1/git/{app}/push?{query}", headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            print(f"clearway refused the push ({response.status}): {response.read().decode(errors='replace').strip()}")
            return False
        accepted = False
        while raw := response.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("clearway-push: "):
                accepted = line == ACCEPTED
                continue
            print(line, flush=True)
        return accepted
    except (OSError, http.client.HTTPException, RuntimeError) as exc:
        print(f"error: cannot reach the clearway control plane ({exc}): the push is rejected", flush=True)
        return False
    finally:
        conn.close()


def main() -> int:
    # GIT_DIR is the repository, "<home>/git/<app>.git" (or "." when git runs us inside it).
    git_dir = Path(os.environ.get("GIT_DIR", ".")).resolve()
    app = git_dir.name.removesuffix(".git")
    ok = True
    for line in sys.stdin:
        parts = line.split()
        if len(parts) == 3:
            old, new, ref = parts
            ok = update(app, old, new, ref) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
