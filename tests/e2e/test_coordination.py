"""Coordination end to end (issue 8): locks and singletons in the replicas of a deployed app,
on both backends (the control plane's embedded one, and a real etcd server).

* ``cw.Lock`` in a function: every holding gets a larger fencing token;
* ``@app.singleton``: one of its two replicas leads (``clearway status`` and
  ``GET /v1/apps/APP/locks`` say which); ``kill -9`` of the leader hands
  leadership to the standby; a graceful stop hands it over too;
* a replica sees the leader with ``cw.leader``;
* a sharded worker (``@app.worker(replicas=2, shards=8)``): its shards are split
  between its replicas exactly as `clearway.sdk.sharding.assign` says; ``kill -9``
  of a replica gets its shards owned again (with larger tokens) once its lease
  expires; a replica paused past its lease loses all its shards to the other;
  ``cw.shard_for`` answers a key's shard and owner;
* a sharded service with key affinity (``@app.service(replicas=2, shards=8,
  affinity="header:x-customer")``): a request carrying a key always reaches the
  replica holding the lock of the key's shard.

Waits are on conditions with deadlines, never on time.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from clearway.sdk.sharding import assign, shard_of
from tests.coordination.etcd_server import EtcdServer
from tests.e2e.conftest import write_app
from tests.e2e.platform import EXAMPLES, Platform, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

APP = """
import asyncio, os, time

@app.function(timeout=60)
def locked(name: str, hold: float = 0.0) -> dict:
    with cw.Lock(name, ttl=5) as lock:
        time.sleep(hold)
        return {"token": lock.token, "held": lock.held, "replica": os.environ["CLEARWAY_REPLICA_ID"]}


@app.function()
def who_leads(name: str) -> str | None:
    return cw.leader(f"singleton/{name}")


@app.singleton(lease_ttl=3)
async def boss(leadership: cw.Leadership) -> None:
    print(f"leading with token {leadership.token}", flush=True)
    await leadership.lost.wait()


@app.worker(replicas=2, shards=8, lease_ttl=3)
async def consume(shard: cw.Shard) -> None:
    print(f"owning shard {shard.index} token {shard.token}", flush=True)
    await shard.lost.wait()


@app.function()
def owner_of(key: str) -> list:
    index, replica = cw.shard_for(key, worker="consume")
    return [index, replica]


@app.service(replicas=2, public=True, path="/keyed", shards=8, affinity="header:x-customer", lease_ttl=3)
def keyed():
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": os.environ["CLEARWAY_REPLICA_ID"].encode()})
    return asgi
"""


@pytest.fixture(scope="module", params=["embedded", "etcd"])
def platform(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    root = tmp_path_factory.mktemp(f"coordination-{request.param}")
    etcd = EtcdServer(root / "etcd") if request.param == "etcd" else None
    running = Platform(home=root / "home", port=free_port())
    try:
        coordination = "embedded"
        if etcd is not None:
            etcd.start()
            coordination = f"etcd://{etcd.endpoint}"
        running.cli("up", "--detach", "--port", str(running.port), "--coordination", coordination)
        running.cli("deploy", str(write_app(root / "coord", APP, name="coord")))
        yield running
    finally:
        running.down()
        if etcd is not None:
            etcd.close()


def invoke(platform: Platform, function: str, **kwargs: Any) -> Any:
    result = platform.cli("invoke", "coord", function, "--json", "--data", json.dumps(kwargs))
    answer = json.loads(result.stdout)
    assert answer["status"] == 200, answer
    return answer["body"]


def locks(platform: Platform) -> list[dict[str, Any]]:
    with platform.api() as client:
        response = client.get("/v1/apps/coord/locks")
    response.raise_for_status()
    found: list[dict[str, Any]] = response.json()
    return found


def leader(platform: Platform) -> dict[str, Any] | None:
    return next((lock for lock in locks(platform) if lock["lock"] == "singleton/boss"), None)


def pid_of(platform: Platform, replica: str) -> int:
    status = platform.status("coord")
    return int(next(r["pid"] for r in status["replicas"] if r["id"] == replica))


def test_every_holding_of_a_lock_gets_a_larger_fencing_token(platform: Platform) -> None:
    tokens = []
    for _ in range(3):
        answer = invoke(platform, "locked", name="inventory")
        assert answer["held"] is True
        tokens.append(answer["token"])
    assert tokens == sorted(tokens) and len(set(tokens)) == 3, tokens
    # Released on leaving the block: nothing of it is left held.
    assert not any(lock["lock"] == "inventory" for lock in locks(platform))


def test_one_replica_leads_a_singleton_and_the_standby_takes_over(platform: Platform) -> None:
    first = wait_for("a leader of boss", lambda: leader(platform))
    replicas = {r["id"] for r in platform.status("coord")["replicas"] if r["component"] == "boss"}
    assert first["replica"] in replicas and len(replicas) == 2
    assert invoke(platform, "who-leads", name="boss") == first["replica"]
    assert "singleton leader" in platform.cli("status", "coord").stdout

    # kill -9 of the leader: the standby leads within about the lease's TTL, with a larger token.
    os.killpg(pid_of(platform, first["replica"]), signal.SIGKILL)
    second = wait_for(
        "the standby to take over", lambda: (found := leader(platform)) and found["replica"] != first["replica"] and found
    )
    assert second["token"] > first["token"]

    # A graceful stop (SIGTERM) resigns: the other replica, restarted as a standby, takes over.
    os.killpg(pid_of(platform, second["replica"]), signal.SIGTERM)
    third = wait_for(
        "the hand-over", lambda: (found := leader(platform)) and found["replica"] != second["replica"] and found
    )
    assert third["token"] > second["token"]
    logs = platform.cli("logs", "coord", "--component", "boss", "--tail", "200").stdout
    assert f"leading with token {third['token']}" in logs



def shard_owners(
    platform: Platform, members: list[str], component: str = "consume"
) -> dict[int, dict[str, Any]] | None:
    """The holders of the 8 shard locks, when they are exactly as the assignment over ``members`` says."""
    prefix = f"shards/{component}/shard/"
    owners = {int(lock["lock"].rsplit("/", 1)[1]): lock for lock in locks(platform) if lock["lock"].startswith(prefix)}
    expected = assign(8, members)
    if sorted(owners) == list(range(8)) and all(owners[i]["replica"] == expected[i] for i in range(8)):
        return owners
    return None


@pytest.mark.timeout(150)
def test_shards_are_split_between_the_replicas_and_taken_over(platform: Platform) -> None:
    replicas = sorted(r["id"] for r in platform.status("coord")["replicas"] if r["component"] == "consume")
    assert len(replicas) == 2
    first = wait_for("the 8 shards split between the 2 replicas", lambda: shard_owners(platform, replicas))
    assert {owner["replica"] for owner in first.values()} == set(replicas)
    assert "consume shard 7" in platform.cli("status", "coord").stdout
    index, owner = invoke(platform, "owner-of", key="customer-42")
    assert (index, owner) == (shard_of("customer-42", 8), first[index]["replica"])

    # kill -9: once its lease expires its shards are owned again, with larger tokens (by the
    # restarted replica, which has the same id and so the same shards, or by the other meanwhile).
    victim = first[index]["replica"]
    os.killpg(pid_of(platform, victim), signal.SIGKILL)
    lost = {i: lock for i, lock in first.items() if lock["replica"] == victim}
    wait_for(
        "the killed replica's shards owned again",
        lambda: (found := shard_owners(platform, replicas))
        and all(found[i]["token"] > lock["token"] and found[i]["incarnation"] != lock["incarnation"] for i, lock in lost.items()),
        within=30,
    )

    # A replica paused past its lease (SIGSTOP) loses every shard to the other; killed, it is
    # restarted, joins again and gets its share back.
    paused, other = victim, next(r for r in replicas if r != victim)
    pid = pid_of(platform, paused)
    os.killpg(pid, signal.SIGSTOP)
    try:
        alone = wait_for("the other replica to own all 8 shards", lambda: shard_owners(platform, [other]), within=30)
    finally:
        os.killpg(pid, signal.SIGKILL)
    back = wait_for("the shards split again", lambda: shard_owners(platform, replicas), within=30)
    for i, lock in back.items():
        assert lock["token"] >= alone[i]["token"]
    wait_for(
        "the owners' log lines",
        lambda: (logs := platform.cli("logs", "coord", "--component", "consume", "--tail", "400").stdout)
        and all(f"owning shard {i} token {lock['token']}" in logs for i, lock in back.items()),
        within=20,
    )


def test_the_coordination_example_reserves_with_growing_tokens_and_has_a_leader(platform: Platform) -> None:
    platform.cli("deploy", str(EXAMPLES / "coordination"))
    answers = [
        platform.get("coordination", "/reserve", params={"item": f"seat-{n}"}).json() for n in range(2)
    ]
    assert all(a["written"] for a in answers), answers
    assert answers[0]["token"] < answers[1]["token"]
    with platform.api() as client:
        wait_for(
            "a scheduler leader",
            lambda: any(lock["lock"] == "singleton/scheduler" for lock in client.get("/v1/apps/coordination/locks").json()),
        )


@pytest.mark.timeout(120)
def test_a_key_always_reaches_the_replica_owning_its_shard(platform: Platform) -> None:
    replicas = sorted(r["id"] for r in platform.status("coord")["replicas"] if r["component"] == "keyed")
    assert len(replicas) == 2
    owners = wait_for("the 8 shards of keyed split", lambda: shard_owners(platform, replicas, "keyed"))
    keys = [f"customer-{n}" for n in range(16)]

    def answers() -> list[tuple[str, str, str]]:
        """(key, replica answering, owner by the locks) of a request for every key."""
        found = []
        for key in keys:
            response = platform.get("coord", "/keyed", headers={"x-customer": key})
            assert response.status_code == 200, response.text
            assert response.headers["x-clearway-shard"] == str(shard_of(key, 8))
            found.append((key, response.text, owners[shard_of(key, 8)]["replica"]))
        return found

    # The gateway learns the owners from the control plane (within about half a second).
    wait_for("every key to reach its shard's owner", lambda: all(got == owner for _, got, owner in answers()), within=30)
    for _ in range(3):
        seen = answers()
        assert all(got == owner for _, got, owner in seen), seen
    assert {got for _, got, _ in seen} == set(replicas)  # both own some of these keys
    # Without a key: any replica answers.
    response = platform.get("coord", "/keyed")
    assert response.status_code == 200 and response.text in replicas and "x-clearway-shard" not in response.headers
