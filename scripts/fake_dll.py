#!/usr/bin/env python3
"""Fake MT5 DLLs for mt5hub: a demo feed, and the load tester.

    python scripts/fake_dll.py demo                       # a few EAs publishing until Ctrl-C
    python scripts/fake_dll.py load -p 10 -r 10 -v 200    # measure: prints throughput and latency

Publishers speak protocol v1 exactly like the DLL (Bearer token, the seed's JSON, pongs to the hub's
pings). Each publish carries an extra field `sent` (wall clock, seconds) that the hub forwards; a
viewer subtracts it from its own clock on arrival, so latency is end to end: publisher socket, hub,
viewer socket. Freshness is the age, at the end of the measured window, of the newest `sent` each
(healthy) viewer holds for each table: what a dashboard shows then, however many updates it
missed. Viewers parse only the head and tail of each update (where `sent` and `seq` are), so that
the load tester measures the hub rather than its own JSON parser; several viewer processes
(`--procs`) spread the clients' cost. The load test is bounded in time and count and talks to
loopback addresses only. `--deflate` makes viewers offer permessage-deflate like browsers do.
Against a server without /healthz and /metrics (bench/seed_fastapi.py) the hub figures are null.

Each publish moves `--change` of its table's cells (default 0.1, about what a strength EA shows
between two publishes; 1 moves them all). `--delta` viewers ask for protocol v1.1 patches
(`/ws?delta=1`): one in VERIFY_EVERY holds every table and applies every patch as a dashboard
does, the others check each patch's `base` from its head (as cheap as reading an update); a
patch whose `base` a viewer does not hold counts as a patch error. The report gives message
bytes per delivery for full updates and patches, and the bytes read off the socket per
delivery (compressed, in TLS records: what went over the wire). `--subscribe one` makes
viewer n subscribe to table n % publishers only (`/ws?keys=`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ipaddress
import json
import math
import os
import random
import re
import socket
import ssl
import statistics
import sys
import time
import urllib.error
import urllib.request
from array import array
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.protocol import CLOSED, OPEN, Event
from websockets.uri import parse_uri

from mt5hub import delta
from mt5hub.testing.tables import PAIRS, SignalTable

MAX_SECONDS = 600
RECEIVE_BYTES = 256 * 1024
MAX_MESSAGE = 16 * 1024 * 1024  # a snapshot of many tables is one message
CONNECT_TIME = 5.0  # viewers connect (and publishers wait) during this much, at most
PUBLISHER_GRACE = 5.0  # after the run, publishers get this long to close before they are cut off
MAX_CLIENTS = 10_000
SENT = re.compile(r'"sent":([0-9.eE+-]+)')
SEQ = re.compile(r'"seq":([0-9]+)')
BASE = re.compile(r'"base":([0-9]+)')
# One --delta viewer in this many holds every table and applies every patch (HeldTables); the
# others check each patch's `base` against the seq they hold, from its head, as cheaply as the
# default viewers read updates: the load tester must not be the bottleneck it measures.
VERIFY_EVERY = 50
KEY_SRC = re.compile(r'"key":"([^"]*)","src":"([^"]*)"')


def client_ssl(url: str, ca: str | None, insecure: bool) -> ssl.SSLContext | None:
    if not url.startswith("wss:"):
        return None
    context = ssl.create_default_context(cafile=ca)
    if insecure:  # the self-signed development certificate
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def table_id(n: int) -> tuple[str, str]:
    """(key, src) of publisher n."""
    return f"EA{n + 1}", f"{PAIRS[n % len(PAIRS)]}_PERIOD_H1"


def http_base(url: str) -> str:
    parts = urlsplit(url)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


# -- publishers ---------------------------------------------------------------------------------


async def publisher(
    args: argparse.Namespace, n: int, stop_at: float, counts: dict[str, int], rng: random.Random
) -> None:
    """One EA: connect, publish `rate` tables a second until stop_at, reconnect when dropped."""
    key, src = table_id(n)
    table = SignalTable(rng, PAIRS[: args.pairs], change=args.change)
    headers = [(b"Authorization", f"Bearer {args.token}".encode())]
    context = client_ssl(args.url, args.ca, args.insecure)
    period = 1.0 / args.rate
    while trio.current_time() < stop_at:
        try:
            async with (
                open_websocket_url(
                    args.url + "/ws/dll", extra_headers=headers, ssl_context=context
                ) as ws,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(_answer_hub, ws, counts)
                next_at = trio.current_time() + rng.uniform(0, period)  # spread publishers out
                while next_at < stop_at:
                    await trio.sleep_until(next_at)
                    message = {
                        "key": key,
                        "src": src,
                        "clientId": f"{key}_{os.getpid()}",
                        "sent": time.time(),
                        "data": table.step(),
                    }
                    await ws.send_message(json.dumps(message, separators=(",", ":")))
                    counts["published"] += 1
                    next_at = max(next_at + period, trio.current_time() - period)
                nursery.cancel_scope.cancel()
                return
        except (OSError, HandshakeError, ConnectionClosed) as exc:
            counts["reconnects"] += 1
            if args.verbose or args.command == "demo":
                print(f"{key}: {type(exc).__name__}: {exc}; retrying in 1 s", file=sys.stderr)
            await trio.sleep(1.0)


async def _answer_hub(ws: Any, counts: dict[str, int]) -> None:
    """Read what the hub says to a publisher: answer pings, count (and show) errors."""
    while True:
        message = json.loads(await ws.get_message())
        if message.get("type") == "ping":
            await ws.send_message('{"type":"pong"}')
        elif message.get("type") == "error":
            counts["errors"] += 1
            if counts["errors"] <= 5:
                print(f"hub error: {message}", file=sys.stderr)


# -- viewers ------------------------------------------------------------------------------------


class ViewerStats:
    def __init__(self) -> None:
        self.latencies = array("d")  # seconds, updates received after the warm-up
        self.updates = 0  # deliveries of a table's new state: update frames and patch frames
        self.patches = 0  # of which patch frames (--delta)
        self.patch_errors = 0  # patches whose base was not the seq held: the hub's bug
        self.gaps = 0  # updates a viewer never saw (seq jumped): conflated for it by the hub
        self.closed = 0
        self.frames = 0
        self.freshness = array("d")  # seconds, one per (healthy viewer, table)
        # Message bytes (after inflating) by frame type, of the deliveries counted above.
        self.delivered_bytes = {"update": 0, "patch": 0}
        self.wire_bytes = 0  # bytes read off the socket for those deliveries (compressed, TLS)

    def merge(self, other: ViewerStats) -> None:
        self.latencies.extend(other.latencies)
        self.updates += other.updates
        self.patches += other.patches
        self.patch_errors += other.patch_errors
        self.gaps += other.gaps
        self.closed += other.closed
        self.frames += other.frames
        self.freshness.extend(other.freshness)
        for kind, size in other.delivered_bytes.items():
            self.delivered_bytes[kind] += size
        self.wire_bytes += other.wire_bytes


class HeldTables:
    """What a --delta viewer holds: each table's latest update, kept up by the hub's frames.

    A `snapshot` replaces everything held (a `partial` one adds or replaces only its tables), an
    `update` replaces its table, a `patch` is applied to its table with mt5hub.delta.apply, and
    `unsubscribed` drops the tables it names.
    The hub sends a patch only to a viewer that holds its `base`: one whose base is not the seq
    held is a protocol error, counted in `patch_errors` (the table is left as it was).
    """

    def __init__(self) -> None:
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.patch_errors = 0

    def take(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Take one frame from the hub; the table's new update if it brought one."""
        kind = message.get("type")
        if kind == "snapshot":
            if not message.get("partial"):
                self.tables.clear()
            for entry in message["tables"]:
                self.tables[entry["key"], entry["src"]] = entry
            return None
        if kind == "update":
            self.tables[message["key"], message["src"]] = message
            return message
        if kind == "patch":
            table = message["key"], message["src"]
            held = self.tables.get(table)
            if held is None or held.get("seq") != message.get("base"):
                self.patch_errors += 1
                return None
            body = {name: v for name, v in message.items() if name not in delta.HEADER}
            new = delta.apply(held, body)
            new["seq"], new["ts"] = message["seq"], message["ts"]
            self.tables[table] = new
            return new
        if kind == "unsubscribed":
            for gone in message["tables"]:
                self.tables.pop((gone["key"], gone["src"]), None)
        return None


class ViewerSocket:
    """A lean WebSocket client for many viewers in one process: websockets' sans-I/O protocol
    over a trio stream.

    trio-websocket costs a task switch and a channel hop per message and reads 4 KiB at a time;
    at 20,000 updates/s of 11.5 KB that makes the load generator, not the hub, the bottleneck.
    This reads 256 KiB at a time and hands back whole text messages. It answers pings as soon as
    it has read what came before them, as a browser does. websockets' frame parser costs 35 us
    per compressed 28 x 9 update and 10 us per plain one, against wsproto's 61 and 28 us (parsing
    alone, on this machine): the client's CPU is what the hub competes with on one machine.
    """

    def __init__(self, stream: trio.abc.Stream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.parts: list[bytes] = []
        self.size = 0  # bytes of the message `messages()` gave last (inflated, if compressed)
        # Bytes read off the socket since the message before (a read may bring several: summed
        # over many messages, what they took on the wire, compressed and in TLS records).
        self.wire = 0
        self._read = 0
        self.pending: list[Event] = []  # frames that came in with the handshake's answer

    @classmethod
    async def connect(
        cls, url: str, context: ssl.SSLContext | None, rcvbuf: int, deflate: bool = False
    ) -> ViewerSocket:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if context else 80)
        tcp = await trio.open_tcp_stream(host, port)
        if rcvbuf:  # like a browser that reads promptly: backlog stays at the hub, not in here
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        stream: trio.abc.Stream = tcp
        if context is not None:
            stream = trio.SSLStream(stream, context, server_hostname=host)
        extensions = [ClientPerMessageDeflateFactory()] if deflate else None
        protocol = ClientProtocol(parse_uri(url), extensions=extensions, max_size=MAX_MESSAGE)
        self = cls(stream, protocol)
        protocol.send_request(protocol.connect())
        await self._flush()
        while not (events := protocol.events_received()):
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise ConnectionError("closed during the handshake")
            protocol.receive_data(data)
        if protocol.handshake_exc is not None:
            raise ConnectionError(f"handshake refused: {protocol.handshake_exc}")
        self.pending = events[1:]
        return self

    async def _flush(self) -> None:
        """Send what the protocol has queued: requests, pongs, close frames."""
        for data in self.protocol.data_to_send():
            if data:
                await self.stream.send_all(data)

    async def _frames(self) -> AsyncIterator[Frame]:
        # What an earlier read brought in comes first: the read that completed the handshake
        # may hold the snapshot and the hub's first ping, and the hub sends nothing more until
        # that ping is answered (flow control).
        events, self.pending = self.pending, []
        while True:
            for event in events:
                if isinstance(event, Frame):
                    yield event
            await self._flush()  # pongs, once what came before their pings was handed on
            if self.protocol.state is CLOSED or self.protocol.close_expected():
                return
            data = await self.stream.receive_some(RECEIVE_BYTES)
            self._read += len(data)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            events = self.protocol.events_received()

    async def messages(self) -> AsyncIterator[str]:
        async for frame in self._frames():
            if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.CONT:
                self.parts.append(frame.data)
                if frame.fin:
                    data = b"".join(self.parts)
                    self.parts.clear()
                    self.size = len(data)
                    self.wire, self._read = self._read, 0
                    yield data.decode()

    async def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        await self._flush()

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            try:
                if self.protocol.state is OPEN:
                    self.protocol.send_close(1000)
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.stream.aclose()


async def viewer(
    url: str,
    context: ssl.SSLContext | None,
    connecting: trio.Semaphore,
    window: tuple[float, float],
    stats: ViewerStats,
    stalled: bool,
    rcvbuf: int,
    fresh: Freshness,
    number: int = 0,
) -> None:
    """A dashboard: reads every frame (or, stalled, connects and never reads).

    Updates arriving within `window` (wall clock) are measured; it leaves a second after. With
    `fresh.delta` it asks for patches (`/ws?delta=1`), parses every frame and holds every table
    (HeldTables), as a dashboard must; otherwise it reads only an update's head and tail.
    """
    measure_from, measure_until = window
    stop_at = trio.current_time() + (measure_until + 1 - time.time())
    seqs: dict[tuple[str, str], int] = {}
    newest: dict[tuple[str, str], float] = {}  # the newest `sent` held, arrived by measure_until
    held = HeldTables() if fresh.delta and number % VERIFY_EVERY == 0 else None

    def deliver(
        table: tuple[str, str], number: int, sent: float | None, arrived: float, kind: str
    ) -> None:
        last = seqs.get(table)
        seqs[table] = number
        if sent is not None and arrived < measure_until:
            newest[table] = max(newest.get(table, 0.0), sent)
        if not measure_from <= arrived < measure_until:
            return
        stats.updates += 1
        stats.patches += kind == "patch"
        stats.delivered_bytes[kind] += ws.size
        stats.wire_bytes += ws.wire
        if last is not None and number > last + 1:
            stats.gaps += number - last - 1
        if sent is not None:
            stats.latencies.append(arrived - sent)

    def hold(entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            seqs[entry["key"], entry["src"]] = entry["seq"]
            if isinstance(entry.get("sent"), int | float):
                newest[entry["key"], entry["src"]] = float(entry["sent"])

    async with connecting:  # a few handshakes at a time: the listen backlog is short
        query = ["delta=1"] if fresh.delta else []
        tables = fresh.tables
        if fresh.one_table:
            tables = (fresh.tables[number % len(fresh.tables)],)
            query.append(f"keys={quote(tables[0][0])}")
        path = "/ws?" + "&".join(query) if query else "/ws"
        ws = await ViewerSocket.connect(url + path, context, rcvbuf, fresh.deflate)
    try:
        if stalled:
            await trio.sleep_until(stop_at)
            return
        with trio.move_on_at(stop_at):
            async for text in ws.messages():
                stats.frames += 1
                head = text[:200]
                if held is not None:
                    arrived = time.time()
                    message = json.loads(text)
                    state = held.take(message)
                    if state is not None:
                        sent = state.get("sent")
                        sent = float(sent) if isinstance(sent, int | float) else None
                        table = state["key"], state["src"]
                        deliver(table, state["seq"], sent, arrived, message["type"])
                    elif message.get("type") == "snapshot":
                        hold(message["tables"])
                    elif message.get("type") == "ping":
                        await ws.send_text('{"type":"pong"}')
                elif head.startswith('{"type":"update"'):
                    arrived = time.time()
                    found = KEY_SRC.search(head)
                    seq = SEQ.search(text, len(text) - 40)
                    sent_at = SENT.search(text)
                    if found is None or seq is None:
                        continue
                    number, table = int(seq.group(1)), (found.group(1), found.group(2))
                    at = None if sent_at is None else float(sent_at.group(1))
                    deliver(table, number, at, arrived, "update")
                elif head.startswith('{"type":"patch"'):
                    arrived = time.time()
                    found, seq, base = KEY_SRC.search(head), SEQ.search(head), BASE.search(head)
                    if found is None or seq is None or base is None:
                        continue
                    table = (found.group(1), found.group(2))
                    if seqs.get(table) != int(base.group(1)):
                        stats.patch_errors += 1  # a patch to a state this viewer does not hold
                    sent_at = SENT.search(text)
                    at = None if sent_at is None else float(sent_at.group(1))
                    deliver(table, int(seq.group(1)), at, arrived, "patch")
                elif head.startswith('{"type":"snapshot"'):
                    hold(json.loads(text)["tables"])
                elif head.startswith('{"type":"ping"'):
                    await ws.send_text('{"type":"pong"}')
            stats.closed += 1  # the hub ended it before the run did
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        stats.closed += 1
    finally:
        if not stalled:  # holding nothing for a table: as old as the whole run
            for table in tables:
                stats.freshness.append(measure_until - newest.get(table, fresh.since))
        if held is not None:
            stats.patch_errors += held.patch_errors
        await ws.aclose()


class Freshness(NamedTuple):
    """What viewers need to report freshness (and whether they offer permessage-deflate and
    ask for deltas)."""

    tables: tuple[tuple[str, str], ...]  # every table published during the run
    since: float  # when publishing started (wall clock): the age of a table never received
    deflate: bool
    delta: bool = False
    one_table: bool = False  # viewer n subscribes to table n % publishers only (?keys=)


async def viewer_group(
    url: str,
    ca: str | None,
    insecure: bool,
    count: int,
    stalled: int,
    window: tuple[float, float],
    rcvbuf: int,
    fresh: Freshness,
    first: int = 0,
) -> ViewerStats:
    """`count` viewers in this process, of which `stalled` never read (numbered from
    `first`)."""
    stats = ViewerStats()
    context = client_ssl(url, ca, insecure)
    connecting = trio.Semaphore(32)
    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(
                viewer,
                url,
                context,
                connecting,
                window,
                stats,
                n < stalled,
                rcvbuf,
                fresh,
                first + n,
            )
    return stats


def run_viewer_group(*args: Any) -> ViewerStats:
    return trio.run(viewer_group, *args)


# -- the commands -------------------------------------------------------------------------------


def scrape(base: str, context: ssl.SSLContext | None) -> tuple[dict[str, Any], dict[str, float]]:
    """/healthz and the hub's own counters from /metrics (empty from a server without them)."""
    counters: dict[str, float] = {}
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5, context=context) as r:
            health = json.loads(r.read())
        with urllib.request.urlopen(base + "/metrics", timeout=5, context=context) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:
        if exc.code != 404:  # bench/seed_fastapi.py has neither route
            raise
        return {}, counters
    except (TimeoutError, urllib.error.URLError) as exc:
        if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, TimeoutError):
            raise
        # A server seconds behind (the seed's loop at 1,000 deflate viewers): the load's own
        # figures still stand.
        print(f"{base}: no answer within 5 s: its own figures are left out", file=sys.stderr)
        return {}, counters
    else:
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                counters[name.split("{")[0]] = counters.get(name.split("{")[0], 0) + float(value)
    return health, counters


def hub_mean_ms(delta: dict[str, float]) -> float | None:
    count = delta.get("mt5hub_delivery_latency_seconds_count", 0)
    if not count:
        return None
    return round(1000 * delta["mt5hub_delivery_latency_seconds_sum"] / count, 1)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"the load tester only targets loopback addresses, not {host!r}")


def load(args: argparse.Namespace) -> dict[str, Any]:
    check_loopback(args.url)
    if args.seconds + args.warmup > MAX_SECONDS or args.viewers + args.publishers > MAX_CLIENTS:
        raise SystemExit(f"bounded: at most {MAX_SECONDS} s and {MAX_CLIENTS} clients")
    base, context = http_base(args.url), client_ssl(args.url, args.ca, args.insecure)
    health_before, counters_before = scrape(base, context)
    procs = max(1, min(args.procs, args.viewers or 1))
    shares = [args.viewers // procs + (i < args.viewers % procs) for i in range(procs)]
    stalled = [args.stalled // procs + (i < args.stalled % procs) for i in range(procs)]
    start = time.time() + CONNECT_TIME  # publishers start then, all viewers connected by then
    window = (start + args.warmup, start + args.warmup + args.seconds)
    tables = tuple(table_id(n) for n in range(args.publishers))
    fresh = Freshness(tables, start, args.deflate, args.delta, args.subscribe == "one")
    with concurrent.futures.ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(
                run_viewer_group,
                *(args.url, args.ca, args.insecure, share, stall, window, args.rcvbuf, fresh),
                sum(shares[:n]),
            )
            for n, (share, stall) in enumerate(zip(shares, stalled, strict=True))
        ]
        time.sleep(max(0.0, start - time.time()))
        connected = scrape(base, context)[0].get("viewers", 0) - health_before.get("viewers", 0)
        shared = health_before.get("backplane", {}).get("kind", "local") != "local"
        shared = shared or not health_before  # no /healthz: no count to check
        if connected < args.viewers and not shared:  # with a backplane: one worker's count
            print(f"warning: only {connected} of {args.viewers} viewers connected", file=sys.stderr)
        counts = trio.run(publish_for, args, args.warmup + args.seconds)
        stats = ViewerStats()
        for future in futures:
            stats.merge(future.result())
    health_after, counters_after = scrape(base, context)
    lat, ages = sorted(stats.latencies), sorted(stats.freshness)
    rss = [h.get("rss_bytes") for h in (health_before, health_after)]
    delta = {k: counters_after.get(k, 0) - counters_before.get(k, 0) for k in counters_after}
    healthy = args.viewers - args.stalled
    return {
        "publishers": args.publishers,
        "rate": args.rate,
        "viewers": args.viewers,
        "stalled": args.stalled,
        "seconds": args.seconds,
        "window": [round(t, 3) for t in window],  # the measured window (wall clock, epoch s)
        "published_per_s": round(counts["published"] / (args.warmup + args.seconds), 1),
        "expected_deliveries_per_s": args.publishers
        * args.rate
        * healthy
        / (args.publishers if args.subscribe == "one" else 1),
        "deliveries_per_s": round(stats.updates / args.seconds, 1),
        "updates_delivered": stats.updates,
        "latency_ms": {
            name: round(1000 * percentile(lat, q), 1)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
        },
        "mean_latency_ms": round(1000 * statistics.fmean(lat), 1) if lat else None,
        "freshness_ms": {
            name: round(1000 * percentile(ages, q), 1)
            for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
        },
        "patches_delivered": stats.patches,  # of updates_delivered (--delta)
        "patch_errors": stats.patch_errors,  # a patch whose base the viewer did not hold
        # Message bytes per delivery (inflated, if compressed): full updates, patches, all.
        "bytes_per_delivery": {
            "update": per(stats.delivered_bytes["update"], stats.updates - stats.patches),
            "patch": per(stats.delivered_bytes["patch"], stats.patches),
            "all": per(sum(stats.delivered_bytes.values()), stats.updates),
            "wire": per(stats.wire_bytes, stats.updates),
        },
        "seq_gaps": stats.gaps,
        "viewers_closed": stats.closed,
        "hub_conflated": delta.get("mt5hub_conflated_total", 0),
        "hub_dropped": delta.get("mt5hub_dropped_total", 0),
        # The hub's own part of the latency: from a publish read to its update written to a
        # viewer's socket (mean over the run; null from a server without the histogram). The
        # rest is the publishers' and viewers' side, and the kernel.
        "hub_mean_latency_ms": hub_mean_ms(delta),
        "hub_rss_mb": {  # null from a server without /healthz
            "before": None if rss[0] is None else round(rss[0] / 2**20, 1),
            "after": None if rss[1] is None else round(rss[1] / 2**20, 1),
        },
        "publisher_errors": counts["errors"],
        "publisher_reconnects": counts["reconnects"],
        "publishers_cut_off": counts["cut_off"],  # still sending when the run's bound hit
        "deflate": args.deflate,
        "delta": args.delta,
        "change": args.change,
    }


def per(total: int, count: int) -> float | None:
    return round(total / count, 1) if count else None


async def publish_for(args: argparse.Namespace, seconds: float) -> dict[str, int]:
    """Run the publishers for `seconds`; a few seconds more, and those still at it are cut off.

    A hub that stops reading a publisher blocks its sends and its closing handshake: the bound
    keeps the load test bounded anyway, and `cut_off` says how many publishers it stopped.
    """
    counts = {"published": 0, "errors": 0, "reconnects": 0, "running": 0, "cut_off": 0}
    stop_at = trio.current_time() + seconds
    rng = random.Random(args.seed)

    async def run(n: int, rng: random.Random) -> None:
        counts["running"] += 1
        await publisher(args, n, stop_at, counts, rng)
        counts["running"] -= 1

    with trio.move_on_at(stop_at + PUBLISHER_GRACE):
        async with trio.open_nursery() as nursery:
            for n in range(args.publishers):
                nursery.start_soon(run, n, random.Random(rng.random()))
    counts["cut_off"] = counts.pop("running")
    return counts


def print_report(r: dict[str, Any]) -> None:
    lat, fresh = r["latency_ms"], r["freshness_ms"]
    print(
        f"{r['publishers']} publishers x {r['rate']:g}/s -> {r['viewers']} viewers "
        f"({r['stalled']} stalled), {r['seconds']:g} s measured\n"
        f"  published       {r['published_per_s']:>10}/s\n"
        f"  delivered       {r['deliveries_per_s']:>10}/s  (all, unconflated: "
        f"{r['expected_deliveries_per_s']}/s)\n"
        f"  latency ms      p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}"
        f"  max {lat['max']}\n"
        f"  freshness ms    p50 {fresh['p50']}  p99 {fresh['p99']}  max {fresh['max']}"
        f"  (age of the newest state held at the end)\n"
        f"  in the hub ms   mean {r['hub_mean_latency_ms']}  (from a publish read to its update "
        f"written, of the latency above)\n"
        f"  bytes/delivery  {r['bytes_per_delivery']['all']}  (full updates "
        f"{r['bytes_per_delivery']['update']}, patches {r['bytes_per_delivery']['patch']}: "
        f"{r['patches_delivered']} patches, {r['patch_errors']} patch errors)\n"
        f"  conflated       {r['seq_gaps']} seen as seq gaps; hub counted {r['hub_conflated']:g} "
        f"conflated, {r['hub_dropped']:g} dropped; {r['viewers_closed']} viewers closed\n"
        f"  hub RSS MB      {r['hub_rss_mb']['before']} -> {r['hub_rss_mb']['after']}\n"
        f"  publishers      {r['publisher_errors']} error frames, "
        f"{r['publisher_reconnects']} reconnects, {r['publishers_cut_off']} cut off"
        + (", viewers offered permessage-deflate" if r["deflate"] else "")
        + (", viewers asked for deltas" if r["delta"] else "")
        + f"; {r['change']:g} of the cells change per publish"
    )


def wait_for_hub(args: argparse.Namespace, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    base, context = http_base(args.url), client_ssl(args.url, args.ca, args.insecure)
    while True:
        try:
            scrape(base, context)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no hub answered at {base} within {timeout:g} s") from None
            time.sleep(0.2)


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1], not {text}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("demo", "load"))
    parser.add_argument(
        "--url", default="ws://127.0.0.1:8000", help="hub base URL (ws:// or wss://)"
    )
    parser.add_argument("--token", default=os.environ.get("MT5HUB_TOKEN", "supersecret123"))
    parser.add_argument("--ca", help="CA file for wss://")
    parser.add_argument("--insecure", action="store_true", help="accept a self-signed certificate")
    parser.add_argument("-p", "--publishers", type=int, default=None)
    parser.add_argument("-r", "--rate", type=float, default=None, help="publishes/s per publisher")
    parser.add_argument("-v", "--viewers", type=int, default=10)
    parser.add_argument("--stalled", type=int, default=0, help="viewers that never read")
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help="rows per table (<= 28)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--procs", type=int, default=1, help="processes for the viewers")
    parser.add_argument(
        "--rcvbuf", type=int, default=256 * 1024, help="viewer socket receive buffer (0: the OS's)"
    )
    parser.add_argument(
        "--deflate", action="store_true", help="viewers offer permessage-deflate (like browsers)"
    )
    parser.add_argument(
        "--delta", action="store_true", help="viewers ask for patches (/ws?delta=1) and apply them"
    )
    parser.add_argument(
        "--subscribe", choices=("all", "one"), default="all",
        help="what each viewer subscribes to: every table, or one (viewer n: n %% publishers)",
    )  # fmt: skip
    parser.add_argument(
        "--change",
        type=fraction,
        default=0.1,
        help="fraction of the cells that move per publish (1: all)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--wait", action="store_true", help="demo: wait for the hub to answer first"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        args.publishers = args.publishers or 4
        args.rate = args.rate or 2.0
        if args.wait:
            wait_for_hub(args)
        print(f"demo feed: {args.publishers} EAs at {args.rate:g}/s to {args.url} (Ctrl-C stops)")
        try:
            trio.run(publish_for, args, math.inf)
        except KeyboardInterrupt:
            pass
        return
    args.publishers = 1 if args.publishers is None else args.publishers
    args.rate = args.rate or 10.0
    result = load(args)
    print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_report(result)


if __name__ == "__main__":
    main()
