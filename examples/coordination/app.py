"""Coordination: a lock with a fencing token, and a singleton with a standby.

* ``reserve`` (HTTP at ``/reserve``) takes the ``inventory`` lock for each
  reservation and writes with its fencing token to a tiny "store" that
  refuses any token smaller than the largest it has seen — the pattern that
  keeps a holder paused past its lease from writing stale data;
* ``scheduler`` runs in one of its two replicas at a time: the other stands
  by and takes over within ``lease_ttl`` seconds if the leader dies, at once
  when it stops (``clearway status coordination`` shows who leads; kill the
  leader's pid and look again).
"""

import asyncio
import os

import clearway as cw

app = cw.App("coordination")

# The stand-in for a database that checks fencing tokens (per replica here; in a
# real app it is the shared store that refuses stale tokens).
_highest_token = 0


@app.function(http="/reserve")
def reserve(item: str) -> dict[str, object]:
    global _highest_token
    with cw.Lock("inventory", ttl=10) as lock:
        assert lock.token is not None
        if lock.token < _highest_token:
            return {"written": False, "reason": f"stale token {lock.token} < {_highest_token}"}
        _highest_token = lock.token
        return {"written": True, "item": item, "token": lock.token, "by": os.environ["CLEARWAY_REPLICA_ID"]}


@app.singleton(replicas=2, lease_ttl=5)
async def scheduler(leadership: cw.Leadership) -> None:
    print(f"leading with fencing token {leadership.token}", flush=True)
    while True:
        print("scheduling the next batch", flush=True)
        await asyncio.sleep(30)
