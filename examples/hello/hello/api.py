"""A tiny Starlette app: the page, a health check, and a streaming endpoint."""

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


async def index(request: Request) -> PlainTextResponse:
    name = request.query_params.get("name", "world")
    return PlainTextResponse(
        f"Hello, {name}! (revision {os.environ.get('CLEARWAY_REVISION')}, "
        f"replica {os.environ.get('CLEARWAY_REPLICA_ID')})\n"
    )


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"method": request.method, "bytes": len(body), "headers": dict(request.headers)})


api = Starlette(
    routes=[
        Route("/", index),
        Route("/healthz", healthz),
        Route("/echo", echo, methods=["GET", "POST", "PUT"]),
    ]
)
