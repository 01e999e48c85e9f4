#!/usr/bin/env python3
"""What an idle viewer costs the hub in memory, at a given state size.

    .venv/bin/python scripts/memory_per_viewer.py --viewers 2000 --tables 0
    .venv/bin/python scripts/memory_per_viewer.py --viewers 500 --tables 1000

Starts a hub (`hypercorn --config hub.toml mt5hub:app`, plain WS on loopback, generous limits),
publishes `--tables` realistic 28 x 9 signal tables, then connects `--viewers` viewers that read
their snapshot whole, answer the hub's pings as browsers do, and then sit idle. Prints the hub's
RSS (its own /healthz) before the viewers (after one viewer has come and gone, so that the state's
shared snapshot is counted there), once they are all idle, and after they have left, and the
difference per viewer. `--checkout` serves another checkout's hub (e.g. an older commit's), for
a side by side comparison. Loopback only; bounded in viewers and time; stops its hub.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import Message, Ping, Request

from mt5hub.testing.launcher import HubProcess, free_port, healthz, hub_toml
from mt5hub.testing.tables import SignalTable

TOKEN = "memory-bench-token"
MAX_VIEWERS = 5000


def write_config(folder: Path, port: int) -> None:
    top = {"worker_class": "trio", "workers": 1, "bind": [f"127.0.0.1:{port}"], "backlog": 4096}
    hub = {
        "max_viewers": MAX_VIEWERS,
        "max_viewers_per_ip": MAX_VIEWERS,
        "rate_limit": 100000.0,
        "rate_burst": 100000,
        "state_file": "",
        "viewer_timeout": 3600.0,
    }
    (folder / "hub.toml").write_text(hub_toml(top, hub, [{"token": TOKEN, "keys": ["*"]}]))


async def publish_tables(port: int, count: int) -> int:
    """Publish `count` tables once; the bytes of JSON published."""
    rng = random.Random(1)
    total = 0
    url = f"ws://127.0.0.1:{port}/ws/dll"
    async with open_websocket_url(url, extra_headers=[("Authorization", f"Bearer {TOKEN}")]) as ws:
        for n in range(count):
            message = json.dumps(
                {
                    "key": f"EA{n // 28}",
                    "src": f"T{n}",
                    "clientId": f"EA{n // 28}_1",
                    "data": SignalTable(rng).step(),
                }
            )
            total += len(message)
            await ws.send_message(message)
        await ws.send_message('{"type":"ping"}')
        while json.loads(await ws.get_message())["type"] != "pong":
            pass
    return total


async def idle_viewer(port: int, ready: trio.Semaphore, leave: trio.Event) -> None:
    """Read the snapshot whole, then stay: answer pings, read whatever else comes."""
    try:
        await _idle_viewer(port, ready, leave)
    except* trio.BrokenResourceError:
        CUT_OFF.append(1)  # the hub dropped it (a 4009 from an older hub, say)


CUT_OFF: list[int] = []


async def _idle_viewer(port: int, ready: trio.Semaphore, leave: trio.Event) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    async with stream:
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/ws")))
        snapshot = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on, leave, nursery.cancel_scope)
            while True:  # until `leave`, or the hub hangs up
                data = await stream.receive_some(1 << 16)
                if not data:
                    return
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Ping):
                        await stream.send_all(ws.send(event.response()))
                    elif isinstance(event, Message) and event.message_finished and not snapshot:
                        snapshot = True
                        ready.release()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def measure(args: argparse.Namespace, port: int) -> dict[str, Any]:
    published = await publish_tables(port, args.tables)
    ready, leave = trio.Semaphore(0), trio.Event()
    async with trio.open_nursery() as nursery:  # one viewer first: the state's snapshot is made
        nursery.start_soon(idle_viewer, port, ready, leave)
        await ready.acquire()
        leave.set()
    await trio.sleep(1.0)
    before = healthz(port)["rss_bytes"]
    ready, leave = trio.Semaphore(0), trio.Event()
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(args.viewers):
            nursery.start_soon(idle_viewer, port, ready, leave)
        read = 0
        with trio.move_on_after(args.timeout):
            while read < args.viewers:
                await ready.acquire()
                read += 1
        connect_s = time.monotonic() - started
        await trio.sleep(args.settle)
        health = healthz(port)
        idle = health["rss_bytes"]
        leave.set()
    await trio.sleep(args.settle)
    after = healthz(port)["rss_bytes"]
    return {
        "viewers": args.viewers,
        "tables": args.tables,
        "state_mb": round(published / 2**20, 1),
        "snapshots_read": read,  # of `viewers`, within --timeout
        "cut_off": len(CUT_OFF),
        "viewers_seen": health["viewers"],  # connected when RSS was read
        "rss_mb": {
            "before": round(before / 2**20, 1),
            "idle": round(idle / 2**20, 1),
            "after": round(after / 2**20, 1),
        },
        "kb_per_idle_viewer": round((idle - before) / args.viewers / 1024, 1),
        "all_snapshots_read_s": round(connect_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=1000)
    parser.add_argument("--tables", type=int, default=0, help="28 x 9 tables published first")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before reading RSS")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--checkout", default="", help="serve the mt5hub of this checkout")
    args = parser.parse_args()
    if not 0 < args.viewers <= MAX_VIEWERS:
        parser.error(f"--viewers: 1 to {MAX_VIEWERS}")
    folder = Path(tempfile.mkdtemp(prefix="mt5hub-memory-"))
    port = free_port()
    write_config(folder, port)
    hub = HubProcess(folder, port, pythonpath=args.checkout)
    hub.start()
    try:
        result = trio.run(measure, args, port)
    finally:
        hub.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
