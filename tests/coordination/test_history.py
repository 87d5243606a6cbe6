"""The history checker, on made-up histories and on real workloads against both backends.

The workload: clients take turns on one lock, each writing to a resource with its
fencing token while it holds the lock. One client is *paused* while holding: it
stops renewing (in-process and deterministic: its renewal task is cancelled, as a
SIGSTOP would freeze it), the backend expires its lease, the next client takes
the lock and writes, and then the paused one "resumes" and writes with its old
token, as a process would that was stopped between checking its deadline and
writing. Against a fenced resource that write is refused and the history is
clean; against an unfenced one it is accepted, and the checker must say so.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from clearway.coordination import Coordinator
from tests.coordination.conftest import renew, stop, wait_until
from tests.coordination.history import FencedResource, History, Write, check, check_owned_again

pytestmark = pytest.mark.timeout(30)

MARGIN = 0.1


# -- the checker on made-up histories ----------------------------------------------------------

def test_checker_passes_a_clean_history() -> None:
    h = History(margin=MARGIN)
    h.granted("la", ttl=1, sent=0.0)
    h.granted("lb", ttl=1, sent=0.0)
    h.acquired("a", "l", "la", token=5, at=0.1)
    h.released("a", "l", at=0.3)
    h.acquired("b", "l", "lb", token=7, at=0.35)
    h.released("b", "l", at=0.5)
    resource = FencedResource("r", h)
    assert resource.write("a", 5, at=0.2) and resource.write("b", 7, at=0.4)
    assert check(h) == []


def test_checker_reports_holders_with_overlapping_validity() -> None:
    h = History(margin=MARGIN)
    h.granted("la", ttl=1, sent=0.0)
    h.granted("lb", ttl=1, sent=0.0)
    h.acquired("a", "l", "la", token=5, at=0.1)  # a's deadline: 0.9, never released
    h.acquired("b", "l", "lb", token=7, at=0.5)
    [violation] = check(h)
    assert "a (token 5" in violation and "held it at once" in violation


def test_a_renewal_sent_after_the_deadline_does_not_extend_validity() -> None:
    h = History(margin=MARGIN)
    h.granted("la", ttl=1, sent=0.0)
    h.renewed("la", sent=0.5)  # deadline 1.4
    h.renewed("la", sent=1.5)  # too late: the client had lost the lease at 1.4
    h.acquired("a", "l", "la", token=5, at=0.1)
    h.granted("lb", ttl=1, sent=1.0)
    h.acquired("b", "l", "lb", token=7, at=1.45)
    assert h.deadline("la") == pytest.approx(1.4)
    assert check(h) == []


def test_checker_reports_tokens_that_do_not_increase() -> None:
    h = History(margin=MARGIN)
    h.granted("la", ttl=1, sent=0.0)
    h.granted("lb", ttl=1, sent=0.0)
    h.acquired("a", "l", "la", token=7, at=0.1)
    h.released("a", "l", at=0.2)
    h.acquired("b", "l", "lb", token=7, at=0.3)
    [violation] = check(h)
    assert "token 7 of b" in violation and "strictly increase" in violation


def test_checker_reports_a_stale_write_that_got_through() -> None:
    h = History(margin=MARGIN)
    resource = FencedResource("r", h, fenced=False)
    assert resource.write("b", 7, at=1.0) and resource.write("a", 5, at=1.1)
    [violation] = check(h)
    assert "accepted token 5 of a" in violation and "after token 7 of b" in violation
    fenced = FencedResource("f", History(margin=MARGIN))
    assert fenced.write("b", 7, at=1.0) and not fenced.write("a", 5, at=1.1)
    assert check(fenced.history) == []


def test_reported_deadlines_bound_validity_and_a_late_report_does_not_revive_it() -> None:
    h = History(margin=MARGIN)
    for event in (
        {"ev": "acquired", "client": "a", "lock": "l", "token": 5, "at": 0.0, "deadline": 1.0},
        {"ev": "acting", "client": "a", "lock": "l", "token": 5, "at": 0.5, "deadline": 1.5},
        # Paused past 1.5, it wakes and reports again: too late to extend anything.
        {"ev": "acting", "client": "a", "lock": "l", "token": 5, "at": 3.0, "deadline": 3.5},
        {"ev": "lost", "client": "a", "lock": "l", "token": 5, "at": 3.1},
        {"ev": "acquired", "client": "b", "lock": "l", "token": 7, "at": 2.0, "deadline": 3.0},
    ):
        h.apply(event)
    assert [round(v.end, 3) for v in h.validity()] == [1.5, 3.0]
    assert [v.end for v in h.validity(bounded=False)] == [3.1, math.inf]
    assert check(h) == []
    # Not bounded by the deadline, a's validity runs until it noticed the loss, over b's.
    [violation] = check(h, bounded=False)
    assert "a (token 5" in violation and "held it at once" in violation


def test_a_replay_through_an_unfenced_resource_shows_the_stale_write() -> None:
    h = History(margin=MARGIN)
    resource = FencedResource("r", h)
    assert resource.write("b", 7, at=1.0) and not resource.write("a", 5, at=1.1)
    assert check(h) == []
    assert check(h.replayed(fenced=True)) == []
    [violation] = check(h.replayed(fenced=False))
    assert "accepted token 5 of a" in violation


def test_checker_reports_a_valid_holder_refused() -> None:
    h = History(margin=MARGIN)
    h.apply({"ev": "acquired", "client": "a", "lock": "l", "token": 5, "at": 0.0, "deadline": 1.0})
    FencedResource("r", h).write("a", 5, at=0.5)
    h.writes[-1] = Write("a", "r", 5, 0.5, accepted=False)
    [violation] = check(h)
    assert "refused token 5 of a" in violation and "rightful" in violation


def test_checker_reports_a_lock_not_taken_over_in_time() -> None:
    h = History(margin=MARGIN)
    h.apply({"ev": "acquired", "client": "a", "lock": "s/0", "token": 1, "at": 0.0, "deadline": 1.0})
    h.apply({"ev": "acquired", "client": "b", "lock": "s/0", "token": 2, "at": 2.0, "deadline": 10.0})
    h.apply({"ev": "acquired", "client": "a", "lock": "s/1", "token": 3, "at": 0.5, "deadline": 4.0})
    violations = check_owned_again(h, ["s/0", "s/1", "s/2"], within=0.9, since=0.0, until=5.0)
    assert [v.split(":")[0] for v in violations] == ["lock s/0", "lock s/1", "lock s/2"], violations
    assert "from 1.000 to 2.000" in violations[0] and "to the end of the run" in violations[1]
    assert check_owned_again(h, ["s/0", "s/1"], within=1.5, since=0.0, until=5.0) == []
    # A backend outage from 0.5 to 1.8 excuses s/0's gap up to 0.5 s after it.
    assert check_owned_again(h, ["s/0"], within=0.9, since=0.0, until=5.0, outages=[(0.5, 1.8)], after_outage=0.5) == []
    assert check_owned_again(h, ["s/0"], within=0.9, since=0.0, until=5.0, outages=[(0.5, 1.4)], after_outage=0.5)


# -- real workloads ------------------------------------------------------------------------------

async def workload(coordinator: Coordinator, lock: str, *, fenced: bool, clients: int = 4, rounds: int = 3) -> History:
    """``clients`` take turns on ``lock``, writing with their token; client 0 is paused in its first turn."""
    history = History(margin=MARGIN)
    resource = FencedResource(f"{lock}-store", history, fenced=fenced)

    async def client(name: str, paused: bool) -> None:
        sent = time.monotonic()
        lease = await coordinator.grant(f"hist/{name}", 1)
        history.granted(lease.id, lease.ttl, sent)
        renewing = renew(coordinator, lease, on_sent=lambda t: history.renewed(lease.id, t))
        try:
            for _ in range(rounds):
                holding = await coordinator.acquire(lock, lease.id, wait=10)
                assert holding is not None
                history.acquired(name, lock, lease.id, holding.token, time.monotonic())
                resource.write(name, holding.token, time.monotonic())
                if paused:
                    await stop(renewing)  # frozen: no renewal goes out
                    # ... until its lease has expired and a newer holder has written,
                    async def overtaken(top: int = resource.highest) -> bool:
                        return resource.highest > top

                    await wait_until(overtaken, within=lease.ttl + 5, what="a newer holder wrote")
                    # ... then it resumes and writes with its old token.
                    resource.write(name, holding.token, time.monotonic())
                    return
                history.released(name, lock, time.monotonic())
                assert await coordinator.release(lock, lease.id)
        finally:
            await stop(renewing)
            await coordinator.revoke(lease.id)

    # Client 0 first, so that it holds the lock while the others queue behind it.
    first = asyncio.create_task(client("c0", paused=True))

    async def c0_holds() -> bool:
        return bool(history.acquisitions)

    await wait_until(c0_holds, within=5, what="c0 holds the lock")
    await asyncio.gather(first, *(client(f"c{i}", paused=False) for i in range(1, clients)))
    return history


async def test_the_checker_fails_an_unfenced_paused_holder_and_passes_a_fenced_one(
    coordinator: Coordinator,
) -> None:
    unfenced, fenced = await asyncio.gather(
        workload(coordinator, "unfenced", fenced=False), workload(coordinator, "fenced", fenced=True)
    )
    for history in (unfenced, fenced):
        assert len(history.acquisitions) == 1 + 3 * 3
    violations = check(unfenced)
    assert violations, "the checker missed a stale write through an unfenced resource"
    assert all("a stale holder's write got through" in v and "of c0" in v for v in violations), violations
    assert check(fenced) == []
    refused = [w for w in fenced.writes if not w.accepted]
    assert [(w.client, w.token) for w in refused] == [("c0", fenced.acquisitions[0].token)]
    assert await coordinator.leases("hist/") == [] and await coordinator.holdings("") == []
