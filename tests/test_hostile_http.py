"""Hostile input at the HTTP layer, against a real hub over raw sockets: the token in the wrong
place, or in a frame sent before the handshake's answer; a plain GET of the WebSocket routes;
garbage instead of HTTP; a request head or a TLS handshake that never completes (slowloris).
What every hostile test must show: tests/hostile.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

import pytest
import trio
from conftest import TOKEN, RunningHub
from helpers import (
    DEADLINE,
    frame,
    health,
    status_of,
    text_frame,
    upgrade_request,
)
from hostile import Healthy, HubMaker, LogWatch, exchange
from wsproto.frame_protocol import Opcode

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
        # what a viewer sends most once it is connected: an answer to the hub's ping
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
