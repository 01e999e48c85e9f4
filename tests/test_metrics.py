"""The hot path's lock-free counters read exactly like prometheus_client's own at a scrape."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mt5hub.metrics import Tally, Timings

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
seconds = st.floats(min_value=0, max_value=20, allow_nan=False) | st.sampled_from(BUCKETS)


@given(st.lists(seconds, max_size=50))
def test_timings_scrape_like_a_prometheus_histogram_bounds_included(values: list[float]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    timings = Timings("t_seconds", "doc", BUCKETS, registry=ours)
    histogram = Histogram("t_seconds", "doc", buckets=BUCKETS, registry=theirs)
    for value in values:
        timings.observe(value)
        histogram.observe(value)
    assert generate_latest(ours) == generate_latest(theirs)


@given(st.lists(st.tuples(st.sampled_from(["viewer", "publisher"]), st.integers(0, 10**6))))
def test_tally_scrapes_like_a_prometheus_counter(incs: list[tuple[str, int]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    tally = Tally("frames", "doc", ["role"], registry=ours)
    counter = Counter("frames", "doc", ["role"], registry=theirs)
    for role, amount in incs:
        tally.labels(role).inc(amount)
        counter.labels(role).inc(amount)
    assert generate_latest(ours) == generate_latest(theirs)


def test_a_tally_without_labels_shows_zero_and_one_with_labels_wants_all_of_them() -> None:
    registry = CollectorRegistry()
    updates = Tally("updates", "doc", registry=registry)
    assert registry.get_sample_value("updates_total") == 0.0
    updates.inc(3)
    assert updates.value == registry.get_sample_value("updates_total") == 3.0
    with pytest.raises(ValueError, match="expected labels"):
        Tally("frames", "doc", ["role"], registry=registry).labels()
