"""flood: one publisher sending small valid publishes as fast as it can (10,000/s aimed)."""

from __future__ import annotations

import math
import random
import struct
import time
from typing import Any

import trio
from wsproto.frame_protocol import Opcode

from mt5hub.testing.rawws import frame, upgrade_request

from .common import FLOOD_KEY, FLOOD_RATE, FLOOD_SRC, TOKEN, since
from .context import Attack, Ctx
from .hub import back_to, hub_socket_to, metric_delta, poll_health, scrape_metrics, snapshot_tables
from .raw import RawWebSocket, connect_from, read_head


def small_publish(i: int) -> str:
    value = round((i % 2000) / 10 - 100, 1)
    row = f'{{"pair":"EURUSD","TF_data":[{{"M1":{value},"cell_color":"clrGreen"}}],"sum":{value}'
    row += ',"sum_cell_color":"clrGreen"}'
    return f'{{"key":"{FLOOD_KEY}","src":"{FLOOD_SRC}","clientId":"FLOOD_1","data":[{row}]}}'


async def _flood(port: int, rate: float, bound: float, closed: trio.Event) -> dict[str, Any]:
    """One publisher on a raw socket sending small valid publishes, 100 frames per write, paced
    to `rate`, until the hub closes it; then it answers the close (if its socket still takes
    data) and hangs up 2 s later, as a client gone quiet would."""
    rng = random.Random(0)
    sent, first, last = 0, 0.0, 0.0
    got: dict[str, Any] = {"closed_at": None, "closed_wall": None}
    sending = trio.CancelScope()
    sock = await connect_from("127.0.0.1", port)
    client_port = int(sock.getsockname()[1])
    stream = trio.SocketStream(sock)
    async with stream:
        await stream.send_all(upgrade_request("/ws/dll", f"Authorization: Bearer {TOKEN}"))
        status, leftover = await read_head(stream)
        if status != 101:
            raise RuntimeError(f"the flood's handshake got HTTP {status}")
        ws = RawWebSocket(stream, leftover)

        async def watch() -> None:
            await ws.wait(lambda: ws.close_code is not None, math.inf)
            got.update(closed_at=trio.current_time(), closed_wall=time.time())
            closed.set()
            sending.cancel()  # a write may be stuck: the hub no longer reads this socket

        with trio.move_on_after(bound):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ws.read)
                nursery.start_soon(watch)
                first = trio.current_time()
                with sending:
                    while True:
                        await trio.sleep_until(first + sent / rate)
                        batch = [small_publish(sent + k).encode() for k in range(100)]
                        if not await ws.send(
                            b"".join(frame(Opcode.TEXT, f, rng=rng) for f in batch)
                        ):
                            break
                        sent += len(batch)
                        last = trio.current_time()
                await closed.wait()
                with trio.move_on_after(1.0):
                    await ws.send(frame(Opcode.CLOSE, struct.pack("!H", 1000), rng=rng))
                await ws.wait(lambda: False, 1.0)
                got["hub_hung_up"] = ws.ended.is_set()
                nursery.cancel_scope.cancel()
    hung_up = time.time()
    took = last - first
    return {
        "sent": sent,
        "send_rate": round(sent / took) if took > 0 else None,
        "error_frames": dict(ws.errors),
        "close_code": ws.close_code,
        "closed_after_s": None if got["closed_at"] is None else round(got["closed_at"] - first, 2),
        "hub_ended_the_connection_within_1s": got.get("hub_hung_up", False),
        "closed_wall": got["closed_wall"],
        "client_port": client_port,
        "hung_up_wall": hung_up,
    }


async def _flood_and_recover(ctx: Ctx, bound: float) -> tuple[dict[str, Any], float | None]:
    """The flood, and from its close on, /healthz until the hub counts the publishers of before."""
    closed = trio.Event()
    recovered: list[float | None] = []

    async def watch() -> None:
        await closed.wait()
        recovered.append(await poll_health(ctx.hub.port, back_to(ctx.baseline, "publishers"), 30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        figures = await _flood(ctx.hub.port, FLOOD_RATE, bound, closed)
        if not closed.is_set():
            nursery.cancel_scope.cancel()
    return figures, recovered[0] if recovered else None


def attack_flood(ctx: Ctx) -> Attack:
    settings = ctx.hub.settings
    flood_seconds = float(settings["flood_seconds"])
    figures, recovered = trio.run(_flood_and_recover, ctx, flood_seconds + 15)
    end = figures.pop("closed_wall") or time.time()
    hung_up = figures.pop("hung_up_wall")
    time.sleep(max(0.0, hung_up + 2.0 - time.time()))  # its FIN or RST would have arrived
    held = hub_socket_to(ctx.hub.port, figures.pop("client_port"))
    figures["hub_still_holds_it"] = None
    if held is not None:
        held["after_hang_up_s"] = round(time.time() - hung_up, 1)
        figures["hub_still_holds_it"] = held
    after = scrape_metrics(ctx.hub.port)
    tables = trio.run(snapshot_tables, ctx.hub.port)
    flood_table = tables.get((FLOOD_KEY, FLOOD_SRC))
    accepted = int(flood_table["seq"]) if flood_table else 0
    dropped = metric_delta(ctx.metrics_before, after, "mt5hub_rejects_total", reason="rate_limited")
    figures.update(
        accepted=accepted,
        dropped_rate_limited=dropped,
        aimed_rate=FLOOD_RATE,
        flood_seconds=flood_seconds,
        rate_limit=settings["rate_limit"],
        rate_burst=settings["rate_burst"],
        frames_unread=figures["sent"] - accepted - dropped,
    )
    failed = []
    if figures["close_code"] != 1008:
        failed.append(f"flood closed with {figures['close_code']}, not 1008")
    if not figures["error_frames"].get("rate_limited"):
        failed.append("no rate_limited error frame")
    if held is not None:
        failed.append(
            f"{held['after_hang_up_s']:g} s after the flooder hung up, the hub still holds its "
            f"connection ({held['state']}, {held['unread_bytes']:,} bytes it never read)"
        )
    limited = figures["error_frames"].get("rate_limited", 0)
    outcome = (
        f"aimed {FLOOD_RATE:,.0f}/s, sent {figures['send_rate'] or 0:,}/s "
        f"({figures['sent']:,} frames); {accepted} accepted, {dropped:,} dropped with "
        f"{limited} `rate_limited` error frames; close {figures['close_code']} after "
        f"{figures['closed_after_s']} s (flood_seconds {flood_seconds:g})"
    )
    return Attack(
        outcome,
        figures,
        recovered or end,
        since(end, recovered),
        "from the 1008 until /healthz publishers are back to before",
        failed,
    )
