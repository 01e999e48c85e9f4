"""A viewer's connection (a dashboard on /ws): the snapshot, then every update, at its pace.

The hub offers each frame to `ViewerSession.offer`, from the task that applied it (a publisher's):
a viewer that keeps up and whose writer is idle gets it written at once (`Transport.send_now`),
any other keeps it in its inbox, a conflating channel, for its writer. The writer sends what
waits in one write, ending with a WebSocket ping when one is due (mt5hub.flow); while the peer
is behind in its reading the writer waits for the answer, and the hub leaves it out of the
fan-out meanwhile (`Hub.away`), then hands it the latest of each table that changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .config import ALL, Settings, ViewerGrant
from .errors import HubError, TooSlow
from .flow import FlowControl
from .hub import Frame, Hub, Inbox
from .session import Session, Transport, log

WRITE_BATCH_BYTES = 1024 * 1024  # a writer sends what is pending, up to this much, in one go


class ViewerSession(Session):
    """A dashboard: what it says only proves it lives; what it is sent is paced by `flow`."""

    role = "viewer"

    def __init__(
        self,
        hub: Hub,
        transport: Transport,
        settings: Settings,
        peer: str,
        *,
        grant: ViewerGrant = ALL,
    ) -> None:
        super().__init__(hub, transport, settings, peer, settings.viewer_timeout)
        self.grant = grant  # the tables its token lets it see (not enforced here yet)
        self.outbox = Inbox(settings.viewer_buffer, hub.metrics, self.role)
        self.flow = FlowControl(settings.viewer_lag, settings.viewer_lag_interval)
        self._answers = trio.lowlevel.ParkingLot()  # the writer waits here while behind
        self._holding = False  # the writer has taken frames it has not written yet

    async def run(self) -> None:
        with self.hub.viewer(self):
            await super().run()

    # -- from the hub (a publisher's task) --------------------------------------------------------

    def offer(self, frame: Frame, express: bool = True) -> bool:
        """Take this frame without waiting; True if it replaced an unsent one of its slot.

        Written at once when nothing is waiting or being written before it, the peer is not
        behind, and the socket takes it whole: then a prompt viewer costs the fan-out one write,
        not a wake-up and a turn of its writer task. Otherwise it waits in the outbox.
        """
        if express and self._idle() and self._write_now(frame):
            return False
        return self.outbox.offer(frame)

    def _idle(self) -> bool:
        return (
            not self._holding
            and self.sending_since is None
            and self.error is None
            and not len(self.outbox.receive)
            and not self.flow.behind(trio.current_time())
        )

    def _write_now(self, frame: Frame) -> bool:
        now = trio.current_time()
        ping = self.flow.ping_due(now)
        try:
            if not self.transport.send_now((frame,), ping):
                return False
        except Exception as exc:  # our bug: this viewer ends, the publisher's task carries on
            log.exception("%s %s: internal error", self.role, self.peer)
            self.fail(HubError(repr(exc)))
            return True
        if ping is not None:
            self.flow.ping_sent(now)
        self.sent_out((frame,))
        return True

    # -- from the peer ----------------------------------------------------------------------------

    def pong(self, payload: bytes) -> None:
        """The peer has read everything written before the ping this answers."""
        super().pong(payload)
        if self.flow.answered(payload, self.last_seen):
            self._answers.unpark_all()

    # -- the writer -------------------------------------------------------------------------------

    async def write(self) -> None:
        """Send what the outbox holds, a batch at a time, at the pace the peer reads it."""
        receive = self.outbox.receive
        while True:
            await self._until_prompt()
            # Taken with nothing in between and the write: a frame offered meanwhile could
            # otherwise be written at once, ahead of an older one of its table.
            if len(receive):
                first = receive.receive_nowait()
            else:
                first = await receive.receive()  # woken for it: no other task runs before us
            self._holding = True
            batch = self._more([first])
            while self.flow.behind(trio.current_time()):  # the ping grew old while idle
                await self._until_prompt()
                batch = self._more(batch)
            now = trio.current_time()
            ping = self.flow.ping_due(now)
            if ping is not None:  # counted before the write: the pong may come back first
                self.flow.ping_sent(now)
            try:
                pinged = await self.send(batch, ping)
            finally:
                self._holding = False
            if ping is not None and not pinged:  # the transport cannot ping (ASGI, tests)
                self.flow.cannot_ping()

    async def _until_prompt(self) -> None:
        """Wait for the peer's answer while it is behind, away from the fan-out meanwhile (it
        would only conflate there)."""
        while self.flow.behind(trio.current_time()):
            with self.hub.away(self):
                await self._answers.park()

    def _more(self, batch: list[Frame]) -> list[Frame]:
        """The batch with what waits in the outbox, up to WRITE_BATCH_BYTES: a newer frame of a
        slot already in the batch takes that frame's place (as it would have in the outbox)."""
        size = sum(len(frame.text) for frame in batch)
        where = {frame.slot: n for n, frame in enumerate(batch) if frame.slot is not None}
        receive = self.outbox.receive
        while size < WRITE_BATCH_BYTES and len(receive):
            frame = receive.receive_nowait()
            size += len(frame.text)
            if frame.slot is None:
                batch.append(frame)
            elif (n := where.get(frame.slot)) is not None:
                batch[n] = frame
                self.hub.metrics.conflated.inc()
            else:
                where[frame.slot] = len(batch)
                batch.append(frame)
        return batch

    def sent_out(self, frames: Sequence[Frame]) -> None:
        """Counted, and each update's time from its publish's arrival to its write observed."""
        self._frames_out.inc(len(frames))
        now, size, latency = trio.current_time(), 0, self.hub.metrics.latency
        for frame in frames:
            size += len(frame.text)
            if frame.received is not None:
                latency.observe(now - frame.received)
        self._bytes_out.inc(size)

    # -- the watchdog -----------------------------------------------------------------------------

    def stuck(self, now: float) -> TooSlow | None:
        """Also stuck: a ping left unanswered for slow_viewer_timeout after the write it ended
        went out (the peer reads nothing more)."""
        if (slow := super().stuck(now)) is not None:
            return slow
        out = self._ping_out_since()
        if out is not None and now - out >= self.settings.slow_viewer_timeout:
            return TooSlow(f"read nothing it was sent for {now - out:.0f} s")
        return None

    def next_stuck_check(self, now: float) -> float:
        out = self._ping_out_since()
        if self.sending_since is None and out is not None:
            return out + self.settings.slow_viewer_timeout
        return super().next_stuck_check(now)

    def _ping_out_since(self) -> float | None:
        """When the ping that is out left: the end of its write (a large one takes a while)."""
        out = self.flow.out_since
        return None if out is None else max(out, self.transport.progress_at)
