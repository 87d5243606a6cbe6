"""hello: one public web service with three replicas, and a janitor worker."""

import clearway as cw

app = cw.App("hello")


@app.service(replicas=3, public=True, health="/healthz")
def web():
    from hello.api import api  # any ASGI or WSGI app

    return api


@app.worker(replicas=1)
def janitor():
    from hello.janitor import run

    run()
