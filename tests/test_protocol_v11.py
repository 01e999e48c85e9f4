"""Protocol v1.1 on real hubs (Hypercorn, real sockets): subscriptions, scoped viewer tokens and
patches, over WS and WSS, across a restart and across two hubs sharing Redis.

The same behaviours in the fan-out core, under trio's MockClock, are in tests/test_subscriptions.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from conftest import RunningHub, RunningRedis
from helpers import DEADLINE, publish_frame, publisher, receive, table_rows, viewer
from trio_websocket import WebSocketConnection, open_websocket_url

from mt5hub.delta import apply as apply_patch

HubFactory = Callable[..., RunningHub]
SCOPED = "viewer-of-ea1-only"  # a scoped viewer token (plain: test hubs run on loopback)
FULL = "viewer-of-everything"
VIEWER_TOKENS = [FULL, {"token": SCOPED, "keys": ["EA1"], "name": "client-a"}]
TABLES = [("EA1", "H1"), ("EA2", "H1"), ("OTHER", "M5")]


async def publish_all(hub: RunningHub, value: float = 1.0, tables: Any = TABLES) -> None:
    """One publish of each table, handled by the hub when this returns."""
    async with publisher(hub.ws_url) as pub:
        for key, src in tables:
            await pub.send_message(publish_frame(key, src, f"{key}_1", value=value))
        await pub.send_message('{"type":"ping"}')
        await receive(pub, "pong", timeout=DEADLINE)


async def messages_for(ws: WebSocketConnection, seconds: float) -> list[dict[str, Any]]:
    """Every message for a while (pings answered and kept out)."""
    heard = []
    with trio.move_on_after(seconds):
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == "ping":
                await ws.send_message('{"type":"pong"}')
            else:
                heard.append(message)
    return heard


def keys_in(messages: list[dict[str, Any]]) -> set[str]:
    found = set()
    for message in messages:
        found |= {t["key"] for t in message.get("tables", []) if "key" in t}
        if "key" in message:
            found.add(message["key"])
    return found


@pytest.mark.parametrize("scheme", ["ws", "wss"])
async def test_a_viewer_subscribes_and_unsubscribes_without_reconnecting(
    hub: RunningHub, scheme: str
) -> None:
    await publish_all(hub)
    url = hub.ws_url if scheme == "ws" else hub.wss_url
    context = None if scheme == "ws" else hub.client_ssl_context()
    async with viewer(url, context, path="/ws?keys=EA1") as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert [t["key"] for t in snapshot["tables"]] == ["EA1"]
        await view.send_message(json.dumps({"type": "subscribe", "keys": ["OTH*"]}))
        partial = await receive(view, "snapshot", timeout=DEADLINE)
        assert partial["partial"] is True and [t["key"] for t in partial["tables"]] == ["OTHER"]
        await view.send_message(json.dumps({"type": "unsubscribe", "keys": ["EA1"]}))
        gone = await receive(view, "unsubscribed", timeout=DEADLINE)
        assert gone["tables"] == [{"key": "EA1", "src": "H1"}]
        await publish_all(hub, value=2.0)
        assert keys_in(await messages_for(view, 1.0)) == {"OTHER"}


async def test_a_bad_subscription_in_the_url_is_refused_with_http_400(hub: RunningHub) -> None:
    status, _ = await trio.to_thread.run_sync(hub.get, "/ws?keys=" + "x" * 200)
    assert status == 426  # a plain GET is not a handshake; the upgrade is checked below
    with pytest.raises(Exception) as refused:
        async with open_websocket_url(hub.ws_url + "/ws?keys=" + "x" * 200):
            pass
    assert getattr(refused.value, "status_code", None) == 400


async def test_a_scoped_viewer_never_sees_another_table_not_even_in_its_snapshot(
    hub_factory: HubFactory,
) -> None:
    hub = hub_factory(viewer_tokens=VIEWER_TOKENS, state_interval=3600.0)
    await publish_all(hub)
    async with viewer(hub.ws_url, path=f"/ws?token={SCOPED}") as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert [t["key"] for t in snapshot["tables"]] == ["EA1"]
        await view.send_message(json.dumps({"type": "subscribe", "keys": ["EA2"]}))
        error = await receive(view, "error", timeout=DEADLINE)
        assert (error["code"], error["keys"]) == ("forbidden_key", ["EA2"])
        await publish_all(hub, value=2.0)
        heard = await messages_for(view, 1.0)
        assert keys_in(heard) == {"EA1"} and "EA2" not in json.dumps(heard)
    async with viewer(hub.ws_url, path=f"/ws?token={SCOPED}&keys=EA*") as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert snapshot["tables"] == []  # it asked only for what it may not see
        assert (await receive(view, "error", timeout=DEADLINE))["keys"] == ["EA*"]
    async with viewer(hub.ws_url, path=f"/ws?token={FULL}") as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert {t["key"] for t in snapshot["tables"]} == {"EA1", "EA2", "OTHER"}

    await trio.to_thread.run_sync(hub.restart)  # the tables come back from the state file
    async with viewer(hub.ws_url, path=f"/ws?token={SCOPED}") as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert [t["key"] for t in snapshot["tables"]] == ["EA1"]
        assert snapshot["tables"][0]["online"] is False


async def test_a_scoped_viewer_on_either_of_two_hubs_on_redis_sees_only_its_tables(
    hub_factory: HubFactory, redis_server: RunningRedis
) -> None:
    settings = {"backplane": redis_server.url, "viewer_tokens": VIEWER_TOKENS}
    a, b = hub_factory(**settings), hub_factory(**settings)
    async with (
        viewer(b.ws_url, path=f"/ws?token={SCOPED}") as scoped,
        viewer(b.ws_url, path=f"/ws?token={FULL}") as full,
    ):
        await receive(scoped, "snapshot", timeout=DEADLINE)
        await receive(full, "snapshot", timeout=DEADLINE)
        await publish_all(a)  # on the other hub
        everything = await messages_for(full, 2.0)
        assert keys_in(everything) == {"EA1", "EA2", "OTHER"}
        heard = await messages_for(scoped, 0.5)
        assert keys_in(heard) == {"EA1"} and {m["type"] for m in heard} >= {"update"}
    async with viewer(a.ws_url, path=f"/ws?token={SCOPED}") as view:
        snapshot = await receive(view, "snapshot", timeout=DEADLINE)
        assert [t["key"] for t in snapshot["tables"]] == ["EA1"]


@pytest.mark.parametrize("ask", ["query", "subprotocol"])
async def test_a_delta_viewer_gets_patches_and_holds_what_a_full_viewer_holds(
    hub: RunningHub, ask: str
) -> None:
    path, protocols = ("/ws?delta=1", []) if ask == "query" else ("/ws", ["mt5hub.v1.1"])
    async with (
        open_websocket_url(hub.ws_url + path, subprotocols=protocols) as delta,
        viewer(hub.ws_url) as full,
        publisher(hub.ws_url) as pub,
    ):
        if ask == "subprotocol":
            assert delta.subprotocol == "mt5hub.v1.1"
        await receive(delta, "snapshot", timeout=DEADLINE)
        await receive(full, "snapshot", timeout=DEADLINE)
        await pub.send_message(publish_frame("EA1", "H1", "EA1_1", value=1.0))
        held = await receive(delta, "update", timeout=DEADLINE)
        rows = table_rows(value=1.0)
        for n in range(1, 6):  # one cell changes per publish
            cell = rows[n % len(rows)]["TF_data"][n]
            cell[next(tf for tf in cell if tf != "cell_color")] = n * 100
            await pub.send_message(json.dumps({"key": "EA1", "src": "H1", "clientId": "EA1_1",
                                               "data": rows}))  # fmt: skip
            patch = await receive(delta, "patch", "update", timeout=DEADLINE)
            assert patch["type"] == "patch" and patch["base"] == held["seq"]
            body = {k: v for k, v in patch.items()
                    if k not in ("type", "key", "src", "seq", "base", "ts")}  # fmt: skip
            held = {**apply_patch(held, body), "type": "update", "key": "EA1", "src": "H1",
                    "seq": patch["seq"], "ts": patch["ts"]}  # fmt: skip
            assert len(json.dumps(patch)) < len(json.dumps(held)) / 5
        last = None
        while last is None or last["seq"] < held["seq"]:
            last = await receive(full, "update", timeout=DEADLINE)
        assert held == last
