"""The SDK refuses a bad lock name before any call, with the backends' own words."""

from __future__ import annotations

import pytest

import clearway as cw
from clearway.coordination import check_lock_name as backend_check


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("orders//eu", "has an empty part"),
        ("/orders", "has an empty part"),
        ("orders/", "has an empty part"),
        ("a b", "contains ' '"),
        ("x" * 201, "the limit is 200"),
    ],
)
def test_a_bad_lock_name_is_refused_at_construction_as_the_backends_refuse_it(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cw.Lock(name)
    with pytest.raises(ValueError, match=message):
        backend_check(name)


@pytest.mark.parametrize("name", ["inventory", "orders/eu", "a.b:c_d-e/f", "x" * 200])
def test_a_good_lock_name_is_taken_by_both(name: str) -> None:
    assert cw.Lock(name).name == name
    assert backend_check(name) == name
