"""The one exception hierarchy of clearway.

Errors are part of the API: every message says what is wrong *and* what to do
about it, because the person reading it is usually a developer at a terminal.

    ClearwayError
    ├── SpecError                 the app description is invalid (points at file:line)
    ├── AppLoadError              the app file is missing or fails to import
    ├── ControlPlaneError         talking to the control plane went wrong
    │   ├── NotRunningError       no control plane is running for this CLEARWAY_HOME
    │   ├── AuthenticationError   the API token is missing or wrong
    │   └── APIError              the API refused a request (carries status + body)
    ├── DeployError               a revision failed to build, import, start or become ready
    ├── RuntimeStartError         a replica or the gateway could not be started
    ├── FunctionError             a function called through the platform failed (status + error id)
    ├── CoordinationError         a lock, lease or election operation went wrong (clearway.coordination)
    │   ├── LeaseGone             the lease expired, was revoked or never existed
    │   └── CoordinationUnavailable  the coordination backend (embedded store, etcd) does not answer
    ├── StorageFull               the disk holding the state is full (control.faults; API 507)
    └── StateIntegrityError       state.db is damaged or lost commits (control.faults; refused at start)

The last two live with the control plane, which alone raises them.
"""

from __future__ import annotations

__all__ = [
    "APIError",
    "AppLoadError",
    "AuthenticationError",
    "ClearwayError",
    "ControlPlaneError",
    "CoordinationError",
    "CoordinationUnavailable",
    "DeployError",
    "FunctionError",
    "LeaseGone",
    "NotRunningError",
    "RuntimeStartError",
    "SpecError",
]


class ClearwayError(Exception):
    """Base class of every error clearway raises on purpose."""


class SpecError(ClearwayError):
    """The app description is invalid.

    ``location`` is ``"path/to/app.py:12"`` when the error can be tied to a line
    of the user's code (the decorator call that declared the bad component).
    """

    def __init__(self, message: str, *, location: str | None = None) -> None:
        self.message = message
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)


class AppLoadError(ClearwayError):
    """The app file is missing, defines no app, or raises while being imported.

    ``details`` holds the traceback of the user's code, when there is one.
    """

    def __init__(self, message: str, *, details: str | None = None) -> None:
        self.message = message
        self.details = details
        super().__init__(message if not details else f"{message}\n{details}")


class ControlPlaneError(ClearwayError):
    """Talking to the control plane went wrong."""


class NotRunningError(ControlPlaneError):
    """No control plane answers for this CLEARWAY_HOME."""


class AuthenticationError(ControlPlaneError):
    """The control plane refused our API token."""


class APIError(ControlPlaneError):
    """The control plane answered a request with an error."""

    def __init__(self, status: int, message: str, *, details: str | None = None) -> None:
        self.status = status
        self.message = message
        self.details = details
        super().__init__(message if not details else f"{message}\n{details}")


class DeployError(ClearwayError):
    """A revision failed to import, start or become ready; the previous one keeps serving."""

    def __init__(self, message: str, *, details: str | None = None) -> None:
        self.message = message
        self.details = details
        super().__init__(message if not details else f"{message}\n{details}")


class RuntimeStartError(ClearwayError):
    """A replica or the gateway could not be started (bad port, missing binary, ...)."""


class FunctionError(ClearwayError):
    """A function called through the platform failed: ``.remote()``, ``.spawn()``, ``Job.result()``.

    ``status`` is the HTTP status of the answer (422: the arguments do not fit the
    function's signature; 500: it raised; 504: it ran past its timeout), None when
    no answer came. ``error_id`` names the failure in the function's logs, where
    its traceback is (``clearway logs APP | grep <error_id>``).
    """

    def __init__(
        self, message: str, *, status: int | None = None, error_id: str | None = None, details: str | None = None
    ) -> None:
        self.message = message
        self.status = status
        self.error_id = error_id
        self.details = details
        super().__init__(message if not details else f"{message}\n{details}")


class CoordinationError(ClearwayError):
    """A coordination operation (lease, lock, election, shard) went wrong."""


class LeaseGone(CoordinationError):
    """The lease expired, was revoked or never existed: whatever it held is no longer held.

    Take a new lease (and acquire again); a holder that gets this must stop acting
    as the holder at once.
    """


class CoordinationUnavailable(CoordinationError):
    """The coordination backend does not answer (etcd down or unreachable, store closed).

    Nothing is known about the state of the lease: the holder keeps its own deadline
    and retries; if its deadline passes first, it must consider the lock lost.
    """
