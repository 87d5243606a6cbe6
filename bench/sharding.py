"""Sharding: shards moved when a sharded worker scales 4 -> 5 and 5 -> 4 replicas.

Run:  python bench/sharding.py [--shards 64] [--trials 1000]

Pure computation (no platform): `clearway.sdk.sharding.assign` — rendezvous
hashing with bounded load (no member above ceil(shards / members * 1.25)) —
beside plain modulo hashing (shard s to member ``blake2b(s) % n``) in the same
run. The ideal is the least any balanced assignment must move: on a join, the
newcomer's fair share, shards / 5; on a leave, the leaver's, shards / 5 too.

One scale-up moves what the newcomer wins in the rendezvous draw, which varies
with the member names (binomial around the ideal), so the figures are given
for the replica names of one app (``shop-1.consume.0`` ...) and as the mean,
p90 and max over ``--trials`` sets of names (revisions ``shop-1``,
``shop-2``, ...). Goal (issue 8): the mean within 10% of the ideal.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from clearway.sdk.sharding import LOAD_BOUND, assign


def modulo(shards: int, members: list[str]) -> list[str]:
    ordered = sorted(members)
    return [
        ordered[int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "big") % len(ordered)]
        for s in range(shards)
    ]


def moved(before: list[str], after: list[str]) -> int:
    return sum(a != b for a, b in zip(before, after, strict=True))


def names(trial: int) -> list[str]:
    return [f"shop-{trial}.consume.{i}" for i in range(5)]


def scale(method: Callable[[int, list[str]], list[str]], shards: int, members: list[str]) -> tuple[int, int]:
    """(moved on 4 -> 5, moved on 5 -> 4 when the middle member leaves)."""
    four, five = method(shards, members[:4]), method(shards, members)
    leave = members[:2] + members[3:]
    return moved(four, five), moved(five, method(shards, leave))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()
    shards, ideal = args.shards, args.shards / 5
    started = time.perf_counter()
    print(f"{shards} shards; ideal moved on 4 -> 5 and on 5 -> 4: {shards} / 5 = {ideal:g}")
    print(f"{'method':<34} {'change':<7} {'one app':>8} {'mean':>7} {'p90':>5} {'max':>5}  mean / ideal")
    for label, method in ((f"rendezvous, bounded load {LOAD_BOUND:g}", assign), ("modulo", modulo)):
        results = [scale(method, shards, names(trial)) for trial in range(1, args.trials + 1)]
        for which, change in enumerate(("4 -> 5", "5 -> 4")):
            counts = sorted(result[which] for result in results)
            one = results[0][which]
            mean = statistics.mean(counts)
            p90 = counts[int(0.9 * (len(counts) - 1))]
            print(
                f"{label:<34} {change:<7} {one:>8} {mean:>7.2f} {p90:>5} {counts[-1]:>5}  "
                f"{mean / ideal:.3f}  ({mean / shards:.1%} of the shards)"
            )
    print(f"({args.trials} sets of member names; {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
