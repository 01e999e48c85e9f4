"""Real protocol clients for tests: a publisher and a viewer over trio-websocket."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from conftest import TOKEN
from trio_websocket import WebSocketConnection, open_websocket_url

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
