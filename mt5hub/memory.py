"""Give memory back to the system after a burst of connections has gone.

Each connection costs the hub buffers and objects that glibc's allocator takes from many small
heaps (arenas, one per thread that ever allocated) and keeps once they are freed: after 5,000
viewers have come and gone, the hub's RSS stays near its peak. `malloc_trim(0)` hands the free
pages of every arena back to the system. `Trimmer` calls it (in a worker thread: it walks the
heaps) when the number of connections has fallen to half of its peak or less, by at least
`min_drop`, and no more often than once per `interval` seconds. Where the C library has no
malloc_trim (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from typing import Any

import trio

from .hub import Hub

log = logging.getLogger("mt5hub")


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, if this process has it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class Trimmer:
    """Watches the hub's connections; after a burst has gone, trims the allocator's heaps."""

    def __init__(
        self,
        *,
        interval: float = 5.0,
        min_drop: int = 500,
        trim: Callable[[int], int] | None = None,
        in_thread: Callable[[Callable[[], Any]], Any] | None = None,
    ) -> None:
        self.interval = interval
        self.min_drop = min_drop
        self._trim = trim if trim is not None else _malloc_trim()
        self._in_thread = in_thread or trio.to_thread.run_sync
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    async def run(self, hub: Hub, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Check every `interval` seconds until cancelled."""
        task_status.started()
        if self._trim is None:
            return
        trim = self._trim
        peak = 0
        while True:
            await trio.sleep(self.interval)
            now = len(hub.viewers) + hub.publishers
            peak = max(peak, now)
            if peak - now >= self.min_drop and now <= peak // 2:
                await self._in_thread(lambda: trim(0))
                self.trims += 1
                log.info("%d connections of %d gone: memory trimmed", peak - now, peak)
                peak = now
