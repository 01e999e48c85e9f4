"""Prometheus metrics, one registry per Hub so that tests can run several hubs in one process.

What is counted per frame (frames and bytes in and out, updates, conflations, compressions, the
delivery latency) is kept in `Tally` and `Timings`: plain numbers, no lock, read when /metrics is
scraped. prometheus_client's own Counter and Histogram take a lock and make several calls per
increment, a cost paid per frame per viewer (docs/performance.md); the hub counts from one trio
thread, so nothing else ever writes these at the same time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

disable_created_metrics()  # type: ignore[no-untyped-call] # the `_created` series only add noise for a long-running hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Count:
    """One series of a Tally: `value` is the count so far."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Tally:
    """A counter for the hot path, shown as a Prometheus counter (`<name>_total`).

    Like prometheus_client's Counter (`inc`, `labels`), minus its lock: only the hub's trio
    thread counts, and a scrape reads the numbers in that same thread.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, tuple(labelnames)
        self._series: dict[tuple[str, ...], Count] = {}
        self._unlabelled = None if labelnames else self.labels()
        registry.register(self)

    def labels(self, *values: str) -> Count:
        """The series for these label values (resolve it once, then `inc` it)."""
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            series = self._series[values] = Count()
        return series

    def inc(self, amount: float = 1) -> None:
        assert self._unlabelled is not None, f"{self._name} has labels: inc one of them"
        self._unlabelled.value += amount

    @property
    def value(self) -> float:
        """The count of an unlabelled tally (tests)."""
        assert self._unlabelled is not None
        return self._unlabelled.value

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in self._series.items():
            family.add_metric(values, series.value)
        yield family


class Timings:
    """A histogram for the hot path (`observe`), shown as a Prometheus histogram; no lock."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = sorted(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # `le`: a value on a bound is in it
        self._sum += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        buckets, total = [], 0
        for bound, count in zip([*map(_le, self._bounds), "+Inf"], self._counts, strict=True):
            total += count
            buckets.append((bound, float(total)))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


def _le(bound: float) -> str:
    return repr(float(bound))  # as prometheus_client writes a bucket bound: 0.5, 1.0, 10.0


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.connections = Gauge(
            "mt5hub_open_connections", "Open WebSocket connections", ["role"], registry=r
        )
        self.connections_total = Counter(
            "mt5hub_connections", "Accepted WebSocket connections", ["role"], registry=r
        )
        self.tables = Gauge("mt5hub_tables", "Tables held by the hub", registry=r)
        self.frames_in = Tally("mt5hub_frames_in", "Frames received", ["role"], registry=r)
        self.bytes_in = Tally("mt5hub_bytes_in", "Bytes received in frames", ["role"], registry=r)
        self.updates = Tally("mt5hub_updates", "Publishes accepted and fanned out", registry=r)
        self.frames_out = Tally("mt5hub_frames_out", "Frames sent", ["role"], registry=r)
        self.bytes_out = Tally("mt5hub_bytes_out", "Bytes sent in frames", ["role"], registry=r)
        self.rejects = Counter(
            "mt5hub_rejects", "Frames or handshakes refused", ["reason"], registry=r
        )
        self.closes = Counter(
            "mt5hub_closes", "Connections closed by the hub", ["role", "code"], registry=r
        )
        self.conflated = Tally(
            "mt5hub_conflated",
            "Updates a slow viewer never saw because a newer one of the same table replaced them",
            registry=r,
        )
        self.dropped = Counter(
            "mt5hub_dropped", "Frames dropped without replacement", ["role"], registry=r
        )
        self.latency = Timings(
            "mt5hub_delivery_latency_seconds",
            "From a publish arriving to its update written to a viewer's socket",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

        self.compressions = Tally(
            "mt5hub_compressions",
            "Messages compressed for permessage-deflate viewers: once per message, for all of them",
            registry=r,
        )
        self.backplane_connected = Gauge(
            "mt5hub_backplane_connected",
            "1 while the shared backplane (Redis) is reachable; 0: serving local clients only",
            registry=r,
        )
        self.backplane_connects = Counter(
            "mt5hub_backplane_connects", "Successful (re)connections to the backplane", registry=r
        )
        self.backplane_events = Counter(
            "mt5hub_backplane_events",
            "Events sent to (out) and received from (in) the backplane",
            ["direction"],
            registry=r,
        )
        self.backplane_conflated = Counter(
            "mt5hub_backplane_conflated",
            "Updates replaced by a newer one of the same table before they reached the backplane",
            registry=r,
        )
        self.state_saves = Counter(
            "mt5hub_state_saves",
            "Latest states of all tables written to the state file (only after a change)",
            registry=r,
        )
        self.state_save_errors = Counter(
            "mt5hub_state_save_errors",
            "Writes of the state file that failed (disk full, permissions); retried next interval",
            registry=r,
        )

        self.task_errors = Counter(
            "mt5hub_task_errors",
            "Unexpected errors of a background task (state saver, backplane), each retried",
            ["task"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
