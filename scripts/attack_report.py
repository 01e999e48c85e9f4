#!/usr/bin/env python3
"""Attacks and faults against a real hub, measured: the figures for the hardening report.

    .venv/bin/python scripts/attack_report.py            # every scenario, about 2 minutes
    .venv/bin/python scripts/attack_report.py --quick    # shorter bounds, about 1.5 minutes
    .venv/bin/python scripts/attack_report.py flood garbage --json --keep

For each scenario it writes a hub.toml into a temporary folder (the repo's hub.toml with a plain WS
bind on a free loopback port, `backlog = 1024`, its own token, and the scenario's changes below),
starts `hypercorn --config hub.toml mt5hub:app` there, and starts the **witness**: a process of its
own (so that the attacker's event loop cannot delay it) holding a publisher that sends a 28-pair x
9-timeframe table (fake_dll's SignalTable, ~11.5 KB) 10 times a second and a viewer that records
every update. Then it runs the attack, waits for the hub to recover, stops the witness (which first
waits until its viewer holds its last publish) and the hub (SIGTERM, then SIGKILL of its process
group), also on Ctrl-C or an error. Clients talk to loopback addresses only, every step is
bounded in time, and tests/ prove the behaviour; this measures it on this machine.

Scenarios (changes to hub.toml in brackets):
    flood        one publisher on a raw socket sending small valid publishes as fast as it can,
                 aimed at 10,000/s: rate_limited error frames, then close 1008 after
                 flood_seconds; then it answers the close and hangs up  [--quick: flood_seconds = 2]
    idle-5000    5,000 raw sockets from 127.0.0.2-127.0.0.6 (bound before connect) doing the
                 WebSocket upgrade of /ws at once, then never reading; answers awaited up to 60 s
                 (--quick: 10 s), held 10 s (2 s), then closed
                 [max_viewers = 3000, max_viewers_per_ip = 1000]
    never-reads  50 viewers (from 127.0.0.7) that finish the handshake and never read while the
                 witness publishes: conflated, then cut with 4009 after slow_viewer_timeout
                 [--quick: slow_viewer_timeout = 5]
    restart      SIGTERM to Hypercorn's master (as systemd's KillMode=mixed does) under the witness
                 load, then the hub again in the same folder, so that its state file persists; 27
                 more tables are published once beforehand, so the snapshot must hold 28
    kill         the same with SIGKILL to the hub's process group (a crash: the state file is up
                 to state_interval old)
    garbage      200 connections (100 with --quick) from 127.0.0.8-127.0.0.11, each one kind of junk
                 from a seeded generator (--seed): random bytes instead of HTTP, broken handshakes,
                 a frame before the 101, invalid UTF-8, protocol violations, a frame over 1 MiB,
                 bad JSON, random frames

The table's columns:
    attack                      the scenario
    outcome for the attacker    what the attacking clients saw: HTTP statuses, close codes, error
                                frames, and the figures of the attack (rates, times, counts)
    witness: lost / p99         updates of the latest state the witness viewer did not end with:
                                0 when, after the run, it holds exactly the data of the witness
                                publisher's last publish (else how many publishes it is behind);
                                then the witness's delivery latency p99 (publisher's send time to
                                the viewer's receive time, same host clock) from the attack's start
                                to the hub's recovery. restart/kill add `restored N behind`: how
                                many seq the state the new hub restored is behind the last update
                                the witness viewer got from the old hub (0: nothing lost)
    hub RSS before → peak → after
                                VmRSS of Hypercorn's worker process (/proc/<pid>/status,
                                sampled every 100 ms): just before the attack, its peak during
                                the attack and the recovery, and 1 s after the recovery
    time to recover             flood: from the 1008 until /healthz shows the publishers of before;
                                idle-5000: from closing the 5,000 sockets until /healthz shows the
                                viewers of before; never-reads: from the 50 connected until the hub
                                had dropped them all; restart/kill: from the signal until a new
                                viewer's snapshot holds every table; garbage: from the last junk
                                connection's end until /healthz shows the connections of before.
                                `but N connection(s) never released`: after the recovery the hub
                                still holds N more connections (its ends of TCP connections on its
                                port, ESTABLISHED or CLOSE_WAIT in /proc/net/tcp) than before the
                                attack, although the attacker has closed them all

A row's outcome ends in **UNEXPECTED: ...** when an expectation of the hardening issue did not hold
(the witness lost its latest state, no 1008, connections not released, tables missing after a
restart, a 1011 or a traceback, ...). The JSON summary after the table holds the same figures and
more: CPU seconds of the hub, the attacker and the witness during each scenario, and what the rest
of the machine used meanwhile (a disturbed run shows there); the hub's open files before, at their
peak and after; the kernel's listen-queue counters. `--json` also prints everything measured,
including the hub log's warning lines; `--keep` keeps each scenario's folder (hub.log,
witness.log, hub.toml). The exit status is 1 if a scenario failed to run or was UNEXPECTED.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import hashlib
import json
import math
import os
import random
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import bench_backplane as bb
import fake_dll
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)
from tw_workaround import pong_unless_closing
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

# Its viewers leave while the hub pings them (the witness, snapshot_tables): without this their
# close crashes trio-websocket's reader task (python-trio/trio-websocket#184).
pong_unless_closing()

REPO = Path(__file__).resolve().parent.parent
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


# -- the hub --------------------------------------------------------------------------------------


def hub_toml(port: int, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The repo's hub.toml for this run, and its effective settings (Hypercorn's and [mt5hub])."""
    shipped = tomllib.loads((REPO / "hub.toml").read_text())
    top = {k: v for k, v in shipped.items() if not isinstance(v, dict) and k not in DROP_KEYS}
    top.update(worker_class="trio", workers=1, bind=[f"127.0.0.1:{port}"], backlog=1024)
    hub = {k: v for k, v in shipped.get("mt5hub", {}).items() if k != "tokens"}
    hub.update(backplane="", state_file=STATE_FILE)
    hub.update(overrides)
    lines = ["# Written by scripts/attack_report.py from the repo's hub.toml."]
    lines += [f"{k} = {json.dumps(v)}" for k, v in top.items()]  # JSON scalars are valid TOML
    lines += ["", "[mt5hub]", *(f"{k} = {json.dumps(v)}" for k, v in hub.items())]
    lines += ["", "[[mt5hub.tokens]]", f"token = {json.dumps(TOKEN)}", 'keys = ["*"]']
    lines += ['name = "attack-report"']
    return "\n".join(lines) + "\n", {**top, **hub}


class HubProcess:
    """`hypercorn --config hub.toml mt5hub:app` in a folder of its own, on a fixed port."""

    def __init__(self, folder: Path, overrides: dict[str, Any]) -> None:
        self.folder = folder
        self.port = bb.free_port()
        text, self.settings = hub_toml(self.port, overrides)
        (folder / "hub.toml").write_text(text)
        self.log = folder / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._workers: dict[int, int] = {}  # master pid: worker pid

    def spawn(self) -> None:
        """Start Hypercorn (again, in the same folder and on the same port); do not wait."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        for var in (
            "MT5HUB_CONFIG",
            "MT5HUB_TOKENS",
            "MT5HUB_BACKPLANE",
            "MT5HUB_VIEWER_TOKENS",
            "MT5HUB_STATE_FILE",
        ):
            env.pop(var, None)  # the hub.toml written above is the whole configuration
        hypercorn = Path(sys.executable).with_name("hypercorn")
        command = [str(hypercorn) if hypercorn.exists() else "hypercorn"]
        with open(self.log, "ab") as log:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [*command, "--config", "hub.toml", "mt5hub:app"],
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self) -> None:
        self.spawn()
        assert self.proc is not None
        bb.wait_for_hub(self.proc, self.port, 1, self.log)

    def worker(self) -> int | None:
        """The worker process that runs the app (Hypercorn's master spawns it)."""
        if self.proc is None:
            return None
        master = self.proc.pid
        known = self._workers.get(master)
        if known is not None and Path(f"/proc/{known}").exists():
            return known
        for pid in bb.children(master):
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    self._workers[master] = pid
                    return pid
        return None

    def open_files_limit(self) -> str:
        pid = self.worker()
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return f"{soft} (hard {hard})"
        return "?"

    def stop(self) -> None:
        bb.stop_group(self.proc, "hypercorn")


class Sampler(threading.Thread):
    """The worker's VmRSS every 100 ms (before, peak, last) and the CPU of the hub's processes.

    It follows `hub.proc`, so a restarted hub is measured too: CPU is what each process used
    while it was seen (a process first seen later counts from zero).
    """

    def __init__(self, hub: HubProcess, period: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.hub, self.period = hub, period
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}
        self.before = self.peak = self.last = 0
        self.peak_fds = 0  # the most files the worker held: its connections, plus ~15
        self._sample(first=True)
        self.before = self.peak = self.last

    def _sample(self, first: bool = False) -> None:
        pids = bb.tree(self.hub.proc.pid) if self.hub.proc is not None else []
        worker = self.hub.worker()
        rss = bb.rss_bytes(worker) if worker is not None else 0
        fds = open_fds(worker) or 0
        with self.lock:
            self.peak_fds = max(self.peak_fds, fds)
            for pid in pids:
                used = bb.cpu_seconds(pid)
                if pid not in self.cpu_first:
                    self.cpu_first[pid] = used if first else 0.0
                if used > 0 or pid not in self.cpu_last:
                    self.cpu_last[pid] = used
            if rss:
                self.last = rss
                self.peak = max(self.peak, rss)

    def run(self) -> None:
        while not self.halt.wait(self.period):
            self._sample()

    def current_rss(self) -> int:
        with self.lock:
            return self.last

    def finish(self) -> dict[str, float]:
        self.halt.set()
        if self.is_alive():
            self.join()
        self._sample()
        cpu = sum(self.cpu_last[p] - self.cpu_first.get(p, 0.0) for p in self.cpu_last)
        return {
            "before": round(self.before / 2**20, 1),
            "peak": round(self.peak / 2**20, 1),
            "after": round(self.last / 2**20, 1),
            "cpu_s": round(cpu, 2),
            "peak_fds": self.peak_fds,
        }


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def _hub_side(port: int) -> list[tuple[int, str, int]]:
    """(peer port, state, unread bytes) of each TCP socket whose local port is the hub's."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                peer = int(fields[2].rsplit(":", 1)[1], 16)
                unread = int(fields[4].split(":")[1], 16)
                found.append((peer, TCP_STATES.get(fields[3], fields[3]), unread))
    return found


def hub_socket_to(port: int, peer_port: int) -> dict[str, Any] | None:
    """The hub's end of the connection from this client port, if it still exists."""
    for peer, state, unread in _hub_side(port):
        if peer == peer_port and state not in ("TIME_WAIT", "LISTEN"):
            return {"state": state, "unread_bytes": unread}
    return None


def live_connections(port: int) -> int:
    """Connections the hub still holds a socket for (ESTABLISHED or CLOSE_WAIT on its side)."""
    return sum(state in ("ESTABLISHED", "CLOSE_WAIT") for _, state, _ in _hub_side(port))


def hub_sockets(port: int) -> dict[str, int]:
    """The hub's ends of its TCP connections (local port = the hub's), by state."""
    states = Counter(state for _, state, _ in _hub_side(port) if state != "LISTEN")
    return dict(states.most_common())


KERNEL_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDoCookies", "TCPReqQFullDrop")


def kernel_counters() -> dict[str, int]:
    """The kernel's listen-queue counters (/proc/net/netstat, the whole network namespace)."""
    counters: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names and names[0] == "TcpExt:":
                table = dict(zip(names[1:], values[1:], strict=True))
                counters = {k: int(table[k]) for k in KERNEL_COUNTERS if k in table}
    return counters


def open_fds(pid: int | None) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd")) if pid is not None else None
    except OSError:
        return None


def scrape_metrics(port: int) -> dict[str, float]:
    """Every series of /metrics, keyed by its name and labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def metric(series: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's series that carry these labels."""
    total = 0.0
    for key, value in series.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def metric_delta(
    before: dict[str, float], after: dict[str, float], name: str, **labels: str
) -> int:
    return round(metric(after, name, **labels) - metric(before, name, **labels))


def closes_by_code(before: dict[str, float], after: dict[str, float], role: str) -> dict[str, int]:
    """Connections of this role the hub closed during the attack, per close code."""
    codes: dict[str, int] = {}
    for key in after:
        if key.startswith("mt5hub_closes_total{") and f'role="{role}"' in key:
            code = key.split('code="', 1)[1].split('"', 1)[0]
            n = metric_delta(before, after, "mt5hub_closes_total", role=role, code=code)
            if n:
                codes[code] = n
    return codes


async def health(port: int, timeout: float = 5.0) -> dict[str, Any]:
    return await trio.to_thread.run_sync(bb.healthz, port, timeout)


async def metrics_patiently(port: int, timeout: float = 30.0) -> dict[str, float]:
    """/metrics, asked again until it answers (a saturated hub may take seconds); {} if never."""
    with trio.move_on_after(timeout):
        while True:
            with contextlib.suppress(OSError):
                return await trio.to_thread.run_sync(scrape_metrics, port)
            await trio.sleep(0.5)
    return {}


async def poll_health(
    port: int, done: Callable[[dict[str, Any]], bool], timeout: float, period: float = 0.1
) -> float | None:
    """Ask /healthz every `period` until `done(answer)`; the wall time it held, None if never."""
    with trio.move_on_after(timeout):
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if done(await health(port)):
                    return time.time()
            await trio.sleep(period)
    return None


def back_to(baseline: dict[str, Any], *counts: str) -> Callable[[dict[str, Any]], bool]:
    """/healthz shows no more of these connections than before the attack."""
    return lambda h: all(int(h[c]) <= int(baseline[c]) for c in counts)


async def snapshot_tables(port: int, timeout: float = 5.0) -> dict[tuple[str, str], Any]:
    """The tables of a new viewer's snapshot, by (key, src)."""
    url = f"ws://127.0.0.1:{port}/ws"
    with trio.fail_after(timeout):
        async with open_websocket_url(
            url, connect_timeout=timeout, disconnect_timeout=2, max_message_size=MAX_MESSAGE
        ) as ws:
            while True:
                message = json.loads(await ws.get_message())
                if message.get("type") == "snapshot":
                    return {(t["key"], t["src"]): t for t in message["tables"]}


# -- the witness (a process of its own) -----------------------------------------------------------


class WitnessLog:
    """Everything the witness saw, at wall-clock times the main process can line up with its own."""

    def __init__(self) -> None:
        self.published: list[tuple[int, float]] = []  # (n, sent)
        self.digests: dict[int, str] = {}
        self.received: list[tuple[int, int, float, float]] = []  # (n, seq, sent, received)
        self.snapshots: list[tuple[float, int | None, int | None, bool | None]] = []
        self.events: list[tuple[float, str, str, str]] = []  # (time, who, what, detail)
        self.errors: Counter[str] = Counter()
        self.held: tuple[int | None, str | None] = (None, None)  # the viewer's (n, digest)
        self.publisher_up = False
        self.news = trio.Event()

    def event(self, who: str, what: str, detail: str = "") -> None:
        self.events.append((round(time.time(), 4), who, what, detail))

    def viewer_frame(self, text: str, received: float) -> None:
        if not text.startswith(('{"type":"update"', '{"type":"snapshot"')):
            return
        message = json.loads(text)
        if message["type"] == "snapshot":
            entry = next(
                (
                    t
                    for t in message["tables"]
                    if (t["key"], t["src"]) == (WITNESS_KEY, WITNESS_SRC)
                ),
                None,
            )
            if entry is None:
                self.snapshots.append((received, None, None, None))
                return
            self.snapshots.append((received, entry.get("n"), entry["seq"], entry.get("online")))
            self.held = (entry.get("n"), digest(entry["data"]))
        elif (message["key"], message["src"]) == (WITNESS_KEY, WITNESS_SRC):
            n, seq = int(message["n"]), int(message["seq"])
            self.received.append((n, seq, float(message["sent"]), received))
            self.held = (n, digest(message["data"]))
        else:
            return
        self.news.set()
        self.news = trio.Event()

    def caught_up(self) -> bool:
        return bool(self.published) and self.held[0] == self.published[-1][0]

    def result(self) -> dict[str, Any]:
        last_n = self.published[-1][0] if self.published else None
        held_n, held_digest = self.held
        equal = last_n is not None and held_n == last_n and held_digest == self.digests[last_n]
        behind = sum(1 for n, _ in self.published if held_n is None or n > held_n)
        return {
            "published": self.published,
            "digests": self.digests,
            "received": self.received,
            "snapshots": self.snapshots,
            "events": self.events,
            "errors": dict(self.errors),
            "final": {
                "last_published": last_n,
                "viewer_holds": held_n,
                "equal": equal,
                "lost": 0 if equal else max(behind, 1),
                "corrupt": held_n is not None
                and held_n in self.digests
                and held_digest != self.digests[held_n],
            },
        }


async def _watch_stdin(stop: trio.Event) -> None:
    """`stop` (or the end of stdin: the main process is gone) ends the witness."""
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line or line.strip() == "stop":
            stop.set()
            return


async def _publisher_frames(ws: WebSocketConnection, log: WitnessLog) -> None:
    """What the hub says to the witness publisher: pings (answered) and error frames."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = json.loads(await ws.get_message())
            if message.get("type") == "ping":
                await ws.send_message('{"type":"pong"}')
            elif message.get("type") == "error":
                log.errors[str(message.get("code"))] += 1


async def _publish_loop(
    url: str, log: WitnessLog, rate: float, rng: random.Random, stop: trio.Event
) -> None:
    """Publish the witness table `rate` times a second until `stop`; reconnect when dropped."""
    table = fake_dll.SignalTable(rng)
    period = 1.0 / rate
    n = 0
    while not stop.is_set():
        try:
            async with open_websocket_url(
                url + "/ws/dll", extra_headers=AUTH, connect_timeout=5, disconnect_timeout=2
            ) as ws:
                log.event("publisher", "connected")
                log.publisher_up = True
                ended = "stopped"
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_publisher_frames, ws, log)
                    next_at = trio.current_time()
                    try:
                        while True:
                            with trio.move_on_at(next_at):
                                await stop.wait()
                            if stop.is_set():
                                break
                            data = table.step()
                            sent = time.time()
                            message = {
                                "key": WITNESS_KEY,
                                "src": WITNESS_SRC,
                                "clientId": f"WITNESS_{os.getpid()}",
                                "n": n + 1,
                                "sent": sent,
                                "data": data,
                            }
                            await ws.send_message(json.dumps(message, separators=(",", ":")))
                            n += 1
                            log.published.append((n, sent))
                            log.digests[n] = digest(data)
                            next_at = max(next_at + period, trio.current_time() - period)
                    except ConnectionClosed as exc:
                        ended = describe(exc)
                    nursery.cancel_scope.cancel()
                log.publisher_up = False
                if ended != "stopped":
                    log.event("publisher", "closed", ended)
        except Exception as exc:  # a refused or lost connection: the witness reconnects, like a DLL
            log.publisher_up = False
            log.event("publisher", "closed", describe(exc))
        if not stop.is_set():
            with trio.move_on_after(RECONNECT_DELAY):
                await stop.wait()


async def _view_loop(url: str, log: WitnessLog) -> None:
    """Record every update; reconnect when dropped."""
    while True:
        try:
            async with open_websocket_url(
                url + "/ws", connect_timeout=5, disconnect_timeout=2, max_message_size=MAX_MESSAGE
            ) as ws:
                log.event("viewer", "connected")
                while True:
                    text = await ws.get_message()
                    received = time.time()
                    if isinstance(text, str):
                        if text.startswith('{"type":"ping"'):
                            await ws.send_message('{"type":"pong"}')
                        log.viewer_frame(text, received)
        except Exception as exc:  # dropped or refused: reconnect, like a dashboard
            log.event("viewer", "closed", describe(exc))
        await trio.sleep(RECONNECT_DELAY)


async def _announce_ready(log: WitnessLog) -> None:
    while not (log.publisher_up and len(log.received) >= 3):
        await trio.sleep(0.05)
    print("ready", flush=True)


async def witness(port: int, rate: float, seed: int) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{port}"
    log = WitnessLog()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_stdin, stop)
        nursery.start_soon(_view_loop, url, log)
        nursery.start_soon(_announce_ready, log)
        await _publish_loop(url, log, rate, random.Random(seed), stop)
        stopped = time.time()
        with trio.move_on_after(SETTLE_TIMEOUT):
            while not log.caught_up():
                await log.news.wait()
        waited = f"{time.time() - stopped:.3f}"
        log.event("witness", "settled" if log.caught_up() else "gave up", waited)
        nursery.cancel_scope.cancel()
    return log.result()


class WitnessProcess:
    """The witness as a subprocess: `ready` on stdout once it works, then its log as JSON."""

    def __init__(self, port: int, folder: Path, seed: int) -> None:
        self.log_path = folder / "witness.log"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--witness-port",
            str(port),
            "--seed",
            str(seed),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                start_new_session=True,
            )
        self.out = b""

    def _read(self, until: Callable[[], bool], timeout: float) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return
                self.out += chunk

    def wait_ready(self, timeout: float = 30.0) -> None:
        self._read(lambda: b"ready\n" in self.out, timeout)
        if b"ready\n" not in self.out:
            raise RuntimeError(f"the witness did not start working; see {self.log_path}")

    def cpu(self) -> float:
        return bb.cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = SETTLE_TIMEOUT + 20) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.flush()
        self._read(lambda: False, timeout)  # to its end
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        lines = self.out.decode(errors="replace").strip().splitlines()
        if not lines or not lines[-1].startswith("{"):
            raise RuntimeError(f"the witness gave no result; see {self.log_path}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        bb.stop_group(self.proc, "witness")


def witness_figures(w: dict[str, Any], start: float, end: float) -> dict[str, Any]:
    """The witness's view of one window (wall clock): latency, missed updates, reconnects."""
    received = [tuple(r) for r in w["received"]]
    latency = [recv - sent for _, _, sent, recv in received if start <= sent <= end]
    timeline = sorted(
        [(r[3], "u", r[1]) for r in received] + [(s[0], "s", s[2]) for s in w["snapshots"]]
    )
    gaps, previous = 0, None
    for _, kind, seq in timeline:
        if seq is None:
            continue
        if kind == "u" and previous is not None and seq > previous + 1:
            gaps += seq - previous - 1  # updates the hub conflated for the witness viewer
        previous = seq if previous is None or kind == "s" else max(previous, seq)
    events = [e for e in w["events"] if start <= e[0] <= end + SETTLE_TIMEOUT]
    closed = Counter(f"{who} {detail}" for _, who, what, detail in events if what == "closed")
    return {
        "lost": w["final"]["lost"],
        "corrupt": w["final"]["corrupt"],
        "updates": len(latency),
        **percentiles(latency),
        "seq_gaps": gaps,
        "closed": dict(closed),
        "publisher_errors": w["errors"],
    }


# -- raw sockets ----------------------------------------------------------------------------------


def upgrade_request(path: str, *headers: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(head: bytes) -> int | None:
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


async def connect_from(source: str, port: int) -> trio.socket.SocketType:
    """A TCP connection to the hub from this loopback address (any of 127/8 is lo on Linux)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


@dataclass
class HeldSockets:
    socks: list[trio.socket.SocketType] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    last_answer: float = 0.0  # seconds from the start until the last handshake answer
    errors_at: list[float] = field(default_factory=list)  # seconds from the start, per error


async def open_and_stall(
    port: int, sources: Sequence[str], count: int, timeout: float
) -> HeldSockets:
    """`count` WebSocket upgrades of /ws at once; read each answer's head, then nothing more."""
    held = HeldSockets()
    start = trio.current_time()

    async def one(n: int) -> None:
        outcome = f"no answer within {timeout:g} s"
        phase = "connecting"
        try:
            with trio.fail_after(timeout):
                sock = await connect_from(sources[n % len(sources)], port)
                held.socks.append(sock)
                phase = "awaiting the answer"
                request = upgrade_request("/ws")
                while request:
                    request = request[await sock.send(request) :]
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await sock.recv(4096)  # may hold the snapshot's first bytes: fine
                    if not chunk:
                        outcome = "closed before answering"
                        break
                    head += chunk
                else:
                    outcome = str(status_of(head))
                    held.last_answer = max(held.last_answer, trio.current_time() - start)
        except trio.TooSlowError:
            pass
        except OSError as exc:
            outcome = f"{error_name(exc)} {phase}"
            held.errors_at.append(round(trio.current_time() - start, 1))
        held.outcomes[outcome] += 1

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)
    return held


def close_all(socks: Sequence[trio.socket.SocketType]) -> None:
    for sock in socks:
        sock.close()


def mask(payload: bytes, key: bytes) -> bytes:
    if not payload or key == b"\0\0\0\0":
        return payload
    n = len(payload)
    keys = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ keys).to_bytes(n, "big")


def frame_head(
    opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    bit = 0x80 if masked else 0
    if length < 126:
        return head + bytes([bit | length])
    if length < 1 << 16:
        return head + bytes([bit | 126]) + struct.pack("!H", length)
    return head + bytes([bit | 127]) + struct.pack("!Q", length)


def ws_frame(
    opcode: int,
    payload: bytes,
    rng: random.Random,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
) -> bytes:
    """A client's frame, or one a client must not send (any opcode, RSV bits, unmasked)."""
    head = frame_head(opcode, len(payload), fin=fin, rsv=rsv, masked=masked)
    if not masked:
        return head + payload
    key = rng.randbytes(4)
    return head + key + mask(payload, key)


class RawWebSocket:
    """A client on a bare socket after a 101: writes whatever it is given, parses what the hub
    says (error frames, its close frame) and notices when the connection ends."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self.stream = stream
        self.parser = FrameProtocol(client=True, extensions=[])
        self.parts: list[str] = []
        self.errors: Counter[str] = Counter()
        self.close_code: int | None = None
        self.unparseable = False
        self.ended = trio.Event()
        self.news = trio.Event()
        self._feed(leftover)

    def _feed(self, data: bytes) -> None:
        if not data or self.unparseable:
            return
        self.parser.receive_bytes(data)
        try:
            for item in self.parser.received_frames():
                if item.opcode in (Opcode.TEXT, Opcode.CONTINUATION):
                    assert isinstance(item.payload, str)
                    self.parts.append(item.payload)
                    if item.message_finished:
                        text, self.parts = "".join(self.parts), []
                        if text.startswith('{"type":"error"'):
                            self.errors[str(json.loads(text).get("code"))] += 1
                elif item.opcode is Opcode.CLOSE:
                    assert isinstance(item.payload, tuple)
                    self.close_code = int(item.payload[0])
        except ParseFailed:
            self.unparseable = True
        self.news.set()
        self.news = trio.Event()

    async def read(self) -> None:
        try:
            while data := await self.stream.receive_some(65536):
                self._feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended.set()
            self.news.set()

    async def send(self, data: bytes) -> bool:
        """False once the connection is gone (the hub closed it)."""
        if self.ended.is_set():
            return False
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def wait(self, ready: Callable[[], bool], timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not (ready() or self.ended.is_set()):
                await self.news.wait()

    def outcome(self) -> str:
        if self.close_code is not None:
            return f"close {self.close_code}"
        if self.unparseable:
            return "an answer this client cannot parse"
        if self.ended.is_set():
            return "hung up without a close frame"
        return "still open"


# -- the attacks ----------------------------------------------------------------------------------


@dataclass
class Ctx:
    name: str
    plan: Plan
    hub: HubProcess
    sampler: Sampler
    seed: int
    baseline: dict[str, Any]  # /healthz before the attack
    metrics_before: dict[str, float]
    tables: set[tuple[str, str]]  # every table the hub holds before the attack
    primed: dict[tuple[str, str], str]  # restart/kill: tables published once, and their data


@dataclass
class Attack:
    outcome: str  # for the table
    figures: dict[str, Any]
    window_end: float  # wall clock: the end of the witness's measured window
    recover_s: float | None
    recover_what: str
    checks_failed: list[str] = field(default_factory=list)
    restored_behind: int | None = None  # restart/kill


def small_publish(i: int) -> str:
    value = round((i % 2000) / 10 - 100, 1)
    row = f'{{"pair":"EURUSD","TF_data":[{{"M1":{value},"cell_color":"clrGreen"}}],"sum":{value}'
    row += ',"sum_cell_color":"clrGreen"}'
    return f'{{"key":"{FLOOD_KEY}","src":"{FLOOD_SRC}","clientId":"FLOOD_1","data":[{row}]}}'


async def _flood(port: int, rate: float, bound: float, closed: trio.Event) -> dict[str, Any]:
    """One publisher on a raw socket sending small valid publishes, 100 frames per write, paced
    to `rate`, until the hub closes it; then it answers the close (if its socket still takes
    data) and hangs up 2 s later, as a client gone quiet would."""
    rng = random.Random(0)
    sent, first, last = 0, 0.0, 0.0
    got: dict[str, Any] = {"closed_at": None, "closed_wall": None}
    sending = trio.CancelScope()
    sock = await connect_from("127.0.0.1", port)
    client_port = int(sock.getsockname()[1])
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(upgrade_request("/ws/dll", f"Authorization: Bearer {TOKEN}"))
        status, leftover = await read_head(stream)
        if status != 101:
            raise RuntimeError(f"the flood's handshake got HTTP {status}")
        ws = RawWebSocket(stream, leftover)

        async def watch() -> None:
            await ws.wait(lambda: ws.close_code is not None, math.inf)
            got.update(closed_at=trio.current_time(), closed_wall=time.time())
            closed.set()
            sending.cancel()  # a write may be stuck: the hub no longer reads this socket

        with trio.move_on_after(bound):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ws.read)
                nursery.start_soon(watch)
                first = trio.current_time()
                with sending:
                    while True:
                        await trio.sleep_until(first + sent / rate)
                        batch = [small_publish(sent + k).encode() for k in range(100)]
                        if not await ws.send(
                            b"".join(ws_frame(Opcode.TEXT, f, rng) for f in batch)
                        ):
                            break
                        sent += len(batch)
                        last = trio.current_time()
                await closed.wait()
                with trio.move_on_after(1.0):
                    await ws.send(ws_frame(Opcode.CLOSE, struct.pack("!H", 1000), rng))
                await ws.wait(lambda: False, 1.0)
                got["hub_hung_up"] = ws.ended.is_set()
                nursery.cancel_scope.cancel()
    hung_up = time.time()
    took = last - first
    return {
        "sent": sent,
        "send_rate": round(sent / took) if took > 0 else None,
        "error_frames": dict(ws.errors),
        "close_code": ws.close_code,
        "closed_after_s": None if got["closed_at"] is None else round(got["closed_at"] - first, 2),
        "hub_ended_the_connection_within_1s": got.get("hub_hung_up", False),
        "closed_wall": got["closed_wall"],
        "client_port": client_port,
        "hung_up_wall": hung_up,
    }


async def _flood_and_recover(ctx: Ctx, bound: float) -> tuple[dict[str, Any], float | None]:
    """The flood, and from its close on, /healthz until the hub counts the publishers of before."""
    closed = trio.Event()
    recovered: list[float | None] = []

    async def watch() -> None:
        await closed.wait()
        recovered.append(await poll_health(ctx.hub.port, back_to(ctx.baseline, "publishers"), 30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        figures = await _flood(ctx.hub.port, FLOOD_RATE, bound, closed)
        if not closed.is_set():
            nursery.cancel_scope.cancel()
    return figures, recovered[0] if recovered else None


def attack_flood(ctx: Ctx) -> Attack:
    settings = ctx.hub.settings
    flood_seconds = float(settings["flood_seconds"])
    figures, recovered = trio.run(_flood_and_recover, ctx, flood_seconds + 15)
    end = figures.pop("closed_wall") or time.time()
    hung_up = figures.pop("hung_up_wall")
    time.sleep(max(0.0, hung_up + 2.0 - time.time()))  # its FIN or RST would have arrived
    held = hub_socket_to(ctx.hub.port, figures.pop("client_port"))
    figures["hub_still_holds_it"] = None
    if held is not None:
        held["after_hang_up_s"] = round(time.time() - hung_up, 1)
        figures["hub_still_holds_it"] = held
    after = scrape_metrics(ctx.hub.port)
    tables = trio.run(snapshot_tables, ctx.hub.port)
    flood_table = tables.get((FLOOD_KEY, FLOOD_SRC))
    accepted = int(flood_table["seq"]) if flood_table else 0
    dropped = metric_delta(ctx.metrics_before, after, "mt5hub_rejects_total", reason="rate_limited")
    figures.update(
        accepted=accepted,
        dropped_rate_limited=dropped,
        aimed_rate=FLOOD_RATE,
        flood_seconds=flood_seconds,
        rate_limit=settings["rate_limit"],
        rate_burst=settings["rate_burst"],
        frames_unread=figures["sent"] - accepted - dropped,
    )
    failed = []
    if figures["close_code"] != 1008:
        failed.append(f"flood closed with {figures['close_code']}, not 1008")
    if not figures["error_frames"].get("rate_limited"):
        failed.append("no rate_limited error frame")
    if held is not None:
        failed.append(
            f"{held['after_hang_up_s']:g} s after the flooder hung up, the hub still holds its "
            f"connection ({held['state']}, {held['unread_bytes']:,} bytes it never read)"
        )
    limited = figures["error_frames"].get("rate_limited", 0)
    outcome = (
        f"aimed {FLOOD_RATE:,.0f}/s, sent {figures['send_rate'] or 0:,}/s "
        f"({figures['sent']:,} frames); {accepted} accepted, {dropped:,} dropped with "
        f"{limited} `rate_limited` error frames; close {figures['close_code']} after "
        f"{figures['closed_after_s']} s (flood_seconds {flood_seconds:g})"
    )
    return Attack(
        outcome,
        figures,
        recovered or end,
        _since(end, recovered),
        "from the 1008 until /healthz publishers are back to before",
        failed,
    )


def _since(start: float, end: float | None) -> float | None:
    return None if end is None else round(max(0.0, end - start), 2)


async def _idle(ctx: Ctx) -> tuple[dict[str, Any], float, float | None]:
    port, plan = ctx.hub.port, ctx.plan
    most = {"viewers": 0, "healthz_failed": 0, "healthz_asked": 0}
    slowest = [0.0]

    async def count_viewers() -> None:
        """The most viewers at once, and how /healthz answers meanwhile (5 s timeout)."""
        while True:
            asked = trio.current_time()
            most["healthz_asked"] += 1
            try:
                most["viewers"] = max(most["viewers"], int((await health(port))["viewers"]))
            except (OSError, ValueError):
                most["healthz_failed"] += 1
            slowest[0] = max(slowest[0], trio.current_time() - asked)
            await trio.sleep(0.25)

    kernel_before = kernel_counters()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_viewers)
        started = time.time()
        held = await open_and_stall(port, IDLE_SOURCES, IDLE_CONNECTIONS, plan.idle_open_timeout)
        opened = time.time()
        await trio.sleep(plan.idle_hold)
        nursery.cancel_scope.cancel()
    rss_held = ctx.sampler.current_rss()
    viewers_end = None
    with contextlib.suppress(OSError, ValueError):
        viewers_end = int((await health(port, timeout=30.0))["viewers"])
    kernel_after = kernel_counters()
    during = await metrics_patiently(port)
    close_all(held.socks)
    closed = time.time()
    recovered = await poll_health(port, back_to(ctx.baseline, "viewers"), 60.0)
    answered = sum(v for k, v in held.outcomes.items() if k.isdigit())
    figures = {
        "connections": IDLE_CONNECTIONS,
        "sources": f"{IDLE_SOURCES[0]}-{IDLE_SOURCES[-1]}",
        "answers": dict(held.outcomes.most_common()),
        "answered": answered,
        "errors_at_s": percentiles_s(held.errors_at),
        "last_answer_after_s": round(held.last_answer, 2),
        "opening_took_s": round(opened - started, 2),
        "open_bound_s": plan.idle_open_timeout,
        "hold_s": plan.idle_hold,
        "most_viewers_at_once": most["viewers"],
        "healthz_during": {
            "asked": most["healthz_asked"],
            "failed_within_5s": most["healthz_failed"],
            "slowest_s": round(slowest[0], 2),
        },
        "viewers_at_end_of_hold": viewers_end,
        "rss_held_mb": round(rss_held / 2**20, 1),
        "hub_closed_viewers": closes_by_code(ctx.metrics_before, during, "viewer"),
        "refused": {
            r: metric_delta(ctx.metrics_before, during, "mt5hub_rejects_total", reason=r)
            for r in ("too_many_from_ip", "hub_full")
        },
        "conflated": metric_delta(ctx.metrics_before, during, "mt5hub_conflated_total"),
        "kernel": {k: v - kernel_before.get(k, 0) for k, v in kernel_after.items()},
        "hub_open_files_limit": ctx.hub.open_files_limit(),
    }
    return figures, closed, recovered


def attack_idle(ctx: Ctx) -> Attack:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    figures, closed, recovered = trio.run(_idle, ctx)
    figures["hub_peak_open_files"] = ctx.sampler.peak_fds
    answers = figures["answers"]
    settings = ctx.hub.settings
    failed = []
    if figures["most_viewers_at_once"] > int(settings["max_viewers"]) + 1:  # + the witness
        failed.append(f"{figures['most_viewers_at_once']} viewers at once, over max_viewers")
    if (
        figures["viewers_at_end_of_hold"] is not None
        and figures["viewers_at_end_of_hold"] > int(settings["max_viewers"]) + 1
    ):
        failed.append(f"{figures['viewers_at_end_of_hold']} viewers at once, over max_viewers")
    if recovered is None:
        failed.append("the hub did not return to its viewers of before within 60 s")
    other = {k: v for k, v in answers.items() if k not in ("101", "429", "503")}
    cut = figures["hub_closed_viewers"]
    overflows = figures["kernel"].get("ListenOverflows", 0)
    outcome = (
        f"{IDLE_CONNECTIONS:,} upgrades at once: 101 x{answers.get('101', 0):,}, "
        f"429 x{answers.get('429', 0):,}, 503 x{answers.get('503', 0):,}"
        + "".join(f", {k} x{v:,}" for k, v in other.items())
        + f" (last answer at {figures['last_answer_after_s']} s; listen queue overflowed "
        f"{overflows:,} times); the hub held at most {figures['hub_peak_open_files']:,} open "
        f"files (max_viewers {settings['max_viewers']}); it cut "
        + (", ".join(f"{v:,} with {k}" for k, v in cut.items()) or "none")
        + f"; {figures['viewers_at_end_of_hold']} still open after a {figures['hold_s']:g} s "
        f"hold (RSS {figures['rss_held_mb']} MB); /healthz unanswered within 5 s "
        f"{figures['healthz_during']['failed_within_5s']} of "
        f"{figures['healthz_during']['asked']} times"
    )
    return Attack(
        outcome,
        figures,
        recovered or closed,
        _since(closed, recovered),
        "from closing the sockets until /healthz viewers are back to before",
        failed,
    )


async def _never_reads(ctx: Ctx, slow: float) -> tuple[dict[str, Any], float, float | None]:
    port = ctx.hub.port
    held = await open_and_stall(port, [STALLED_SOURCE], STALLED_VIEWERS, 30.0)
    connected = time.time()
    first_drop: list[float] = []

    def dropped_all(h: dict[str, Any]) -> bool:
        viewers = int(h["viewers"])
        if not first_drop and viewers < int(ctx.baseline["viewers"]) + STALLED_VIEWERS:
            first_drop.append(time.time())
        return viewers <= int(ctx.baseline["viewers"])

    gone = await poll_health(port, dropped_all, slow + 45.0)
    after = await metrics_patiently(port)
    close_all(held.socks)
    figures = {
        "viewers": STALLED_VIEWERS,
        "answers": dict(held.outcomes),
        "slow_viewer_timeout": slow,
        "viewer_buffer": ctx.hub.settings["viewer_buffer"],
        "first_dropped_after_s": _since(connected, first_drop[0] if first_drop else None),
        "all_dropped_after_s": _since(connected, gone),
        "hub_closed_viewers": closes_by_code(ctx.metrics_before, after, "viewer"),
        "conflated": metric_delta(ctx.metrics_before, after, "mt5hub_conflated_total"),
        "dropped_frames": metric_delta(ctx.metrics_before, after, "mt5hub_dropped_total"),
    }
    return figures, connected, gone


def attack_never_reads(ctx: Ctx) -> Attack:
    slow = float(ctx.hub.settings["slow_viewer_timeout"])
    figures, connected, gone = trio.run(_never_reads, ctx, slow)
    failed = []
    if figures["answers"] != {"101": STALLED_VIEWERS}:
        failed.append(f"handshakes: {figures['answers']}")
    if gone is None:
        failed.append("the stalled viewers were not all dropped")
    cut = figures["hub_closed_viewers"]
    outcome = (
        f"{STALLED_VIEWERS} x 101; {figures['conflated']:,} updates conflated for them; "
        f"cut {', '.join(f'{v} with {k}' for k, v in cut.items()) or 'none'}, all gone "
        f"{figures['all_dropped_after_s']} s after connecting (first at "
        f"{figures['first_dropped_after_s']} s; slow_viewer_timeout {slow:g} s, "
        f"viewer_buffer {figures['viewer_buffer']})"
    )
    return Attack(
        outcome,
        figures,
        gone or time.time(),
        _since(connected, gone),
        "from the 50 connected until the hub had dropped them all",
        failed,
    )


def read_state_file(path: Path) -> dict[str, Any]:
    """The state file as the next hub will restore it: per table its seq, n and data."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": str(exc), "tables": {}}
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in document.get("tables", []):
        update = json.loads(entry["update"])
        tables[entry["key"], entry["src"]] = {
            "seq": entry["seq"],
            "n": update.get("n"),
            "digest": digest(update.get("data")),
        }
    return {"saved": document.get("saved"), "tables": tables}


def _gone(pid: int | None) -> bool:
    """The process has exited (a zombie holds no sockets any more)."""
    if pid is None:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


async def _wait_for_snapshot(
    port: int, expected: set[tuple[str, str]], timeout: float
) -> tuple[float | None, dict[tuple[str, str], Any]]:
    """A new viewer every 50 ms until its snapshot holds every expected table."""
    tables: dict[tuple[str, str], Any] = {}
    with trio.move_on_after(timeout):
        while True:
            try:
                tables = await snapshot_tables(port, timeout=2.0)
                if expected <= tables.keys():
                    return time.time(), tables
            except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError):
                pass
            await trio.sleep(0.05)
    return None, tables


def attack_fault(ctx: Ctx, kill: bool) -> Attack:
    hub = ctx.hub
    assert hub.proc is not None
    old, worker = hub.proc, hub.worker()
    graceful = float(hub.settings["graceful_timeout"])
    signalled = time.time()
    if kill:
        os.killpg(old.pid, signal.SIGKILL)
    else:
        old.send_signal(signal.SIGTERM)
    try:
        code = old.wait(timeout=graceful + 15)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the hub did not exit {graceful + 15:g} s after the signal") from None
    exited = time.time()
    deadline = time.monotonic() + 5
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.01)
    saved = read_state_file(hub.folder / STATE_FILE)
    started = time.time()
    hub.spawn()
    snapshot_at, tables = trio.run(_wait_for_snapshot, hub.port, ctx.tables, 30.0)
    back = trio.run(
        poll_health,
        hub.port,
        lambda h: (
            int(h["publishers"]) >= int(ctx.baseline["publishers"])
            and int(h["viewers"]) >= int(ctx.baseline["viewers"])
        ),
        20.0,
    )
    time.sleep(ctx.plan.fault_after)
    entry = tables.get((WITNESS_KEY, WITNESS_SRC))
    saved_entry = saved["tables"].get((WITNESS_KEY, WITNESS_SRC))
    figures: dict[str, Any] = {
        "signal": "SIGKILL (process group)" if kill else "SIGTERM (master)",
        "exit_code": code,
        "exit_after_s": round(exited - signalled, 2),
        "graceful_timeout": graceful,
        "state_interval": hub.settings["state_interval"],
        "restarted_serving_after_s": _since(started, snapshot_at),
        "snapshot_after_signal_s": _since(signalled, snapshot_at),
        "tables_expected": len(ctx.tables),
        "tables_in_snapshot": len(ctx.tables & tables.keys()),
        "tables_changed": sorted(
            f"{k}/{s}"
            for (k, s), t in tables.items()
            if (k, s) in ctx.primed and digest(t["data"]) != ctx.primed[k, s]
        ),
        "state_file": {
            "saved_before_signal_s": None
            if saved.get("saved") is None
            else round(signalled - float(saved["saved"]), 2),
            "witness": saved_entry,
            "error": saved.get("error"),
        },
        "snapshot_witness": None
        if entry is None
        else {
            "seq": entry["seq"],
            "n": entry.get("n"),
            "online": entry.get("online"),
            "digest": digest(entry["data"]),
        },
        "witness_back_after_restart_s": _since(started, back),
        "times": {"signal": signalled, "exit": exited, "start": started},
    }
    failed = []
    if figures["tables_in_snapshot"] < len(ctx.tables) or figures["tables_changed"]:
        failed.append("the first snapshot after the restart lacks or changed tables")
    if back is None:
        failed.append("the witness did not reconnect")
    if not kill and code != 0:
        failed.append(f"SIGTERM: the hub exited with {code}")
    recover = _since(signalled, snapshot_at)
    return Attack(
        "",
        figures,
        time.time(),  # the witness's window: through the normal flow after its return
        recover,
        "from the signal until a new viewer's snapshot holds every table",
        failed,
    )


def finish_fault(attack: Attack, w: dict[str, Any], kill: bool) -> None:
    """What needs the witness's log: the last update it got from the old hub, vs. the restore."""
    f = attack.figures
    times = f.pop("times")
    closes = [
        e for e in w["events"] if e[0] >= times["signal"] and e[1] == "viewer" and e[2] == "closed"
    ]
    old_end = closes[0][0] if closes else times["exit"]
    old = [r for r in w["received"] if r[3] <= old_end]
    last_seq = max((r[1] for r in old), default=None)
    last_n = max((r[0] for r in old), default=None)
    saved = f["state_file"]["witness"]
    snap = f["snapshot_witness"]
    restored_seq = saved["seq"] if saved else None
    behind = None if last_seq is None or restored_seq is None else max(0, last_seq - restored_seq)
    attack.restored_behind = behind
    f["old_hub_last_update_seen"] = {"seq": last_seq, "n": last_n}
    f["restored_seq_behind"] = behind
    f["restored_data_is_a_real_publish"] = bool(
        saved and saved["n"] is not None and w["digests"].get(str(saved["n"])) == saved["digest"]
    )
    if snap is not None and saved is not None and snap["online"] is False:
        f["snapshot_equals_state_file"] = (
            snap["seq"] == saved["seq"] and snap["digest"] == saved["digest"]
        )
    closed_old = Counter(e[3] for e in closes if e[0] <= old_end + 0.5)
    f["witness_viewer_closed_with"] = dict(closed_old)
    first_close = closes[0][0] - times["signal"] if closes else None
    f["witness_closed_after_s"] = None if first_close is None else round(first_close, 2)
    new = [r for r in w["received"] if r[3] > times["start"]]
    first_new = min(new, key=lambda r: r[3]) if new else None
    f["witness_first_update_after_signal_s"] = (
        None if first_new is None else round(first_new[3] - times["signal"], 2)
    )
    reconnects = [
        e
        for e in w["events"]
        if e[0] > times["start"] and e[1] == "publisher" and e[2] == "connected"
    ]
    f["witness_publisher_reconnected_after_restart_s"] = (
        round(reconnects[0][0] - times["start"], 2) if reconnects else None
    )
    if new and restored_seq is not None:
        f["seq_continues"] = min(r[1] for r in new) >= restored_seq + 1
    if not f["restored_data_is_a_real_publish"]:
        attack.checks_failed.append("the restored witness data is not one of its publishes")
    if not kill and behind:
        attack.checks_failed.append(f"SIGTERM lost {behind} updates of the latest state")
    if reconnects == []:
        attack.checks_failed.append("the witness publisher did not reconnect")
    word = "SIGKILL" if kill else "SIGTERM"
    exit_text = (
        f"exit {f['exit_code']} after {f['exit_after_s']} s (1001 to the witness at "
        f"{f['witness_closed_after_s']} s; graceful_timeout {f['graceful_timeout']:g} s)"
        if not kill
        else f"closed: {', '.join(closed_old) or '?'}"
    )
    attack.outcome = (
        f"{word}: {exit_text}; restarted, serving in {f['restarted_serving_after_s']} s; first "
        f"snapshot: {f['tables_in_snapshot']}/{f['tables_expected']} tables, witness restored "
        f"at seq {restored_seq} (last seen from the old hub: {last_seq}); witness publisher back "
        f"{f['witness_publisher_reconnected_after_restart_s']} s after the restart"
    )


async def prime_tables(port: int, count: int, seed: int) -> dict[tuple[str, str], str]:
    """Publish `count` tables once (then leave): the snapshot after a restart must hold them."""
    rng = random.Random(seed)
    primed: dict[tuple[str, str], str] = {}
    async with open_websocket_url(
        f"ws://127.0.0.1:{port}/ws/dll", extra_headers=AUTH, connect_timeout=5, disconnect_timeout=2
    ) as ws:
        for n in range(count):
            key, src = f"EA{n + 1}", f"{fake_dll.PAIRS[n % len(fake_dll.PAIRS)]}_PERIOD_H4"
            data = fake_dll.SignalTable(rng).step()
            message = {"key": key, "src": src, "clientId": f"{key}_prime", "data": data}
            await ws.send_message(json.dumps(message))
            primed[key, src] = digest(data)
        await ws.send_message('{"type":"ping"}')
        with trio.fail_after(10):
            while json.loads(await ws.get_message()).get("type") != "pong":
                pass  # every publish before the ping has been handled
    return primed


# -- garbage --------------------------------------------------------------------------------------

GARBAGE_KINDS = {  # kind: weight
    "not-http": 12,
    "bad-handshake": 10,
    "frame-before-101": 8,
    "bad-utf8": 14,
    "protocol-violation": 16,
    "oversized": 6,
    "bad-json": 22,
    "random-frames": 12,
}
JUNK = (
    "",
    "{",
    "}",
    "[]",
    "null",
    "42",
    '"text"',
    "{'key': 'EA1'}",
    '{"key":"EA1"',
    "NaN",
    '{"a":NaN}',
    "[" * 3000 + "]" * 3000,
    '{"type":"subscribe"}',
    '{"type":7}',
    '{"key":"EA1","src":"X","clientId":"c","data":"not a list"}',
    '{"key":"","src":"X","clientId":"c","data":[]}',
    '{"key":"EA1","src":"X","clientId":"c","data":[{"pair":"EURUSD","TF_data":[],"sum":"x",'
    '"sum_cell_color":"clrRed"}]}',
    '{"key":"EA1","src":"X","clientId":"c","data":[{"pair":"EURUSD","TF_data":[{"M1":1e999,'
    '"cell_color":"x"}],"sum":1,"sum_cell_color":"x"}]}',
    '{"key":"EA\\u0000","src":"X","clientId":"c","data":[]}',
    '{"key":"\\ud800","src":"X","clientId":"c","data":[]}',
    '{"key":"EA1","key":"EA2","src":"X","clientId":"c","data":[]}',
)
JSON_ALPHABET = '{}[]",:0123456789.eE+-truefalsnNaIiy\\u d8 keysrcdataTF_'


def junk_frame(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.5:
        return ws_frame(Opcode.TEXT, rng.choice(JUNK).encode(), rng)
    if roll < 0.85:
        text = "".join(rng.choice(JSON_ALPHABET) for _ in range(rng.randrange(1, 300)))
        return ws_frame(Opcode.TEXT, text.encode(), rng)
    return ws_frame(Opcode.BINARY, rng.randbytes(rng.randrange(1, 300)), rng)


def bad_handshake(rng: random.Random) -> bytes:
    """An upgrade without a key, of an old version, by POST; a bad header, a huge head, HTTP/9.9,
    a huge target."""
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
    auth = f"Authorization: Bearer {TOKEN}"
    upgrade = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    return rng.choice(
        [
            f"GET /ws/dll HTTP/1.1\r\n{upgrade}Sec-WebSocket-Version: 13\r\n{auth}\r\n\r\n",
            f"GET /ws/dll HTTP/1.1\r\n{upgrade}{key}\r\nSec-WebSocket-Version: 8\r\n{auth}\r\n\r\n",
            f"POST /ws HTTP/1.1\r\n{upgrade}{key}\r\nSec-WebSocket-Version: 13\r\n"
            "Content-Length: 5\r\n\r\nhello",
            "GET /ws HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + "a" * 20000 + "\r\n\r\n",  # a huge head
            "GET /ws HTTP/9.9\r\nHost: x\r\n\r\n",
            "GET " + "/" * 9000 + " HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
    ).encode()


def violation(rng: random.Random) -> list[bytes]:
    """Frames that break RFC 6455 (wsproto answers 1002)."""
    body = b'{"type":"ping"}'
    return rng.choice(
        [
            [
                ws_frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), body, rng)
            ],  # reserved opcode
            [ws_frame(Opcode.TEXT, body, rng, rsv=rng.choice([1, 2, 4]))],  # RSV bits, no extension
            [ws_frame(Opcode.TEXT, body, rng, masked=False)],  # a client frame must be masked
            [ws_frame(Opcode.PING, b"x", rng, fin=False)],  # a fragmented control frame
            [ws_frame(Opcode.PING, b"x" * 126, rng)],  # a control frame over 125 bytes
            [ws_frame(Opcode.CONTINUATION, body, rng)],  # a continuation of nothing
            [ws_frame(Opcode.TEXT, body, rng, fin=False), ws_frame(Opcode.TEXT, body, rng)],
        ]
    )


def random_frames(rng: random.Random) -> list[bytes]:
    frames = []
    for _ in range(rng.randrange(1, 9)):
        opcode = rng.choice([0, 1, 1, 1, 2, 2, 8, 9, 10, rng.randrange(16)])
        payload = rng.randbytes(rng.choice([0, 1, 2, 50, 125, 126, 300, rng.randrange(2000)]))
        if opcode == Opcode.CLOSE and len(payload) >= 2 and rng.random() < 0.5:
            code = rng.choice([1000, 1001, 1005, 1006, 1011, 2999, 3000, 4999, 5000])
            payload = struct.pack("!H", code) + payload[2:]
        frames.append(
            ws_frame(
                opcode,
                payload,
                rng,
                fin=rng.random() < 0.85,
                rsv=rng.choice([0] * 10 + [1, 4]),
                masked=rng.random() < 0.9,
            )
        )
    return frames


async def http_answer(stream: trio.SocketStream, timeout: float) -> str:
    """Everything the hub answers until it hangs up: its HTTP status, or how it ended."""
    answer = b""
    reset, started = False, trio.current_time()
    with trio.move_on_after(timeout) as scope:
        try:
            while chunk := await stream.receive_some(65536):
                answer += chunk
        except trio.BrokenResourceError:
            reset = True  # closed with our junk unread: a RST, which may discard its answer
    status = status_of(answer)
    if status is not None:
        return f"HTTP {status}" + (" (left open)" if scope.cancelled_caught else "")
    if scope.cancelled_caught:
        return f"no answer, still open after {timeout:g} s"
    after = f" after {trio.current_time() - started:.0f} s"
    return ("reset by the hub, no answer read" if reset else "closed without an answer") + after


async def read_head(stream: trio.SocketStream) -> tuple[int | None, bytes]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None, b""
        head += chunk
    end = head.index(b"\r\n\r\n") + 4
    return status_of(head), head[end:]


async def garbage_one(
    port: int, source: str, kind: str, rng: random.Random
) -> tuple[str, Counter[str]]:
    """One connection of one kind of junk; (outcome, error frames by code)."""
    errors: Counter[str] = Counter()
    try:
        with trio.fail_after(20):
            stream = trio.SocketStream(await connect_from(source, port))
            async with stream:
                if kind == "not-http":
                    junk = rng.randbytes(rng.randrange(1, 4000))
                    await stream.send_all(junk + (b"\r\n\r\n" if rng.random() < 0.5 else b""))
                    return await http_answer(stream, 8.0), errors
                if kind == "bad-handshake":
                    await stream.send_all(bad_handshake(rng))
                    return await http_answer(stream, 8.0), errors
                viewer = kind in ("bad-utf8", "protocol-violation", "random-frames") and (
                    rng.random() < 0.2
                )
                request = upgrade_request(
                    "/ws" if viewer else "/ws/dll", f"Authorization: Bearer {TOKEN}"
                )
                if kind == "frame-before-101":
                    await stream.send_all(request + junk_frame(rng))
                    return await http_answer(stream, 8.0), errors
                await stream.send_all(request)
                status, leftover = await read_head(stream)
                if status != 101:
                    return f"HTTP {status}", errors
                ws = RawWebSocket(stream, leftover)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ws.read)
                    outcome = await GARBAGE_SENDERS[kind](ws, rng)
                    nursery.cancel_scope.cancel()
                return outcome, ws.errors
    except trio.TooSlowError:
        return "no end within 20 s", errors
    except OSError as exc:
        return f"socket error {error_name(exc)}", errors


async def send_bad_json(ws: RawWebSocket, rng: random.Random) -> str:
    count = rng.randrange(3, 15)
    sent = 0
    for _ in range(count):
        if not await ws.send(junk_frame(rng)):
            break
        sent += 1
    await ws.wait(lambda: sum(ws.errors.values()) >= sent, 5.0)
    if ws.ended.is_set() or ws.close_code is not None:
        return ws.outcome()
    await ws.send(ws_frame(Opcode.CLOSE, struct.pack("!H", 1000), rng))
    await ws.wait(lambda: False, 2.0)
    return "stayed open" + (" after error frames" if ws.errors else "") + ", closed by us"


async def send_and_watch(ws: RawWebSocket, frames: list[bytes], wait: float = 5.0) -> str:
    for data in frames:
        if not await ws.send(data):
            break
    await ws.wait(lambda: ws.close_code is not None, wait)
    if ws.close_code is None and not ws.ended.is_set():
        return "still open after its frames" + (", with error frames" if ws.errors else "")
    await ws.wait(lambda: False, 2.0)  # the end of the connection after the close frame
    return ws.outcome()


async def send_utf8(ws: RawWebSocket, rng: random.Random) -> str:
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b'{"key":"\xe2\x82"}', b"ok\x80"])
    return await send_and_watch(ws, [ws_frame(Opcode.TEXT, bad, rng)])


async def send_violation(ws: RawWebSocket, rng: random.Random) -> str:
    return await send_and_watch(ws, violation(rng))


async def send_random(ws: RawWebSocket, rng: random.Random) -> str:
    return await send_and_watch(ws, random_frames(rng))


async def send_oversized(ws: RawWebSocket, rng: random.Random) -> str:
    """One text frame of 1 MiB + up to 1 MiB, streamed in 64 KiB writes (masked with a zero key,
    which leaves the payload as it is)."""
    length = (1 << 20) + 1 + rng.randrange(1 << 20)
    if await ws.send(frame_head(Opcode.TEXT, length) + b"\0\0\0\0"):
        chunk = b"x" * 65536
        left = length
        while left > 0 and await ws.send(chunk[: min(left, len(chunk))]):
            left -= len(chunk)
    return await send_and_watch(ws, [])


GARBAGE_SENDERS: dict[str, Callable[[RawWebSocket, random.Random], Awaitable[str]]] = {
    "bad-json": send_bad_json,
    "bad-utf8": send_utf8,
    "protocol-violation": send_violation,
    "random-frames": send_random,
    "oversized": send_oversized,
}


async def _garbage(ctx: Ctx, count: int) -> tuple[dict[str, Any], float]:
    rng = random.Random(ctx.seed)
    kinds = rng.choices(list(GARBAGE_KINDS), weights=list(GARBAGE_KINDS.values()), k=count)
    outcomes: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    errors: Counter[str] = Counter()
    started = trio.current_time()

    async def one(n: int, kind: str, seed: int) -> None:
        source = GARBAGE_SOURCES[n % len(GARBAGE_SOURCES)]
        outcome, frames = await garbage_one(ctx.hub.port, source, kind, random.Random(seed))
        outcomes[outcome] += 1
        by_kind.setdefault(kind, Counter())[outcome] += 1
        errors.update(frames)

    async with trio.open_nursery() as nursery:
        for n, kind in enumerate(kinds):
            nursery.start_soon(one, n, kind, rng.getrandbits(64))
    ended = time.time()
    figures = {
        "connections": count,
        "seed": ctx.seed,
        "took_s": round(trio.current_time() - started, 2),
        "outcomes": dict(outcomes.most_common()),
        "by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())},
        "error_frames": dict(errors.most_common()),
    }
    return figures, ended


def attack_garbage(ctx: Ctx) -> Attack:
    figures, ended = trio.run(_garbage, ctx, ctx.plan.garbage_connections)
    recovered = trio.run(
        poll_health, ctx.hub.port, back_to(ctx.baseline, "viewers", "publishers"), 30.0
    )
    after = scrape_metrics(ctx.hub.port)
    closes = {
        role: closes_by_code(ctx.metrics_before, after, role) for role in ("publisher", "viewer")
    }
    figures["hub_closes"] = closes
    figures["hub_rejects"] = {
        key.split('reason="', 1)[1].split('"', 1)[0]: n
        for key in after
        if key.startswith("mt5hub_rejects_total{")
        and (
            n := metric_delta(
                ctx.metrics_before,
                after,
                key.split("{")[0],
                reason=key.split('reason="', 1)[1].split('"', 1)[0],
            )
        )
    }
    tracebacks = bb.grep_log(ctx.hub.log)["lines"]
    internal = [line for line in tracebacks if "Traceback" in line or "internal error" in line]
    figures["tracebacks_or_internal_errors"] = len(internal)
    failed = []
    if any("1011" in codes for codes in closes.values()) or internal:
        failed.append("an internal error (1011 or a traceback) in the hub")
    if recovered is None:
        failed.append("the hub did not return to its connections of before")
    statuses = Counter[str]()
    for outcome, n in figures["outcomes"].items():
        statuses[outcome.split(" (")[0].split(",")[0]] += n
    parts = [f"{k} x{v}" for k, v in statuses.most_common()]
    outcome = (
        f"{figures['connections']} junk connections: {', '.join(parts)}; error frames "
        + (", ".join(f"{k} x{v}" for k, v in figures["error_frames"].items()) or "none")
        + f"; 1011 or traceback: {len(internal) + sum(c.get('1011', 0) for c in closes.values())}"
    )
    return Attack(
        outcome,
        figures,
        recovered or ended,
        _since(ended, recovered),
        "from the last junk connection's end until /healthz connections are back to before",
        failed,
    )


# -- one scenario ---------------------------------------------------------------------------------


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_scenario(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    overrides = scenario_overrides(name, args.quick)
    hub = HubProcess(workdir, overrides)
    witness_proc: WitnessProcess | None = None
    sampler: Sampler | None = None
    began = time.monotonic()
    try:
        hub.start()
        primed: dict[tuple[str, str], str] = {}
        if name in ("restart", "kill"):
            primed = trio.run(prime_tables, hub.port, PRIMED_TABLES, args.seed)
        witness_proc = WitnessProcess(hub.port, workdir, args.seed)
        witness_proc.wait_ready()
        ready = time.time()
        time.sleep(plan.baseline)
        baseline = bb.healthz(hub.port)
        tables = set(trio.run(snapshot_tables, hub.port).keys())
        metrics_before = scrape_metrics(hub.port)
        fds_before, sockets_before = open_fds(hub.worker()), hub_sockets(hub.port)
        live_before = live_connections(hub.port)
        sampler = Sampler(hub)
        sampler.start()
        ctx = Ctx(name, plan, hub, sampler, args.seed, baseline, metrics_before, tables, primed)
        busy_before, cpu_before, witness_cpu_before = bb.system_busy()[0], self_cpu(), 0.0
        witness_cpu_before = witness_proc.cpu()
        attack_start = time.time()
        if name == "flood":
            attack = attack_flood(ctx)
        elif name == "idle-5000":
            attack = attack_idle(ctx)
        elif name == "never-reads":
            attack = attack_never_reads(ctx)
        elif name in ("restart", "kill"):
            attack = attack_fault(ctx, kill=name == "kill")
        else:
            attack = attack_garbage(ctx)
        time.sleep(SETTLE_AFTER)
        rss = sampler.finish()
        deadline = time.monotonic() + 3.0  # the hub's ends of closed connections: let them go
        while live_connections(hub.port) > live_before and time.monotonic() < deadline:
            time.sleep(0.1)
        fds_after, sockets_after = open_fds(hub.worker()), hub_sockets(hub.port)
        leaked = live_connections(hub.port) - live_before
        if leaked > 0:
            attack.outcome += f"; the hub still holds {leaked} of the attack's connections"
            if name != "flood":  # the flood's check names it already
                attack.checks_failed.append(
                    f"the hub still holds {leaked} connection(s) the attacker has closed"
                )
        witness_cpu = witness_proc.cpu() - witness_cpu_before
        attacker_cpu = self_cpu() - cpu_before
        busy = bb.system_busy()[0] - busy_before
        w = witness_proc.stop()
        rss_end = bb.rss_bytes(hub.worker() or 0)  # once more, a few seconds later
        if name in ("restart", "kill"):
            finish_fault(attack, w, kill=name == "kill")
        witness = witness_figures(w, attack_start, attack.window_end)
        witness["baseline"] = percentiles(
            [r[3] - r[2] for r in w["received"] if ready <= r[2] < attack_start]
        )
        if witness["lost"]:
            attack.checks_failed.append(f"the witness viewer lost {witness['lost']} (latest state)")
        if witness["corrupt"]:
            attack.checks_failed.append("the witness viewer holds data that was never published")
        return {
            "scenario": name,
            "settings_changed": overrides,
            "outcome": attack.outcome,
            "attacker": attack.figures,
            "witness": witness,
            "restored_seq_behind": attack.restored_behind,
            "hub_rss_mb": {
                **{k: rss[k] for k in ("before", "peak", "after")},
                "at_the_end": round(rss_end / 2**20, 1),
            },
            "hub_fds": {"before": fds_before, "peak": rss["peak_fds"], "after": fds_after},
            "hub_connections_left": max(0, leaked),
            "hub_sockets": {"before": sockets_before, "after": sockets_after},
            "recover_s": attack.recover_s,
            "recover": attack.recover_what,
            "cpu_s": {
                "hub": rss["cpu_s"],
                "attacker": round(attacker_cpu, 2),
                "witness": round(witness_cpu, 2),
                "rest_of_machine": round(busy - rss["cpu_s"] - attacker_cpu - witness_cpu, 2),
            },
            "checks_failed": attack.checks_failed,
            "took_s": round(time.monotonic() - began, 1),
        }
    finally:
        if sampler is not None:
            sampler.halt.set()
        if witness_proc is not None:
            witness_proc.kill()
        hub.stop()


# -- the report -----------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def row(r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [r["scenario"], f"failed: {r['error']}", "-", "-", "-"]
    w, rss = r["witness"], r["hub_rss_mb"]
    witness = f"{w['lost']} lost / p99 {fmt_ms(w['p99_ms'])}"
    if r["restored_seq_behind"] is not None:
        witness += f"; restored {r['restored_seq_behind']} behind"
    outcome = r["outcome"]
    if r["checks_failed"]:
        outcome += " **UNEXPECTED: " + "; ".join(r["checks_failed"]) + "**"
    recover = "not within its bound" if r["recover_s"] is None else f"{r['recover_s']:g} s"
    if r["hub_connections_left"]:
        recover += f", but {r['hub_connections_left']} connection(s) never released"
    return [
        r["scenario"],
        outcome.replace("|", "/"),
        witness,
        f"{rss['before']:g} → {rss['peak']:g} → {rss['after']:g} MB",
        recover,
    ]


def table(results: Sequence[dict[str, Any]]) -> str:
    head = [
        "attack",
        "outcome for the attacker",
        "witness: latest state lost / p99 latency",
        "hub RSS before → peak → after",
        "time to recover",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


BULKY = ("by_kind", "times", "state_file", "snapshot_witness", "hub_log")


def summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures behind the table, one entry per scenario, without the bulkier details."""
    out: dict[str, Any] = {}
    for r in results:
        if "error" in r:
            out[r["scenario"]] = {"error": r["error"]}
            continue
        w = r["witness"]
        out[r["scenario"]] = {
            "settings_changed": r["settings_changed"],
            "attacker": {k: v for k, v in r["attacker"].items() if k not in BULKY},
            "witness": {
                k: w[k]
                for k in (
                    "lost",
                    "updates",
                    "p50_ms",
                    "p99_ms",
                    "max_ms",
                    "seq_gaps",
                    "closed",
                    "baseline",
                )
            },
            "restored_seq_behind": r["restored_seq_behind"],
            "hub_rss_mb": r["hub_rss_mb"],
            "hub_fds": r["hub_fds"],
            "hub_sockets_after": r["hub_sockets"]["after"],
            "hub_connections_left": r["hub_connections_left"],
            "cpu_s": r["cpu_s"],
            "recover_s": r["recover_s"],
            "checks_failed": r["checks_failed"],
            "took_s": r["took_s"],
        }
    return out


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C and SIGTERM unwind the same way, so that the finally blocks stop every child.

    SIGTERM goes through the SIGINT handler: inside trio.run that is trio's, which raises
    KeyboardInterrupt only where it is safe (bench_backplane's sigterm_as_exit raises SystemExit
    from the handler, which can land inside trio's scheduler and abandon the run). SIGINT is
    set to Python's own handler first: a background job inherits it ignored.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        interrupt = signal.getsignal(signal.SIGINT)
        if not callable(interrupt):
            raise KeyboardInterrupt
        interrupt(signal.SIGINT, frame)  # trio's may defer it to a safe point, and return

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all, in this order)",
    )
    parser.add_argument("--quick", action="store_true", help="shorter bounds: ~1.5 min, not 2")
    parser.add_argument("--seed", type=int, default=20261126, help="for the junk and the tables")
    parser.add_argument("--json", action="store_true", help="also print everything measured")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs and their logs")
    parser.add_argument("--witness-port", type=int, help=argparse.SUPPRESS)  # the witness process
    args = parser.parse_args(argv)
    if args.witness_port:
        result = trio.run(witness, args.witness_port, WITNESS_RATE, args.seed)
        print(json.dumps(result), flush=True)
        return 0
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIOS)}")
    names = [n for n in SCENARIOS if n in args.scenarios] or list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="mt5hub-attack-"))
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        with interruptible():
            for name in names:
                workdir = root / name
                workdir.mkdir()
                print(f"== {name}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
                try:
                    result = run_scenario(name, args, workdir)
                except (
                    RuntimeError,
                    OSError,
                    ValueError,
                    KeyError,
                    trio.TooSlowError,
                    HandshakeError,
                    ConnectionClosed,
                ) as exc:
                    traceback.print_exc()
                    result = {"scenario": name, "error": f"{type(exc).__name__}: {exc}"}
                result["hub_log"] = {"path": str(workdir / "hub.log")}
                result["hub_log"].update(bb.grep_log(workdir / "hub.log"))
                results.append(result)
                print("   " + " | ".join(row(result)), file=sys.stderr, flush=True)
                bb.report_logs(result, "hub_log", "hub log")
    except* KeyboardInterrupt:  # bare, or from inside a trio nursery
        print("interrupted", file=sys.stderr)
    took = time.monotonic() - started
    print(f"took {took:.0f} s", file=sys.stderr)

    def render(done: Sequence[dict[str, Any]]) -> str:
        brief = {
            "took_s": round(took, 1),
            "quick": args.quick,
            "seed": args.seed,
            "cpus": os.cpu_count(),
            "scenarios": summary(done),
        }
        return table(done) + "\n\n" + json.dumps(brief, indent=2)

    status = bb.finish(results, args, root, render)
    failed = [r["scenario"] for r in results if r.get("checks_failed")]
    if failed:
        print(f"expectations not met in: {', '.join(failed)}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
