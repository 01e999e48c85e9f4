"""A connection's watchdog: ping a quiet peer, drop a silent one, drop one that stopped reading.

It runs in the session's nursery beside the writer and reads the session's state; the session
says what counts as stuck (`Watched.stuck`: a write that makes no progress, a flow-control ping
left unanswered) and when to look again.
"""

from __future__ import annotations

import math
from typing import Protocol

import trio

from .errors import HeartbeatTimeout, HubError, TooSlow

CLOSE_GRACE = 1.0  # seconds a write stuck at cancellation gets before its socket is aborted


class Watched(Protocol):
    timeout: float  # no frame from the peer for this long: it is gone (4008)
    last_seen: float  # when the peer last sent anything (a frame, a pong)
    sending_since: float | None  # when the write in progress began

    @property
    def ping_interval(self) -> float: ...

    def ping(self) -> None: ...

    @property
    def slow_timeout(self) -> float: ...

    def write_idle_since(self) -> float | None: ...

    def unanswered_since(self) -> float | None: ...

    def fail(self, error: HubError) -> None: ...

    def abort(self) -> None: ...

    async def write_done(self) -> None: ...


class Watchdog:
    def __init__(self, session: Watched) -> None:
        self.session = session

    async def run(self) -> None:
        """Watch until the session ends. Pings go through the session's outbox, so a peer that
        does not read cannot block this task. When the session is cancelled while its writer is
        stuck in a send that cannot be cancelled, the write gets CLOSE_GRACE, then the socket is
        aborted, so that the session's nursery can always exit."""
        try:
            await self._loop()
        finally:
            if self.session.sending_since is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE) as grace:
                    await self.session.write_done()
                if grace.cancelled_caught:
                    self.session.abort()

    async def _loop(self) -> None:
        s = self.session
        pinged_at = -math.inf
        interval = s.ping_interval
        while True:  # ends when the session fails, or is cancelled
            now = trio.current_time()
            quiet = now - s.last_seen
            if quiet >= s.timeout:
                s.fail(HeartbeatTimeout(f"no frame for {quiet:.0f} s"))
                return
            if quiet >= interval and now - pinged_at >= interval:
                s.ping()
                pinged_at = now
            if (slow := stuck(s, now)) is not None:
                s.fail(slow)
                return
            wake = [s.last_seen + s.timeout, max(s.last_seen, pinged_at) + interval]
            wake.append(next_stuck_check(s, now))
            await trio.sleep_until(min(wake))


def stuck(s: Watched, now: float) -> TooSlow | None:
    """Why the peer counts as no longer reading, if it does: a write of which the socket took
    nothing for slow_timeout (a large write read slowly is not stuck), or what proves it reads
    (a viewer's flow-control ping) left unanswered that long after it went out."""
    idle = s.write_idle_since()
    if idle is not None and now - idle >= s.slow_timeout:
        return TooSlow(f"socket took nothing for {now - idle:.0f} s")
    out = s.unanswered_since()
    if out is not None and now - out >= s.slow_timeout:
        return TooSlow(f"read nothing it was sent for {now - out:.0f} s")
    return None


def next_stuck_check(s: Watched, now: float) -> float:
    """When `stuck` may next say something new (a send may start meanwhile: look again)."""
    idle, out = s.write_idle_since(), s.unanswered_since()
    if idle is None and out is not None:
        return out + s.slow_timeout
    return (now if idle is None else idle) + s.slow_timeout
