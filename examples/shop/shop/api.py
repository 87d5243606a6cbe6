"""The shop's JSON API (FastAPI, ASGI), served under /api.

``/api/quote/{id}`` asks the private ``pricing`` service for a discount: a
service-to-service call to ``cw.service_url("pricing")`` (the same revision's
pricing), proving who is calling with ``cw.identity_headers()``; the gateway
refuses callers without a credential or outside the service's ``allow`` policy.
"""

import json
import os
import urllib.request

from fastapi import FastAPI, HTTPException

import clearway as cw

api = FastAPI(title="shop api")

PRODUCTS = {1: {"name": "teapot", "price": 18}, 2: {"name": "kettle", "price": 35}}


@api.get("/api/healthz")
def healthz() -> dict[str, bool]:
    return {"ok": True}


@api.get("/api/products")
def products() -> dict[str, object]:
    return {"currency": os.environ["SHOP_CURRENCY"], "products": PRODUCTS}


@api.get("/api/quote/{product_id}")
def quote(product_id: int) -> dict[str, object]:
    product = PRODUCTS.get(product_id)
    if product is None:
        raise HTTPException(404, f"no product {product_id}")
    request = urllib.request.Request(cw.service_url("pricing") + "/discount", headers=cw.identity_headers())
    with urllib.request.urlopen(request, timeout=10) as response:
        discount = json.load(response)["discount"]
    price = float(product["price"])  # type: ignore[arg-type]
    return {"product": product["name"], "price": round(price * (1 - discount), 2), "currency": os.environ["SHOP_CURRENCY"]}
