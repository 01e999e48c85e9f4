"""Prometheus metrics, one registry per Hub so that tests can run several hubs in one process."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # type: ignore[no-untyped-call] # the `_created` series only add noise for a long-running hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self.frames_in = Counter("mt5hub_frames_in", "Frames received", ["role"], registry=r)
        self.bytes_in = Counter("mt5hub_bytes_in", "Bytes received in frames", ["role"], registry=r)
        self.updates = Counter("mt5hub_updates", "Publishes accepted and fanned out", registry=r)
        self.frames_out = Counter("mt5hub_frames_out", "Frames sent", ["role"], registry=r)
        self.bytes_out = Counter("mt5hub_bytes_out", "Bytes sent in frames", ["role"], registry=r)
        self.rejects = Counter(
            "mt5hub_rejects", "Frames or handshakes refused", ["reason"], registry=r
        )
        self.closes = Counter(
            "mt5hub_closes", "Connections closed by the hub", ["role", "code"], registry=r
        )
        self.conflated = Counter(
            "mt5hub_conflated",
            "Updates a slow viewer never saw because a newer one of the same table replaced them",
            registry=r,
        )
        self.dropped = Counter(
            "mt5hub_dropped", "Frames dropped without replacement", ["role"], registry=r
        )
        self.latency = Histogram(
            "mt5hub_delivery_latency_seconds",
            "From a publish arriving to its update written to a viewer's socket",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

        self.compressions = Counter(
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
