"""The shop's JSON API (FastAPI, ASGI), served under /api.

``/api/quote/{id}`` asks the private ``pricing`` service for a discount: a
service-to-service call through ``CLEARWAY_SERVICE_PRICING_URL``, which the
platform sets in every replica and which always reaches the same revision.
"""

import json
import os
import urllib.request

from fastapi import FastAPI, HTTPException

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
    with urllib.request.urlopen(os.environ["CLEARWAY_SERVICE_PRICING_URL"] + "/discount", timeout=10) as response:
        discount = json.load(response)["discount"]
    price = float(product["price"])  # type: ignore[arg-type]
    return {"product": product["name"], "price": round(price * (1 - discount), 2), "currency": os.environ["SHOP_CURRENCY"]}
