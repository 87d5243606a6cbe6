"""The local backend: replicas as OS processes, clearway's own gateway in front.

* ``backend``  — ``LocalBackend``: desired revisions → replica processes, and
  ready replicas → the gateway's route table, draining before every stop.
* ``gateway``  — the gateway child process: start, adopt, reload, query.
* ``artifacts`` — artifact references (code and environment digests) → host paths.
* ``records``  — what must survive a control-plane crash to re-adopt replicas.
"""

from clearway.backends.local.backend import LocalBackend, LocalConfig

__all__ = ["LocalBackend", "LocalConfig"]
