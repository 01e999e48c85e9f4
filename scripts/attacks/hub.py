"""The hub under attack: its process, what /proc and its own endpoints say about it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_backplane as bb
import trio
from trio_websocket import (
    open_websocket_url,
)

from mt5hub.testing import launcher
from mt5hub.testing.launcher import healthz, hub_toml

from .common import DROP_KEYS, MAX_MESSAGE, REPO, STATE_FILE, TOKEN


def attack_hub_toml(port: int, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The repo's hub.toml for this run, and its effective settings (Hypercorn's and [mt5hub])."""
    shipped = tomllib.loads((REPO / "hub.toml").read_text())
    top = {k: v for k, v in shipped.items() if not isinstance(v, dict) and k not in DROP_KEYS}
    top.update(worker_class="trio", workers=1, bind=[f"127.0.0.1:{port}"], backlog=1024)
    hub = {k: v for k, v in shipped.get("mt5hub", {}).items() if k != "tokens"}
    hub.update(backplane="", state_file=STATE_FILE)
    hub.update(overrides)
    tokens = [{"token": TOKEN, "keys": ["*"], "name": "attack-report"}]
    text = hub_toml(
        top, hub, tokens, "Written by scripts/attack_report.py from the repo's hub.toml."
    )
    return text, {**top, **hub}


class HubProcess(launcher.HubProcess):
    """`hypercorn --config hub.toml mt5hub:app` in a folder of its own, on a fixed port."""

    def __init__(self, folder: Path, overrides: dict[str, Any]) -> None:
        super().__init__(folder, launcher.free_port())
        text, self.settings = attack_hub_toml(self.port, overrides)
        (folder / "hub.toml").write_text(text)
        self._workers: dict[int, int] = {}  # master pid: worker pid

    def worker(self) -> int | None:
        """The worker process that runs the app (Hypercorn's master spawns it)."""
        if self.process is None:
            return None
        master = self.process.pid
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


class Sampler(threading.Thread):
    """The worker's VmRSS every 100 ms (before, peak, last) and the CPU of the hub's processes.

    It follows `hub.process`, so a restarted hub is measured too: CPU is what each process used
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
        pids = bb.tree(self.hub.process.pid) if self.hub.process is not None else []
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
    return await trio.to_thread.run_sync(healthz, port, timeout)


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
