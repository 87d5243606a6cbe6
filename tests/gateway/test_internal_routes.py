"""Internal routes (replicas calling their app's private services) answer only
clients on this machine; to anyone else they do not exist."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from clearway.gateway import GatewaySettings, RoutesError, RouteTable
from clearway.gateway._metrics import Metrics
from clearway.gateway._proxy import ClientConnection, ProxyContext
from clearway.gateway._router import EndpointRegistry, Router
from clearway.gateway._upstream import UpstreamConnection
from clearway.tasks import TaskSupervisor

from .memory_transport import RecordingTransport

REQUEST = b"GET /_services/shop-1/pricing/discount HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


def table(internal: object) -> RouteTable:
    return RouteTable.from_json(
        {
            "version": 1,
            "routes": [
                {
                    "app": "shop",
                    "host": "127.0.0.1",
                    "prefix": "/_services/shop-1/pricing",
                    "strip_prefix": True,
                    "internal": internal,
                    "targets": [{"revision": "shop-1", "weight": 100, "endpoints": ["127.0.0.1:1"]}],
                }
            ],
        }
    )


def send_from(peer: str) -> tuple[bytes, bytes]:
    """What the client and the replica receive when ``peer`` sends REQUEST."""
    loop = asyncio.get_running_loop()
    settings = GatewaySettings()
    endpoints = EndpointRegistry(settings, loop)
    metrics = Metrics()
    ctx = ProxyContext(
        loop=loop,
        settings=settings,
        router=Router(table(True), endpoints, metrics, random.Random(1)),
        metrics=metrics,
        supervisor=TaskSupervisor(logging.getLogger("test")),
        access_log=None,
    )
    endpoint = endpoints.get("127.0.0.1:1")
    replica = RecordingTransport(("127.0.0.1", 1))
    upstream = UpstreamConnection(endpoint)
    upstream.connection_made(replica)  # type: ignore[arg-type]
    endpoint.release(upstream)  # an idle pooled connection, so no socket is needed
    client = RecordingTransport((peer, 40000))
    connection = ClientConnection(ctx)
    connection.connection_made(client)  # type: ignore[arg-type]
    connection.data_received(REQUEST)
    return client.data, replica.data


@pytest.mark.timeout(10)
async def test_local_clients_reach_the_private_service() -> None:
    to_client, to_replica = send_from("127.0.0.1")
    assert to_replica.startswith(b"GET /discount HTTP/1.1\r\n")
    assert to_client == b""  # the answer comes from the replica


@pytest.mark.timeout(10)
async def test_other_clients_get_a_404_and_nothing_is_forwarded() -> None:
    to_client, to_replica = send_from("203.0.113.9")
    assert to_client.startswith(b"HTTP/1.1 404 ")
    assert to_replica == b""


def test_internal_is_a_boolean_and_round_trips() -> None:
    assert table(True).routes[0].internal is True
    assert table(True).to_json()["routes"][0]["internal"] is True
    with pytest.raises(RoutesError, match="internal must be true or false"):
        table("yes")
