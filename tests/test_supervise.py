"""The supervisor of background tasks, on trio's MockClock: hours of backoff in milliseconds."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from mt5hub.metrics import Metrics
from mt5hub.supervise import Backoff, Supervisor


@pytest.fixture
def hub_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logger = logging.getLogger("mt5hub")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


def errors(metrics: Metrics, task: str) -> float:
    value = metrics.registry.get_sample_value("mt5hub_task_errors_total", {"task": task})
    return float(value or 0.0)


class Flaky:
    """A task that fails while `broken`, each time `interval` after it was started."""

    def __init__(self, interval: float = 1.0) -> None:
        self.broken = True
        self.interval = interval
        self.starts: list[float] = []

    async def __call__(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            if self.broken:
                raise ValueError("not an OSError")


async def test_a_failing_task_is_restarted_with_backoff_logged_once_counted_and_shown(
    autojump_clock: MockClock, hub_log: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics, initial=1.0, maximum=8.0, settle=30.0, rng=random.Random(1))
    task = Flaky()
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run, "state saver", task)
        assert supervisor.failing == {}
        await trio.sleep(120)
        assert supervisor.failing == {"state saver": "ValueError: not an OSError"}
        gaps = [b - a for a, b in zip(task.starts, task.starts[1:], strict=False)]
        # Each start: 1 s of running, then a backoff of half to all of 1, 2, 4, 8, 8, ... s.
        ceilings = [min(8.0, 2.0**n) for n in range(len(gaps))]
        assert all(1 + c / 2 <= g <= 1 + c for g, c in zip(gaps, ceilings, strict=True)), gaps
        assert errors(metrics, "state saver") == len(task.starts) > 10
        logged = [r for r in hub_log.records if r.levelno == logging.ERROR]
        assert len(logged) == 1 and "state saver" in logged[0].getMessage()
        assert logged[0].exc_info is not None  # with its traceback

        task.broken = False  # fixed (the disk came back, say): healthy once it settles
        await trio.sleep(10)
        assert "state saver" in supervisor.failing
        await trio.sleep(30)
        assert supervisor.failing == {}
        task.broken = True  # a new failure is logged again
        await trio.sleep(5)
        assert (
            supervisor.failing
            and len([r for r in hub_log.records if r.levelno == logging.ERROR]) == 2
        )
        nursery.cancel_scope.cancel()


async def test_cancellation_passes_through_and_a_first_start_that_fails_lets_the_app_serve(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics, initial=1.0, maximum=4.0, rng=random.Random(2))
    attempts = 0

    async def never_starts(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("Redis said something odd")

    with trio.move_on_after(60) as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run, "backplane", never_starts)  # returns: degraded
            assert supervisor.failing == {"backplane": "RuntimeError: Redis said something odd"}
    assert scope.cancelled_caught  # the supervisor ended by cancellation, not by an error
    assert attempts > 10 and errors(metrics, "backplane") == attempts


def test_backoff_doubles_up_to_its_maximum_with_jitter_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0, rng=random.Random(3))
    delays = [backoff.next() for _ in range(8)]
    for delay, ceiling in zip(delays, [1, 2, 4, 8, 10, 10, 10, 10], strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next() <= 1.0
