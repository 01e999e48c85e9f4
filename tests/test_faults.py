"""Faults on a real hub: links that drop mid-frame, EAs that reconnect, two EAs on one table, a
publisher flooding at 10,000 frames/s, and a shutdown while everything is busy.

Publishers that must misbehave at the byte level (half a frame, then silence or a reset; frames
pre-built and written as fast as the socket takes them) are helpers.RawPublisher, on a bare
socket; everyone else is a trio-websocket client, as in test_hub_server.py.
"""

from __future__ import annotations

import functools
import socket
import struct
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from conftest import RunningHub
from helpers import (
    DEADLINE,
    RawPublisher,
    frame,
    health,
    metric,
    publish_frame,
    publisher,
    receive,
    stalled_viewer,
    text_frame,
    viewer,
    wait_for,
)
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.frame_protocol import Opcode

HubFactory = Callable[..., RunningHub]


def reset(raw: RawPublisher) -> None:
    """Drop the link with a TCP reset, as a router losing the connection would look."""
    sock = raw.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def presence_and_updates(view: WebSocketConnection, into: list[dict[str, Any]]) -> None:
    """Record every update and presence the viewer gets (pings answered by `receive`)."""
    while True:
        into.append(await receive(view, "update", "presence", timeout=DEADLINE * 2))


async def publish_then_half_a_frame(
    old: RawPublisher, client_id: str, seen: list[dict[str, Any]]
) -> None:
    """An update that arrives (value 1), then the first half of the next one (value 2)."""
    await old.send(text_frame(publish_frame(client_id=client_id, value=1.0)))
    await wait_for(lambda: len(seen) == 2, "online, then the first update")
    half = text_frame(publish_frame(client_id=client_id, value=2.0))
    await old.send(half[: len(half) // 2])


def _events(seen: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(type, online or the value published, clientId) of each message."""
    return [
        (
            m["type"],
            m["online"] if "online" in m else m["data"][0]["TF_data"][0]["M1"],
            m["clientId"],
        )
        for m in seen
    ]


# -- a link that drops, and the EA that comes back ---------------------------------------------


async def test_an_ea_whose_link_went_silent_mid_frame_reconnects_and_the_new_connection_wins(
    hub: RunningHub,
) -> None:
    """The old connection is half-open (no FIN, no RST: the hub cannot know it is dead)."""
    seen: list[dict[str, Any]] = []
    async with viewer(hub.ws_url) as view, trio.open_nursery() as nursery:
        await receive(view, "snapshot")
        nursery.start_soon(presence_and_updates, view, seen)
        async with RawPublisher.connect(hub.http_port) as old:
            await publish_then_half_a_frame(old, "EA1_77", seen)  # and then the link goes quiet
            async with publisher(hub.ws_url) as new:
                await new.send_message(publish_frame(client_id="EA1_77", value=3.0))
                # The hub ends the old connection at once, with a close code that says why...
                assert await old.closed_with() == 4010
                await wait_for(lambda: len(seen) == 3, "the new connection's update")
                await new.send_message(publish_frame(client_id="EA1_77", value=4.0))
                await wait_for(lambda: len(seen) == 4, "and its next one")
            await wait_for(lambda: len(seen) == 5, "offline when the new connection leaves")
        nursery.cancel_scope.cancel()
    # ...the table never went offline in between, and half a frame never reached anyone.
    assert _events(seen) == [
        ("presence", True, "EA1_77"),
        ("update", 1.0, "EA1_77"),
        ("update", 3.0, "EA1_77"),
        ("update", 4.0, "EA1_77"),
        ("presence", False, "EA1_77"),
    ]
    assert [m["seq"] for m in seen if m["type"] == "update"] == [1, 2, 3]
    log = hub.log()
    assert sum("closed 4010" in line and "EA1_77" in line for line in log.splitlines()) == 1


async def test_an_ea_whose_link_reset_mid_frame_goes_offline_then_back_with_nothing_lost(
    hub: RunningHub,
) -> None:
    seen: list[dict[str, Any]] = []
    async with viewer(hub.ws_url) as view, trio.open_nursery() as nursery:
        await receive(view, "snapshot")
        nursery.start_soon(presence_and_updates, view, seen)
        async with RawPublisher.connect(hub.http_port) as old:
            await publish_then_half_a_frame(old, "EA1_78", seen)
            reset(old)
            await wait_for(lambda: len(seen) == 3, "offline: the hub saw the reset")
        async with publisher(hub.ws_url) as new:
            await new.send_message(publish_frame(client_id="EA1_78", value=5.0))
            await wait_for(lambda: len(seen) == 5, "online again, and the new update")
        nursery.cancel_scope.cancel()
    # (then offline again as the new one leaves, if the viewer hears it before it stops)
    assert [(t, v) for t, v, _ in _events(seen[:5])] == [
        ("presence", True),
        ("update", 1.0),
        ("presence", False),
        ("presence", True),
        ("update", 5.0),
    ]
    async with viewer(hub.ws_url) as late:  # the snapshot holds the latest publish, seq 2
        (table,) = (await receive(late, "snapshot"))["tables"]
        assert (table["seq"], table["data"][0]["TF_data"][0]["M1"], table["online"]) == (
            2,
            5.0,
            False,
        )


async def test_two_eas_on_one_table_last_writer_wins_and_each_update_names_its_client(
    hub: RunningHub,
) -> None:
    seen: list[dict[str, Any]] = []
    async with viewer(hub.ws_url) as view, trio.open_nursery() as nursery:
        await receive(view, "snapshot")
        nursery.start_soon(presence_and_updates, view, seen)
        async with publisher(hub.ws_url) as a:
            await a.send_message(publish_frame(client_id="EA1_a", value=1.0))
            await wait_for(lambda: len(seen) == 2, "online, then a's update")
            async with publisher(hub.ws_url) as b:
                await b.send_message(publish_frame(client_id="EA1_b", value=2.0))
                await wait_for(lambda: len(seen) == 3, "b's update")
                await a.send_message(publish_frame(client_id="EA1_a", value=3.0))
                await wait_for(lambda: len(seen) == 4, "a's second update")
                async with viewer(hub.ws_url) as late:
                    (table,) = (await receive(late, "snapshot"))["tables"]
                    assert (table["clientId"], table["seq"]) == ("EA1_a", 3)  # the last write
            # b left; a still publishes the table: no presence, it stays online
            await a.send_message(publish_frame(client_id="EA1_a", value=4.0))
            await wait_for(lambda: len(seen) == 5, "a's update after b left")
        await wait_for(lambda: len(seen) == 6, "offline when the last one leaves")
        nursery.cancel_scope.cancel()
    assert [(t, c) for t, _, c in _events(seen)] == [
        ("presence", "EA1_a"),
        ("update", "EA1_a"),
        ("update", "EA1_b"),
        ("update", "EA1_a"),
        ("update", "EA1_a"),
        ("presence", "EA1_a"),
    ]
    assert seen[-1]["online"] is False


# -- a flood at 10,000 frames/s ----------------------------------------------------------------


@pytest.mark.parametrize("answers_the_close", [True, False], ids=["answers", "keeps-flooding"])
async def test_a_publisher_at_10000_frames_a_second_is_limited_then_closed_1008_and_nobody_notices(
    hub_factory: HubFactory, answers_the_close: bool
) -> None:
    hub = hub_factory(rate_limit=50, rate_burst=100, flood_seconds=2)
    polite_sums: list[float] = []
    async with (
        viewer(hub.ws_url) as view,
        publisher(hub.ws_url) as polite,
        RawPublisher.connect(hub.http_port) as flood,
    ):
        await receive(view, "snapshot")
        batch = b"".join(
            text_frame(publish_frame(key="FLOOD", pairs=["EURUSD"])) for _ in range(100)
        )
        sent = 0
        started = time.monotonic()

        async def blast() -> None:
            nonlocal sent
            try:  # 100 frames per write, paced to 10,000/s, until the hub lets go
                while not (answers_the_close and flood.close_code is not None):
                    await flood.stream.send_all(batch)
                    sent += 100
                    await trio.sleep_until(started + sent / 10_000)
                await flood.stream.send_all(frame(Opcode.CLOSE, struct.pack("!H", 1000)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the hub cut it off

        async def keep_publishing() -> None:
            for n in range(1, 1000):
                await polite.send_message(publish_frame(key="POLITE", value=n))
                polite_sums.append(n)
                await trio.sleep(0.1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blast)
            nursery.start_soon(keep_publishing)
            await flood.wait_until(lambda: flood.close_code is not None)
            code, elapsed = flood.close_code, time.monotonic() - started
            # And the hub lets go of the connection, however many frames are still coming.
            with trio.fail_after(DEADLINE):
                await flood.ended.wait()
            nursery.cancel_scope.cancel()
        last = polite_sums[-1]
        while True:  # the viewer gets the polite EA's latest update, whatever the flood did
            update = await receive(view, "update", timeout=DEADLINE)
            if update["key"] == "POLITE" and update["data"][0]["TF_data"][0]["M1"] == last:
                break
    assert code == 1008
    notices = [m for m in flood.messages if m["type"] == "error"]
    assert notices and {m["code"] for m in notices} == {"rate_limited"}
    assert len(notices) <= elapsed + 1  # at most one notice a second, not one per frame
    print(
        f"\nflood: {sent} frames in {elapsed:.1f} s ({sent / elapsed:,.0f}/s), closed 1008 after "
        f"{elapsed:.1f} s; {len(notices)} rate_limited notices; polite EA's latest delivered"
    )
    lines = [line for line in hub.log().splitlines() if "FLOOD" in line or "1008" in line]
    assert sum("closed 1008" in line for line in lines) == 1
    assert await metric(hub, "mt5hub_open_connections", role="publisher") == 0


# -- shutting down while busy ------------------------------------------------------------------


async def test_shutdown_under_load_closes_everyone_with_1001_and_exits_within_the_grace_period(
    hub_factory: HubFactory,
) -> None:
    grace = 10.0  # long: the hub must not need it, because it says 1001 the moment it stops
    hub = hub_factory(graceful_timeout=grace)
    codes: dict[str, int | None] = {}

    async def publish_until_closed(name: str, ws: WebSocketConnection) -> None:
        n = 0
        try:
            while True:
                n += 1
                await ws.send_message(publish_frame(key=name, value=n))
                await trio.sleep(0.02)  # 50/s, at the default rate limit
        except ConnectionClosed as closed:
            codes[name] = closed.reason.code if closed.reason else None

    async def read_until_closed(name: str, ws: WebSocketConnection) -> None:
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as closed:
            codes[name] = closed.reason.code if closed.reason else None

    async with trio.open_nursery() as nursery:
        for n in range(5):
            ws = await nursery.start(_open, functools.partial(publisher, hub.ws_url))
            nursery.start_soon(publish_until_closed, f"EA{n}", ws)
        for n in range(30):
            url = hub.wss_url if n % 2 else hub.ws_url
            context = hub.client_ssl_context() if n % 2 else None
            ws = await nursery.start(_open, functools.partial(viewer, url, context))
            nursery.start_soon(read_until_closed, f"viewer{n}", ws)
        await wait_for(lambda: _has_tables(hub, 5), "every EA publishing")
        started = time.monotonic()
        # stop() sends SIGTERM and waits; past its timeout it raises (and kills the hub).
        exit_code = await trio.to_thread.run_sync(functools.partial(hub.stop, timeout=grace + 10))
        stopped = time.monotonic() - started
        await wait_for(lambda: len(codes) == 35, "every client told")
        nursery.cancel_scope.cancel()
    assert exit_code == 0  # Hypercorn exits cleanly: no task outlived the grace period
    assert codes == {name: 1001 for name in codes}
    assert stopped < grace  # everyone was told at once, not cancelled when the grace ran out
    log = hub.log()
    assert "Traceback" not in log and "internal error" not in log
    print(f"\nSIGTERM to exit under load (5 EAs at 50/s, 30 viewers): {stopped:.2f} s")


async def _has_tables(hub: RunningHub, count: int) -> bool:
    return bool((await health(hub))["tables"] == count)


async def _open(
    connect: Callable[[], Any], task_status: trio.TaskStatus[WebSocketConnection]
) -> None:
    """Hold a connection open for the nursery's life; hand it over once it is up."""
    async with connect() as ws:
        task_status.started(ws)
        await trio.sleep_forever()


# -- viewers that never read -------------------------------------------------------------------


async def test_viewers_that_never_read_are_conflated_then_dropped_and_memory_stays_bounded(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(slow_viewer_timeout=3, viewer_timeout=3600, rate_limit=100, rate_burst=100)
    pairs = [f"PAIR{n:02}" for n in range(28)]  # a full 28 x 9 table, ~11 KB a frame
    async with AsyncExitStack() as stack:
        healthy = await stack.enter_async_context(viewer(hub.ws_url))
        pub = await stack.enter_async_context(publisher(hub.ws_url))
        await receive(healthy, "snapshot")
        rss = [(await health(hub))["rss_bytes"]]
        for _ in range(20):
            await stack.enter_async_context(stalled_viewer(hub.http_port))
        await wait_for(lambda: _has_viewers(hub, 21), "the stalled viewers connected")
        held = trio.Event()  # set once the healthy viewer holds the latest publish
        n = 0

        async def read_as_it_comes() -> None:  # as a dashboard does: it reads all along
            while True:
                update = await receive(healthy, "update")
                if update["data"][0]["TF_data"][0]["M1"] == n:
                    held.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_as_it_comes)
            while not await _has_viewers(hub, 1):  # 50 updates/s until every stalled one is gone
                assert n < 5000, "the stalled viewers were never disconnected"
                n += 1
                await pub.send_message(publish_frame(pairs=pairs, value=n))
                await trio.sleep(0.02)
                if n % 25 == 0:
                    rss.append((await health(hub))["rss_bytes"])
            with trio.fail_after(DEADLINE):
                await held.wait()  # the healthy viewer ends with the latest state
            nursery.cancel_scope.cancel()
        after = (await health(hub))["rss_bytes"]
    assert await metric(hub, "mt5hub_closes_total", role="viewer", code="4009") == 20
    assert await metric(hub, "mt5hub_conflated_total") > 0  # they fell behind and were conflated
    assert await metric(hub, "mt5hub_dropped_total", role="viewer") == 0  # not dropped blindly
    mib = 2**20
    assert max(rss) - rss[0] < 64 * mib  # a mailbox holds at most 64 frames, shared by all
    print(
        f"\n20 viewers that never read, {n} updates of {len(publish_frame(pairs=pairs)):,} bytes:"
        f" hub RSS {rss[0] / mib:.0f} MiB before, {max(rss) / mib:.0f} MiB at most, "
        f"{after / mib:.0f} MiB after they were dropped"
    )


async def _has_viewers(hub: RunningHub, count: int) -> bool:
    return bool((await health(hub))["viewers"] == count)
