"""Faults of the machine, end to end (issue 5, "Faults end in a clear state"):
each one made for real — a WAL frame corrupted on disk after a ``kill -9``, a
real full filesystem (a small tmpfs), an ``app.py`` that forks at import, a
gzip bomb through the real API — and checked through the real CLI."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import subprocess
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from clearway.runtime.process import is_alive
from tests.e2e.conftest import asgi_app, write_app
from tests.e2e.platform import Load, Platform, all_pids_under, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1024 * 1024

def service(text: str) -> str:
    return asgi_app(text, replicas=1)


def wait_until_dead(pid: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while is_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive after {within}s"
        time.sleep(0.01)


def replica_processes(home: Path) -> set[int]:
    """The replica processes (``python -m clearway.runtime.replica``) of the platform in ``home``."""
    found = set()
    for pid in all_pids_under(home):
        with contextlib.suppress(OSError):
            if b"clearway.runtime.replica" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return found


def descendants(roots: set[int]) -> set[int]:
    """``roots`` and every process below them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    seen, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, []))
    return seen


# -- a. a corrupted write-ahead log -------------------------------------------------------
@dataclass(frozen=True)
class WalFrame:
    offset: int
    page: int
    #: Size of the database after this frame for a commit frame, 0 for the others.
    commit: int


@dataclass(frozen=True)
class Wal:
    page_size: int
    salt: tuple[int, int]
    #: The frames SQLite would replay: salts and running checksums valid, up to the last commit.
    frames: list[WalFrame]


def read_wal(path: Path) -> Wal:
    """Parse a SQLite WAL the way SQLite does (https://sqlite.org/fileformat2.html#walformat).

    A WAL is reused from its start after a checkpoint, so frames of an older
    generation may follow the live ones; only frames whose salts match the
    header and whose cumulative checksums hold are live.
    """
    data = path.read_bytes()
    magic, _version, page_size, _seq, salt1, salt2, check1, check2 = struct.unpack(">8I", data[:32])
    assert magic in (0x377F0682, 0x377F0683), f"{path} is not a WAL (magic {magic:#x})"
    order = ">" if magic == 0x377F0683 else "<"

    def checksum(buffer: bytes, s0: int, s1: int) -> tuple[int, int]:
        words = struct.unpack(f"{order}{len(buffer) // 4}I", buffer)
        for i in range(0, len(words), 2):
            s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
            s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
        return s0, s1

    assert checksum(data[:24], 0, 0) == (check1, check2), f"{path} has a damaged header"
    running = (check1, check2)
    frames: list[WalFrame] = []
    size = 24 + page_size
    offset = 32
    while offset + size <= len(data):
        header = data[offset : offset + 24]
        page, commit, fsalt1, fsalt2, fcheck1, fcheck2 = struct.unpack(">6I", header)
        if (fsalt1, fsalt2) != (salt1, salt2):
            break
        running = checksum(header[:8] + data[offset + 24 : offset + size], *running)
        if running != (fcheck1, fcheck2):
            break
        frames.append(WalFrame(offset, page, commit))
        offset += size
    last_commit = max((i for i, frame in enumerate(frames) if frame.commit), default=-1)
    return Wal(page_size, (salt1, salt2), frames[: last_commit + 1])


def flip_page_bytes(path: Path, frame: WalFrame, page_size: int) -> None:
    """Invert 16 bytes in the middle of ``frame``'s page: its checksum no longer holds."""
    with path.open("r+b") as wal:
        wal.seek(frame.offset + 24 + page_size // 2)
        original = wal.read(16)
        wal.seek(frame.offset + 24 + page_size // 2)
        wal.write(bytes(b ^ 0xFF for b in original))


def test_a_corrupted_wal_is_refused_and_recovery_keeps_the_gateway_port_and_the_app(
    platform: Platform, tmp_path: Path
) -> None:
    platform.cli("deploy", str(write_app(tmp_path / "keep", service("kept"), name="keep")))
    wal_path = platform.home / "state.db-wal"
    kept = read_wal(wal_path)  # everything "keep" needs is in these frames (or already in state.db)
    # Commits after it, so a frame in the middle of them is followed by more commits.
    churn = tmp_path / "churn"
    platform.cli("deploy", str(write_app(churn, service("churn one"), name="churn")))
    platform.cli("deploy", str(write_app(churn, service("churn two"), name="churn")))
    platform.cli("scale", "churn", "web", "2")
    kept_pids = {r["id"]: r["pid"] for r in platform.status("keep")["replicas"]}

    with Load(platform, "keep") as load:
        load.wait_for(5)
        control = platform.control_pid()
        os.kill(control, signal.SIGKILL)
        wait_until_dead(control)
        load.wait_for(10)  # the gateway and the replicas serve on

        wal = read_wal(wal_path)
        first = len(kept.frames) if wal.salt == kept.salt else 0  # a checkpoint restarts the WAL
        assert len(wal.frames) - first >= 10, f"the WAL holds too few frames after 'keep' to corrupt: {wal}"
        middle = (first + len(wal.frames)) // 2
        assert any(frame.commit for frame in wal.frames[middle + 1 :]), "no commit follows the damaged frame"
        flip_page_bytes(wal_path, wal.frames[middle], wal.page_size)
        assert len(read_wal(wal_path).frames) < len(wal.frames)  # SQLite now stops before the damage

        # Not --port: the port must come from what the platform kept, not from us.
        refused = platform.cli("up", "--detach", check=False)
        assert refused.returncode == 1, refused
        assert "lost committed changes" in refused.stderr, refused.stderr
        assert "clearway state recover" in refused.stderr, refused.stderr
        assert not platform.home.joinpath("control.json").exists() or not is_alive(platform.control_pid())
        load.wait_for(10)  # a refused start leaves the running apps alone

        recovered = platform.cli("state", "recover", "--yes")
        assert "moved the damaged state to" in recovered.stdout, recovered
        assert "committed changes were lost" in recovered.stderr, recovered

        started = platform.cli("up", "--detach")
        assert f":{platform.port}/" in started.stdout, started.stdout
        load.wait_for(20)
    assert load.failures == []

    info = json.loads(platform.home.joinpath("control.json").read_text())
    assert info["gateway_port"] == platform.port, info
    status = platform.status("keep")
    assert status["active_revision"] == "keep-1", status
    assert {r["id"]: r["pid"] for r in status["replicas"]} == kept_pids  # adopted, not restarted
    assert platform.get("keep").text == "kept"

    # Nothing orphaned: every replica process left belongs to a replica the platform knows.
    deadline = time.monotonic() + 60
    while True:
        apps = [app["name"] for app in json.loads(platform.cli("status", "--json").stdout)]
        known = {r["pid"] for name in apps for r in platform.status(name)["replicas"] if r["pid"]}
        orphans = replica_processes(platform.home) - descendants(known)
        if not orphans:
            break
        assert time.monotonic() < deadline, f"replica processes no one manages: {sorted(orphans)}"
        time.sleep(0.1)


# -- b. a full disk ---------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real, small filesystem: a 96 MiB tmpfs (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        deadline = time.monotonic() + 30
        while subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "--lazy", str(mount)], check=True)
                raise AssertionError(f"{mount} stayed busy after the platform went down (lazily unmounted)")
            time.sleep(0.1)


@pytest.fixture
def platform_on_small_disk(small_disk: Path) -> Iterator[Platform]:
    running = Platform(home=small_disk / "home", port=free_port())
    try:
        running.up()
        yield running
    finally:
        running.down()
        deadline = time.monotonic() + 30
        while all_pids_under(running.home) and time.monotonic() < deadline:
            time.sleep(0.05)


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem has no room left."""
    chunk = b"\xa5" * MiB
    with path.open("wb", buffering=0) as filler:
        while True:
            try:
                filler.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    # Whatever partial page is left too.
    with path.open("ab", buffering=0) as filler, contextlib.suppress(OSError):
        while filler.write(b"\xa5" * 512):
            pass


def test_a_full_disk_fails_deploy_quickly_naming_the_disk_and_recovers_once_freed(
    platform_on_small_disk: Platform, small_disk: Path, tmp_path: Path
) -> None:
    platform = platform_on_small_disk
    project = tmp_path / "demo"
    platform.cli("deploy", str(write_app(project, service("before"))))
    assert platform.get("demo").text == "before"

    filler = small_disk / "filler"
    fill(filler)
    write_app(project, service("after"))
    started = time.monotonic()
    refused = platform.cli("deploy", str(project), check=False, timeout=60)
    elapsed = time.monotonic() - started
    assert refused.returncode == 1, refused
    assert elapsed < 15, f"a deploy on a full disk took {elapsed:.1f}s to fail"
    assert "no space left" in refused.stderr and str(small_disk) in refused.stderr, refused.stderr
    assert platform.get("demo").text == "before"  # the app keeps serving meanwhile
    assert platform.status("demo")["active_revision"] == "demo-1"

    filler.unlink()
    platform.cli("deploy", str(project))
    assert platform.get("demo").text == "after"


# -- c. an app.py that forks at import -------------------------------------------------------
def test_an_app_that_forks_at_import_deploys_promptly_and_leaks_no_process(
    platform: Platform, tmp_path: Path
) -> None:
    marker = f"clearway-fork-test-{uuid.uuid4().hex}"
    # The child holds stdout and stderr open forever; its command line and its
    # environment carry the marker and who forked it (the spec-reading import or a replica).
    forks = f"""
import os, sys
if os.fork() == 0:
    tag = {marker!r} + "-" + os.environ.get("CLEARWAY_REPLICA_ID", "inspect")
    os.execve(sys.executable, [sys.executable, "-c", "import time\\nwhile True: time.sleep(3600)", tag], {{"FORK_MARKER": tag}})
"""
    project = write_app(tmp_path / "forker", forks + service("forked"), name="forker")
    started = time.monotonic()
    result = platform.cli("deploy", str(project), check=False, timeout=90)
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"deploy took {elapsed:.1f}s (the import timeout is 60s): {result.stderr}"
    assert result.returncode == 0, result.stderr
    assert platform.get("forker").text == "forked"

    def holders(tag: str) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if tag.encode() in (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes():
                    found.append(int(entry.name))
        return found

    assert holders(f"{marker}-inspect") == []  # the spec-reading child's fork died with it
    assert holders(marker), "the replica's own fork should run while the replica does"  # the probe works
    platform.cli("destroy", "forker", "--yes")
    deadline = time.monotonic() + 30
    while leaked := holders(marker):
        assert time.monotonic() < deadline, f"processes forked by the app outlived it: {leaked}"
        time.sleep(0.05)


# -- d. a gzip bomb -----------------------------------------------------------------------
def gzip_bomb(expanded_mib: int) -> Iterator[bytes]:
    """A gzipped tar holding one file of zeros, ``expanded_mib`` MiB once unpacked, streamed.

    Deflate output for a MiB of zeros after a sync flush depends only on the
    window before it (zeros too), so one compressed block is repeated: about
    1 KiB per MiB, built in milliseconds with no MiB ever held twice.
    """
    member = tarfile.TarInfo("bomb.bin")
    member.size = expanded_mib * MiB - 512 - 1024  # then the 1024 zero bytes that end a tar
    header = member.tobuf(format=tarfile.GNU_FORMAT)
    zeros = bytes(MiB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: we write the gzip framing
    first = header + zeros[len(header) :]
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip header: deflate, no name, no mtime
    yield compressor.compress(first) + compressor.flush(zlib.Z_SYNC_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH)
    crc = zlib.crc32(zeros, zlib.crc32(first))
    yield block
    for _ in range(expanded_mib - 2):
        crc = zlib.crc32(zeros, crc)
        yield block
    yield b"\x03\x00" + struct.pack("<II", crc, (expanded_mib * MiB) & 0xFFFFFFFF)  # empty final block, trailer


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_a_gzip_bomb_is_refused_with_413_and_the_control_plane_stays_small(platform: Platform) -> None:
    expanded_mib = 1024
    body = b"".join(gzip_bomb(expanded_mib))
    assert len(body) < 2 * MiB, len(body)
    # The bomb is real: it inflates to exactly what it claims (checked streaming, in bounded memory).
    inflater, inflated = zlib.decompressobj(31), 0
    for start in range(0, len(body), 64 * 1024):
        inflated += len(inflater.decompress(body[start : start + 64 * 1024]))
    assert inflater.eof and inflated == expanded_mib * MiB, inflated

    pid = platform.control_pid()
    info = json.loads(platform.home.joinpath("control.json").read_text())
    token = platform.home.joinpath("token").read_text().strip()
    peak = rss_kib(pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            with contextlib.suppress(OSError, AssertionError):
                peak = max(peak, rss_kib(pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        response = httpx.post(
            f"{info['api_url']}/v1/deploy",
            content=gzip_bomb(expanded_mib),
            headers={"authorization": f"Bearer {token}", "content-type": "application/gzip"},
            timeout=120,
        )
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 413, (response.status_code, response.text)
    message = response.json()["error"]
    assert "expands to more than" in message and "MiB" in message, message

    expanded_kib = expanded_mib * 1024
    assert peak < expanded_kib // 4, f"control plane RSS reached {peak} KiB for a {expanded_kib} KiB bomb"
    assert rss_kib(pid, "VmHWM") < expanded_kib // 4, rss_kib(pid, "VmHWM")
    # It keeps answering, and left nothing of the bomb on disk.
    assert httpx.get(f"{info['api_url']}/v1/health", timeout=10).status_code == 200
    assert platform.cli("status").returncode == 0
    leftovers = [*platform.home.joinpath("uploads").iterdir(), *platform.home.joinpath("code", ".staging").iterdir()]
    assert leftovers == [], leftovers
