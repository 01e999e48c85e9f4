"""Memory handed back after a burst of connections (mt5hub/memory.py), on trio's MockClock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from trio.testing import MockClock

from mt5hub.hub import Hub, Inbox
from mt5hub.memory import Trimmer, _malloc_trim


async def test_the_heaps_are_trimmed_once_a_burst_has_gone_and_not_while_it_lasts(
    autojump_clock: MockClock,
) -> None:
    hub = Hub()
    trims: list[float] = []

    def trim(pad: int) -> int:
        trims.append(trio.current_time())
        return 1

    async def inline(fn: Callable[[], Any]) -> Any:
        return fn()

    trimmer = Trimmer(interval=5.0, min_drop=500, trim=trim, in_thread=inline)
    viewers = [Inbox(1, hub.metrics, "viewer") for _ in range(2000)]
    async with trio.open_nursery() as nursery:
        await nursery.start(trimmer.run, hub)  # it looks every 5 s: at 5, 10, ...
        await trio.sleep(2.5)  # changes happen between two looks (at x.5 s)
        hub.viewers.update(viewers)  # a burst of 2,000
        await trio.sleep(60)
        assert trims == []
        hub.viewers.difference_update(viewers[:900])  # 1,100 left: over half of the peak
        await trio.sleep(60)
        assert trims == []
        hub.viewers.difference_update(viewers[900:1500])  # 500 left: the burst has gone
        await trio.sleep(2.4)
        assert trims == []
        await trio.sleep(0.2)  # the next look
        assert len(trims) == 1
        await trio.sleep(120)  # no new burst: no new trim
        assert len(trims) == 1
        hub.viewers.difference_update(viewers[1500:1700])  # 200 fewer: under min_drop
        await trio.sleep(60)
        assert len(trims) == 1
        nursery.cancel_scope.cancel()


def test_glibc_malloc_trim_is_found_on_this_machine() -> None:
    trim = _malloc_trim()
    assert trim is not None and trim(0) in (0, 1)
