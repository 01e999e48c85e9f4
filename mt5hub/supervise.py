"""Background tasks of the app's lifespan (state saver, Redis backplane), kept running.

A task started straight in the lifespan nursery takes the whole lifespan down with its first
unexpected error: Hypercorn then turns lifespan off, and from then on nothing is saved (not
even at shutdown) while /healthz still says ok. `Supervisor.run` stands between the nursery and
such a task: an unexpected error is logged once (with its traceback) while the task keeps
failing, counted in `mt5hub_task_errors_total{task=...}`, and the task is started again after a
capped exponential backoff. While it is failing, `failing` names it and /healthz says
`degraded`. A task that then runs `settle` seconds without an error counts as healthy again
(and its next error is logged again). Cancellation (the lifespan ending) passes straight through.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .metrics import Metrics

log = logging.getLogger("mt5hub")

# A task: an async function taking `task_status` (it may call started() once it is ready).
Task = Callable[..., Awaitable[None]]


class Backoff:
    """Capped exponential backoff with jitter (half to all of the ceiling): spreads the retries
    of many tasks and hubs. (The supervisor's, and the Redis backplane's reconnects.)"""

    def __init__(
        self, initial: float = 1.0, maximum: float = 60.0, rng: random.Random | None = None
    ) -> None:
        self.initial, self.maximum = initial, maximum
        self._rng = rng or random.Random()
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2**self._attempt)
        self._attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class Supervisor:
    """Runs tasks that must outlive their own errors; knows which of them are failing now."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        initial: float = 1.0,
        maximum: float = 60.0,
        settle: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.metrics = metrics
        self.initial, self.maximum, self.settle = initial, maximum, settle
        self._rng = rng
        self.failing: dict[str, str] = {}  # task name -> its last error, while it is failing

    async def run(
        self, name: str, task: Task, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run `task` until cancelled, starting it again after each unexpected error.

        `task_status.started()` is passed on from the task's first start; if that first start
        fails, it comes after the failure, so that the app serves anyway (degraded).
        """
        backoff = Backoff(self.initial, self.maximum, self._rng)
        started = False
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(task)
                    if not started:
                        started = True
                        task_status.started()
                    nursery.start_soon(self._settled, name, backoff)
                # The task returned: it had nothing more to do.
                self.failing.pop(name, None)
                return
            except Exception as exc:  # an ExceptionGroup too, unless it holds a Cancelled
                self._failed(name, exc)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(backoff.next())

    async def _settled(self, name: str, backoff: Backoff) -> None:
        await trio.sleep(self.settle)
        backoff.reset()
        if self.failing.pop(name, None) is not None:
            log.info("%s: running again without errors for %s s", name, self.settle)

    def _failed(self, name: str, exc: Exception) -> None:
        self.metrics.task_errors.labels(name).inc()
        error = _describe(exc)
        if name not in self.failing:
            log.error("%s: unexpected error, restarting it with backoff", name, exc_info=exc)
        self.failing[name] = error


def _describe(exc: BaseException) -> str:
    """The first error in a (maybe nested) group, as `Type: message`."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:200]
