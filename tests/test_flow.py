"""mt5hub.flow: flow control by WebSocket pings, driven event by event with the time handed in."""

from __future__ import annotations

import math

from mt5hub.flow import FlowControl

LAG, INTERVAL = 0.05, 0.25


def ping_number(payload: bytes | None) -> int:
    assert payload is not None and len(payload) == 8
    return int.from_bytes(payload, "big")


def test_the_first_write_carries_a_ping_and_one_ping_is_out_at_a_time() -> None:
    flow = FlowControl(LAG, INTERVAL)
    first = flow.ping_due(0.0)
    assert ping_number(first) == 1
    flow.ping_sent(0.0)
    assert flow.out_since == 0.0
    assert flow.ping_due(1.0) is None  # one out: no other
    assert not flow.behind(0.01)  # younger than `lag`: keeping up
    assert flow.behind(LAG)  # `lag` old: behind


def test_a_prompt_answer_clears_the_ping_and_the_next_comes_after_the_interval() -> None:
    flow = FlowControl(LAG, INTERVAL)
    flow.ping_sent(0.0)
    assert flow.answered((1).to_bytes(8, "big"), 0.01)
    assert flow.out_since is None and not flow.behind(0.02)
    assert flow.ping_due(0.1) is None  # prompt: at most every INTERVAL
    assert ping_number(flow.ping_due(INTERVAL)) == 2


def test_after_a_slow_answer_every_write_carries_a_ping_and_waits_for_its_answer() -> None:
    flow = FlowControl(LAG, INTERVAL)
    flow.ping_sent(0.0)
    assert flow.answered((1).to_bytes(8, "big"), 0.2)  # took 0.2 s: slower than LAG
    assert ping_number(flow.ping_due(0.2)) == 2  # the next write carries one at once
    flow.ping_sent(0.2)
    assert flow.behind(0.2)  # the last answer was slow: behind while any ping is out
    assert flow.answered((2).to_bytes(8, "big"), 0.21)  # a quick one: prompt again
    assert not flow.behind(0.22)
    assert flow.ping_due(0.3) is None  # prompt: pinged at most every INTERVAL again
    assert ping_number(flow.ping_due(0.2 + INTERVAL)) == 3


def test_pongs_that_are_not_the_answer_change_nothing() -> None:
    flow = FlowControl(LAG, INTERVAL)
    flow.ping_sent(0.0)
    for payload in (b"", b"1234", (7).to_bytes(8, "big")):  # unasked, or not the one out
        assert not flow.answered(payload, 0.01)
    assert flow.out_since == 0.0
    assert not FlowControl(LAG, INTERVAL).answered((1).to_bytes(8, "big"), 0.0)  # none out


def test_no_flow_control_when_lag_is_inf_or_the_transport_cannot_ping() -> None:
    off = FlowControl(math.inf, INTERVAL)
    assert not off.enabled and off.ping_due(0.0) is None and not off.behind(100.0)
    flow = FlowControl(LAG, INTERVAL)
    flow.ping_sent(0.0)
    flow.cannot_ping()
    assert not flow.enabled and flow.out_since is None and not flow.behind(100.0)


def test_a_lag_above_the_interval_sets_the_interval() -> None:
    assert FlowControl(1.0, INTERVAL).interval == 1.0
