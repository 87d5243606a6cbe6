"""HTTP/1.1 proxying behaviour, over real sockets against a real uvicorn replica."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from .conftest import GatewayFactory, raw_exchange, route, table
from .replica import Replica, run_replica

HOST = {"host": "hello.localhost"}


@pytest.mark.timeout(15)
async def test_response_is_streamed_not_buffered(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    async with client.stream("GET", f"{gw.url}/stream", headers=HOST) as r:
        chunks = r.aiter_raw()
        first = await anext(chunks)
        # The replica has not finished (it waits for release): the gateway relayed early.
        assert first == b"first\n"
        assert not replica.control.release.is_set()
        replica.control.release.set()
        rest = b"".join([c async for c in chunks])
    assert rest == b"second\n"


@pytest.mark.timeout(15)
async def test_chunked_upload_and_content_length_upload(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    r = await client.post(f"{gw.url}/upload", headers=HOST, content=body())  # chunked
    assert r.json() == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    r = await client.post(f"{gw.url}/upload", headers=HOST, content=payload)  # content-length
    assert r.json()["length"] == len(payload)
    r = await client.get(f"{gw.url}/big?n=3000000", headers=HOST)
    assert len(r.content) == 3000000 and r.headers["content-length"] == "3000000"


@pytest.mark.timeout(15)
async def test_expect_100_continue_is_answered_before_the_body(
    replica: Replica, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: hello.localhost\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    interim = await reader.readuntil(b"\r\n\r\n")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
    # No 100 for a request that has nowhere to go: the 404 comes first.
    answer = await raw_exchange(
        gw.port,
        b"POST / HTTP/1.1\r\nHost: nowhere\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404")


async def test_hop_by_hop_headers_and_forwarding_headers(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    r = await client.get(
        f"{gw.url}/echo",
        headers={
            **HOST,
            "connection": "keep-alive, x-private",
            "x-private": "secret",
            "keep-alive": "timeout=5",
            "te": "trailers",
            "proxy-connection": "keep-alive",
            "x-forwarded-for": "10.0.0.1",
            "forwarded": "for=10.0.0.1",
            "x-other": "kept",
        },
    )
    headers = dict(r.json()["headers"])
    for dropped in ("x-private", "keep-alive", "te", "proxy-connection", "connection"):
        assert dropped not in headers, dropped
    assert headers["x-other"] == "kept"
    assert headers["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "hello.localhost"
    assert headers["forwarded"] == 'for=10.0.0.1, for=127.0.0.1;host="hello.localhost";proto=http'
    r = await client.get(f"{gw.url}/hop", headers=HOST)
    assert r.text == "hop"
    assert "x-secret" not in r.headers and "keep-alive" not in r.headers
    assert r.headers["x-kept"] == "1"


async def test_request_id_is_kept_if_sane_and_generated_otherwise(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    r = await client.get(f"{gw.url}/echo", headers={**HOST, "x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert dict(r.json()["headers"])["x-request-id"] == "abc-123"
    r = await client.get(f"{gw.url}/echo", headers={**HOST, "x-request-id": "bad id with spaces"})
    generated = r.headers["x-request-id"]
    assert generated != "bad id with spaces" and dict(r.json()["headers"])["x-request-id"] == generated
    r2 = await client.get(f"{gw.url}/echo", headers=HOST)
    assert r2.headers["x-request-id"] != generated


async def test_head_204_304_http10_and_connection_close(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    r = await client.head(f"{gw.url}/big?n=100", headers=HOST)
    assert r.status_code == 200 and r.headers["content-length"] == "100" and r.content == b""
    # The pooled connection that carried the HEAD is still usable afterwards.
    r = await client.get(f"{gw.url}/big?n=10", headers=HOST)
    assert r.content == b"x" * 10
    for code in (204, 304):
        r = await client.get(f"{gw.url}/status/{code}", headers=HOST)
        assert r.status_code == code and r.content == b""
    answer = await raw_exchange(gw.port, b"GET /echo HTTP/1.0\r\nHost: hello.localhost\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert json.loads(body)["path"] == "/echo"  # close-delimited, not chunked
    answer = await raw_exchange(
        gw.port, b"GET /big?n=3 HTTP/1.1\r\nHost: hello.localhost\r\nConnection: close\r\n\r\n"
    )
    assert answer.endswith(b"\r\n\r\nxxx") and b"connection: close" in answer.lower()


@pytest.mark.timeout(15)
async def test_keep_alive_and_pipelining(replica: Replica, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    answer = await raw_exchange(
        gw.port,
        b"GET /big?n=1 HTTP/1.1\r\nHost: hello.localhost\r\n\r\n"
        b"GET /nothing-here HTTP/1.1\r\nHost: nowhere\r\n\r\n"
        b"GET /big?n=2 HTTP/1.1\r\nHost: hello.localhost\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200") == 2 and answer.count(b"HTTP/1.1 404") == 1
    # (b"HTTP/1.1 404", not b"404": a random request id may contain "404".)
    assert answer.index(b"\r\n\r\nx") < answer.index(b"HTTP/1.1 404") < answer.index(b"\r\n\r\nxx")


async def test_websocket_echo(replica: Replica, start_gateway: GatewayFactory) -> None:
    from websockets.asyncio.client import connect

    gw = await start_gateway(table(route("hello", [replica.address])))
    # The URI gives the Host header (one only: two get a 400); the connection goes to the gateway.
    async with connect(f"ws://hello.localhost:{gw.port}/ws", host="127.0.0.1") as ws:
        for text in ("one", "two"):
            await ws.send(text)
            assert await ws.recv() == f"r1:{text}"


async def test_tcp_endpoints_still_work(start_gateway: GatewayFactory, client: httpx.AsyncClient) -> None:
    # Replicas listen on Unix sockets; "host:port" endpoints remain for tests and benchmarks.
    async with run_replica("tcp", tcp=True) as tcp:
        assert not tcp.address.startswith("unix:")
        gw = await start_gateway(table(route("hello", [tcp.address])))
        r = await client.get(f"{gw.url}/echo", headers=HOST)
        assert r.status_code == 200 and r.json()["replica"] == "tcp"
