"""never-reads: 50 viewers that finish the handshake and never read while updates flow."""

from __future__ import annotations

import time
from typing import Any

import trio

from .common import STALLED_SOURCE, STALLED_VIEWERS, since
from .context import Attack, Ctx
from .hub import closes_by_code, metric_delta, metrics_patiently, poll_health
from .raw import close_all, open_and_stall


async def _never_reads(ctx: Ctx, slow: float) -> tuple[dict[str, Any], float, float | None]:
    port = ctx.hub.port
    held = await open_and_stall(port, [STALLED_SOURCE], STALLED_VIEWERS, 30.0)
    connected = time.time()
    first_drop: list[float] = []

    def dropped_all(h: dict[str, Any]) -> bool:
        viewers = int(h["viewers"])
        if not first_drop and viewers < int(ctx.baseline["viewers"]) + STALLED_VIEWERS:
            first_drop.append(time.time())
        return viewers <= int(ctx.baseline["viewers"])

    gone = await poll_health(port, dropped_all, slow + 45.0)
    after = await metrics_patiently(port)
    close_all(held.socks)
    figures = {
        "viewers": STALLED_VIEWERS,
        "answers": dict(held.outcomes),
        "slow_viewer_timeout": slow,
        "viewer_buffer": ctx.hub.settings["viewer_buffer"],
        "first_dropped_after_s": since(connected, first_drop[0] if first_drop else None),
        "all_dropped_after_s": since(connected, gone),
        "hub_closed_viewers": closes_by_code(ctx.metrics_before, after, "viewer"),
        "conflated": metric_delta(ctx.metrics_before, after, "mt5hub_conflated_total"),
        "dropped_frames": metric_delta(ctx.metrics_before, after, "mt5hub_dropped_total"),
    }
    return figures, connected, gone


def attack_never_reads(ctx: Ctx) -> Attack:
    slow = float(ctx.hub.settings["slow_viewer_timeout"])
    figures, connected, gone = trio.run(_never_reads, ctx, slow)
    failed = []
    if figures["answers"] != {"101": STALLED_VIEWERS}:
        failed.append(f"handshakes: {figures['answers']}")
    if gone is None:
        failed.append("the stalled viewers were not all dropped")
    cut = figures["hub_closed_viewers"]
    outcome = (
        f"{STALLED_VIEWERS} x 101; {figures['conflated']:,} updates conflated for them; "
        f"cut {', '.join(f'{v} with {k}' for k, v in cut.items()) or 'none'}, all gone "
        f"{figures['all_dropped_after_s']} s after connecting (first at "
        f"{figures['first_dropped_after_s']} s; slow_viewer_timeout {slow:g} s, "
        f"viewer_buffer {figures['viewer_buffer']})"
    )
    return Attack(
        outcome,
        figures,
        gone or time.time(),
        since(connected, gone),
        "from the 50 connected until the hub had dropped them all",
        failed,
    )
