"""Ids are composed by one constructor each, and composed ids never collide."""

import itertools

import pytest

import clearway as cw
from clearway.exceptions import SpecError
from clearway.spec import AppSpec
from clearway.spec.ids import parse_replica_id, replica_id, revision_id


@pytest.mark.parametrize("name", ["name\n", "\nname", "a b", "A", "a_b", "-a", "a-", "a.b", "", "a" * 41])
def test_names_are_matched_whole(name: str) -> None:
    with pytest.raises(SpecError, match="is not a valid name"):
        cw.App(name)
    with pytest.raises(ValueError, match="is not a valid name"):
        AppSpec(name=name)


@pytest.mark.parametrize("key", ["A B", "A\nB", "A\0", "1A", "", "A-B", "A\n"])
def test_env_names_are_validated(key: str) -> None:
    with pytest.raises(SpecError, match="environment variable name"):
        app = cw.App("ok", env={key: "x"})
        app.spec()


def test_env_values_may_not_hold_nul() -> None:
    with pytest.raises(SpecError, match="NUL"):
        cw.App("ok", env={"A": "x\0y"}).spec()


def test_the_reported_collision_no_longer_collides() -> None:
    # App "b", component "x-2-y", revision 1 vs app "b-1-x", component "y", revision 2.
    first = replica_id(revision_id("b", 1), "x-2-y", 0)
    second = replica_id(revision_id("b-1-x", 2), "y", 0)
    assert first != second
    assert parse_replica_id(first) == ("b-1", "x-2-y", 0)
    assert parse_replica_id(second) == ("b-1-x-2", "y", 0)


def test_composed_ids_are_unique_over_tricky_names() -> None:
    names = ["a", "a-1", "a-1-b", "b", "b-1", "1-b", "x-2-y", "y", "a-b"]
    names = [n for n in names if n[0].isalpha()]
    seen: dict[str, tuple[str, int, str, int]] = {}
    for app, number, component, index in itertools.product(names, (1, 2, 12), names, (0, 1, 10)):
        rid = replica_id(revision_id(app, number), component, index)
        assert rid not in seen, (rid, seen[rid], (app, number, component, index))
        seen[rid] = (app, number, component, index)


@pytest.mark.parametrize("bad", ["a-1.web", "a-1.web.x", "a.web.0", "a-1.we.b.0", "a-1.Web.0", "a-01.web.0"])
def test_parse_refuses_what_the_constructor_cannot_make(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_replica_id(bad)


def test_allow_entries_are_checked() -> None:
    with pytest.raises(SpecError, match="allow entry"):
        app = cw.App("ok")

        @app.service(allow=["Billing"])
        def web() -> None: ...
