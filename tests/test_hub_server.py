"""The hub as it runs: `hypercorn --config hub.toml mt5hub:app` in a subprocess (conftest), serving
WS and WSS at once, with real trio-websocket clients over real sockets.

No test asserts a timing figure. Where something must happen "soon", the test polls /healthz or
/metrics under a generous deadline (the machine may be busy), and the deadline only stops a test
that would otherwise wait forever for a behaviour that never comes.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import (
    EA1_ONLY_TOKEN,
    ROOT,
    TOKEN,
    RunningHub,
    free_port,
    write_hub_files,
)
from helpers import (
    close_reason,
    health,
    metric,
    metrics,
    publish_frame,
    publisher,
    receive,
    stalled_viewer,
    table_rows,
    viewer,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Ping, Pong, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

HubFactory = Callable[..., RunningHub]
CLIENT, SERVER = ConnectionType.CLIENT, ConnectionType.SERVER
DEADLINE = 60.0  # for things that take milliseconds on an idle machine
GRACEFUL_TIMEOUT = 2.0  # conftest's hub.toml


# -- helpers -----------------------------------------------------------------------------------


async def rejection(url: str, **kwargs: Any) -> ConnectionRejected:
    """Open a WebSocket that the hub must refuse at the handshake; the HTTP answer."""
    with trio.fail_after(DEADLINE), pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(url, **kwargs):
            pass
    return refused.value


async def synced(pub: WebSocketConnection) -> None:
    """Ping and wait for the pong: every frame sent before it has been handled by the hub."""
    await pub.send_message('{"type":"ping"}')
    await receive(pub, "pong", timeout=DEADLINE)


async def next_update(ws: WebSocketConnection, key: str | None = None) -> dict[str, Any]:
    """The next update (of `key`, if given), skipping presence and other tables."""
    while True:
        message = await receive(ws, "update", timeout=DEADLINE)
        if key is None or message["key"] == key:
            return message


def viewer_endpoint(hub: RunningHub, scheme: str) -> tuple[int, str, ssl.SSLContext | None]:
    """(port, URL, TLS context) of the hub's WS or WSS bind, for a viewer: the same path both."""
    if scheme == "wss":
        return hub.https_port, hub.wss_url, hub.client_ssl_context()
    return hub.http_port, hub.ws_url, None


def big_frame(n: int, rows: int) -> str:
    return publish_frame(key="BIG", pairs=[f"P{i:05d}" for i in range(rows)], value=n)


# -- publisher handshake -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_publisher_without_token_is_refused_with_http_401_at_the_handshake(
    hub: RunningHub, scheme: str
) -> None:
    url, context = (hub.ws_url, None) if scheme == "ws" else (hub.wss_url, hub.client_ssl_context())
    refused = await rejection(url + "/ws/dll", ssl_context=context)
    assert refused.status_code == 401
    assert json.loads(refused.body or b"{}")["error"] == "unauthorized"
    assert (await health(hub))["publishers"] == 0


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/ws/dll", [("Authorization", "Bearer not-the-token")]),
        ("/ws/dll?token=not-the-token", []),
        ("/ws/dll", [("Authorization", f"Bearer {TOKEN}x")]),
    ],
    ids=["header", "query", "prefix-of-real-token"],
)
async def test_publisher_with_wrong_token_is_refused_with_http_403_at_the_handshake(
    hub: RunningHub, path: str, headers: list[tuple[str, str]]
) -> None:
    refused = await rejection(hub.ws_url + path, extra_headers=headers)
    assert refused.status_code == 403
    assert (await health(hub))["publishers"] == 0
    assert await metric(hub, "mt5hub_rejects_total", reason="unauthorized") == 1


async def test_publisher_token_in_the_query_string_is_accepted(hub: RunningHub) -> None:
    async with (
        viewer(hub.ws_url) as view,
        open_websocket_url(f"{hub.ws_url}/ws/dll?token={TOKEN}") as pub,
    ):
        await receive(view, "snapshot")
        await pub.send_message(publish_frame(key="QUERY"))
        update = await next_update(view)
        assert (update["key"], update["seq"]) == ("QUERY", 1)


async def test_token_limited_to_ea1_gets_forbidden_key_for_ea2_and_stays_connected(
    hub: RunningHub,
) -> None:
    async with viewer(hub.ws_url) as view, publisher(hub.ws_url, EA1_ONLY_TOKEN) as pub:
        await receive(view, "snapshot")
        await pub.send_message(publish_frame(key="EA2"))
        error = await receive(pub, "error")
        assert error["code"] == "forbidden_key"
        assert error["detail"].startswith("$.key:") and "EA2" in error["detail"]
        await pub.send_message(publish_frame(key="EA1", value=7))
        update = await next_update(view)
        assert (update["key"], update["seq"]) == ("EA1", 1)  # EA2 never became a table
        assert update["data"] == table_rows(value=7)
        assert pub.closed is None
        assert (await health(hub))["tables"] == 1


# -- what viewers get ----------------------------------------------------------------------------


async def test_wss_viewer_gets_a_snapshot_of_every_table_then_updates_then_offline_presence(
    hub: RunningHub,
) -> None:
    """The publisher is on the WS bind and the viewer on the WSS bind: one hub behind both."""
    async with publisher(hub.ws_url) as pub:
        await pub.send_message(publish_frame(key="EA1", src="S1", client_id="c1", value=1))
        await pub.send_message(publish_frame(key="EA1", src="S1", client_id="c1", value=2))
        await pub.send_message(publish_frame(key="EA2", src="S2", client_id="c1", value=5, x=1))
        await synced(pub)
        async with viewer(hub.wss_url, hub.client_ssl_context()) as view:
            snapshot = json.loads(await view.get_message())  # at once, before anything else
            assert snapshot["type"] == "snapshot" and isinstance(snapshot["ts"], int)
            tables = {(t["key"], t["src"]): t for t in snapshot["tables"]}
            assert tables.keys() == {("EA1", "S1"), ("EA2", "S2")}
            first, second = tables["EA1", "S1"], tables["EA2", "S2"]
            assert (first["type"], first["seq"], first["online"]) == ("update", 2, True)
            assert first["data"] == table_rows(value=2)  # the latest state, not the first
            assert (second["seq"], second["online"], second["x"]) == (1, True, 1)
            assert first["clientId"] == "c1" and isinstance(first["ts"], int)

            await pub.send_message(
                publish_frame(key="EA1", src="S1", client_id="c1", value=3, note="kept", more=[1])
            )
            update = await next_update(view)
            assert (update["key"], update["src"], update["seq"]) == ("EA1", "S1", 3)
            assert isinstance(update["ts"], int) and update["ts"] >= first["ts"] - 60_000
            assert (update["note"], update["more"]) == ("kept", [1])  # unknown fields forwarded
            assert update["data"] == table_rows(value=3)

            # seq, ts, online and type belong to the hub: a publisher cannot set them
            await pub.send_message(
                publish_frame(
                    key="EA1", src="S1", client_id="c1", value=4, seq=99, ts=5, online=False
                )
            )
            update = await next_update(view)
            assert (update["type"], update["seq"]) == ("update", 4)
            assert update["ts"] != 5 and "online" not in update

        async with viewer(hub.wss_url, hub.client_ssl_context()) as view:
            await receive(view, "snapshot")
            await pub.aclose()  # the publisher leaves: both its tables go offline
            gone = [await receive(view, "presence") for _ in range(2)]
    assert {(m["key"], m["src"], m["online"]) for m in gone} == {
        ("EA1", "S1", False),
        ("EA2", "S2", False),
    }
    assert all(m["clientId"] == "c1" and isinstance(m["ts"], int) for m in gone)


class WsprotoViewer:
    """A viewer on a raw wsproto connection, that can offer permessage-deflate as browsers do,
    and answer the hub's WebSocket pings as they come (as browsers do) or when told to.

    Its inflater keeps its window between messages (it allows the hub context takeover), so it
    proves that updates compressed once, each on its own, decode for such clients too.
    """

    def __init__(self, stream: trio.abc.Stream, answer_pings: bool) -> None:
        self.stream, self.ws, self.raw_bytes, self.compressed = stream, WSConnection(CLIENT), 0, 0
        self.pending: list[Any] = []
        self.answer_pings = answer_pings
        self.pings: list[Ping] = []  # received and not answered yet

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        port: int,
        deflate: bool = True,
        answer_pings: bool = True,
        ssl_context: ssl.SSLContext | None = None,
    ) -> AsyncIterator[WsprotoViewer]:
        """A viewer on this port: over TLS (the WSS bind) when given an `ssl_context`."""
        stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
        self = cls(stream, answer_pings)
        async with self.stream:
            extensions = [PerMessageDeflate()] if deflate else []
            await self.stream.send_all(
                self.ws.send(Request(f"127.0.0.1:{port}", "/ws", extensions=extensions))
            )
            accepted = await self._event()
            assert isinstance(accepted, AcceptConnection)
            assert bool(accepted.extensions) == deflate
            yield self

    async def _event(self) -> Any:
        with trio.fail_after(DEADLINE):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                assert data, "the hub closed the connection"
                self.raw_bytes += len(data)
                self.compressed += _rsv1_frames(data)
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def message(self) -> dict[str, Any]:
        parts = []
        while True:
            event = await self._event()
            if isinstance(event, Ping):
                self.pings.append(event)
                if self.answer_pings:
                    await self.answer()
            elif isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return json.loads("".join(parts))  # type: ignore[no-any-return]

    async def answer(self) -> None:
        """Pong every ping received so far: all that came before them has been read."""
        for ping in self.pings:
            await self.stream.send_all(self.ws.send(ping.response()))
        self.pings.clear()

    async def nothing_more(self, seconds: float = 0.3) -> None:
        """Whatever arrives within `seconds` is a failure (a wait that can only ever pass late)."""
        with trio.move_on_after(seconds):
            message = await self.message()
            raise AssertionError(f"the hub sent {message} before its ping was answered")


def _rsv1_frames(data: bytes) -> int:
    """Frames with RSV1 (compressed) that start in this chunk, counted roughly: first bytes only."""
    return int(bool(data) and data[0] & 0x40 and data[0] & 0x0F == 1)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_viewers_offering_permessage_deflate_get_updates_compressed_and_intact(
    hub: RunningHub, scheme: str
) -> None:
    port, url, context = viewer_endpoint(hub, scheme)
    async with (
        WsprotoViewer.connect(port, ssl_context=context) as one,
        WsprotoViewer.connect(port, ssl_context=context) as two,
        viewer(url, context) as plain,
        publisher(hub.ws_url) as pub,
    ):
        for view in (one, two):
            assert (await view.message())["type"] == "snapshot"
        await receive(plain, "snapshot")
        sent = []
        got: dict[WsprotoViewer, list[dict[str, Any]]] = {one: [], two: []}
        for n in range(20):  # paced like an EA, one at a time (a burst would be conflated)
            frame = publish_frame(key="EA1", value=n, pairs=[f"P{i:02d}" for i in range(28)])
            sent.append(json.loads(frame)["data"])
            await pub.send_message(frame)
            # the plain viewer on the same hub gets the same, uncompressed
            assert (await next_update(plain))["data"] == sent[n]
            for view in (one, two):  # read as they come, as a browser does
                while len(got[view]) <= n:
                    if (message := await view.message())["type"] == "update":
                        got[view].append(message)
        for view in (one, two):
            assert [m["seq"] for m in got[view]] == list(range(1, 21))
            assert [m["data"] for m in got[view]] == sent  # each decodes, in a kept window
            assert view.compressed > 0
            assert view.raw_bytes < sum(len(json.dumps(d)) for d in sent) / 3
        # Each update and the presence was compressed once for both, and so was the snapshot:
        # both connected to the same state, so it is one frame, shared. (Checked before leaving:
        # the offline presence that follows may or may not reach them before they close.)
        assert await metric(hub, "mt5hub_compressions_total") == 20 + 1 + 1


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_viewer_is_sent_no_more_until_it_has_read_what_it_was_sent(
    hub_factory: Callable[..., RunningHub], scheme: str
) -> None:
    """Flow control at its strictest (`viewer_lag = 0`): after each write, which ends with a
    ping, the hub waits for the pong; what is published meanwhile is conflated, so the pong
    brings the latest state only. A viewer that reads but never answers is one that has stopped
    reading: 4009."""
    hub = hub_factory(viewer_lag=0.0, slow_viewer_timeout=2.0)
    port, _, context = viewer_endpoint(hub, scheme)
    async with (
        WsprotoViewer.connect(port, deflate=False, answer_pings=False, ssl_context=context) as view,
        viewer(hub.ws_url) as prompt,
        publisher(hub.ws_url) as pub,
    ):
        assert (await view.message())["type"] == "snapshot"  # the first write, and its ping
        await receive(prompt, "snapshot")
        for n in range(1, 6):
            await pub.send_message(publish_frame(key="EA1", value=n))
            assert (await next_update(prompt))["seq"] == n  # a prompt viewer gets every one
        await view.nothing_more()
        assert len(view.pings) == 1
        await view.answer()  # the viewer has read it all: the latest state, and only that
        latest = await view.message()
        while latest["type"] != "update":
            latest = await view.message()
        assert latest["seq"] == 5
        assert await metric(hub, "mt5hub_conflated_total") >= 4  # updates 1 to 4, never sent
        # now it stops answering: cut off once slow_viewer_timeout has passed
        with trio.fail_after(DEADLINE):
            while True:
                try:
                    await view.message()
                except (AssertionError, trio.BrokenResourceError):
                    break  # the hub hung up (aborted: no close frame through a stuck socket)
        assert await metric(hub, "mt5hub_closes_total", role="viewer", code="4009") == 1


async def test_an_answer_counts_alone_in_a_read_split_over_two_or_after_a_frame(
    hub_factory: Callable[..., RunningHub],
) -> None:
    """An answer to the hub's ping lets the next write go however it arrives: alone in a read,
    split across reads, or behind another frame. A pong of another size is not an answer to
    the hub's ping."""
    hub = hub_factory(viewer_lag=0.0)
    async with (
        WsprotoViewer.connect(hub.http_port, deflate=False, answer_pings=False) as view,
        publisher(hub.ws_url) as pub,
    ):
        assert (await view.message())["type"] == "snapshot"

        async def next_seq() -> int:
            while (message := await view.message())["type"] != "update":
                pass
            return int(message["seq"])

        async def pong(*parts: bytes) -> None:
            for n, part in enumerate(parts):
                if n:
                    await trio.sleep(0.05)  # another read for the hub, most likely
                await view.stream.send_all(part)
            view.pings.clear()

        await pub.send_message(publish_frame(key="EA1", value=1))
        await view.nothing_more()  # the snapshot's ping is not answered yet
        (ping,) = view.pings
        await view.stream.send_all(view.ws.send(Pong(b"1234")))  # not the hub's: no answer
        await view.nothing_more()
        answer = view.ws.send(ping.response())
        assert len(answer) == 14  # FIN+pong, mask bit and length 8, the mask, the payload
        await pong(answer)  # alone
        assert await next_seq() == 1
        await pub.send_message(publish_frame(key="EA1", value=2))
        await view.nothing_more()
        answer = view.ws.send(view.pings[0].response())
        await pong(answer[:5], answer[5:])  # split
        assert await next_seq() == 2
        await pub.send_message(publish_frame(key="EA1", value=3))
        await view.nothing_more()
        text = view.ws.send(Message(data='{"type":"pong"}'))
        await pong(text + view.ws.send(view.pings[0].response()))  # behind a text frame
        assert await next_seq() == 3


async def test_5_publishers_and_20_viewers_all_end_with_the_latest_seq_of_every_table(
    hub: RunningHub,
) -> None:
    publishers, viewers, updates = 5, 20, 10
    keys = [f"EA{p}" for p in range(publishers)]
    final: dict[int, dict[str, dict[str, Any]]] = {}
    connected = trio.Semaphore(0)

    async def watch(n: int) -> None:
        # half of the viewers on WS, half on WSS
        url, context = (hub.ws_url, None) if n % 2 else (hub.wss_url, hub.client_ssl_context())
        latest: dict[str, dict[str, Any]] = {}
        async with viewer(url, context) as view:
            assert (await receive(view, "snapshot"))["tables"] == []
            connected.release()
            while len(latest) < publishers or any(m["seq"] < updates for m in latest.values()):
                message = await next_update(view)
                previous = latest.get(message["key"], {"seq": 0})["seq"]
                assert message["seq"] > previous  # never backwards, never twice
                latest[message["key"]] = message
        final[n] = latest

    async def publish(key: str) -> None:
        async with publisher(hub.ws_url) as pub:
            for value in range(1, updates + 1):
                await pub.send_message(publish_frame(key=key, client_id=key, value=value))
            await synced(pub)

    with trio.fail_after(3 * DEADLINE):
        async with trio.open_nursery() as nursery:
            for n in range(viewers):
                nursery.start_soon(watch, n)
            for _ in range(viewers):
                await connected.acquire()
            assert (await health(hub))["viewers"] == viewers
            async with trio.open_nursery() as publishing:
                for key in keys:
                    publishing.start_soon(publish, key)

    assert len(final) == viewers
    for latest in final.values():
        assert sorted(latest) == keys
        for key, message in latest.items():
            assert message["seq"] == updates
            assert message["clientId"] == key
            assert message["data"] == table_rows(value=updates)

    async with viewer(hub.ws_url) as late:  # a latecomer's snapshot holds the same state
        tables = (await receive(late, "snapshot"))["tables"]
    assert sorted((t["key"], t["seq"]) for t in tables) == [(k, updates) for k in keys]


# -- slow viewers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_stalled_viewer_does_not_delay_a_healthy_viewer(
    hub_factory: HubFactory, scheme: str
) -> None:
    """A viewer that never reads, with no slow-viewer timeout to rescue the others in time."""
    hub = hub_factory(
        viewer_buffer=4,
        slow_viewer_timeout=3600,
        viewer_timeout=3600,
        rate_limit=1000,
        rate_burst=1000,
        max_rows=2000,
        max_table_bytes=1048576,  # tables of ~400 KB, as fast as the healthy viewer reads
        byte_rate=1e9,
    )
    rows = 1500  # ~400 KB a frame: the stalled socket's buffers fill after a few
    port, url, context = viewer_endpoint(hub, scheme)
    with trio.fail_after(3 * DEADLINE):
        async with (
            stalled_viewer(port, context),
            viewer(url, context) as healthy,
            publisher(hub.ws_url) as pub,
        ):
            await receive(healthy, "snapshot")
            await wait_for(lambda: _viewers_are(hub, 2), "both viewers connected")
            n = 0
            # Lockstep: publish, and wait for the healthy viewer to have it. Once the stalled
            # viewer's socket takes nothing more, its mailbox fills and starts conflating.
            while n < 200 and (n % 4 or not await metric(hub, "mt5hub_conflated_total")):
                n += 1
                await pub.send_message(big_frame(n, rows))
                assert (await next_update(healthy, "BIG"))["seq"] == n
            conflated = await metric(hub, "mt5hub_conflated_total")
            assert conflated > 0, f"the stalled viewer never stalled in {n} frames"

            # The stall is established and the stalled viewer is still connected...
            for _ in range(20):
                n += 1
                await pub.send_message(big_frame(n, rows))
                update = await next_update(healthy, "BIG")  # ...and the healthy one keeps up
                assert update["seq"] == n
                assert update["data"][0]["TF_data"][0] == {"M1": n, "cell_color": "clrGreen"}
            assert (await health(hub))["viewers"] == 2
            assert await metric(hub, "mt5hub_conflated_total") > conflated  # still stuck
            assert await metric(hub, "mt5hub_closes_total", role="viewer", code="4009") == 0


async def test_stalled_viewer_is_disconnected_after_slow_viewer_timeout(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(
        viewer_buffer=4,
        slow_viewer_timeout=2,
        viewer_timeout=3600,  # only slowness may end the stalled viewer
        rate_limit=1000,
        rate_burst=1000,
        max_rows=2000,
        max_table_bytes=1048576,  # tables of ~400 KB, as fast as the healthy viewer reads
        byte_rate=1e9,
    )
    with trio.fail_after(3 * DEADLINE):
        async with (
            stalled_viewer(hub.http_port) as stalled,
            viewer(hub.ws_url) as healthy,
            publisher(hub.ws_url) as pub,
        ):
            await receive(healthy, "snapshot")
            await wait_for(lambda: _viewers_are(hub, 2), "both viewers connected")
            n = 0
            while not await _viewers_are(hub, 1):
                assert n < 500, "the stalled viewer was never disconnected"
                n += 1
                await pub.send_message(big_frame(n, 1500))
                assert (await next_update(healthy, "BIG"))["seq"] == n
            assert await metric(hub, "mt5hub_closes_total", role="viewer", code="4009") == 1

            # The healthy viewer is still there and still served.
            await pub.send_message(publish_frame(key="AFTER"))
            assert (await next_update(healthy, "AFTER"))["seq"] == 1
            assert healthy.closed is None

            # The stalled socket was closed by the hub: reading it ends (EOF or a reset).
            with trio.fail_after(DEADLINE):
                try:
                    while await stalled.receive_some(1 << 16):
                        pass
                except trio.BrokenResourceError:
                    pass
    assert "viewer too slow" in hub.log()


async def _viewers_are(hub: RunningHub, count: int) -> bool:
    return bool((await health(hub))["viewers"] == count)


# -- bad input -------------------------------------------------------------------------------------


async def test_bad_frames_get_error_frames_and_the_connection_stays_up(hub: RunningHub) -> None:
    bad_row = {"pair": "EURUSD", "TF_data": [{"M1": 1, "cell_color": "a"}], "sum": "1"}
    cases: list[tuple[str | bytes, str, str]] = [
        ("this is not JSON", "bad_json", ""),
        ("[1, 2, 3]", "bad_json", ""),
        ('{"key": "EA1", "data": [{"sum": NaN}]}', "bad_json", ""),
        (b'{"key": "EA1"}', "bad_json", "binary"),
        ('{"key": "EA1", "clientId": "c", "data": []}', "bad_schema", "$.src: "),
        (
            json.dumps({"key": "EA1", "src": "S", "clientId": "c", "data": [bad_row]}),
            "bad_schema",
            "$.data[0].sum: ",
        ),
        ('{"type": "dance"}', "unknown_type", "$.type: "),
    ]
    async with viewer(hub.ws_url) as view, publisher(hub.ws_url) as pub:
        await receive(view, "snapshot")
        for seq, (frame, code, detail) in enumerate(cases, 1):
            await pub.send_message(frame)
            error = await receive(pub, "error")
            assert error["code"] == code, frame
            assert detail in error["detail"], error
            await pub.send_message(publish_frame(key="EA1", value=seq))
            update = await next_update(view)  # nothing of the bad frame reached the viewer
            assert (update["key"], update["seq"]) == ("EA1", seq)
        assert pub.closed is None and view.closed is None
    assert await metric(hub, "mt5hub_rejects_total", reason="bad_json") == 4
    assert await metric(hub, "mt5hub_rejects_total", reason="bad_schema") == 2


async def test_lone_surrogate_in_a_publish_is_bad_json_and_viewers_stay_connected(
    hub: RunningHub,
) -> None:
    """`\\ud800` is valid JSON but cannot be sent on as UTF-8: forwarded, it used to take every
    viewer down with 1011 (and, stored in a snapshot, every viewer that connected after)."""
    async with viewer(hub.ws_url) as view, publisher(hub.ws_url) as pub:
        await receive(view, "snapshot")
        for frame in (
            publish_frame(key="EA\ud800"),  # json.dumps writes it as the escape \ud800
            publish_frame(key="EA1", type="publish", note="x\udfff"),
        ):
            await pub.send_message(frame)
            assert (await receive(pub, "error"))["code"] == "bad_json"
        await pub.send_message(publish_frame(key="EA1", note="\U0001f600"))  # a pair is fine
        update = await next_update(view)
        assert (update["key"], update["seq"], update["note"]) == ("EA1", 1, "\U0001f600")
        assert view.closed is None
    async with viewer(hub.ws_url) as late:
        assert [t["key"] for t in (await receive(late, "snapshot"))["tables"]] == ["EA1"]


async def test_frame_over_max_message_size_is_closed_with_1009_while_others_carry_on(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(websocket_max_message_size=65536)
    frame = publish_frame(key="HUGE", pairs=[f"P{i:03d}" for i in range(400)])
    assert len(frame) >= 100_000 and len(json.loads(frame)["data"]) <= 500  # too big, else valid
    async with viewer(hub.ws_url) as view, publisher(hub.ws_url) as other:
        await receive(view, "snapshot")
        await other.send_message(publish_frame(key="OTHER", value=1))
        assert (await next_update(view, "OTHER"))["seq"] == 1
        with trio.CancelScope() as leave:
            async with publisher(hub.ws_url) as big:
                await big.send_message(frame)
                reason = await close_reason(big)
                # Hypercorn 0.18 may miss the client's answer to its 1009 close frame (it stops
                # reading events after the oversized one) and then never closes the connection.
                # Hang up as a DLL does, without waiting for the hub to close first.
                await big._stream.aclose()
                leave.cancel()
        assert reason.code == 1009
        await other.send_message(publish_frame(key="OTHER", value=2))
        update = await next_update(view, "OTHER")
        assert (update["seq"], update["data"]) == (2, table_rows(value=2))
        assert other.closed is None
        await wait_for(lambda: _publishers_are(hub, 1), "the big publisher gone from /healthz")
    assert (await health(hub))["tables"] == 1  # HUGE never became a table


async def _publishers_are(hub: RunningHub, count: int) -> bool:
    return bool((await health(hub))["publishers"] == count)


async def test_sustained_flood_is_closed_with_1008_while_a_polite_publisher_reaches_viewers(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(rate_limit=20, rate_burst=20, flood_seconds=1)
    flooding, flood_closed = trio.Event(), trio.Event()
    notices: list[dict[str, Any]] = []
    flood_reason: list[CloseReason] = []
    sent = {"before": 0, "during": 0, "after": 0}  # polite frames, by the flood's phase
    seqs: list[int] = []

    async def flood(ws: WebSocketConnection) -> None:
        async def drain() -> None:  # read the hub's notices, or its close frame never gets in
            try:
                while True:
                    notices.append(json.loads(await ws.get_message()))
            except ConnectionClosed:
                pass

        frame = publish_frame(key="FLOOD", pairs=["EURUSD"])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            flooding.set()
            try:
                while True:  # ~500 frames/s against a limit of 20
                    await ws.send_message(frame)
                    await trio.sleep(0.002)
            except ConnectionClosed as closed:
                assert closed.reason is not None
                flood_reason.append(closed.reason)
        flood_closed.set()

    async def polite(ws: WebSocketConnection) -> None:
        while sent["after"] < 5:
            phase = (
                "after" if flood_closed.is_set() else "during" if flooding.is_set() else "before"
            )
            sent[phase] += 1
            last = phase == "after" and sent["after"] == 5
            await ws.send_message(publish_frame(key="POLITE", value=sum(sent.values()), last=last))
            await trio.sleep(0.1)  # 10 frames/s, well under the limit of 20

    async def watch(view: WebSocketConnection) -> None:
        while True:
            update = await next_update(view, "POLITE")
            seqs.append(update["seq"])
            if update["last"]:
                return

    with trio.fail_after(3 * DEADLINE):
        async with (
            viewer(hub.ws_url) as view,
            publisher(hub.ws_url) as flooder,
            publisher(hub.ws_url) as polite_pub,
        ):
            await receive(view, "snapshot")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, view)
                nursery.start_soon(polite, polite_pub)
                await wait_for(lambda: _has_seen(seqs), "the first polite update")
                nursery.start_soon(flood, flooder)
            assert polite_pub.closed is None and view.closed is None

    assert [reason.code for reason in flood_reason] == [1008]
    assert sent["during"] >= 1  # the polite publisher did publish while the flood went on
    assert seqs == list(range(1, sum(sent.values()) + 1))  # every one of them, in order
    assert {n["code"] for n in notices if n["type"] == "error"} <= {"rate_limited"}
    assert await metric(hub, "mt5hub_rejects_total", reason="rate_limited") > 0
    assert await metric(hub, "mt5hub_closes_total", role="publisher", code="1008") == 1


async def _has_seen(seqs: list[int]) -> bool:
    return bool(seqs)


# -- viewer handshake ----------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1:1", "null"])
async def test_viewer_from_a_foreign_origin_is_refused_with_http_403(
    hub: RunningHub, origin: str
) -> None:
    refused = await rejection(hub.ws_url + "/ws", extra_headers=[("Origin", origin)])
    assert refused.status_code == 403
    assert (await health(hub))["viewers"] == 0


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_viewer_from_the_same_origin_is_accepted(hub: RunningHub, scheme: str) -> None:
    if scheme == "ws":
        url, context, origin = hub.ws_url, None, hub.http_url
    else:
        url, context, origin = hub.wss_url, hub.client_ssl_context(), hub.https_url
    async with viewer(url, context, headers=[("Origin", origin)]) as view:
        assert (await receive(view, "snapshot"))["tables"] == []


async def test_viewer_tokens_when_set_401_without_403_wrong_and_accepted_with_the_token(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(viewer_tokens=["vt"])
    assert (await rejection(hub.ws_url + "/ws")).status_code == 401
    assert (await rejection(hub.ws_url + "/ws?token=nope")).status_code == 403
    async with viewer(hub.ws_url, path="/ws?token=vt") as view:
        assert (await receive(view, "snapshot"))["type"] == "snapshot"
    ssl_context = hub.client_ssl_context()
    async with viewer(hub.wss_url, ssl_context, headers=[("Authorization", "Bearer vt")]) as view:
        assert (await receive(view, "snapshot"))["type"] == "snapshot"


# -- lifecycle -------------------------------------------------------------------------------------


async def test_sigterm_closes_publishers_and_viewers_with_1001_and_exits_0(
    hub: RunningHub,
) -> None:
    reasons: dict[str, CloseReason] = {}

    async def closed(name: str, ws: WebSocketConnection) -> None:
        reasons[name] = await close_reason(ws)

    async with publisher(hub.ws_url) as pub, viewer(hub.wss_url, hub.client_ssl_context()) as view:
        await receive(view, "snapshot")
        await pub.send_message(publish_frame())
        await next_update(view)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(closed, "publisher", pub)
            nursery.start_soon(closed, "viewer", view)
            # stop() sends SIGTERM and waits; past its timeout it raises (and kills the hub)
            stop = functools.partial(hub.stop, timeout=GRACEFUL_TIMEOUT + 20)
            exit_code = await trio.to_thread.run_sync(stop)
    assert {name: (r.code, r.reason) for name, r in reasons.items()} == {
        "publisher": (1001, "hub shutting down"),
        "viewer": (1001, "hub shutting down"),
    }
    assert exit_code == 0
    assert "Traceback" not in hub.log()


def _default_token_on_public_bind(folder: Path, ca: trustme.CA, workers: int) -> RunningHub:
    hub = RunningHub(folder, free_port(), free_port(), ca)
    grant = {"token": "supersecret123", "keys": ["*"], "name": "dev"}
    write_hub_files(
        folder, ca, hub.http_port, hub.https_port, {"tokens": [grant]}, bind_host="0.0.0.0"
    )
    toml = folder / "hub.toml"
    toml.write_text(toml.read_text().replace("workers = 1", f"workers = {workers}"))
    return hub


def _says_why(log: str) -> None:
    assert "refusing to start" in log
    assert "default publisher token" in log
    assert "0.0.0.0" in log and "not loopback" in log
    assert "mt5hub serving" not in log


def test_default_token_on_a_public_bind_refuses_to_start_and_logs_why(
    tmp_path: Path, ca: trustme.CA
) -> None:
    hub = _default_token_on_public_bind(tmp_path, ca, workers=1)  # as hub.toml ships
    try:
        with pytest.raises(RuntimeError, match="hub exited"):
            hub.start(timeout=DEADLINE)  # it exits by itself, never answering /healthz
    finally:
        hub.kill()
    _says_why(hub.log())
    # Its exit status with workers >= 1: tests/test_limits_server.py (Hypercorn 0.18 itself
    # reports 0 there, pgjones/hypercorn#269: see mt5hub/hardening.py, 7).


def test_default_token_refusal_is_a_failing_exit_status_where_hypercorn_reports_it(
    tmp_path: Path, ca: trustme.CA
) -> None:
    _default_token_on_public_bind(tmp_path, ca, workers=0)  # the app runs in Hypercorn's process
    done = subprocess.run(
        [sys.executable, "-m", "hypercorn", "--config", "hub.toml", "mt5hub:app"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MT5HUB_CONFIG": "hub.toml"},
        capture_output=True,
        timeout=DEADLINE,
        start_new_session=True,
    )
    assert done.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL)
    _says_why(done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace"))


# -- observability -------------------------------------------------------------------------------


async def test_healthz_returns_json_counts_of_publishers_viewers_and_tables(
    hub: RunningHub,
) -> None:
    body = await health(hub)
    assert body["status"] == "ok"
    assert (body["publishers"], body["viewers"], body["tables"]) == (0, 0, 0)
    assert body["pid"] > 0 and body["rss_bytes"] > 0 and body["uptime_s"] >= 0
    async with publisher(hub.ws_url) as pub, viewer(hub.ws_url) as a, viewer(hub.ws_url) as b:
        await pub.send_message(publish_frame(key="EA1"))
        await pub.send_message(publish_frame(key="EA2"))
        await synced(pub)
        await receive(a, "snapshot")
        await receive(b, "snapshot")
        body = await health(hub)
        assert (body["publishers"], body["viewers"], body["tables"]) == (1, 2, 2)
    await wait_for(lambda: _viewers_are(hub, 0), "viewers gone from /healthz")
    body = await health(hub)
    assert (body["publishers"], body["tables"]) == (0, 2)  # tables outlive their publishers


async def test_metrics_is_prometheus_text_with_frames_conflation_and_delivery_latency(
    hub: RunningHub,
) -> None:
    async with publisher(hub.ws_url) as pub, viewer(hub.ws_url) as view:
        await receive(view, "snapshot")
        for value in range(3):
            await pub.send_message(publish_frame(value=value))
            await next_update(view)
        await pub.send_message("not json")
        await receive(pub, "error")

        async def latency_counted() -> bool:
            return await metric(hub, "mt5hub_delivery_latency_seconds_count") >= 3

        await wait_for(latency_counted, "three deliveries in the latency histogram")
        status, text = await trio.to_thread.run_sync(hub.get, "/metrics")
    assert status == 200
    kinds = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert kinds["mt5hub_frames_in"] == "counter"
    assert kinds["mt5hub_conflated"] == "counter"
    assert kinds["mt5hub_delivery_latency_seconds"] == "histogram"
    assert '\nmt5hub_frames_in_total{role="publisher"} 4.0\n' in text  # the text format
    samples = await metrics(hub)
    assert samples["mt5hub_frames_in_total", (("role", "publisher"),)] == 4
    assert samples["mt5hub_updates_total", ()] == 3
    assert samples["mt5hub_conflated_total", ()] == 0  # a prompt viewer is never conflated
    assert samples["mt5hub_rejects_total", (("reason", "bad_json"),)] == 1
    buckets = [v for (name, _), v in samples.items() if name.endswith("_seconds_bucket")]
    assert buckets and max(buckets) >= 3  # the +Inf bucket holds every observation


async def test_refused_handshake_is_logged_once_and_no_token_is_ever_logged(
    tmp_path: Path, ca: trustme.CA
) -> None:
    """With Hypercorn's access log on, as the shipped hub.toml has it."""
    hub = RunningHub(tmp_path, free_port(), free_port(), ca)
    write_hub_files(tmp_path, ca, hub.http_port, hub.https_port, {})
    toml = tmp_path / "hub.toml"
    toml.write_text(toml.read_text().replace('errorlog = "-"', 'errorlog = "-"\naccesslog = "-"'))
    wrong = "wrong-token-3f9a7c"
    try:
        hub.start(timeout=DEADLINE)
        assert (await rejection(f"{hub.ws_url}/ws/dll?token={wrong}")).status_code == 403
        async with (
            viewer(hub.ws_url) as view,
            open_websocket_url(f"{hub.ws_url}/ws/dll?token={TOKEN}") as by_query,
            publisher(hub.wss_url, TOKEN, hub.client_ssl_context()) as by_header,
        ):
            await receive(view, "snapshot")
            await by_query.send_message(publish_frame(key="Q"))
            await by_header.send_message(publish_frame(key="H"))
            await synced(by_query)
            await synced(by_header)
        await wait_for(lambda: _viewers_are(hub, 0), "viewer gone")
    finally:
        hub.kill()
    log = hub.log()
    refused = [line for line in log.splitlines() if "refused" in line]
    assert len(refused) == 1, refused
    assert "/ws/dll" in refused[0] and "403" in refused[0]
    for secret in (wrong, TOKEN, EA1_ONLY_TOKEN):
        assert secret not in log
    assert "GET /ws/dll" in log  # the access log is on: handshakes are logged, tokens are not
