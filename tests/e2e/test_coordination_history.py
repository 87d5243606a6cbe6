"""Coordination under faults, checked over a whole multi-process run (issue 8), on both
backends: the embedded one and a real etcd.

The in-process history checker (`tests.coordination.history`) sees clients that
share one process; here the clients are the replicas of a deployed app, using
nothing but the public SDK, and the faults are real signals to real processes:

* ``ledger`` (2 replicas) takes turns on ``cw.Lock("ledger")`` and, while it
  holds it, makes transfers: a write to ``ledger`` then one to ``journal``,
  each with its fencing token, after one ``lock.held`` check;
* ``chief`` is a singleton (2 replicas) writing to ``chief`` while it leads;
* ``part`` is a sharded worker (2 replicas, 4 shards) writing to ``part-N``
  for each shard it owns.

Every replica logs what it does to stdout, one ``CWHIST {json}`` line an event:
``acquired`` (token, and the SDK's own ``deadline``), ``acting`` before each
action (with the ``deadline`` it counts on then: the validity bound),
``released``/``lost`` when it stops acting. Times are ``time.monotonic()`` of
each replica: CLOCK_MONOTONIC is one system-wide clock on Linux, the same in
every process and not virtualised by the sandbox (bwrap makes no time
namespace), so they compare with each other and with the test's (checked: every
event falls inside the test's own window). The writes go to a `FencedStore` in
the test, a real shared resource that refuses stale tokens as writes arrive
(see its docstring for what that proves and what it does not).

The faults, together so the run stays short: a ``ledger`` holder is caught in
the middle of a transfer and SIGSTOPped past its TTL, then SIGCONTed once a newer
holder has written — its ``journal`` write then carries a stale token and must
be refused; the ``chief`` leader is SIGKILLed; the owner of shard 0 is
SIGKILLed; on the etcd platform, etcd is restarted mid-run. Then ``clearway
logs`` is read back, the history built and checked: no two holders of one lock,
leadership or shard with overlapping validity, tokens strictly increasing per
lock, no stale write accepted and no valid one refused, and every shard and the
singleton owned again within the takeover bound. And it must be able to fail on
the same data: with validity not bounded by the SDK's deadline, or with the
writes replayed through an unfenced store, it reports violations.

The second test (embedded backend) SIGKILLs the control plane while
``steady`` (a singleton, ``lease_ttl=30``) leads and ``keeper`` holds
``cw.Lock("kept", ttl=30)``, starts it again on the same home, and checks the
issue's promise: a control-plane restart shorter than the TTL changes no leader
and no lock holder (same replica, same token, the same process, which never
noticed a loss), that the standby kept its place in the queue (a graceful stop
of the leader right after hands over at once: it used to wait for the TTL of a
place lost in the outage) — and that the run's history is still clean across
it. "Shorter
than the TTL" precisely: shorter than what is left of each holder's own
deadline at the kill, which is at least two thirds of the TTL less the margin
(renewals go every third), hence the long TTL here.

Waits are on conditions with deadlines, never on time.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.coordination.etcd_server import EtcdServer
from tests.coordination.history import History, check, check_owned_again
from tests.e2e.conftest import write_app
from tests.e2e.fenced_store import FencedStore
from tests.e2e.platform import Platform, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TTL = 2.0
SHARDS = 4
#: A dead owner's shards are taken over within about ``ttl + ttl / 3`` of its last renewal
#: (`clearway.sdk.sharding`); a second more for the processes of a loaded two-core machine.
#: After a backend outage, one TTL more: nothing can be taken over while etcd is down, and
#: etcd gives every lease its full TTL again when it comes back (its lessor's ``Promote`` on
#: becoming leader), so a lease its holder could not revoke meanwhile lives one more TTL.
TAKEOVER = TTL + TTL / 3 + 1.0
#: Long enough for a control-plane restart on a loaded machine (4 to 10 s measured) to fit in
#: what is left of a lease at any moment: at least 2/3 of the TTL minus the margin.
STEADY_TTL = 30.0
PREFIX = "CWHIST "
RESOURCES = ["ledger", "journal", "chief", *(f"part-{i}" for i in range(SHARDS))]
OWNED = ["singleton/chief", *(f"shards/part/shard/{i}" for i in range(SHARDS))]

APP = """
import asyncio, json, os, secrets, threading, time, urllib.request

STORE = {store!r}
TTL = {ttl!r}
TICK = 0.2
# One client per process (a restarted replica is another client; pids repeat in sandboxes).
ME = os.environ.get("CLEARWAY_REPLICA_ID", "-") + "/" + secrets.token_hex(4)


def log(ev, lock, token, **fields):
    event = {{"ev": ev, "client": ME, "lock": lock, "token": token, "at": time.monotonic(), **fields}}
    print({prefix!r} + json.dumps(event), flush=True)


def write(resource, token):
    body = json.dumps({{"resource": resource, "client": ME, "token": token}}).encode()
    request = urllib.request.Request(STORE, data=body, method="POST", headers={{"content-type": "application/json"}})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())["accepted"]


@app.worker(replicas=2)
def ledger() -> None:
    while True:
        try:
            transfers()
        except cw.LockError as error:  # the control plane restarting, say: try again
            print(f"ledger: {{error}}", flush=True)
            time.sleep(0.5)


def transfers():
    with cw.Lock("ledger", ttl=TTL) as lock:
        log("acquired", "ledger", lock.token, deadline=lock.deadline)
        for _ in range(5):
            if not lock.held:
                break
            log("acting", "ledger", lock.token, deadline=lock.deadline)
            write("ledger", lock.token)    # one transfer: the ledger, then the journal
            write("journal", lock.token)
            time.sleep(TICK)
        log("lost" if not lock.held else "released", "ledger", lock.token)


@app.singleton(replicas=2, lease_ttl=TTL)
async def chief(leadership: cw.Leadership) -> None:
    log("acquired", "singleton/chief", leadership.token, deadline=leadership.deadline)
    try:
        while True:
            if not leadership.held:
                await leadership.lost.wait()  # cancelled here once the loss is signalled
            log("acting", "singleton/chief", leadership.token, deadline=leadership.deadline)
            await asyncio.to_thread(write, "chief", leadership.token)
            await asyncio.sleep(TICK)
    finally:
        log("lost", "singleton/chief", leadership.token)


@app.worker(replicas=2, shards={shards}, lease_ttl=TTL)
async def part(shard: cw.Shard) -> None:
    lock = f"shards/part/shard/{{shard.index}}"
    log("acquired", lock, shard.token, deadline=shard.deadline)
    try:
        while True:
            if not shard.held:
                await shard.lost.wait()
            log("acting", lock, shard.token, deadline=shard.deadline)
            await asyncio.to_thread(write, f"part-{{shard.index}}", shard.token)
            await asyncio.sleep(TICK)
    finally:
        log("released", lock, shard.token)
"""

#: Only on the embedded platform, for the control-plane restart.
STEADY = """
@app.singleton(replicas=2, lease_ttl={steady_ttl!r})
async def steady(leadership: cw.Leadership) -> None:
    print(f"steady leads with token {{leadership.token}}", flush=True)
    try:
        await leadership.lost.wait()
    finally:
        print(f"steady stops leading (token {{leadership.token}})", flush=True)


@app.worker()
def keeper() -> None:
    with cw.Lock("kept", ttl={steady_ttl!r}) as lock:
        print(f"keeper holds kept with token {{lock.token}}", flush=True)
        lock.lost.wait()
        print(f"keeper lost kept (token {{lock.token}})", flush=True)
"""


@dataclass
class Run:
    kind: str
    platform: Platform
    store: FencedStore
    started: float
    etcd: EtcdServer | None


@pytest.fixture(scope="module", params=["embedded", "etcd"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp(f"coordination-history-{request.param}")
    etcd = EtcdServer(root / "etcd") if request.param == "etcd" else None
    store = FencedStore()
    platform = Platform(home=root / "home", port=free_port())
    try:
        coordination = "embedded"
        if etcd is not None:
            etcd.start()
            coordination = f"etcd://{etcd.endpoint}"
        started = time.monotonic()
        platform.cli("up", "--detach", "--port", str(platform.port), "--coordination", coordination)
        body = APP.format(store=store.url, ttl=TTL, prefix=PREFIX, shards=SHARDS)
        if etcd is None:
            body += STEADY.format(steady_ttl=STEADY_TTL)
        platform.cli("deploy", str(write_app(root / "hist", body, name="hist")))
        yield Run(request.param, platform, store, started, etcd)
    finally:
        platform.down()
        store.close()
        if etcd is not None:
            etcd.close()


def locks(platform: Platform) -> dict[str, dict[str, Any]]:
    with platform.api() as client:
        response = client.get("/v1/apps/hist/locks")
    response.raise_for_status()
    return {lock["lock"]: lock for lock in response.json()}


def pids(platform: Platform) -> dict[str, int]:
    return {r["id"]: int(r["pid"]) for r in platform.status("hist")["replicas"] if r["pid"]}


def logs(platform: Platform) -> list[str]:
    """Every line the app's replicas logged (killed incarnations' included)."""
    result = platform.cli("logs", "hist", "--json", "--tail", "100000")
    return [json.loads(row)["line"] for row in result.stdout.splitlines()]


def events(lines: list[str]) -> list[dict[str, Any]]:
    """The history events among ``lines``, oldest first."""
    found = [json.loads(line.removeprefix(PREFIX)) for line in lines if line.startswith(PREFIX)]
    return sorted(found, key=lambda e: float(e["at"]))


def history_of(run: Run, until: float) -> tuple[History, list[dict[str, Any]], list[str]]:
    """The run's history so far: the replicas' events (once they cover ``until``: a line
    reaches the log a little after it is printed) and the writes the store received;
    with the events and every line logged."""

    def logged() -> tuple[list[dict[str, Any]], list[str]] | None:
        lines = logs(run.platform)
        found = events(lines)
        acting = {e["lock"] for e in found if e["ev"] == "acting" and e["at"] > until}
        return (found, lines) if acting >= set(OWNED) else None

    found, lines = wait_for("every owned lock's events logged", logged, within=20)
    now = time.monotonic()
    late = [e for e in found if not run.started <= e["at"] <= now]
    assert not late, f"events outside the test's own monotonic window: {late[:3]}"
    history = History(margin=max(0.2, TTL / 10))  # the SDK's margin (unused: deadlines are reported)
    for event in found:
        history.apply(event)
    history.writes = run.store.writes()
    return history, found, lines


def written_after(store: FencedStore, resources: list[str]) -> float:
    """Wait until each of ``resources`` accepted a write after now; returns now."""
    at = time.monotonic()
    wait_for(f"writes to {', '.join(resources)}", lambda: store.written_since(at, resources), within=30)
    return at


def test_a_run_with_killed_paused_and_restarted_parts_has_a_clean_history(run: Run) -> None:
    platform, store = run.platform, run.store
    wait_for("every resource written", lambda: all(store.highest(r) for r in RESOURCES), within=60)
    since = time.monotonic()
    running = pids(platform)

    # A ledger holder, caught between the two writes of a transfer, is stopped there.
    store.catch("ledger")
    caught = wait_for("a ledger holder caught mid-transfer", store.caught, within=20)
    paused = running[caught.client.split("/")[0]]
    faults = {"SIGSTOP of a ledger holder": time.monotonic()}
    os.killpg(paused, signal.SIGSTOP)
    store.let_go()
    try:
        # Meanwhile: kill -9 of the chief leader and of the owner of shard 0.
        held = wait_for(
            "a chief and an owner of shard 0",
            lambda: (found := locks(platform)) and {"singleton/chief", "shards/part/shard/0"} <= set(found) and found,
            within=10,
        )
        chief, owner = held["singleton/chief"], held["shards/part/shard/0"]
        faults["SIGKILL of the chief and of shard 0's owner"] = time.monotonic()
        os.killpg(running[chief["replica"]], signal.SIGKILL)
        os.killpg(running[owner["replica"]], signal.SIGKILL)
        wait_for(
            "a new chief, shard 0 owned again and a newer ledger holder's transfer",
            lambda: store.highest("chief") > chief["token"]
            and store.highest("part-0") > owner["token"]
            and store.highest("journal") > caught.token,
            within=30,
        )
    finally:
        faults["SIGCONT"] = time.monotonic()
        os.killpg(paused, signal.SIGCONT)
    # Woken, it finishes its transfer with its old token: the store refuses that write.
    stale_write = (caught.client, "journal", caught.token, False)
    stale = wait_for(
        "the paused holder's journal write",
        lambda: next(
            (w for w in store.writes() if (w.client, w.resource, w.token, w.accepted) == stale_write), None
        ),
        within=20,
    )

    if run.etcd is not None:
        faults["etcd stopped"] = time.monotonic()
        run.etcd.stop()
        run.etcd.start()
        faults["etcd started"] = time.monotonic()
    until = written_after(store, RESOURCES)

    history, found, _ = history_of(run, until)
    assert check(history) == []
    outages = [(faults["etcd stopped"], faults["etcd started"])] if run.etcd is not None else []
    assert check_owned_again(
        history, OWNED, within=TAKEOVER, since=since, until=until, outages=outages, after_outage=TTL + TAKEOVER
    ) == [], faults
    # The fault happened as intended: the paused holder's write came after its own deadline,
    # and it noticed the loss only then.
    [mine] = [v for v in history.validity() if v.client == caught.client and v.token == caught.token]
    assert stale.at > mine.end
    assert any(e["ev"] == "lost" and e["client"] == caught.client for e in found)
    # Every token of one lock was used by one holding only.
    assert len({(a.lock, a.token) for a in history.acquisitions}) == len(history.acquisitions)

    # The same data must fail a checker without the deadline, or a store without fencing.
    unbounded = check(history, bounded=False)
    assert any("lock ledger" in v and caught.client in v for v in unbounded), unbounded
    assert any("lock singleton/chief" in v for v in unbounded), unbounded
    unfenced = check(history.replayed(fenced=False))
    assert any(f"accepted token {caught.token} of {caught.client}" in v for v in unfenced), unfenced
    assert check(history.replayed(fenced=True)) == []


def holders(platform: Platform) -> tuple[dict[str, Any], dict[str, Any]] | None:
    held = locks(platform)
    leader, kept = held.get("singleton/steady"), held.get("kept")
    return (leader, kept) if leader and kept else None


def holder_lease_expiries(platform: Platform, names: list[str]) -> list[float]:
    """When the embedded backend will expire the leases of the holders of ``names`` (wall
    clock), read from its file (a lock's holder is its queue entry with the smallest token)."""
    db = sqlite3.connect(f"file:{platform.home / 'coordination.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute(
            "SELECT leases.expires_at FROM entries JOIN leases ON leases.id = entries.lease "
            "WHERE entries.token IN (SELECT MIN(token) FROM entries GROUP BY lock) "
            f"AND entries.lock IN ({','.join('?' * len(names))})",
            [f"hist/{name}" for name in names],
        ).fetchall()
    finally:
        db.close()
    return [float(row[0]) for row in rows]


def test_a_control_plane_restart_shorter_than_the_ttl_changes_no_leader_and_no_holder(run: Run) -> None:
    if run.kind != "embedded":
        pytest.skip("the control plane keeps the leases itself only with the embedded backend")
    platform = run.platform
    leader, kept = wait_for("steady led and kept held", lambda: holders(platform), within=30)
    before = pids(platform)

    control = platform.control_pid()
    killed = time.time()
    os.kill(control, signal.SIGKILL)
    wait_for("the control plane dead", lambda: not os.path.exists(f"/proc/{control}") or _zombie(control), within=10)
    platform.up()
    # The holders renew every third of the TTL, so at the kill each had at least two thirds
    # of it, less the margin, to run on its own deadline: the restart must fit in that.
    assert time.time() - killed < STEADY_TTL * 2 / 3 - STEADY_TTL / 10, "the restart took too long to test anything"
    # The holders' renewals went through to the new process: their leases now end later
    # than they could have without a renewal since the kill.
    wait_for(
        "the holders' leases renewed since the restart",
        lambda: (found := holder_lease_expiries(platform, ["kept", "singleton/steady"])) and len(found) == 2
        and min(found) > killed + STEADY_TTL,
        within=STEADY_TTL / 3,
    )
    assert holders(platform) == (leader, kept)
    after = pids(platform)
    assert after[leader["replica"]] == before[leader["replica"]]
    assert after[kept["replica"]] == before[kept["replica"]]

    # And the run's history stays clean across the restart (the short leases were lost and
    # taken again meanwhile: the outage was longer than their TTL).
    until = written_after(run.store, RESOURCES)
    history, _, lines = history_of(run, until)
    assert check(history) == []
    assert f"keeper holds kept with token {kept['token']}" in lines
    assert not [line for line in lines if "steady stops leading" in line or "keeper lost kept" in line]

    # The standby kept its place in the queue through the restart: a graceful stop of the
    # leader hands over at once, not after the TTL of a place lost in the outage.
    os.killpg(after[leader["replica"]], signal.SIGTERM)
    handed = time.monotonic()
    successor = wait_for(
        "the standby's replica to hold the lock",
        lambda: (found := locks(platform).get("singleton/steady")) and found["replica"] != leader["replica"] and found,
        within=STEADY_TTL / 6,
    )
    # ... and its process to lead: the holder is its live place in the queue, not one it lost.
    wait_for(
        "the standby to lead",
        lambda: f"steady leads with token {successor['token']}"
        in platform.cli("logs", "hist", "--component", "steady", "--tail", "50").stdout,
        within=STEADY_TTL / 6 - (time.monotonic() - handed),
    )


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
