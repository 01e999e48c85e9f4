#!/usr/bin/env python3
"""Does the hub give memory back after a burst of connections? Prints its RSS as it goes.

    python scripts/memory_burst.py                     # 5,000 viewers, then 60 s after they left
    python scripts/memory_burst.py --no-trim           # the same without malloc_trim (memory.py)
    python scripts/memory_burst.py -c 1000 --wait 10   # a smaller, quicker run
    python scripts/memory_burst.py --bursts 3          # one hub, three bursts: reused or leaked?

Starts its own hub (`hypercorn --config hub.toml mt5hub:app` in a temporary folder, loopback
only), publishes `--tables` tables of 28 x 9, opens `--connections` viewers from addresses
spread over 127.0.0.0/8 (so that max_viewers_per_ip stays as configured), has each read its
snapshot and keep reading, closes them all, and reads the hub's own `rss_bytes` from /healthz:
before, at the peak, at once after the close, and `--wait` seconds later. Bounded in count and
time; the hub is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "memory-burst-token"
PAIRS = [f"P{n:02d}USD" for n in range(28)]
TFS = ("M1", "M5", "M15", "M30", "H1", "H4", "D1", "W1", "MN1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table(n: int, value: float) -> str:
    rows = [
        {
            "pair": pair,
            "TF_data": [{tf: round(value + i / 10, 2), "cell_color": "clrGreen"} for i, tf in
                        enumerate(TFS)],
            "sum": value,
            "sum_cell_color": "clrGreen",
        }
        for pair in PAIRS
    ]  # fmt: skip
    return json.dumps({"key": f"EA{n}", "src": "H1", "clientId": f"EA{n}_1", "data": rows})


def rss(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
        return int(json.loads(answer.read())["rss_bytes"])


def viewers(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
        return int(json.loads(answer.read())["viewers"])


def mib(n: int) -> str:
    return f"{n / 2**20:7.1f} MiB"


def _frame_end(data: bytes, start: int) -> int | None:
    """Where the WebSocket frame that begins at `start` ends, if all of its header is in."""
    if len(data) < start + 2:
        return None
    length, at = data[start + 1] & 0x7F, start + 2
    if length == 126:
        if len(data) < at + 2:
            return None
        length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
    elif length == 127:
        if len(data) < at + 8:
            return None
        length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
    return at + length


async def hold_viewer(port: int, source: str, limiter: trio.CapacityLimiter) -> int:
    """Connect from `source` and read the snapshot (its size), then read on until cancelled."""
    async with limiter:  # connects under way at once: within the hub's backlog
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        await stream.send_all(HANDSHAKE)
        got = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise OSError(f"closed during the handshake: {got[:80]!r}")
            got += data
            head_end = got.find(b"\r\n\r\n")
            if head_end < 0:
                continue
            if not got.startswith(b"HTTP/1.1 101"):
                raise OSError(f"refused: {got[:80]!r}")
            end = _frame_end(got, head_end + 4)
            if end is not None and len(got) >= end:
                break
    async with stream:
        while await stream.receive_some(65536):
            pass  # the hub's pings; unanswered (viewer_timeout is above the run's length)
    return end - head_end - 4


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def burst(port: int, connections: int) -> tuple[int, int]:
    """Open the viewers, read the RSS at the peak, close them all; (peak RSS, viewers held)."""
    limiter = trio.CapacityLimiter(200)
    failed = 0

    async def one(n: int) -> None:
        nonlocal failed
        source = f"127.0.{1 + n // 40}.{1 + n % 40}"  # 40 addresses a /24: 40 per address
        try:
            await hold_viewer(port, source, limiter)
        except OSError as exc:
            failed += 1
            if failed <= 5:
                print(f"  viewer {n}: {exc}", file=sys.stderr)

    async with trio.open_nursery() as nursery:
        for n in range(connections):
            nursery.start_soon(one, n)
        count = 0
        with trio.move_on_after(600):
            while (count := await trio.to_thread.run_sync(viewers, port)) + failed < connections:
                await trio.sleep(1)
        await trio.sleep(2)
        peak = await trio.to_thread.run_sync(rss, port)
        nursery.cancel_scope.cancel()  # every viewer closes its socket
    return peak, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--connections", type=int, default=5000)
    parser.add_argument("-t", "--tables", type=int, default=20)
    parser.add_argument("--wait", type=float, default=60.0, help="seconds after the close")
    parser.add_argument("--no-trim", action="store_true", help="trim_memory = false")
    parser.add_argument("--bursts", type=int, default=1, help="bursts, each measured")
    args = parser.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="mt5hub-memory-"))
    (folder / "hub.toml").write_text(
        "\n".join(
            [
                'worker_class = "trio"',
                "workers = 1",
                f'bind = ["127.0.0.1:{port}"]',
                "backlog = 1024",
                "[mt5hub]",
                'state_file = ""',
                f"max_viewers = {args.connections + 100}",
                "max_viewers_per_ip = 50",
                "viewer_timeout = 3600.0",
                "slow_viewer_timeout = 3600.0",
                f"trim_memory = {'false' if args.no_trim else 'true'}",
                'log_level = "INFO"',
                "[[mt5hub.tokens]]",
                f'token = "{TOKEN}"',
                'keys = ["*"]',
            ]
        )
        + "\n"
    )
    log = open(folder / "hub.log", "wb")  # noqa: SIM115 - the process owns it
    hub = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--config", "hub.toml", "mt5hub:app"],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MT5HUB_CONFIG": "hub.toml"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                rss(port)
                break
            except OSError:
                if time.monotonic() > deadline or hub.poll() is not None:
                    raise SystemExit((folder / "hub.log").read_text()) from None
                time.sleep(0.1)
        started = rss(port)

        async def publish() -> None:
            url = f"ws://127.0.0.1:{port}/ws/dll"
            headers = [("Authorization", f"Bearer {TOKEN}")]
            async with open_websocket_url(url, extra_headers=headers) as ws:
                for n in range(args.tables):
                    await ws.send_message(table(n, random.random()))
                await trio.sleep(1)

        trio.run(publish)
        with_tables = rss(port)
        print(f"hub pid {hub.pid}, {args.tables} tables, trim_memory {not args.no_trim}")
        print(f"  started          {mib(started)}")
        print(f"  with tables      {mib(with_tables)}")
        for _ in range(args.bursts):
            peak, count = trio.run(burst, port, args.connections)
            while viewers(port) > 0:
                time.sleep(0.5)
            closed = rss(port)
            time.sleep(args.wait)
            after = rss(port)
            print(f"  {count} viewers   {mib(peak)}")
            print(f"  all closed       {mib(closed)}")
            print(f"  {args.wait:g} s later      {mib(after)}")
            print(f"  kept after the burst: {mib(after - with_tables)}")
        lines = (folder / "hub.log").read_text().splitlines()
        print("\n".join(f"  hub: {line}" for line in lines if "trimmed" in line))
    finally:
        hub.terminate()
        hub.wait(30)


if __name__ == "__main__":
    main()
