"""Give memory back to the system after a burst of connections has gone.

After 5,000 viewers have come and gone, the hub's RSS stayed near its peak for good: two
reasons, both dealt with here once the number of connections has fallen to half of its peak or
less, by at least `min_drop` (checked every `interval` seconds):

- Much of what a closed connection leaves is cyclic garbage (its cancelled tasks' exceptions,
  tracebacks and frames, which reference each other): ~1 million objects after 5,000
  connections, which only a full collection frees, and nothing may trigger one for a long time
  once the hub is quiet. `gc.collect()` frees them; it holds the event loop while it runs (about
  2 s for 1.2 million objects on a busy 2-core machine: docs/performance.md), once per
  burst, as Python's own full collections do during the burst.
- glibc's allocator keeps freed pages in its heaps (arenas). `malloc_trim(0)` hands the free
  pages of every arena back (in a worker thread: it walks the heaps), where the C library has
  it (not musl, not macOS).

`trim_memory = false` in [mt5hub] turns this off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
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
        trim = self._trim
        peak = 0
        while True:
            await trio.sleep(self.interval)
            now = len(hub.viewers) + hub.publishers
            peak = max(peak, now)
            if peak - now >= self.min_drop and now <= peak // 2:
                # The connections' tasks, coroutines and exceptions reference each other:
                # cycles that wait for a full collection, which may not come for a long time.
                began = time.perf_counter()
                found = gc.collect()
                collected = time.perf_counter() - began
                if trim is not None:
                    await self._in_thread(lambda: trim(0))
                self.trims += 1
                log.info(
                    "%d connections of %d gone: collected %d objects in %.3f s, memory trimmed",
                    peak - now,
                    peak,
                    found,
                    collected,
                )
                peak = now
