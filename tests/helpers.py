"""Real protocol clients for tests (a publisher and a viewer over trio-websocket, a viewer that
never reads) and the ways tests ask a running hub how it is (/healthz, /metrics)."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from conftest import TOKEN, RunningHub
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto.frame_protocol import FrameProtocol, Opcode

from mt5hub.testing.rawws import frame, upgrade_request
from mt5hub.testing.rawws import status_of as raw_status_of

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


@asynccontextmanager
async def stalled_viewer(
    port: int, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[trio.abc.Stream]:
    """A viewer that completes the handshake and then never reads a byte (over TLS with a
    context: the WSS bind).

    A raw socket with a small receive buffer (set before connecting, so the TCP window stays
    small), so that the hub's side of it fills after a few frames.
    """
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream: trio.abc.Stream = trio.SocketStream(sock)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
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


def status_of(answer: bytes) -> int:
    status = raw_status_of(answer)
    assert status is not None, answer[:200]
    return status


def text_frame(text: str | bytes, **kwargs: Any) -> bytes:
    return frame(Opcode.TEXT, text.encode() if isinstance(text, str) else text, **kwargs)


class RawPublisher:
    """A publisher on a bare socket: a correct handshake, then whatever bytes the test writes.

    A reader task parses what the hub sends (error frames, pongs, its close frame) as a client
    would, so the hub is never blocked by a peer that does not read.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = FrameProtocol(client=True, extensions=[])
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.closed = trio.Event()  # the hub's close frame came, or the connection ended
        self.ended = trio.Event()  # the connection ended
        self._news = trio.Event()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, port: int, token: str = TOKEN, path: str = "/ws/dll"
    ) -> AsyncIterator[RawPublisher]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(upgrade_request(path, f"Authorization: Bearer {token}"))
            head = b""
            with trio.fail_after(DEADLINE):
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(1)  # nothing past the head
                    assert chunk, f"the hub closed during the handshake: {head!r}"
                    head += chunk
            assert status_of(head) == 101, head
            self = cls(stream)
            nursery.start_soon(self._read)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        parts: list[str] = []
        try:
            while data := await self.stream.receive_some(65536):
                self.parser.receive_bytes(data)
                for item in self.parser.received_frames():
                    if item.opcode in (Opcode.TEXT, Opcode.CONTINUATION):
                        parts.append(item.payload)
                        if item.message_finished:
                            self.messages.append(json.loads("".join(parts)))
                            parts = []
                    elif item.opcode is Opcode.CLOSE:
                        self.close_code = int(item.payload[0])
                        self.closed.set()
                self._news.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed.set()
            self.ended.set()
            self._news.set()

    async def send(self, data: bytes) -> bool:
        """False if the hub has closed the connection already (a write then fails or is lost)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Until `ready()` holds (checked whenever the hub sent something), or the hub closed."""
        with trio.fail_after(DEADLINE):
            while True:
                self._news = trio.Event()
                if ready() or self.closed.is_set():
                    return
                await self._news.wait()

    def count(self, kind: str) -> int:
        return sum(m["type"] == kind for m in self.messages)

    async def closed_with(self) -> int | None:
        """The close code the hub sent (None: it hung up without one), once the connection ended
        (a close frame must be followed by the end of the connection)."""
        with trio.fail_after(DEADLINE):
            await self.ended.wait()
        return self.close_code

    async def error(self) -> dict[str, Any]:
        """The next error frame; the connection is still up after it (a ping gets its pong)."""
        await self.wait_until(lambda: self.count("error") > 0)
        assert not self.closed.is_set(), f"closed with {self.close_code} instead"
        error = next(m for m in self.messages if m["type"] == "error")
        self.messages.remove(error)
        await self.synced()
        return error

    async def synced(self, pongs: int = 1) -> None:
        """Ping, and wait for the pong (`pongs` of them in all): every frame before it has been
        handled by the hub. Then forget the pongs."""
        await self.send(text_frame('{"type":"ping"}'))
        await self.wait_until(lambda: self.count("pong") >= pongs)
        assert not self.closed.is_set(), f"closed with {self.close_code}"
        self.messages = [m for m in self.messages if m["type"] != "pong"]
