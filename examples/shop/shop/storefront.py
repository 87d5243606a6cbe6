"""The storefront: a Flask (WSGI) app at the root of the shop's URL."""

import os

from flask import Flask

site = Flask(__name__)


@site.get("/")
def index() -> str:
    return f"<h1>The shop</h1><p>Prices in {os.environ['SHOP_CURRENCY']}. See <a href='/api/products'>/api/products</a>.</p>"


@site.get("/healthz")
def healthz() -> str:
    return "ok"
