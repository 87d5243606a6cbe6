"""A hostile app for the trust tests: each endpoint tries one thing from inside a replica.

Every answer is JSON ``{"ok": bool, ...}`` with HTTP 200, so the test sees what
the attempt did rather than a crash. ``PROBER_SECRET`` (set with ``--env``) is
what other apps must never see.
"""

import clearway as cw

app = cw.App("prober")


@app.service(replicas=1, public=True, health="/healthz")
def web():
    from prober_web import api

    return api


@app.service(replicas=1, health="/healthz")
def private():
    from prober_web import api

    return api
