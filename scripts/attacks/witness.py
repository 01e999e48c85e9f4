"""The witness: a publisher and a viewer in a process of their own, recording every update."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_backplane as bb
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
)

from mt5hub.testing.launcher import spawn, stop_group
from mt5hub.testing.tables import SignalTable

from .common import (
    AUTH,
    MAX_MESSAGE,
    RECONNECT_DELAY,
    REPO,
    SETTLE_TIMEOUT,
    WITNESS_KEY,
    WITNESS_SRC,
    describe,
    digest,
    percentiles,
)


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
    table = SignalTable(rng)
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
            str(REPO / "scripts" / "attack_report.py"),
            "--witness-port",
            str(port),
            "--seed",
            str(seed),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = spawn(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=REPO
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
        stop_group(self.proc, "witness")


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
