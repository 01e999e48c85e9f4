"""idle-5000: 5,000 raw sockets that upgrade to WebSocket at once and then never read."""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Any

import trio

from .common import IDLE_CONNECTIONS, IDLE_SOURCES, percentiles_s, since
from .context import Attack, Ctx
from .hub import (
    back_to,
    closes_by_code,
    health,
    kernel_counters,
    metric_delta,
    metrics_patiently,
    poll_health,
)
from .raw import close_all, open_and_stall


async def _idle(ctx: Ctx) -> tuple[dict[str, Any], float, float | None]:
    port, plan = ctx.hub.port, ctx.plan
    most = {"viewers": 0, "healthz_failed": 0, "healthz_asked": 0}
    slowest = [0.0]

    async def count_viewers() -> None:
        """The most viewers at once, and how /healthz answers meanwhile (5 s timeout)."""
        while True:
            asked = trio.current_time()
            most["healthz_asked"] += 1
            try:
                most["viewers"] = max(most["viewers"], int((await health(port))["viewers"]))
            except (OSError, ValueError):
                most["healthz_failed"] += 1
            slowest[0] = max(slowest[0], trio.current_time() - asked)
            await trio.sleep(0.25)

    kernel_before = kernel_counters()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_viewers)
        started = time.time()
        held = await open_and_stall(port, IDLE_SOURCES, IDLE_CONNECTIONS, plan.idle_open_timeout)
        opened = time.time()
        await trio.sleep(plan.idle_hold)
        nursery.cancel_scope.cancel()
    rss_held = ctx.sampler.current_rss()
    viewers_end = None
    with contextlib.suppress(OSError, ValueError):
        viewers_end = int((await health(port, timeout=30.0))["viewers"])
    kernel_after = kernel_counters()
    during = await metrics_patiently(port)
    close_all(held.socks)
    closed = time.time()
    recovered = await poll_health(port, back_to(ctx.baseline, "viewers"), 60.0)
    answered = sum(v for k, v in held.outcomes.items() if k.isdigit())
    figures = {
        "connections": IDLE_CONNECTIONS,
        "sources": f"{IDLE_SOURCES[0]}-{IDLE_SOURCES[-1]}",
        "answers": dict(held.outcomes.most_common()),
        "answered": answered,
        "errors_at_s": percentiles_s(held.errors_at),
        "last_answer_after_s": round(held.last_answer, 2),
        "opening_took_s": round(opened - started, 2),
        "open_bound_s": plan.idle_open_timeout,
        "hold_s": plan.idle_hold,
        "most_viewers_at_once": most["viewers"],
        "healthz_during": {
            "asked": most["healthz_asked"],
            "failed_within_5s": most["healthz_failed"],
            "slowest_s": round(slowest[0], 2),
        },
        "viewers_at_end_of_hold": viewers_end,
        "rss_held_mb": round(rss_held / 2**20, 1),
        "hub_closed_viewers": closes_by_code(ctx.metrics_before, during, "viewer"),
        "refused": {
            r: metric_delta(ctx.metrics_before, during, "mt5hub_rejects_total", reason=r)
            for r in ("too_many_from_ip", "hub_full")
        },
        "conflated": metric_delta(ctx.metrics_before, during, "mt5hub_conflated_total"),
        "kernel": {k: v - kernel_before.get(k, 0) for k, v in kernel_after.items()},
        "hub_open_files_limit": ctx.hub.open_files_limit(),
    }
    return figures, closed, recovered


def attack_idle(ctx: Ctx) -> Attack:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = IDLE_CONNECTIONS + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    figures, closed, recovered = trio.run(_idle, ctx)
    figures["hub_peak_open_files"] = ctx.sampler.peak_fds
    answers = figures["answers"]
    settings = ctx.hub.settings
    failed = []
    if figures["most_viewers_at_once"] > int(settings["max_viewers"]) + 1:  # + the witness
        failed.append(f"{figures['most_viewers_at_once']} viewers at once, over max_viewers")
    if (
        figures["viewers_at_end_of_hold"] is not None
        and figures["viewers_at_end_of_hold"] > int(settings["max_viewers"]) + 1
    ):
        failed.append(f"{figures['viewers_at_end_of_hold']} viewers at once, over max_viewers")
    if recovered is None:
        failed.append("the hub did not return to its viewers of before within 60 s")
    other = {k: v for k, v in answers.items() if k not in ("101", "429", "503")}
    cut = figures["hub_closed_viewers"]
    overflows = figures["kernel"].get("ListenOverflows", 0)
    outcome = (
        f"{IDLE_CONNECTIONS:,} upgrades at once: 101 x{answers.get('101', 0):,}, "
        f"429 x{answers.get('429', 0):,}, 503 x{answers.get('503', 0):,}"
        + "".join(f", {k} x{v:,}" for k, v in other.items())
        + f" (last answer at {figures['last_answer_after_s']} s; listen queue overflowed "
        f"{overflows:,} times); the hub held at most {figures['hub_peak_open_files']:,} open "
        f"files (max_viewers {settings['max_viewers']}); it cut "
        + (", ".join(f"{v:,} with {k}" for k, v in cut.items()) or "none")
        + f"; {figures['viewers_at_end_of_hold']} still open after a {figures['hold_s']:g} s "
        f"hold (RSS {figures['rss_held_mb']} MB); /healthz unanswered within 5 s "
        f"{figures['healthz_during']['failed_within_5s']} of "
        f"{figures['healthz_during']['asked']} times"
    )
    return Attack(
        outcome,
        figures,
        recovered or closed,
        since(closed, recovered),
        "from closing the sockets until /healthz viewers are back to before",
        failed,
    )
