"""``connect``: the backend named on ``clearway up --coordination``."""

from __future__ import annotations

from pathlib import Path

import pytest

from clearway.coordination import EmbeddedCoordinator, connect
from clearway.coordination.etcd import EtcdCoordinator

pytestmark = pytest.mark.timeout(10)


def test_embedded_lives_in_the_home(tmp_path: Path) -> None:
    coordinator = connect("embedded", home=tmp_path)
    assert isinstance(coordinator, EmbeddedCoordinator) and coordinator.kind == "embedded"
    assert coordinator.path == tmp_path / "coordination.db"


def test_etcd_url(tmp_path: Path) -> None:
    coordinator = connect("etcd://127.0.0.1:2379", home=tmp_path)
    assert isinstance(coordinator, EtcdCoordinator) and coordinator.kind == "etcd"
    assert coordinator.endpoint == "127.0.0.1:2379"
    assert connect("etcd://etcd.internal:23790/", home=tmp_path).kind == "etcd"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "unknown coordination backend"),
        ("Embedded", "unknown coordination backend"),
        ("zk://127.0.0.1:2181", "unknown coordination backend"),
        ("etcd", "unknown coordination backend"),
        ("etcd://", "is not etcd://host:port"),
        ("etcd://127.0.0.1", "names no valid port"),
        ("etcd://127.0.0.1:http", "names no valid port"),
        ("etcd://127.0.0.1:2379/v3", "is not etcd://host:port"),
        ("etcd://user@127.0.0.1:2379", "is not etcd://host:port"),
    ],
)
def test_anything_else_is_refused_clearly(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        connect(url, home=tmp_path)
