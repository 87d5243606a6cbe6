"""Uploads are unpacked under limits into an unambiguous digest."""

from __future__ import annotations

import gzip
import resource
import tarfile
from pathlib import Path

import pytest

from clearway.control.uploads import UploadLimits, parse_env, unpack
from clearway.exceptions import APIError
from tests.control.projects import file_member, link_member, tar_gz

pytestmark = pytest.mark.timeout(60)

GiB = 1 << 30


def digest_of(tmp_path: Path, name: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    target = tmp_path / f"out-{name}"
    target.mkdir()
    return unpack(tar_gz(tmp_path / f"{name}.tar.gz", members), target, UploadLimits())


def test_names_and_contents_cannot_trade_bytes(tmp_path: Path) -> None:
    one = digest_of(tmp_path, "one", [file_member("a", b"bc")])
    two = digest_of(tmp_path, "two", [file_member("ab", b"c")])
    assert one != two and len(one) == 64


def test_symlink_targets_modes_and_types_are_covered(tmp_path: Path) -> None:
    base = [file_member("x.py", b"1"), file_member("y.py", b"2")]
    to_x = digest_of(tmp_path, "to_x", [*base, link_member("current", "x.py")])
    to_y = digest_of(tmp_path, "to_y", [*base, link_member("current", "y.py")])
    executable = digest_of(tmp_path, "exec", [file_member("x.py", b"1", 0o755), file_member("y.py", b"2"), link_member("current", "x.py")])
    assert len({to_x, to_y, executable}) == 3
    empty_file = digest_of(tmp_path, "file", [file_member("d", b"")])
    directory = tarfile.TarInfo("d")
    directory.type = tarfile.DIRTYPE
    assert empty_file != digest_of(tmp_path, "dir", [(directory, None)])


def test_the_same_members_in_another_order_give_the_same_digest(tmp_path: Path) -> None:
    one = digest_of(tmp_path, "one", [file_member("a", b"1"), file_member("b", b"2")])
    two = digest_of(tmp_path, "two", [file_member("b", b"2"), file_member("a", b"1")])
    assert one == two


def test_snapshot_modes_are_normalised(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    unpack(tar_gz(tmp_path / "a.tar.gz", [file_member("run.sh", b"#!/bin/sh", 0o4777), file_member("data", b"x", 0o666)]), target, UploadLimits())
    assert (target / "run.sh").stat().st_mode & 0o7777 == 0o750
    assert (target / "data").stat().st_mode & 0o7777 == 0o640


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([file_member("../escape", b"x")], "unsafe"),
        ([link_member("out", "/etc/passwd")], "unsafe"),
        ([link_member("out", "../../x")], "unsafe"),
        ([file_member("a", b"1"), file_member("a", b"2")], "twice"),
        ([link_member("sub", "."), file_member("sub/x", b"1")], "symlink"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str) -> None:
    with pytest.raises(APIError, match=reason) as caught:
        digest_of(tmp_path, "bad", members)
    assert caught.value.status == 400


def test_absolute_names_land_inside_the_snapshot(tmp_path: Path) -> None:
    digest_of(tmp_path, "abs", [file_member("/etc/evil", b"x")])
    assert (tmp_path / "out-abs" / "etc" / "evil").read_bytes() == b"x"


@pytest.fixture(scope="module")
def gzip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 1 MB of gzip holding one 1 GiB file of zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    header = tarfile.TarInfo("big")
    header.size = GiB
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(header.tobuf())
        zeros = b"\0" * (16 << 20)
        for _ in range(GiB // len(zeros)):
            out.write(zeros)
        out.write(b"\0" * 1024)  # end of archive
    return path


def test_a_gzip_bomb_is_refused_with_413_and_small_memory(tmp_path: Path, gzip_bomb: Path) -> None:
    assert gzip_bomb.stat().st_size < 2 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(APIError, match="expands to more than 512 MiB") as caught:
        unpack(gzip_bomb, target, UploadLimits())
    assert caught.value.status == 413
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"


def test_a_header_that_lies_about_its_size_is_counted_by_what_is_decompressed(tmp_path: Path) -> None:
    limits = UploadLimits(max_uncompressed=1 << 20)
    with pytest.raises(APIError) as caught:
        digest_of_limits = tar_gz(tmp_path / "a.tar.gz", [file_member("f", b"\0" * (2 << 20))])
        target = tmp_path / "out"
        target.mkdir()
        unpack(digest_of_limits, target, limits)
    assert caught.value.status == 413


def test_too_many_members_is_413(tmp_path: Path) -> None:
    path = tar_gz(tmp_path / "many.tar.gz", [file_member(f"f{i}", b"") for i in range(11)])
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(APIError, match="more than 10 files") as caught:
        unpack(path, target, UploadLimits(max_members=10))
    assert caught.value.status == 413


def test_a_huge_metadata_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 64 << 20
    path = tmp_path / "long.tar.gz"
    with gzip.open(path, "wb") as out:
        out.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        out.write(b"a" * (64 << 20))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(APIError, match="metadata header"):
        unpack(path, target, UploadLimits())


def test_not_a_gzip_is_400(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"plain text")
    (tmp_path / "out").mkdir()
    with pytest.raises(APIError, match="not a gzipped tar") as caught:
        unpack(tmp_path / "x", tmp_path / "out", UploadLimits())
    assert caught.value.status == 400


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("NOEQUALS", "no '='"),
        ("BAD KEY=s3cret", "not a valid variable name"),
        ("1ABC=s3cret", "not a valid variable name"),
        ("K\n=s3cret", "not a valid variable name"),
        ("K=s3cret\0b", "NUL"),
    ],
)
def test_env_entries_are_checked_without_echoing_values(item: str, message: str) -> None:
    with pytest.raises(APIError, match=message) as caught:
        parse_env([item])
    assert caught.value.status == 422
    value = item.partition("=")[2]
    assert not value or value not in caught.value.message


def test_good_env_entries_pass() -> None:
    assert parse_env(["A=1", "_b2=x=y", "EMPTY="]) == {"A": "1", "_b2": "x=y", "EMPTY": ""}
