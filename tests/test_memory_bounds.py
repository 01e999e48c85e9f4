"""Memory and time bounded by configuration, not by the state's size or how viewers read.

The snapshot is one frame shared by every viewer (made once per change, compressed once per
window size); a write is judged by its progress, so a viewer reading a large snapshot slowly but
steadily is served, not cut off. Figures (RSS per viewer at a large state) are printed by
scripts/memory_per_viewer.py and kept in docs/performance.md, not asserted here.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import trio
from conftest import RunningHub
from helpers import metric, publish_frame, publisher
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Ping, Request

from mt5hub.hub import Event, Hub, Inbox
from mt5hub.state import SNAPSHOT_REUSE_BYTES

DEADLINE = 120.0


def _drain(inbox: Any) -> list[dict[str, Any]]:
    assert isinstance(inbox, Inbox)
    got = []
    while True:
        try:
            got.append(json.loads(inbox.receive.receive_nowait().text))
        except trio.WouldBlock:
            return got


def _update(table: str, value: int, rows: int = 1) -> Event:
    text = json.dumps({"type": "update", "key": table, "src": "S", "v": value, "pad": "x" * rows})
    return Event("update", (table, "S"), text)


def test_viewers_connecting_together_share_one_snapshot_frame() -> None:
    hub = Hub()
    hub.apply(_update("A", 1))
    with hub.viewer() as one, hub.viewer() as two:
        first, second = (inbox.receive.receive_nowait() for inbox in (one, two))  # type: ignore[attr-defined]
        assert first is second  # one frame: its WebSocket frame, too, is made once for both
        hub.apply(_update("A", 2))
        with hub.viewer() as three:  # small state, changed: a snapshot of its own, up to date
            (entry,) = json.loads(three.receive.receive_nowait().text)["tables"]  # type: ignore[attr-defined]
            assert entry["v"] == 2


def test_a_large_snapshot_is_shared_after_a_change_with_what_changed_since() -> None:
    """A crowd connecting while tables change costs a few snapshots, not one each, and every
    viewer still ends with the latest state of every table."""
    hub = Hub()
    for n in range(8):  # a state over SNAPSHOT_REUSE_BYTES
        hub.apply(_update(f"T{n}", 0, rows=SNAPSHOT_REUSE_BYTES // 4))
    with hub.viewer() as early:
        snapshot = early.receive.receive_nowait()  # type: ignore[attr-defined]
        hub.apply(_update("T3", 1))
        hub.apply(_update("NEW", 1))
        with hub.viewer() as late:
            assert late.receive.receive_nowait() is snapshot  # type: ignore[attr-defined]
            caught_up = _drain(late)
        assert [(m["key"], m["v"]) for m in caught_up] == [("T3", 1), ("NEW", 1)]
        assert [(m["key"], m["v"]) for m in _drain(early)] == [("T3", 1), ("NEW", 1)]


async def test_a_viewer_reading_a_large_snapshot_slowly_but_steadily_is_not_cut_off(
    hub_factory: Any,
) -> None:
    """A snapshot of ~4 MB read at ~0.5 MB/s takes far longer than slow_viewer_timeout (1 s):
    the socket takes something all along, so the viewer gets all of it; one that takes nothing
    at all is still cut off (tests/test_hub_server.py)."""
    hub: RunningHub = hub_factory(
        slow_viewer_timeout=1.0,
        max_rows=2000,
        max_table_bytes=1 << 20,
        rate_limit=1000,
        rate_burst=1000,
        byte_rate=1 << 30,
        byte_burst=1 << 30,
    )
    tables = 10
    async with publisher(hub.ws_url) as pub:
        for n in range(tables):
            await pub.send_message(
                publish_frame(key=f"BIG{n}", pairs=[f"P{i:05d}" for i in range(1500)])
            )
        await pub.send_message('{"type":"ping"}')
        while json.loads(await pub.get_message())["type"] != "pong":
            pass
        with trio.fail_after(DEADLINE):
            snapshot = await _slow_snapshot(hub.http_port, bytes_per_second=500_000)
    assert len(snapshot["tables"]) == tables
    assert await metric(hub, "mt5hub_closes_total", role="viewer", code="4009") == 0


async def _slow_snapshot(port: int, bytes_per_second: int) -> dict[str, Any]:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    chunk = 16 * 1024
    received = 0
    async with stream:
        await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
        parts: list[str] = []
        while True:
            data = await stream.receive_some(chunk)
            assert data, f"the hub closed the connection after {received} bytes"
            received += len(data)
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    continue
                if isinstance(event, Ping):
                    await stream.send_all(ws.send(event.response()))  # as a browser does
                elif isinstance(event, Message):
                    parts.append(str(event.data))
                    if event.message_finished:
                        message: dict[str, Any] = json.loads("".join(parts))
                        assert message["type"] == "snapshot"
                        assert received > 2_000_000, received  # it was large, as meant
                        return message
            await trio.sleep(chunk / bytes_per_second)
