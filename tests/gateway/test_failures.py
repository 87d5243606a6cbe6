"""Failures: dead and slow replicas, safe retries, bad clients, vanishing clients."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import pytest

from .conftest import GatewayFactory, raw_exchange, route, table, until
from .replica import Replica
from .scripted_replica import run_scripted_replica

HOST = {"host": "hello.localhost"}


def dead_address(directory: Path) -> str:
    """A Unix socket nothing listens on any more (bound, then closed: the file stays)."""
    path = directory / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    return f"unix:{path}"


async def test_502_when_the_replica_is_down(
    start_gateway: GatewayFactory, client: httpx.AsyncClient, sock_dir: Path
) -> None:
    gw = await start_gateway(table(route("hello", [dead_address(sock_dir), f"unix:{sock_dir}/missing.sock"])))
    r = await client.get(f"{gw.url}/", headers=HOST)
    assert r.status_code == 502
    assert "Could not connect to any replica of app 'hello'" in r.text
    assert str(sock_dir) not in r.text  # no internals in error pages


@pytest.mark.timeout(10)
async def test_504_when_the_replica_is_too_slow(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address], timeout=0.3)))
    r = await client.get(f"{gw.url}/slow", headers=HOST)
    assert r.status_code == 504
    assert "did not answer within 0.3 s" in r.text
    r = await client.get(f"{gw.url}/echo", headers=HOST)  # still serving
    assert r.status_code == 200


async def test_connect_failure_is_retried_on_another_endpoint(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient, sock_dir: Path
) -> None:
    gw = await start_gateway(table(route("hello", [dead_address(sock_dir), replica.address])))
    for _ in range(10):
        r = await client.post(f"{gw.url}/echo", headers=HOST, content=b"data")
        assert r.status_code == 200  # nothing was sent: even a POST is safe to retry


async def test_idempotent_request_is_retried_when_a_reused_connection_was_closed(
    start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    async with run_scripted_replica(answers_per_connection=1) as scripted:
        gw = await start_gateway(table(route("hello", [scripted.address])))
        assert (await client.get(f"{gw.url}/one", headers=HOST)).text == "ok"
        r = await client.get(f"{gw.url}/two", headers=HOST)
        assert r.text == "ok"
        assert scripted.requests == ["GET /one", "GET /two", "GET /two"]


async def test_post_that_was_sent_is_never_retried(
    start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    async with run_scripted_replica(answers_per_connection=0) as scripted:
        gw = await start_gateway(table(route("hello", [scripted.address])))
        r = await client.post(f"{gw.url}/pay", headers=HOST, content=b"money")
        assert r.status_code == 502
        assert "closed the connection before answering" in r.text
        assert scripted.requests == ["POST /pay"]


async def test_malformed_request_gets_400(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(table())
    answer = await raw_exchange(gw.port, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"not valid HTTP/1.1" in answer
    answer = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"no Host header" in answer


async def test_oversized_head_gets_413(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(table())
    big = b"x-big: " + b"a" * 70_000 + b"\r\n"
    answer = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"larger than 64 KiB" in answer


@pytest.mark.timeout(10)
async def test_slow_request_head_gets_408(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(table(), header_timeout=0.2)
    answer = await raw_exchange(gw.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
    assert answer.startswith(b"HTTP/1.1 408")


@pytest.mark.timeout(15)
async def test_client_disconnecting_mid_body_harms_nobody(
    replica: Replica, start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    gw = await start_gateway(table(route("hello", [replica.address])))
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: hello.localhost\r\nContent-Length: 1000000\r\n\r\n")
    writer.write(b"a" * 100_000)
    await writer.drain()
    await until(lambda: "POST /upload" in replica.control.requests)
    writer.transport.abort()
    await replica.control.disconnected.wait()  # the replica saw its request end early
    r = await client.get(f"{gw.url}/echo", headers=HOST)
    assert r.status_code == 200
    assert b'clearway_gateway_requests_total{app="hello",code="4xx",component="",revision="hello-1"} 1.0' in gw.metrics_text()


async def test_a_get_whose_replica_dies_answering_goes_to_another_replica(
    replica: Replica, start_gateway: GatewayFactory
) -> None:
    async with run_scripted_replica(answers_per_connection=0) as dying:
        gw = await start_gateway(table(route("hello", [dying.address, replica.address])))
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as fresh:
            for n in range(10):
                r = await fresh.get(f"{gw.url}/get-{n}", headers=HOST)
                assert r.status_code == 200 and r.headers["x-replica"] == "r1"
        assert dying.requests, "the dying replica was never tried: the test proves nothing"
        # Each GET reached the dying replica at most once before going to the healthy one.
        assert len(dying.requests) == len(set(dying.requests))


async def test_a_get_that_kills_every_replica_is_sent_a_bounded_number_of_times(
    start_gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    async with run_scripted_replica(answers_per_connection=0) as dying:
        gw = await start_gateway(table(route("hello", [dying.address])))
        r = await client.get(f"{gw.url}/poison", headers=HOST)
        assert r.status_code == 502
        assert "closed the connection before answering" in r.text
        assert dying.requests == ["GET /poison"] * 3  # max_attempts
