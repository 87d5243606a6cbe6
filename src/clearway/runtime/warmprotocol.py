"""The wire between the fork launcher and a warm parent: descriptor numbers and sizes.

Apart from both ends (`clearway.runtime.forking` on the host,
`clearway.runtime.warmparent` in the sandbox), so that importing the launcher
never imports the warm parent, which imports the replica entry point
(``python -m clearway.runtime.replica`` must not find itself already imported).
"""

from __future__ import annotations

__all__ = ["CONTROL_FD", "MAX_MESSAGE"]

#: Where the warm parent finds its control socket (a ``SOCK_SEQPACKET`` pair with the launcher).
CONTROL_FD = 4
#: The largest control message (a spec and an environment, as JSON).
MAX_MESSAGE = 1024 * 1024
