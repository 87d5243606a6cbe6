"""The autoscaler's decisions, reading by reading, with an injected clock."""

from __future__ import annotations

import pytest

from clearway.backends.base import ComponentLoad
from clearway.control.autoscaler import Autoscaler
from clearway.spec.model import FunctionSpec

pytestmark = pytest.mark.timeout(10)

KEY = ("fn-1", "resize")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(**kwargs: object) -> FunctionSpec:
    fields: dict[str, object] = {"name": "resize", "max_concurrency": 10, "max_replicas": 20, "idle_timeout": 30.0}
    fields.update(kwargs)
    return FunctionSpec.model_validate(fields)


def load(in_flight: int = 0, held: int = 0, requests: int = 0) -> list[ComponentLoad]:
    """As the gateway reports it: held requests are in flight too."""
    return [
        ComponentLoad(
            app="fn", revision="fn-1", component="resize", in_flight=max(in_flight, held), held=held, requests=requests
        )
    ]


def test_a_held_request_at_zero_starts_a_replica_at_once() -> None:
    clock = Clock()
    scaler = Autoscaler(clock=clock)
    fn = spec()
    assert scaler.replicas("fn-1", fn) == 1  # a new revision proves it starts
    clock.now += 31
    [idle] = scaler.update(load(), {KEY: fn})
    assert idle.replicas_to == 0 and "idle" in idle.reason
    clock.now += 100
    assert scaler.update(load(), {KEY: fn}) == []  # nothing waiting, nothing to do
    [decision] = scaler.update(load(held=1), {KEY: fn})
    assert (decision.replicas_from, decision.replicas_to) == (0, 1)
    assert "cold start" in decision.reason
    assert scaler.replicas("fn-1", fn) == 1


def test_a_burst_panics_up_and_a_lull_does_not_scale_down_early() -> None:
    clock = Clock()
    scaler = Autoscaler(clock=clock)
    fn = spec(min_replicas=1)
    scaler.replicas("fn-1", fn)
    requests = 0
    for _ in range(30):  # 3 s of 70 concurrent: 10 replicas at 7 each
        clock.now += 0.1
        requests += 50
        scaler.update(load(in_flight=70, requests=requests), {KEY: fn})
    assert scaler.replicas("fn-1", fn) == 10
    assert any("panic" in d["reason"] for d in scaler.status("fn-1", "resize")["decisions"])  # type: ignore[index, union-attr]
    for _ in range(50):  # a 5 s lull: the stable window still remembers the burst
        clock.now += 0.1
        requests += 1
        scaler.update(load(in_flight=1, requests=requests), {KEY: fn})
    assert scaler.replicas("fn-1", fn) > 1


def test_idle_functions_go_to_zero_after_idle_timeout_and_not_before() -> None:
    clock = Clock()
    scaler = Autoscaler(clock=clock)
    fn = spec(idle_timeout=30.0)
    scaler.update(load(in_flight=1, requests=1), {KEY: fn})
    assert scaler.replicas("fn-1", fn) == 1
    clock.now += 29
    scaler.update(load(requests=1), {KEY: fn})
    assert scaler.replicas("fn-1", fn) == 1  # at least one while not idle
    clock.now += 2
    [decision] = scaler.update(load(requests=1), {KEY: fn})
    assert decision.replicas_to == 0 and "idle" in decision.reason


def test_min_and_max_bound_every_decision() -> None:
    clock = Clock()
    scaler = Autoscaler(clock=clock)
    fn = spec(min_replicas=2, max_replicas=3)
    assert scaler.replicas("fn-1", fn) == 2
    for _ in range(20):
        clock.now += 0.1
        scaler.update(load(in_flight=500, requests=1), {KEY: fn})
    assert scaler.replicas("fn-1", fn) == 3
    clock.now += 1000
    scaler.update(load(requests=1), {KEY: fn})
    assert scaler.replicas("fn-1", fn) == 2


def test_a_restarted_control_plane_keeps_the_replicas_it_finds() -> None:
    scaler = Autoscaler(clock=Clock())
    assert scaler.replicas("fn-1", spec(), running=4) == 4


def test_forcing_zero_holds_until_a_request_wakes_it() -> None:
    clock = Clock()
    scaler = Autoscaler(clock=clock)
    fn = spec(min_replicas=1)
    scaler.update(load(in_flight=3, requests=10), {KEY: fn})
    decision = scaler.force("fn-1", fn, 0, reason="operator")
    assert (decision.replicas_from, decision.replicas_to) == (1, 0)
    clock.now += 0.1
    assert scaler.update(load(requests=10), {KEY: fn}) == []  # stays at zero, below min_replicas
    [woken] = scaler.update(load(held=1, requests=10), {KEY: fn})
    assert woken.replicas_to == 1 and "cold start" in woken.reason
