"""What access control costs: an internal route with identity checks vs a public route.

Run:  python bench/gateway_internal.py [--duration 5] [--connections 64] [--repeats 3]

One gateway process (``python -m clearway.gateway --identity-key ...``) serves
two routes to the same backend (nginx ``return 200 "hello"`` on a Unix socket,
as replicas listen now):

  * public:   ``Host: bench.localhost``, no credential;
  * padded:   the public route with a dummy header as long as the credential
              header, so that it parses the same number of bytes;
  * internal: ``Host: internal.localhost`` with ``x-clearway-identity: <replica
              JWT>`` (EdDSA), checked against the allow rules and the
              identities table, stripped, and ``x-clearway-caller`` added.

wrk sends the same fixed headers on every request of a keep-alive connection,
which is how a replica's HTTP client behaves, so after the first request of a
connection the token is a cache hit.  The three targets alternate
``--repeats`` times and the median of each is reported, with the gateway's CPU
time per request; the goal is internal within 5% of public in requests/s.
CPU pinning as in ``bench/gateway.py`` (gateway alone on one CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# bench/ is not a package: share the helpers of the nginx comparison.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import (
    cpu_layout,
    cpu_seconds,
    free_port,
    median_run,
    nginx,
    run_gateway,
    wait_for_port,
    wrk,
)

REPLICA = "client-1.web.0"
INCARNATION = "0123456789abcdef"


def replica_token(key: Ed25519PrivateKey) -> str:
    """A replica credential shaped exactly like the control plane's."""
    now = int(time.time())
    claims = {
        "iss": "clearway", "aud": "clearway:replica", "sub": REPLICA, "app": "client", "rev": "client-1",
        "comp": "web", "inc": INCARNATION, "iat": now, "exp": now + 3600, "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="EdDSA")


@contextlib.contextmanager
def gateway(tmp: Path, port: int, backend: str, key_path: Path, cpus: str | None) -> Iterator[subprocess.Popen[bytes]]:
    target = [{"revision": "bench-1", "weight": 100, "endpoints": [backend]}]
    table: dict[str, object] = {
        "version": 1, "generation": 1, "domains": ["localhost"],
        "identities": {REPLICA: INCARNATION},
        "routes": [
            {"app": "bench", "host": "bench", "prefix": "/", "targets": target},
            {"app": "bench", "host": "internal", "prefix": "/", "internal": True,
             "allow": [{"app": "client", "revision": None, "component": None}], "targets": target},
        ],
    }
    with run_gateway(tmp, port, table, cpus, ("--identity-key", str(key_path))) as proc:
        yield proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per target (median)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs with taskset")
    args = parser.parse_args()
    proxy_cpu, load_cpu, layout = cpu_layout(not args.no_pin)
    key = Ed25519PrivateKey.generate()
    token = replica_token(key)

    with tempfile.TemporaryDirectory(prefix="cw-bench-", dir="/tmp") as tmpdir:
        tmp = Path(tmpdir)
        key_path = tmp / "signing.pub.pem"
        key_path.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        socket_path = tmp / "backend.sock"
        port = free_port()
        backend = f'listen unix:{socket_path} backlog=4096; location / {{ return 200 "hello"; }}'
        with (
            nginx(tmp, "backend", backend, cpus=load_cpu),
            gateway(tmp, port, f"unix:{socket_path}", key_path, proxy_cpu) as gateway_proc,
        ):
            wait_for_port(port)
            url = f"http://127.0.0.1:{port}/"
            targets = {
                "public": ("Host: bench.localhost",),
                "padded": ("Host: bench.localhost", f"x-padding-header-: {'p' * len(token)}"),
                "internal": ("Host: internal.localhost", f"x-clearway-identity: {token}"),
            }
            for headers in targets.values():  # warm up; also proves every target answers 200
                result = wrk(url, 1, args.connections, cpus=load_cpu, headers=headers)
                if result.get("errors"):
                    raise SystemExit(f"a warm-up run with {headers[0]!r} got errors; see above")
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(max(1, args.repeats)):
                for name, headers in targets.items():
                    before = cpu_seconds(gateway_proc.pid)
                    result = wrk(url, args.duration, args.connections, cpus=load_cpu, headers=headers)
                    result["cpu_us"] = (cpu_seconds(gateway_proc.pid) - before) / (result["rps"] * args.duration) * 1e6
                    runs[name].append(result)

    median = {name: median_run(results) for name, results in runs.items()}
    print(f"\nclearway gateway: internal route with identity checks vs public route — wrk -t1 -c{args.connections},")
    print(f"{args.duration:g} s per run, median of {len(runs['public'])} alternating runs (all runs in brackets).")
    print(f"{layout}.")
    print("backend: nginx 'return 200 \"hello\"' on a Unix socket; token: EdDSA replica JWT "
          f"({len(token)} bytes), sent on every request.\n")
    for name in targets:
        m = median[name]
        every = ", ".join(f"{r['rps']:.0f}" for r in runs[name])
        print(
            f"  {name:9s} {m['rps']:>9.0f} req/s   p50 {m.get('p50_ms', 0):.3f} ms   p99 {m.get('p99_ms', 0):.3f} ms"
            f"   cpu {m['cpu_us']:.1f} us/req   [{every}]"
        )
    ratio = median["internal"]["rps"] / median["public"]["rps"]
    padded = median["internal"]["rps"] / median["padded"]["rps"]
    print(f"\n  internal / public: {ratio:.3f}x  (goal >= 0.95x)")
    print(f"  internal / padded public (same header bytes): {padded:.3f}x  (the cost of the check itself)")
    cpu = median["internal"]["cpu_us"] / median["public"]["cpu_us"]
    print(f"  gateway CPU per request, internal / public: {cpu:.3f}x  (steadier than req/s on a busy machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
