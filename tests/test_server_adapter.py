"""mt5hub.server, the Hypercorn adapter, event by event, as Hypercorn's own tests drive its streams:
bytes and events fed to a WSStream, the events it sends recorded, no sockets. Then the adapter as
the hub runs it: refusing to start without the internals it needs (unless `asgi_only`), serving
with it off, and serving where `fcntl` does not exist (Windows).

The same holes are shown on real sockets in tests/test_hostile.py.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, Mock

import pytest
import trio
import trustme
from conftest import ROOT, RunningHub, free_port, write_hub_files
from helpers import health, publish_frame, publisher, receive, viewer
from hypercorn.config import Config
from hypercorn.protocol.events import Data, Request, Response, StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, Message, Ping
from wsproto.extensions import PerMessageDeflate

import mt5hub.server
from mt5hub.errors import ConfigError
from mt5hub.server import LINK, Link, _hardening
from mt5hub.server._transport import _encrypt, _tls_ready

DEADLINE = 60.0
UPGRADE = [
    (b"host", b"hub"),
    (b"upgrade", b"websocket"),
    (b"connection", b"upgrade"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
]


class Recorder:
    """What a session would be handed: messages and pongs, in order."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str | bytes]] = []

    def feed(self, message: str | bytes) -> None:
        self.got.append(("message", message))

    def pong(self, payload: bytes) -> None:
        self.got.append(("pong", payload))


# What install() replaces, process-wide: put back after this module, so that the tests after
# it (whose clients use wsproto's PerMessageDeflate too) run on the libraries as shipped.
PATCHED = {
    WSStream: ("handle", "_handle_events", "_mt5hub_guarded"),
    TCPServer: ("protocol_send", "_read_data"),
    H11Protocol: ("handle",),
    PerMessageDeflate: ("frame_inbound_payload_data",),
}


@pytest.fixture(autouse=True, scope="module")
def adapter_installed() -> Iterator[None]:
    assert _hardening.missing() == [], "the pinned Hypercorn/wsproto lack what the adapter needs"
    missing = object()
    saved = {(c, n): vars(c).get(n, missing) for c, names in PATCHED.items() for n in names}
    mt5hub.server.install(lambda role, code: None, max_message=1024, asgi_only=False)
    yield
    for (cls, name), value in saved.items():
        if value is missing:
            if name in vars(cls):
                delattr(cls, name)
        else:
            setattr(cls, name, value)


async def ws_stream(
    accept: bool = True, extensions: bytes = b""
) -> tuple[WSStream, AsyncMock, Recorder, Connection]:
    """A WSStream for /ws/dll that has read an upgrade request (offering these extensions) and
    accepted it, or not."""
    config = Config()
    config.websocket_max_message_size = 1024
    sent = AsyncMock()
    task_group = Mock()
    task_group.spawn_app = AsyncMock(return_value=AsyncMock())
    stream = WSStream(AsyncMock(), config, Mock(), task_group, False, None, None, sent, 1)
    headers = [*UPGRADE, (b"sec-websocket-extensions", extensions)] if extensions else UPGRADE
    await stream.handle(
        Request(stream_id=1, http_version="1.1", headers=headers, raw_path=b"/ws/dll",
                method="GET", state={})
    )  # fmt: skip
    recorder = Recorder()
    link = Link(AsyncMock(), raw_ok=True)
    stream.scope[LINK] = link  # type: ignore[literal-required]  # what TrackConnections does
    link.attach(recorder)
    if accept:
        await stream.app_send({"type": "websocket.accept"})
    return stream, sent, recorder, Connection(ConnectionType.CLIENT)


def sent_events(sent: AsyncMock) -> list[Any]:
    return [call.args[0] for call in sent.call_args_list]


def close_code(sent: AsyncMock) -> int | None:
    """The close code in the frames the stream wrote, if any."""
    server_side = Connection(ConnectionType.CLIENT)  # reads what a server writes
    for event in sent_events(sent):
        if isinstance(event, Data):
            server_side.receive_data(event.data)
    for event in server_side.events():
        if isinstance(event, CloseConnection):
            return int(event.code)
    return None


async def test_messages_and_pongs_go_to_the_link_as_they_are_read() -> None:
    stream, _, recorder, client = await ws_stream()
    data = client.send(Message(data="one")) + client.send(Message(data=b"\x00two"))
    await stream.handle(Data(stream_id=1, data=data))  # two messages in one read
    await stream.handle(Data(stream_id=1, data=client.send(Ping(b"12345678").response())))
    assert recorder.got == [("message", "one"), ("message", b"\x00two"), ("pong", b"12345678")]


async def test_the_answer_to_the_hubs_ping_skips_the_parser_between_frames() -> None:
    stream, _, recorder, client = await ws_stream()
    lone = client.send(Ping((5).to_bytes(8, "big")).response())
    assert len(lone) == 14
    await stream.handle(Data(stream_id=1, data=lone))
    assert recorder.got == [("pong", (5).to_bytes(8, "big"))]


async def test_bytes_before_the_handshake_is_answered_get_400_and_the_stream_ends() -> None:
    stream, sent, recorder, client = await ws_stream(accept=False)
    await stream.handle(Data(stream_id=1, data=client.send(Message(data="token?"))))
    events = sent_events(sent)
    assert [e.status_code for e in events if isinstance(e, Response)] == [400]
    assert isinstance(events[-1], StreamClosed) and stream.closed
    assert recorder.got == []
    await stream.app_send({"type": "websocket.accept"})  # the app's answer, too late
    assert not any(isinstance(e, Response) and e.status_code == 101 for e in sent_events(sent))


async def test_a_message_over_the_limit_gets_1009_and_the_rest_is_read_and_dropped() -> None:
    stream, sent, recorder, client = await ws_stream()
    too_big = client.send(Message(data="x" * 2000))
    await stream.handle(Data(stream_id=1, data=too_big[:1500]))
    await stream.handle(Data(stream_id=1, data=too_big[1500:]))
    assert close_code(sent) == 1009
    assert stream.buffer.length == 0  # nothing of it kept
    assert recorder.got == []
    stream.task_group.spawn.assert_called_once()  # hang up CLOSE_GRACE later, unanswered


async def test_a_frame_wsproto_refuses_is_answered_with_its_close_code() -> None:
    stream, sent, recorder, client = await ws_stream()
    bad_utf8 = bytearray(client.send(Message(data="ok")))
    bad_utf8[-2:] = bytes(a ^ b for a, b in zip(b"\xff\xfe", bad_utf8[2:4], strict=True))
    # (the two payload bytes, masked with the frame's key, now unmask to invalid UTF-8)
    await stream.handle(Data(stream_id=1, data=bytes(bad_utf8)))
    assert close_code(sent) == 1007
    assert isinstance(sent_events(sent)[-1], StreamClosed)
    assert recorder.got == []


async def test_a_deflated_message_is_inflated_at_most_to_the_limit() -> None:
    from wsproto.extensions import PerMessageDeflate
    from wsproto.frame_protocol import FrameProtocol

    stream, sent, _, _ = await ws_stream(extensions=b"permessage-deflate")
    deflate = PerMessageDeflate()
    deflate.finalize("permessage-deflate")  # as the hub agreed above
    bomb = bytes(FrameProtocol(client=True, extensions=[deflate]).send_data("a" * 10_000_000))
    assert len(bomb) < 50_000
    await stream.handle(Data(stream_id=1, data=bomb))
    assert close_code(sent) == 1009


def test_without_the_internals_the_hub_refuses_to_start_naming_the_versions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_hardening, "missing", lambda: ["hypercorn WSStream._handle_events"])
    with pytest.raises(ConfigError) as refused:
        mt5hub.server.install(lambda role, code: None, 1024, asgi_only=False)
    message = str(refused.value)
    assert "refusing to start" in message and "hypercorn 0.18.0" in message
    assert "wsproto 1.3.2" in message and "asgi_only = true" in message
    assert "WSStream._handle_events" in message


def test_without_the_internals_asgi_only_serves_and_says_what_is_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_hardening, "missing", lambda: ["hypercorn WSStream._handle_events"])
    logging.getLogger("mt5hub").propagate = True
    with caplog.at_level(logging.WARNING, logger="mt5hub"):
        assert mt5hub.server.install(lambda role, code: None, 1024, asgi_only=True) == "asgi"
    assert "flow control" in caplog.text and "hardening" in caplog.text
    assert not mt5hub.server.direct()
    monkeypatch.undo()
    mt5hub.server.install(lambda role, code: None, 1024, asgi_only=False)  # back, for others
    assert mt5hub.server.direct()


# -- TLS records made by the adapter (trio's SSLStream internals) ---------------------------------


TlsPair = tuple[trio.SSLStream[Any], trio.SSLStream[Any]]


@pytest.fixture
async def tls_pair(ca: trustme.CA) -> AsyncIterator[TlsPair]:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    a, b = trio.testing.memory_stream_pair()
    server = trio.SSLStream(a, server_context, server_side=True)
    client = trio.SSLStream(b, client_context, server_hostname="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    await server.send_all(b"first")  # the session tickets go out with it
    assert await client.receive_some() == b"first"
    yield server, client


async def test_records_made_by_the_adapter_decrypt_in_order_with_trios_own(
    tls_pair: TlsPair,
) -> None:
    server, client = tls_pair
    assert _tls_ready(server)
    await server.transport_stream.send_all(_encrypt(server, b"made here, "))
    await server.send_all(b"then by trio")
    got = b""
    while len(got) < len(b"made here, then by trio"):
        got += await client.receive_some()
    assert got == b"made here, then by trio"


async def test_no_records_are_made_while_trio_is_sending(
    tls_pair: TlsPair,
) -> None:
    server, _ = tls_pair
    async with server._inner_send_lock:
        assert not _tls_ready(server)
    assert _tls_ready(server)


# -- the adapter as the hub runs it ----------------------------------------------------------------


async def test_a_real_hub_serves_through_the_adapter_and_says_so(hub: RunningHub) -> None:
    """The fast paths are on, and /healthz says so: never silently off."""
    async with viewer(hub.ws_url) as view, publisher(hub.ws_url) as pub:
        await receive(view, "snapshot")
        await pub.send_message(publish_frame(key="EA1", value=3))
        assert (await receive(view, "update"))["data"][0]["TF_data"][0]["M1"] == 3
    assert (await health(hub))["server"] == "direct"
    assert "socket was not found" not in hub.log()


async def test_a_hub_with_asgi_only_serves_on_hypercorns_public_path(
    hub_factory: Any,
) -> None:
    hub = hub_factory(asgi_only=True)
    async with viewer(hub.ws_url) as view, publisher(hub.ws_url) as pub:
        await receive(view, "snapshot")
        for n in range(1, 4):
            await pub.send_message(publish_frame(key="EA1", value=n))
        seqs = []
        while not seqs or seqs[-1] < 3:
            seqs.append((await receive(view, "update"))["seq"])
        await pub.send_message('{"type":"nonsense"}')
        assert (await receive(pub, "error"))["code"] == "unknown_type"
    assert (await health(hub))["server"] == "asgi"
    assert "asgi_only = true: off:" in hub.log()


def test_the_hub_serves_where_fcntl_does_not_exist(tmp_path: Path, ca: trustme.CA) -> None:
    """As on Windows: no fcntl. The hub needs none (it does not look at the kernel's send
    queue): it serves over WS and WSS."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["fcntl"] = None\n')
    hub = RunningHub(tmp_path, free_port(), free_port(), ca, pythonpath=str(site))
    write_hub_files(tmp_path, ca, hub.http_port, hub.https_port, {})
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    check = subprocess.run(
        [sys.executable, "-c", "import fcntl"], env=env, capture_output=True, timeout=DEADLINE
    )
    assert check.returncode != 0  # the blocker works
    hub.start(timeout=DEADLINE)
    try:

        async def main() -> None:
            for url, context in ((hub.ws_url, None), (hub.wss_url, hub.client_ssl_context())):
                async with viewer(url, context) as view, publisher(hub.ws_url) as pub:
                    await receive(view, "snapshot")
                    await pub.send_message(publish_frame(key="W", value=7))
                    update = await receive(view, "update")
                    assert update["data"][0]["TF_data"][0]["M1"] == 7

        trio.run(main)
    finally:
        hub.kill()


async def test_tls_reads_made_by_the_adapter_get_every_byte_and_the_peers_close(
    tls_pair: TlsPair,
) -> None:
    """`_tls_receive` decrypts what comes in (records whole or split across reads) as trio's own
    receive_some would, and hands the end of the stream to trio's path (b"" on close_notify)."""
    from mt5hub.server._transport import _tls_receive

    server, client = tls_pair
    payload = bytes(range(256)) * 1000  # 256 KB: many records, read in many pieces
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, payload)
        got = bytearray()
        while len(got) < len(payload):
            got += await _tls_receive(server, 65536)
    assert bytes(got) == payload
    await server.send_all(b"and back")  # the stream is still sound both ways
    assert await client.receive_some() == b"and back"
    await client.aclose()
    assert await _tls_receive(server, 65536) == b""
