"""Real protocol clients for tests (a publisher and a viewer over trio-websocket, a viewer that
never reads) and the ways tests ask a running hub how it is (/healthz, /metrics)."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from conftest import TOKEN, RunningHub
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, open_websocket_url

DEADLINE = 60.0  # for things that take milliseconds on an idle machine

PAIRS = ("EURUSD", "GBPUSD", "USDJPY", "AUDUSD")
TFS = ("M1", "M5", "M15", "M30", "H1", "H4", "D1", "W1", "MN1")


def table_rows(pairs: Sequence[str] = PAIRS, value: float = 1.0) -> list[dict[str, Any]]:
    rows = []
    for n, pair in enumerate(pairs):
        cells = [
            {tf: round(value + n + i / 10, 2), "cell_color": "clrGreen" if value >= 0 else "clrRed"}
            for i, tf in enumerate(TFS)
        ]
        total = round(sum(next(iter(c.values())) for c in cells), 2)
        rows.append({"pair": pair, "TF_data": cells, "sum": total, "sum_cell_color": "clrGreen"})
    return rows


def publish_frame(
    key: str = "EA1",
    src: str = "EURUSD_PERIOD_H1",
    client_id: str = "EA1_1",
    value: float = 1.0,
    pairs: Sequence[str] = PAIRS,
    **extra: Any,
) -> str:
    message = {"key": key, "src": src, "clientId": client_id, "data": table_rows(pairs, value)}
    return json.dumps({**message, **extra})


@asynccontextmanager
async def publisher(
    url: str, token: str | None = TOKEN, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[WebSocketConnection]:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    async with open_websocket_url(
        url + "/ws/dll", extra_headers=headers, ssl_context=ssl_context
    ) as ws:
        yield ws


@asynccontextmanager
async def viewer(
    url: str,
    ssl_context: ssl.SSLContext | None = None,
    headers: list[tuple[str, str]] | None = None,
    path: str = "/ws",
) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(
        url + path, ssl_context=ssl_context, extra_headers=headers or []
    ) as ws:
        yield ws


async def receive(ws: WebSocketConnection, *types: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next message of one of these types (pings are answered and skipped)."""
    with trio.fail_after(timeout):
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == "ping":
                await ws.send_message('{"type":"pong"}')
            if not types or message["type"] in types:
                return message  # type: ignore[no-any-return]


async def health(hub: RunningHub) -> dict[str, Any]:
    """GET /healthz without blocking the event loop the test's clients run on."""
    return await trio.to_thread.run_sync(hub.health)


async def metrics(hub: RunningHub) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    status, text = await trio.to_thread.run_sync(hub.get, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def metric(hub: RunningHub, name: str, **labels: str) -> float:
    return (await metrics(hub)).get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = DEADLINE
) -> None:
    """Poll until `check()` (sync, or async) holds; fail (naming `what`) if it never does."""
    try:
        with trio.fail_after(timeout):
            while True:
                held = check()
                if held if isinstance(held, bool) else await held:
                    return
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"never happened: {what}") from None


async def close_reason(ws: WebSocketConnection, timeout: float = DEADLINE) -> CloseReason:
    """Read (and drop) messages until the hub closes the connection; how it closed it."""
    with trio.fail_after(timeout):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            assert closed.reason is not None
            return closed.reason


def upgrade_request(path: str, *headers: str) -> bytes:
    """A WebSocket upgrade request as raw bytes, for clients that write their own sockets."""
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


@asynccontextmanager
async def stalled_viewer(port: int) -> AsyncIterator[trio.SocketStream]:
    """A viewer that completes the handshake and then never reads a byte.

    A raw socket with a small receive buffer (set before connecting, so the TCP window stays
    small), so that the hub's side of it fills after a few frames.
    """
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(upgrade_request("/ws"))
        head = b""
        with trio.fail_after(DEADLINE):
            while b"\r\n\r\n" not in head:  # one byte at a time: read nothing past the head
                byte = await stream.receive_some(1)
                assert byte, f"hub closed during the handshake: {head!r}"
                head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        yield stream
