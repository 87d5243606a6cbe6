"""What a replica's exit code means.

Shared by the replica process, which chooses the code, and the supervisor,
which turns it into words in ``ReplicaStatus.last_error``. It lives apart from
`clearway.runtime.replica` so the supervisor never imports the module that
``python -m`` runs as ``__main__`` (which would make runpy warn).
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    # Stopped on request (SIGTERM), or a worker function returned.
    OK = 0
    # The user's code raised while running (a worker's exception).
    APP_ERROR = 1
    # The replica was started without a readable spec: a bug in the platform.
    BAD_SPEC = 2
    # The app file could not be imported, or the service function raised.
    APP_LOAD = 3
    # No such component, or the service function did not return a web app.
    BAD_COMPONENT = 4
    # The server did not start, e.g. the app's lifespan startup failed.
    SERVER_START = 5
    # A sync singleton's leadership was lost while it ran: the process ended so it cannot act.
    LEADERSHIP_LOST = 6

    def describe(self) -> str:
        return {
            ExitCode.OK: "exited normally",
            ExitCode.APP_ERROR: "the component raised an exception",
            ExitCode.BAD_SPEC: "the runtime passed an unreadable spec",
            ExitCode.APP_LOAD: "could not load the app",
            ExitCode.BAD_COMPONENT: "the component is missing or did not return a web app",
            ExitCode.SERVER_START: "the web server failed to start",
            ExitCode.LEADERSHIP_LOST: "its singleton lost leadership while running",
        }[self]
