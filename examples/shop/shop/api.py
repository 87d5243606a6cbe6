"""The shop's JSON API (FastAPI, ASGI), served under /api."""

import os

from fastapi import FastAPI

api = FastAPI(title="shop api")

PRODUCTS = {1: {"name": "teapot", "price": 18}, 2: {"name": "kettle", "price": 35}}


@api.get("/api/healthz")
def healthz() -> dict[str, bool]:
    return {"ok": True}


@api.get("/api/products")
def products() -> dict[str, object]:
    return {"currency": os.environ["SHOP_CURRENCY"], "products": PRODUCTS}
