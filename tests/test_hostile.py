"""Hostile and broken input against a real hub (Hypercorn in a subprocess, see conftest), sent over
raw sockets wherever a well-behaved client library would refuse to send it.

Every attack has a defined outcome (an HTTP status, a close code or an error frame) and leaves
everyone else undisturbed (a healthy publisher and viewer keep working through it). Every one
that gets as far as a request costs the hub a line in its log about the offender (what Hypercorn
refuses before that, garbage or a head or TLS handshake that never completes, it drops without
one); none ever writes a token or a traceback there:

- handshakes: the token in the wrong place, or in a frame sent before the handshake's answer;
  a plain GET of the WebSocket routes; garbage instead of HTTP; a request head or a TLS
  handshake that never completes (slowloris);
- frames: invalid UTF-8, protocol violations, messages over the size limit (in one frame, in many
  fragments, 50 MiB of them), JSON too deep, too big, NaN, with a name given twice, with control
  characters or markup, 100,000 rows;
- a seeded random frame generator on a raw socket (MT5HUB_FUZZ_SEED picks another seed), and
  hypothesis over the whole publish path on one connection.

Sleeps appear only where the attack itself is paced (the slowloris trickle); deadlines only stop
a test that would otherwise hang.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import TOKEN, RunningHub, free_port, write_hub_files
from helpers import (
    DEADLINE,
    RawPublisher,
    frame,
    health,
    metric,
    publish_frame,
    publisher,
    receive,
    status_of,
    table_rows,
    text_frame,
    upgrade_request,
    viewer,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub_server import next_update, synced
from test_models import mangled_publishes
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import Opcode

from mt5hub.errors import ProtocolError
from mt5hub.hub import update_text
from mt5hub.models import Decoder, parse_json

HubMaker = Callable[..., RunningHub]
FUZZ_SEED = int(os.environ.get("MT5HUB_FUZZ_SEED", "20261126"))
NEVER_IN_THE_LOG = ("Traceback", "internal error", "Error in ASGI", "Exception Group")


# -- hubs -----------------------------------------------------------------------------------------


def _start_hub(folder: Path, ca: trustme.CA, settings: dict[str, Any]) -> RunningHub:
    """A hub as production runs it: with Hypercorn's access log on (the shipped hub.toml's)."""
    hub = RunningHub(folder, free_port(), free_port(), ca)
    write_hub_files(folder, ca, hub.http_port, hub.https_port, settings)
    toml = folder / "hub.toml"
    toml.write_text(toml.read_text().replace('errorlog = "-"', 'errorlog = "-"\naccesslog = "-"'))
    hub.start(timeout=DEADLINE)
    return hub


@pytest.fixture
def make_hub(
    tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA
) -> Iterator[Callable[..., RunningHub]]:
    hubs: list[RunningHub] = []

    def make(**settings: Any) -> RunningHub:
        hubs.append(_start_hub(tmp_path_factory.mktemp("hostile"), ca, settings))
        return hubs[-1]

    yield make
    for hub in hubs:
        hub.kill()


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[RunningHub]:
    """One hub for the tests that need nothing special: no rate limit to get in the way."""
    hub = _start_hub(
        tmp_path_factory.mktemp("shared"), ca, {"rate_limit": 100000, "rate_burst": 100000}
    )
    yield hub
    hub.kill()


class LogWatch:
    """The hub's log from the moment this was made: what this test caused, on a shared hub."""

    def __init__(self, hub: RunningHub, whole: bool = False) -> None:
        self.hub, self.start = hub, 0 if whole else len(hub.log())

    def text(self) -> str:
        return self.hub.log()[self.start :]

    def lines(self, *needles: str) -> list[str]:
        return [line for line in self.text().splitlines() if all(n in line for n in needles)]

    async def wait_for_lines(self, count: int, *needles: str) -> list[str]:
        async def logged() -> bool:
            return len(self.lines(*needles)) >= count

        await wait_for(logged, f"{count} log line(s) with {needles}")
        return self.lines(*needles)

    def assert_clean(self) -> None:
        text = self.text()
        for bad in NEVER_IN_THE_LOG:
            assert bad not in text, text
        assert TOKEN not in text


# -- the healthy pair -----------------------------------------------------------------------------


class Healthy:
    """A publisher and a viewer that must keep working whatever happens beside them."""

    def __init__(self, pub: WebSocketConnection, view: WebSocketConnection, key: str) -> None:
        self.pub, self.view, self.key, self.n = pub, view, key, 0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, hub: RunningHub, key: str = "HEALTHY", tls: bool = False
    ) -> AsyncIterator[Healthy]:
        url, context = (hub.wss_url, hub.client_ssl_context()) if tls else (hub.ws_url, None)
        async with publisher(url, ssl_context=context) as pub, viewer(url, context) as view:
            await receive(view, "snapshot")
            yield cls(pub, view, key)

    async def still_served(self) -> None:
        """The next publish reaches the viewer, intact, and neither connection was closed."""
        self.n += 1
        await self.pub.send_message(publish_frame(key=self.key, value=self.n))
        update = await next_update(self.view, self.key)
        assert update["data"] == table_rows(value=self.n)
        assert self.pub.closed is None and self.view.closed is None


# -- raw sockets ----------------------------------------------------------------------------------


async def exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send these bytes on a new connection; everything the hub answers until it closes it, and
    how long that took. A reset after the answer counts as closed."""
    started = time.monotonic()
    answer = b""
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            try:
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            except trio.BrokenResourceError:
                pass
    return answer, time.monotonic() - started


# -- handshakes -----------------------------------------------------------------------------------


async def test_token_anywhere_but_the_handshake_headers_is_401_and_never_logged(
    make_hub: HubMaker,
) -> None:
    """`Authorization: Bearer` or `?token=` only: a token elsewhere is no token (401), and the
    hub never writes it down, wherever it was put."""
    hub = make_hub()
    log = LogWatch(hub)
    misplaced = [
        [f"X-Token: {TOKEN}"],
        [f"Cookie: token={TOKEN}"],
        [f"Authorization: Token {TOKEN}"],
        [f"Authorization: Basic {base64.b64encode(f'{TOKEN}:'.encode()).decode()}"],
        [f"Authorization: {TOKEN}"],
        [f"Sec-WebSocket-Protocol: {TOKEN}"],  # where browsers can put one
    ]
    async with Healthy.connect(hub) as healthy:
        for headers in misplaced:
            answer, _ = await exchange(hub.http_port, upgrade_request("/ws/dll", *headers))
            assert status_of(answer) == 401, headers
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "unauthorized"
        for path in (f"/ws/dll?access_token={TOKEN}", f"/ws/dll?Token={TOKEN}"):
            answer, _ = await exchange(hub.http_port, upgrade_request(path))
            assert status_of(answer) == 401, path

        # A client that waits for the answer, as every WebSocket client does, and then sends its
        # token in a first frame anyway: the 401 came first, and the connection is closed.
        stream = await trio.open_tcp_stream("127.0.0.1", hub.http_port)
        async with stream:
            await stream.send_all(upgrade_request("/ws/dll"))
            answer = await stream.receive_some(65536)
            assert status_of(answer) == 401
            try:
                await stream.send_all(text_frame(json.dumps({"token": TOKEN})))
                with trio.fail_after(DEADLINE):
                    while await stream.receive_some(65536):
                        pass
            except trio.BrokenResourceError:
                pass
        await healthy.still_served()
        assert (await health(hub))["publishers"] == 1  # the healthy one, and none of these

    attempts = len(misplaced) + 3
    await log.wait_for_lines(attempts, '"GET /ws/dll 1.1" 401')  # the access log: each of them
    # The hub's own line: one per burst from an address (a flood of refusals is one story).
    refused = log.lines("refused /ws/dll from 127.0.0.1: 401 missing token")
    assert 1 <= len(refused) <= attempts, refused
    log.assert_clean()


@pytest.mark.parametrize(
    ("path", "token", "early_frame"),
    [
        ("/ws/dll", TOKEN, text_frame(json.dumps({"token": TOKEN}))),
        ("/ws/dll", None, text_frame(json.dumps({"token": TOKEN}))),
        # what the hub reads without a parser once a viewer is connected (hardening._lone_pong)
        ("/ws", None, frame(Opcode.PONG, b"\x00" * 7 + b"\x01")),
    ],
    ids=["valid-token", "no-token", "viewer-pong"],
)
async def test_a_frame_sent_before_the_handshake_is_answered_gets_400_and_the_hub_lives(
    make_hub: HubMaker, path: str, token: str | None, early_frame: bytes
) -> None:
    """RFC 6455 forbids it. Hypercorn 0.18 answered 400 while the hub answered too, and the
    collision in h11 ended the hub's worker: one request stopped the hub (pgjones/hypercorn#225).
    Now it is a 400 and nothing else, whatever the token or the frame (mt5hub/hardening.py)."""
    hub = make_hub()
    log = LogWatch(hub)
    headers = [f"Authorization: Bearer {token}"] if token else []
    early = upgrade_request(path, *headers) + early_frame
    async with Healthy.connect(hub) as healthy:
        for _ in range(5):
            answer, _ = await exchange(hub.http_port, early)  # one write: there before any answer
            assert status_of(answer) == 400
            await healthy.still_served()
    assert (await health(hub))["status"] == "ok"
    await log.wait_for_lines(5, f"refused {path} from", "400 data sent before the handshake")
    log.assert_clean()


async def test_a_plain_get_of_the_websocket_routes_is_426_upgrade_required(
    shared_hub: RunningHub,
) -> None:
    log = LogWatch(shared_hub)
    async with Healthy.connect(shared_hub, key="PLAIN_GET") as healthy:
        for path in ("/ws", "/ws/dll", f"/ws/dll?token={TOKEN}"):
            status, body = await trio.to_thread.run_sync(shared_hub.get, path)
            assert status == 426, path
            assert json.loads(body)["error"] == "upgrade_required"
        answer, _ = await exchange(
            shared_hub.http_port, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert re.search(rb"\r\nupgrade: websocket\r\n", answer, re.IGNORECASE), answer
        answer, _ = await exchange(
            shared_hub.http_port,
            b"POST /ws/dll HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        assert status_of(answer) == 405
        await healthy.still_served()
    await log.wait_for_lines(4, "426 not a WebSocket handshake")
    log.assert_clean()


GARBAGE = {
    "tls-hello-on-the-plain-port": bytes.fromhex("160301020001000001fc0303") + os.urandom(64),
    "binary": bytes(range(256)) * 4,
    "text-without-http": b"hello there\r\n\r\n",
    "bad-request-line": b"GET\r\n\r\n",
    "no-version": b"GET /ws/dll\r\nHost: x\r\n\r\n",
    "header-without-colon": b"GET /ws HTTP/1.1\r\nHost x\r\n\r\n",
    "nul-in-header": b"GET /ws HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
    "head-over-16-kib": b"GET /ws HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "upgrade-without-key": (
        b"GET /ws/dll HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    ),
    "upgrade-over-http-1.0": (
        b"GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ),
}


async def test_garbage_instead_of_a_handshake_gets_400_and_closed_while_others_carry_on(
    shared_hub: RunningHub,
) -> None:
    """Hypercorn answers what is not HTTP/1.1 (or not a valid upgrade) before the hub sees a
    request, and closes the connection. (An upgrade it refused itself used to stay open for as
    long as the client liked: mt5hub/hardening.py closes it.)"""
    log = LogWatch(shared_hub)
    async with Healthy.connect(shared_hub, key="GARBAGE") as healthy:
        for name, data in GARBAGE.items():
            answer, _ = await exchange(shared_hub.http_port, data)  # returns once it is closed
            # h11 says 431 to a head still incomplete past 16 KiB, 400 if it came whole
            expected = {400, 431} if name == "head-over-16-kib" else {400}
            assert status_of(answer) in expected, (name, answer[:100])
            await healthy.still_served()
    assert (await health(shared_hub))["status"] == "ok"
    log.assert_clean()


async def test_a_request_head_trickled_byte_by_byte_is_cut_at_keep_alive_timeout(
    make_hub: HubMaker,
) -> None:
    """Slowloris: Hypercorn's keep_alive_timeout runs from the connect until a whole request head
    has arrived, and again after each response (hub.toml sets 5 s; this hub 1 s). A connection
    that says nothing is cut too, and so is one that made a good request first (Hypercorn lost
    that timer under Quart-Trio: mt5hub/hardening.py)."""
    hub = make_hub(keep_alive_timeout=1)
    head = upgrade_request("/ws", "X-Padding: " + "p" * 200)
    closed_after: dict[str, float] = {}
    cut_send, cut = trio.open_memory_channel[str](10)

    async def trickle(name: str, data: bytes, first: bytes = b"") -> None:
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", hub.http_port)
            async with stream:
                if first:  # a good request, answered in full, before the trickle
                    await stream.send_all(first)
                    answer = b""
                    while not answer.rstrip().endswith(b"}"):
                        answer += await stream.receive_some(65536)
                    assert status_of(answer) == 200
                started = time.monotonic()
                try:
                    for byte in data:
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.1)  # the attack's own pace: the point of this test
                    raise AssertionError(f"{name}: the whole head went through")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the hub closed it (a write to a closed connection fails)
        closed_after[name] = time.monotonic() - started
        await cut_send.send(name)

    async def silent() -> None:
        answer, closed_after["silent"] = await exchange(hub.http_port, b"")
        assert answer == b""
        await cut_send.send("silent")

    healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    async with Healthy.connect(hub) as healthy, trio.open_nursery() as nursery:
        nursery.start_soon(trickle, "viewer-head", head)  # would take 30 s to go through
        nursery.start_soon(trickle, "publisher-head", upgrade_request("/ws/dll"))
        nursery.start_soon(trickle, "after-a-good-request", head, healthz)
        nursery.start_soon(silent)
        await healthy.still_served()
        for _ in range(4):
            await cut.receive()
            await healthy.still_served()  # served all along
    print(f"slowloris connections closed after {closed_after} (keep_alive_timeout 1 s)")
    assert closed_after["silent"] < len(head) * 0.1  # well before a trickle could be done
    LogWatch(hub, whole=True).assert_clean()


async def test_a_tls_client_that_never_finishes_its_handshake_is_cut_at_ssl_handshake_timeout(
    make_hub: HubMaker,
) -> None:
    """On the WSS bind: no ClientHello at all, half of one, or plain HTTP. hub.toml sets
    ssl_handshake_timeout to 5 s (Hypercorn's default is 60); this hub 1 s."""
    hub = make_hub(ssl_handshake_timeout=1)
    hello = bytes.fromhex("16030100c8010000c40303") + os.urandom(40)
    attacks = {"nothing": b"", "half-a-client-hello": hello, "plain-http": b"GET / HTTP/1.1\r\n"}
    took: dict[str, float] = {}

    cut_send, cut = trio.open_memory_channel[str](10)

    async def attack(name: str) -> None:
        answer, took[name] = await exchange(hub.https_port, attacks[name])
        assert b"HTTP/1.1 2" not in answer
        await cut_send.send(name)

    async with Healthy.connect(hub, tls=True) as healthy, trio.open_nursery() as nursery:
        for name in attacks:
            nursery.start_soon(attack, name)
        await healthy.still_served()
        for _ in attacks:
            await cut.receive()
            await healthy.still_served()  # served all along
    print(f"stalled TLS handshakes closed after {took} (ssl_handshake_timeout 1 s)")
    assert took["nothing"] < 30 and took["half-a-client-hello"] < 30  # Hypercorn's default: 60
    LogWatch(hub, whole=True).assert_clean()


# -- frames the WebSocket layer refuses -----------------------------------------------------------


async def each_closed_with(
    hub: RunningHub, log: LogWatch, cases: dict[str, bytes], code: int, healthy_key: str
) -> None:
    """Each case, on a connection of its own, is closed with `code` and logged once, while a
    healthy publisher and viewer are served between every two of them."""
    async with Healthy.connect(hub, key=healthy_key) as healthy:
        for name, data in cases.items():
            async with RawPublisher.connect(hub.http_port) as raw:
                await raw.send(data)
                assert await raw.closed_with() == code, name
            await healthy.still_served()
    lines = await log.wait_for_lines(len(cases), "publisher", f"closed {code} (bad frame)")
    assert len(lines) == len(cases)
    log.assert_clean()


async def test_invalid_utf8_in_a_text_frame_is_closed_with_1007_and_logged(
    shared_hub: RunningHub,
) -> None:
    """wsproto finds it; Hypercorn 0.18 then dropped the connection without a close frame or a
    log line (mt5hub/hardening.py sends the 1007 and logs it)."""
    log = LogWatch(shared_hub)
    publish = publish_frame(key="UTF8").encode()
    cases = {
        "invalid-start-byte": text_frame(b'{"key":"\xff\xfe"}'),
        "truncated-sequence-at-the-end": text_frame(publish[:-1] + b"\xe2\x82"),
        "encoded-surrogate": text_frame(b'{"key":"\xed\xa0\x80"}'),
        "overlong-encoding": text_frame(b'{"key":"\xc0\xaf"}'),
        "in-the-second-fragment": text_frame(publish[:10], fin=False)
        + frame(Opcode.CONTINUATION, b"\xff" + publish[10:]),
    }
    await each_closed_with(shared_hub, log, cases, 1007, healthy_key="UTF8_HEALTHY")


async def test_websocket_protocol_violations_are_closed_with_1002_and_logged(
    shared_hub: RunningHub,
) -> None:
    log = LogWatch(shared_hub)
    ping = '{"type":"ping"}'
    cases = {
        "reserved-opcode": frame(3, b"x"),
        "reserved-control-opcode": frame(11, b"x"),
        "rsv1-without-compression": text_frame(ping, rsv=4),
        "rsv2-rsv3": text_frame(ping, rsv=3),
        "unmasked": text_frame(ping, masked=False),
        "control-frame-over-125-bytes": frame(Opcode.PING, b"p" * 126),
        "fragmented-control-frame": frame(Opcode.PING, b"p", fin=False),
        "continuation-without-a-start": frame(Opcode.CONTINUATION, ping.encode()),
        "new-message-inside-a-fragmented-one": text_frame(ping[:5], fin=False) + text_frame(ping),
        "close-with-a-one-byte-payload": frame(Opcode.CLOSE, b"\x03"),
        "close-with-a-reserved-code": frame(Opcode.CLOSE, struct.pack("!H", 1005)),
        "length-with-the-top-bit-set": b"\x81\xff" + b"\x80" + b"\0" * 7 + b"\0\0\0\0",
    }
    await each_closed_with(shared_hub, log, cases, 1002, healthy_key="PROTO_HEALTHY")


async def test_a_message_over_the_limit_in_many_fragments_is_closed_with_1009(
    make_hub: HubMaker,
) -> None:
    """The limit is on the message, not the frame: 100 fragments of 1 KiB each against 64 KiB."""
    hub = make_hub(websocket_max_message_size=65536, rate_limit=1000, rate_burst=1000)
    log = LogWatch(hub)
    fitting = publish_frame(key="FRAGMENTED", pairs=[f"P{i:03d}" for i in range(100)]).encode()
    assert 32768 < len(fitting) < 65536
    async with Healthy.connect(hub) as healthy:
        async with RawPublisher.connect(hub.http_port) as raw:  # under the limit: fine
            chunks = [fitting[i : i + 1024] for i in range(0, len(fitting), 1024)]
            data = text_frame(chunks[0], fin=False)
            for n, chunk in enumerate(chunks[1:], 2):
                data += frame(Opcode.CONTINUATION, chunk, fin=n == len(chunks))
            await raw.send(data)
            update = await next_update(healthy.view, "FRAGMENTED")
            assert update["data"] == json.loads(fitting)["data"]

        async with RawPublisher.connect(hub.http_port) as raw:
            data = text_frame(b"[" + b" " * 1023, fin=False)
            data += b"".join(frame(Opcode.CONTINUATION, b" " * 1024, fin=False) for _ in range(99))
            await raw.send(data)
            assert await raw.closed_with() == 1009
        await healthy.still_served()
    await log.wait_for_lines(1, "publisher", "closed 1009 (frame too large): over 65536 bytes")
    assert await metric(hub, "mt5hub_closes_total", role="publisher", code="1009") == 1
    log.assert_clean()


async def test_a_50_mib_frame_is_closed_with_1009_without_the_hub_holding_it(
    make_hub: HubMaker,
) -> None:
    """Hypercorn 0.18 kept appending the rest of a refused message to its buffer (the whole 50
    MiB, and forever for a peer that never stops) and left the connection open until the
    heartbeat timeout: mt5hub/hardening.py drops the rest and hangs up."""
    hub = make_hub()  # websocket_max_message_size: 1 MiB
    log = LogWatch(hub)
    size = 50 * 1024 * 1024
    chunk = b"a" * (1024 * 1024)
    rss: list[int] = []
    sent = 0

    async with Healthy.connect(hub) as healthy:
        before = (await health(hub))["rss_bytes"]

        async def watch_rss(done: trio.Event) -> None:
            while not done.is_set():
                rss.append((await health(hub))["rss_bytes"])
                await trio.sleep(0.05)

        async with RawPublisher.connect(hub.http_port) as raw, trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(watch_rss, done)
            # Masked with a zero key: the payload goes out as it is, at full speed. And all of
            # it, whatever the hub says meanwhile, until the hub hangs up.
            if await raw.send(frame(Opcode.TEXT, length=size, key=b"\0\0\0\0")):
                while sent < size and await raw.send(chunk):
                    sent += len(chunk)
            code = await raw.closed_with()
            done.set()
        await healthy.still_served()
        after = (await health(hub))["rss_bytes"]

    grew = (max(rss, default=before) - before) / 2**20
    print(
        f"50 MiB frame: closed with {code}; {sent / 2**20:.0f} MiB written before it hung up; RSS "
        f"{before / 2**20:.1f} MiB before, +{grew:.1f} MiB at most during, "
        f"{after / 2**20:.1f} MiB after"
    )
    assert code == 1009
    assert grew < 40, f"the hub grew by {grew:.1f} MiB: it held on to the refused message"
    await log.wait_for_lines(1, "publisher", "closed 1009 (frame too large)")
    assert not log.lines("heartbeat timeout")  # it was not left open until then
    log.assert_clean()


# -- JSON the hub refuses or forwards -------------------------------------------------------------

BIG_INT = "1" + "0" * 1000
DEEP = "[" * 100_000 + "]" * 100_000


def _with(text: str, insert: str) -> str:
    """A valid publish with `insert` added as its last top-level member."""
    return text[:-1] + "," + insert + "}"


VALID = publish_frame(key="BAD_JSON", pairs=["EURUSD"])
SUM = '"sum": 12.6'  # VALID's
WIDE = ",".join(f'"x{n}":{n}' for n in range(200))  # past the names models._loads walks one by one
ROWS_100000 = json.dumps(
    {"key": "ROWS", "src": "S", "clientId": "c", "data": [{}] * 100_000}, separators=(",", ":")
)

REFUSED: dict[str, tuple[str, str, str]] = {  # name: (frame, code, in the detail)
    "nested-100000-deep": (DEEP, "bad_json", "nested too deeply"),
    "nested-deep-in-an-extra": (_with(VALID, f'"x":{DEEP}'), "bad_json", "nested too deeply"),
    "1e400-as-sum": (VALID.replace(SUM, '"sum": 1e400'), "bad_schema", "$.data[0].sum"),
    "1001-digit-sum": (VALID.replace(SUM, f'"sum": {BIG_INT}'), "bad_schema", "sum"),
    "5000-digit-integer": (_with(VALID, '"x":' + "9" * 5000), "bad_json", "digits"),
    "nan-sum": (VALID.replace(SUM, '"sum": NaN'), "bad_json", "NaN"),
    "infinity-in-an-extra": (_with(VALID, '"x":Infinity'), "bad_json", "Infinity"),
    "minus-infinity-cell": (VALID.replace('"M1": 1.0', '"M1": -Infinity'), "bad_json", "Infinity"),
    "key-twice": (_with(VALID, '"key":"EA2"'), "bad_json", "$.key: given more than once"),
    "src-twice": (_with(VALID, '"src":"S2"'), "bad_json", "$.src: given more than once"),
    "clientId-twice": (_with(VALID, '"clientId":"c2"'), "bad_json", "$.clientId: given more"),
    "data-twice": (_with(VALID, '"data":[]'), "bad_json", "$.data: given more than once"),
    "type-twice": ('{"type":"ping","type":"publish"}', "bad_json", "$.type: given more"),
    "extra-twice": (_with(_with(VALID, '"x":1'), '"x":2'), "bad_json", "$.x: given more"),
    "key-twice-one-escaped": (_with(VALID, '"k\\u0065y":"EA2"'), "bad_json", "$.key: given"),
    "key-twice-among-200-names": (_with(VALID, WIDE + ',"key":"EA2"'), "bad_json", "$.key: given"),
    "bell-in-key-escaped": (VALID.replace('"BAD_JSON"', '"EA\\u0007"'), "bad_schema", "$.key:"),
    "del-in-src": (VALID.replace('"EURUSD_PERIOD_H1"', '"S\x7f"'), "bad_schema", "$.src:"),
    "c1-control-in-pair": (VALID.replace('"EURUSD",', '"EUR\u0085USD",'), "bad_schema", "pair"),
    "csi-in-pair": (VALID.replace('"EURUSD",', '"\u009b31mEURUSD",'), "bad_schema", "pair"),
    "raw-bell-in-key": (VALID.replace('"BAD_JSON"', '"EA\x07"'), "bad_json", "control character"),
    "raw-newline-in-pair": (VALID.replace('"EURUSD",', '"EUR\nUSD",'), "bad_json", "control"),
    "100000-rows-under-the-frame-limit": (
        ROWS_100000,
        "bad_schema",
        "$.data: at most 500 rows, got 100000",
    ),
}


def test_the_refused_frames_are_what_they_claim() -> None:
    """Each case differs from a valid publish only in what it is about."""
    assert SUM in VALID and parse_json(VALID)["data"][0]["sum"] == 12.6
    assert json.loads(VALID)["data"][0]["TF_data"][0] == {"M1": 1.0, "cell_color": "clrGreen"}
    for name, (text, _, _) in REFUSED.items():
        assert text != VALID, name
        assert len(text.encode()) < 1024 * 1024, name  # under the frame limit: the hub decides
    assert len(json.loads(ROWS_100000)["data"]) == 100_000


@pytest.mark.parametrize("extra", [0, 200], ids=["narrow", "wide"])
@pytest.mark.parametrize("position", ["first", "last"])
def test_a_name_given_twice_is_refused_at_the_top_level_only(extra: int, position: str) -> None:
    """The decoder's rule, on both of its paths (a few top-level names, or many)."""
    names = [f"x{n}" for n in range(extra)]
    wide = "".join(f'"{name}":0,' for name in names)
    nested = '"nested":{"key":1,"key":2},'  # nested: the last one counts, as in browsers
    twice = '"src":"A",' if position == "first" else ""
    text = "{" + twice + wide + nested + '"src":"B"' + ("" if twice else ',"src":"C"') + "}"
    with pytest.raises(ProtocolError) as refused:
        parse_json(text)
    assert (refused.value.code, refused.value.detail) == ("bad_json", "$.src: given more than once")
    ok = parse_json("{" + wide + nested + '"src":"B"}')
    assert ok["nested"] == {"key": 2} and ok["src"] == "B" and len(ok) == extra + 2


async def test_json_the_hub_refuses_gets_an_error_frame_and_one_log_line_and_nobody_else_notices(
    shared_hub: RunningHub,
) -> None:
    """Each on a connection of its own, which stays up; a name given twice at the top level is
    refused, since parsers disagree on which one counts (see mt5hub.models._loads)."""
    log = LogWatch(shared_hub)
    async with Healthy.connect(shared_hub, key="JSON_HEALTHY") as healthy:
        for name, (text, code, detail) in REFUSED.items():
            async with RawPublisher.connect(shared_hub.http_port) as raw:
                await raw.send(text_frame(text))
                error = await raw.error()  # and the connection is still up
                assert (error["code"], name) == (code, name), error
                assert detail in error["detail"], (name, error)
            await healthy.still_served()
        assert (await health(shared_hub))["tables"] >= 1
    lines = await log.wait_for_lines(len(REFUSED), "publisher", "refused a frame")
    assert len(lines) == len(REFUSED)  # one each: none of them sent a second bad frame
    for (_, code, _), line in zip(REFUSED.values(), lines, strict=True):
        assert f"refused a frame, {code}: " in line
    async with viewer(shared_hub.ws_url) as late:  # nothing refused became a table
        keys = {t["key"] for t in (await receive(late, "snapshot"))["tables"]}
    assert not keys & {"BAD_JSON", "EA2", "ROWS"}
    log.assert_clean()


async def test_binary_frames_even_empty_ones_get_bad_json_and_the_connection_stays_up(
    shared_hub: RunningHub,
) -> None:
    """An empty binary message reached the session as "the peer has closed" (Quart-Trio passes
    on `bytes or text`), which ended it with 1000 and took its tables offline; found by the
    fuzzer below (mt5hub/transport.py)."""
    async with (
        Healthy.connect(shared_hub, key="BINARY_HEALTHY") as healthy,
        RawPublisher.connect(shared_hub.http_port) as raw,
    ):
        for payload in (b"", b"\x00", publish_frame(key="BINARY").encode()):
            await raw.send(frame(Opcode.BINARY, payload))
            error = await raw.error()
            assert (error["code"], error["detail"]) == (
                "bad_json",
                "binary frame: send JSON as a text frame",
            )
        await raw.send(text_frame(publish_frame(key="BINARY")))
        await raw.synced()
        assert (await next_update(healthy.view, "BINARY"))["seq"] == 1
        await healthy.still_served()


async def test_a_connection_that_sends_only_junk_is_logged_once_not_per_frame(
    shared_hub: RunningHub,
) -> None:
    log = LogWatch(shared_hub)
    async with RawPublisher.connect(shared_hub.http_port) as raw:
        for n in range(50):
            await raw.send(text_frame(f"junk {n}"))
        for _ in range(50):
            assert (await raw.error())["code"] == "bad_json"
    await log.wait_for_lines(1, "publisher", "refused a frame, bad_json")
    assert len(log.lines("refused a frame")) == 1
    assert await metric(shared_hub, "mt5hub_rejects_total", reason="bad_json") >= 50


async def test_huge_numbers_in_extra_fields_are_forwarded_as_they_were_written(
    shared_hub: RunningHub,
) -> None:
    """Valid JSON, even if no float holds it: the hub forwards the publisher's text."""
    async with Healthy.connect(shared_hub, key="HUGE_EXTRA") as healthy:
        text = _with(publish_frame(key="HUGE_EXTRA"), f'"big":1e400,"long":{BIG_INT}')
        await healthy.pub.send_message(text)
        with trio.fail_after(DEADLINE):
            while '"type":"update"' not in (raw := await healthy.view.get_message()):
                pass
        assert f'"big":1e400,"long":{BIG_INT}' in raw
        assert json.loads(raw)["long"] == int(BIG_INT)
        await healthy.still_served()


MARKUP = {
    "key": "<img src=x onerror=alert(1)>",
    "src": "</script><script>alert(document.cookie)</script>",
    "clientId": '" onmouseover="alert(1)',
    "pair": "<b>EUR</b>&amp;USD\u202e",
}


async def test_markup_in_names_is_accepted_and_reaches_viewers_verbatim(
    shared_hub: RunningHub,
) -> None:
    """Names are text, not HTML: the hub forwards them as they are (the dashboard renders them
    as text; tests/test_dashboard_browser.py)."""
    log = LogWatch(shared_hub)
    text = publish_frame(
        key=MARKUP["key"],
        src=MARKUP["src"],
        client_id=MARKUP["clientId"],
        pairs=[MARKUP["pair"], "GBPUSD"],
    )
    async with Healthy.connect(shared_hub, key="MARKUP_HEALTHY") as healthy:
        async with publisher(shared_hub.ws_url) as pub:
            await pub.send_message(text)
            await synced(pub)
        update = await next_update(healthy.view, MARKUP["key"])
        assert (update["key"], update["src"], update["clientId"]) == (
            MARKUP["key"],
            MARKUP["src"],
            MARKUP["clientId"],
        )
        assert update["data"] == json.loads(text)["data"]
        assert update["data"][0]["pair"] == MARKUP["pair"]
        await healthy.still_served()
    async with viewer(shared_hub.ws_url) as late:
        tables = (await receive(late, "snapshot"))["tables"]
    [table] = [t for t in tables if t["key"] == MARKUP["key"]]
    assert table["src"] == MARKUP["src"] and table["data"] == json.loads(text)["data"]
    assert not log.lines("refused a frame")
    log.assert_clean()


async def test_100000_rows_over_the_frame_limit_are_closed_with_1009(
    shared_hub: RunningHub,
) -> None:
    """Under the limit they are refused by the decoder, naming max_rows (the table above)."""
    log = LogWatch(shared_hub)
    row = {"pair": "P00000", "TF_data": [], "sum": 0, "sum_cell_color": "c"}
    text = json.dumps({"key": "ROWS", "src": "S", "clientId": "c", "data": [row] * 100_000})
    assert len(text) > 4 * 1024 * 1024
    async with Healthy.connect(shared_hub, key="ROWS_HEALTHY") as healthy:
        async with RawPublisher.connect(shared_hub.http_port) as raw:
            await raw.send(text_frame(text, key=b"\0\0\0\0"))
            assert await raw.closed_with() == 1009
        await healthy.still_served()
    await log.wait_for_lines(1, "publisher", "closed 1009 (frame too large)")
    log.assert_clean()


# -- random frames on a raw socket ----------------------------------------------------------------


def _random_frame(rng: random.Random, n: int) -> tuple[str, bytes, int | None]:
    """One frame for the fuzzer: (what it is, its bytes, the code if it is a close frame: 1005
    for none). Valid publishes and pings now and then, so that the connection does real work
    between the hostile frames."""
    kind = rng.choices(
        ["publish", "ping", "junk-text", "random", "lying-length", "truncated"],
        weights=[20, 5, 15, 40, 10, 10],
    )[0]
    if kind == "publish":
        publish = publish_frame(key="FUZZ", value=n, pairs=["EURUSD", "GBPUSD"])
        return kind, text_frame(publish), None
    if kind == "ping":
        return kind, text_frame('{"type":"ping"}'), None
    if kind == "junk-text":
        alphabet = '{}[]",:0123456789.eE+-truefalsnNaIiy\\u d8 keysrcdataTF_'
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        return kind, text_frame(text), None
    size = rng.choice([0, 1, 2, 125, 126, 127, 200, 65535, 65536, 70000, rng.randrange(300)])
    payload = rng.randbytes(size)
    opcode = rng.choice([0, 1, 1, 1, 2, 2, 8, 9, 10, rng.randrange(16)])
    if opcode == Opcode.CLOSE and rng.random() < 0.5 and size >= 2:
        code = rng.choice([1000, 1001, 1005, 1006, 1011, 2999, 3000, 4999, 5000, 65535])
        payload = struct.pack("!H", code) + payload[2:]
    options: dict[str, Any] = {
        "fin": rng.random() < 0.8,
        "rsv": rng.choice([0] * 8 + [1, 2, 4, 7]),
        "masked": rng.random() < 0.9,
    }
    if kind == "lying-length":
        options["length"] = rng.choice(
            [size + 1, size + 100, 126, 65536, 2**32, 2**63 - 1, 2**64 - 1, max(size - 1, 0)]
        )
    data = frame(opcode, payload, **options)
    if kind == "truncated":
        data = data[: rng.randrange(len(data))] if len(data) > 1 else b""
    if opcode != Opcode.CLOSE:
        return kind, data, None
    return kind, data, struct.unpack("!H", payload[:2])[0] if size >= 2 else 1005


async def test_random_frames_on_a_raw_socket_never_hurt_the_hub_or_anyone_else(
    make_hub: HubMaker,
) -> None:
    """300 random frames from a seeded generator (MT5HUB_FUZZ_SEED to vary it): reserved opcodes,
    RSV bits, unmasked, 7/16/64-bit lengths that lie, truncated frames, close codes good and bad,
    among valid publishes. Whenever the hub hangs up, the fuzzer reconnects; after a lie or a
    truncation it hangs up itself. The hub answers each with an error frame or a close code,
    never 1011, and the healthy pair and every viewer's state end where the publishes left them."""
    hub = make_hub(rate_limit=100000, rate_burst=100000)
    log = LogWatch(hub)
    rng = random.Random(FUZZ_SEED)
    print(f"fuzz seed {FUZZ_SEED} (set MT5HUB_FUZZ_SEED to vary it)")
    kinds: Counter[str] = Counter()
    closes: Counter[int | None] = Counter()  # the hub's own close codes
    echoed: Counter[int] = Counter()  # its answers to a close the fuzzer sent
    errors: Counter[str] = Counter()
    published: dict[int, list[dict[str, Any]]] = {}
    seen: list[dict[str, Any]] = []

    async def watch(view: WebSocketConnection) -> None:
        while True:
            seen.append(await next_update(view, "FUZZ"))

    async with (
        Healthy.connect(hub, key="FUZZ_HEALTHY") as healthy,
        viewer(hub.ws_url) as fuzz_view,
        trio.open_nursery() as bg,
    ):
        await receive(fuzz_view, "snapshot")
        bg.start_soon(watch, fuzz_view)
        n = connections = 0
        with trio.fail_after(3 * DEADLINE):
            while n < 300:
                connections += 1
                async with RawPublisher.connect(hub.http_port) as raw:
                    sent_close = None
                    while n < 300 and not raw.closed.is_set():
                        n += 1
                        kind, data, close_code = _random_frame(rng, n)
                        sent_close = close_code or sent_close
                        kinds[kind] += 1
                        if kind == "publish":
                            published[n] = table_rows(("EURUSD", "GBPUSD"), n)
                        if not await raw.send(data) or kind in ("lying-length", "truncated"):
                            break
                        await trio.sleep(0)
                    if raw.closed.is_set():
                        code = await raw.closed_with()
                        if code is not None and code == sent_close:
                            echoed[code] += 1
                        else:
                            closes[code] += 1
                    errors.update(m["code"] for m in raw.messages if m["type"] == "error")
                if connections % 10 == 0:
                    await healthy.still_served()
        await healthy.still_served()

        # The last word: a clean publish, which every viewer must end with, once the hub is
        # done with the fuzzer's connections (a publish still in flight there could come after).
        async def only_the_healthy_publisher() -> bool:
            return bool((await health(hub))["publishers"] == 1)

        await wait_for(only_the_healthy_publisher, "the fuzzer's connections gone")
        async with publisher(hub.ws_url) as pub:
            await pub.send_message(publish_frame(key="FUZZ", value=1000, pairs=["EURUSD"]))
            await synced(pub)
        final = table_rows(("EURUSD",), 1000)
        await wait_for(_has(seen, final), "the final publish at the live viewer")
        bg.cancel_scope.cancel()

    print(
        f"fuzz: {dict(kinds)} on {connections} connections; the hub closed {dict(closes)}, "
        f"echoed closes {dict(echoed)}, sent error frames {dict(errors)}"
    )
    assert kinds["random"] > 50 and kinds["lying-length"] > 5 and kinds["truncated"] > 5
    assert set(closes) <= {1002, 1007, 1009, None}, closes  # never 1011
    assert set(errors) <= {"bad_json", "bad_schema", "unknown_type"}, errors
    seqs = [m["seq"] for m in seen]
    # In order and never twice; frames of one read may be conflated to their latest.
    assert seqs == sorted(set(seqs)), seqs
    assert all(m["data"] in published.values() for m in seen[:-1])  # only real publishes
    async with viewer(hub.ws_url) as late:
        [table] = [t for t in (await receive(late, "snapshot"))["tables"] if t["key"] == "FUZZ"]
    assert table["data"] == final and table["seq"] == seqs[-1]
    assert (await health(hub))["status"] == "ok"
    assert await metric(hub, "mt5hub_closes_total", role="publisher", code="1011") == 0
    log.assert_clean()


def _has(seen: list[dict[str, Any]], data: list[dict[str, Any]]) -> Callable[[], Any]:
    async def check() -> bool:
        return bool(seen) and seen[-1]["data"] == data

    return check


# -- hypothesis over the publish path -------------------------------------------------------------

DECODER = Decoder(max_rows=500)  # the shared hub's
KNOWN_CODES = {"bad_json", "bad_schema", "unknown_type"}


def expected(text: str) -> str:
    """What the hub does with this frame, computed as PublisherSession.handle and Hub.publish
    do it: "accepted", "ping", "pong", or the error code."""
    try:
        obj = parse_json(text)
        if not isinstance(obj, dict):
            return "bad_json"
        kind = obj.get("type", "publish")
        if kind == "publish":
            DECODER.accept(obj)
            update_text(text, obj, 0)
            return "accepted"
        return kind if kind in ("ping", "pong") else "unknown_type"
    except ProtocolError as error:
        return error.code


@st.composite
def publish_texts(draw: st.DrawFn) -> str:
    """A (maybe mangled) publish as text, maybe mangled again as text."""
    message = draw(mangled_publishes())
    text = json.dumps(message, ensure_ascii=draw(st.booleans()))
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: only its escape can be sent
        text = json.dumps(message)
    mutation = draw(st.sampled_from(["none", "twice", "number", "cut", "control", "deep"]))
    if mutation == "twice" and text.endswith("}"):
        name = draw(st.sampled_from(["key", "src", "clientId", "data", "type", "x"]))
        text = _with(text, f"{json.dumps(name)}:{json.dumps(message.get(name, 1))}")
    elif mutation == "number":
        numbers = list(re.finditer(r"(?<![\w.\"])-?\d+(\.\d+)?([eE][-+]?\d+)?", text))
        if numbers:
            spot = draw(st.sampled_from(numbers))
            odd = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", BIG_INT, "-0"]))
            text = text[: spot.start()] + odd + text[spot.end() :]
    elif mutation == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif mutation == "control":
        spot = draw(st.integers(0, len(text)))
        text = text[:spot] + draw(st.sampled_from(["\x00", "\x07", "\x1b", "\u0085"])) + text[spot:]
    elif mutation == "deep" and text.endswith("}"):
        text = _with(text, '"deep":' + "[" * 5000 + "]" * 5000)
    return text


async def test_any_publish_over_one_real_connection_is_accepted_or_gets_an_error_never_a_close(
    shared_hub: RunningHub,
) -> None:
    """Hypothesis (40 examples, derandomized) drives one publisher connection: each frame is
    either accepted (the viewer gets it, intact) or refused with the error code the decoder
    gives it offline, and the connection stays up through all of them."""
    counts: Counter[str] = Counter()
    log = LogWatch(shared_hub)
    async with (
        viewer(shared_hub.ws_url) as view,
        RawPublisher.connect(shared_hub.http_port) as raw,
    ):
        await receive(view, "snapshot")

        async def one(text: str) -> None:
            want = expected(text)
            counts[want] += 1
            await raw.send(text_frame(text))
            if want in KNOWN_CODES:
                error = await raw.error()
                assert error["code"] == want, (text[:300], error)
            else:  # accepted (or a heartbeat): no error before the pong (two for a ping)
                await raw.synced(pongs=2 if want == "ping" else 1)
                assert not raw.count("error"), (text[:300], raw.messages)
            if want == "accepted":
                sent = json.loads(text)
                update = await receive(view, "update", timeout=DEADLINE)
                assert (update["key"], update["src"]) == (sent["key"], sent["src"])
                assert update["data"] == sent["data"]
            assert not raw.closed.is_set(), text[:300]

        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(publish_texts())
        def check(text: str) -> None:
            trio.from_thread.run(one, text)

        await trio.to_thread.run_sync(check)

        # Nothing refused reached the viewer: the next update it gets is this one.
        await raw.send(text_frame(publish_frame(key="HYPOTHESIS_END")))
        assert (await receive(view, "update", timeout=DEADLINE))["key"] == "HYPOTHESIS_END"
    print(f"hypothesis over the socket: {dict(counts)}")
    assert counts["accepted"] >= 3 and sum(counts[c] for c in KNOWN_CODES) >= 10
    log.assert_clean()


async def test_a_deflate_bomb_is_closed_with_1009_without_the_hub_inflating_it(
    make_hub: HubMaker,
) -> None:
    """64 MiB of one byte compresses to ~64 KiB. Anyone may open a viewer and negotiate
    permessage-deflate (browsers do), and wsproto inflated each read of the socket whole before
    any size check: one read could cost the hub 64 MiB. mt5hub/hardening.py inflates at most
    the message limit at a time and refuses the message past it."""
    hub = make_hub()  # websocket_max_message_size: 1 MiB
    log = LogWatch(hub)
    async with Healthy.connect(hub) as healthy:
        pid = (await health(hub))["pid"]
        before = _peak_rss(pid)
        client = WSConnection(ConnectionType.CLIENT)
        stream = await trio.open_tcp_stream("127.0.0.1", hub.http_port)
        async with stream:
            offer = Request(host="127.0.0.1", target="/ws", extensions=[PerMessageDeflate()])
            await stream.send_all(client.send(offer))
            events: list[Any] = []
            with trio.fail_after(DEADLINE):
                while not any(isinstance(e, AcceptConnection) for e in events):
                    client.receive_data(await stream.receive_some(65536))
                    events += list(client.events())
            accepted = next(e for e in events if isinstance(e, AcceptConnection))
            assert [x.name for x in accepted.extensions] == ["permessage-deflate"]
            bomb = client.send(Message(data=b" " * (64 * 2**20)))  # compressed on our side
            assert len(bomb) < 2**20
            code = None
            with trio.fail_after(DEADLINE):
                await stream.send_all(bomb)
                while code is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    client.receive_data(data)
                    for event in client.events():
                        if isinstance(event, CloseConnection):
                            code = event.code
        peak = _peak_rss(pid)
        await healthy.still_served()
    grew = (peak - before) / 2**20
    print(f"deflate bomb ({len(bomb):,} bytes for 64 MiB): closed {code}, peak RSS +{grew:.1f} MiB")
    assert code == 1009
    assert grew < 32, f"the hub grew by {grew:.1f} MiB: it inflated the bomb"
    await log.wait_for_lines(1, "viewer", "closed 1009")
    log.assert_clean()


def _peak_rss(pid: int) -> int:
    """The hub worker's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
