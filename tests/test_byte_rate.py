"""A publisher's byte rate beside its frame rate (session.RateLimiter), on trio's MockClock."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from mt5hub.errors import Flooding
from mt5hub.publisher import RateLimiter


async def test_bytes_over_the_rate_are_refused_though_the_frame_rate_allows_them(
    autojump_clock: MockClock,
) -> None:
    limiter = RateLimiter(1000.0, 1000, 3600.0, byte_rate=100_000.0, byte_burst=300_000)
    assert [limiter.allow(100_000) for _ in range(4)] == [True, True, True, False]
    assert limiter.exceeded == "100000 bytes/s"
    await trio.sleep(0.5)  # 50 KB back: not enough for another 100 KB
    assert not limiter.allow(100_000)
    assert limiter.allow(40_000)  # a smaller frame fits
    await trio.sleep(1.0)
    assert limiter.allow(100_000)
    await trio.sleep(60)  # the bucket refills to its burst, no further
    assert [limiter.allow(100_000) for _ in range(4)] == [True, True, True, False]


async def test_a_frame_larger_than_the_burst_passes_when_the_bucket_is_full_then_it_owes(
    autojump_clock: MockClock,
) -> None:
    limiter = RateLimiter(1000.0, 1000, 3600.0, byte_rate=100_000.0, byte_burst=300_000)
    assert limiter.allow(1_000_000)  # a full bucket lets it through...
    await trio.sleep(3.0)
    assert not limiter.allow(1)  # ...and it is paid back first: 700 KB owed, 300 KB repaid
    await trio.sleep(7.0)
    assert limiter.allow(1)


async def test_frames_over_the_frame_rate_say_so(autojump_clock: MockClock) -> None:
    limiter = RateLimiter(10.0, 2, 3600.0, byte_rate=1e9, byte_burst=10**9)
    assert [limiter.allow(10) for _ in range(3)] == [True, True, False]
    assert limiter.exceeded == "10 frames/s"


async def test_a_publisher_over_its_byte_rate_for_flood_seconds_is_flooding(
    autojump_clock: MockClock,
) -> None:
    limiter = RateLimiter(1000.0, 1000, 5.0, byte_rate=10_000.0, byte_burst=20_000)
    with pytest.raises(Flooding, match="10000 bytes/s for 5 s"):
        for _ in range(1000):
            limiter.allow(20_000)
            await trio.sleep(0.1)
    assert trio.current_time() == pytest.approx(5.1, abs=0.2)
