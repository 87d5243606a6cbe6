"""shop: several services (FastAPI API, Flask storefront, private pricing) and a worker."""

import clearway as cw

app = cw.App("shop", env={"SHOP_CURRENCY": "EUR"})


@app.service(replicas=2, public=True, path="/api", health="/api/healthz")
def api():
    from shop.api import api

    return api


@app.service(replicas=2, public=True, health="/healthz")
def storefront():
    from shop.storefront import site  # a WSGI (Flask) app

    return site


@app.service(replicas=1, health="/healthz", memory_mb=256)
def pricing():
    from shop.pricing import pricing

    return pricing


@app.worker(replicas=1)
def orders():
    from shop.orders import process_forever

    process_forever()
