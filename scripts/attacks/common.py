"""What every scenario shares: the settings, the plan, the context an attack runs in."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fake_dll
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
)

REPO = Path(__file__).resolve().parent.parent.parent
SCENARIOS = ("flood", "idle-5000", "never-reads", "restart", "kill", "garbage")
TOKEN = "attack-report-token"
AUTH = [(b"Authorization", f"Bearer {TOKEN}".encode())]
WITNESS_KEY, WITNESS_SRC = "WITNESS", "EURUSD_PERIOD_H1"
WITNESS_RATE = 10.0  # publishes/s of the witness publisher
RECONNECT_DELAY = 0.5  # the witness's pause before it reconnects
SETTLE_TIMEOUT = 10.0  # the witness, stopped, waits this long at most for its last publish
FLOOD_KEY, FLOOD_SRC = "FLOOD", "EURUSD_PERIOD_M1"
FLOOD_RATE = 10_000.0
IDLE_CONNECTIONS = 5_000
IDLE_SOURCES = tuple(f"127.0.0.{n}" for n in range(2, 7))
STALLED_VIEWERS = 50
STALLED_SOURCE = "127.0.0.7"
GARBAGE_SOURCES = tuple(f"127.0.0.{n}" for n in range(8, 12))
PRIMED_TABLES = 27  # restart/kill: tables besides the witness's, published once beforehand
SETTLE_AFTER = 1.0  # seconds after the recovery before RSS "after" is read
MAX_MESSAGE = 64 * 1024 * 1024
STATE_FILE = "mt5hub-state.json"
DROP_KEYS = ("bind", "insecure_bind", "certfile", "keyfile", "ssl_handshake_timeout")  # WSS


@dataclass(frozen=True)
class Plan:
    """How long each part runs: the full report, or --quick."""

    baseline: float  # the witness alone, before the attack
    idle_hold: float  # idle-5000: how long the sockets are held once all are open
    idle_open_timeout: float  # idle-5000: bound on opening them
    garbage_connections: int
    fault_after: float  # restart/kill: witness flow kept after the recovery


FULL = Plan(
    baseline=2.0, idle_hold=10.0, idle_open_timeout=60.0, garbage_connections=200, fault_after=2.0
)
QUICK = Plan(
    baseline=1.0, idle_hold=2.0, idle_open_timeout=10.0, garbage_connections=100, fault_after=1.0
)


def scenario_overrides(name: str, quick: bool) -> dict[str, Any]:
    """The scenario's changes to [mt5hub] of the repo's hub.toml."""
    if name == "flood":
        return {"flood_seconds": 2.0} if quick else {}
    if name == "idle-5000":
        return {"max_viewers": 3000, "max_viewers_per_ip": 1000}
    if name == "never-reads":
        return {"slow_viewer_timeout": 5.0} if quick else {}  # updates conflate per table anyway
    return {}


def digest(data: Any) -> str:
    """A table's data, as a short fingerprint (the same for the publisher's and a viewer's copy)."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]


def describe(exc: BaseException) -> str:
    """Why a client connection ended, in a few words: `close 1008`, `HTTP 503`, `OSError`."""
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return describe(exc.exceptions[0])
    if isinstance(exc, ConnectionClosed):
        return f"close {exc.reason.code}" if exc.reason is not None else "close ?"
    if isinstance(exc, ConnectionRejected):
        return f"HTTP {exc.status_code}"
    cause: BaseException = exc  # e.g. HandshakeError <- OSError <- [ConnectionRefusedError]
    while True:
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        elif cause.__cause__ is not None:
            cause = cause.__cause__
        else:
            return type(cause).__name__


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p99/max in milliseconds (None without values)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(1000 * fake_dll.percentile(ordered, 0.5), 1),
        "p99_ms": round(1000 * fake_dll.percentile(ordered, 0.99), 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def percentiles_s(values: Sequence[float]) -> dict[str, float] | None:
    """First, median and last of some times, in seconds."""
    if not values:
        return None
    ordered = sorted(values)
    return {"first": ordered[0], "median": ordered[len(ordered) // 2], "last": ordered[-1]}


def since(start: float, end: float | None) -> float | None:
    return None if end is None else round(max(0.0, end - start), 2)
