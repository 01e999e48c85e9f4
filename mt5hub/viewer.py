"""A viewer's connection (a dashboard on /ws): the snapshot, then every update, at its pace.

The hub offers each frame to `ViewerSession.offer`, from the task that applied it (a publisher's):
the viewer keeps it in its inbox, a conflating channel, for its writer. The writer sends what
waits in one write, ending with a WebSocket ping when one is due (mt5hub.flow); while the peer
is behind in its reading the writer waits for the answer, and the hub leaves it out of the
fan-out meanwhile (`Hub.away`), then hands it the latest of each table that changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .config import Settings
from .delivery import Delivery, forbidden
from .fanout import Frame, Inbox
from .flow import FlowControl
from .hub import Hub
from .models import parse_json
from .session import Session, Transport, error_frame
from .subscription import Subscription

WRITE_BATCH_BYTES = 1024 * 1024  # a writer sends what is pending, up to this much, in one go


class ViewerSession(Session):
    """A dashboard: what it says proves it lives or changes what it is sent (`subscribe`,
    `unsubscribe`); how fast it is sent is paced by `flow`."""

    role = "viewer"

    def __init__(
        self,
        hub: Hub,
        transport: Transport,
        settings: Settings,
        peer: str,
        subscription: Subscription | None = None,
        delta: bool = False,
        refused: Sequence[str] = (),
    ) -> None:
        super().__init__(hub, transport, settings, peer, settings.viewer_timeout)
        self.outbox = Inbox(settings.viewer_buffer, hub.metrics, self.role)
        self.subscription = subscription or Subscription()
        self.refused = list(refused)  # keys asked for at connect beyond the token's grant
        # Kept for a viewer of patches or of some tables only (see mt5hub.delivery); made for
        # any other once it changes its subscription.
        self.delivery: Delivery | None = None
        if delta or not self.subscription.everything:
            self.delivery = Delivery(hub, self.subscription, delta, settings.flood_seconds)
        self.flow = FlowControl(settings.viewer_lag, settings.viewer_lag_interval)
        self._answers = trio.lowlevel.ParkingLot()  # the writer waits here while behind

    async def run(self) -> None:
        with self.hub.viewer(self, self.subscription):
            if self.refused:
                self.outbox.offer(error_frame(forbidden(self.refused)))
            await super().run()

    # -- from the hub (a publisher's task) --------------------------------------------------------

    def offer(self, frame: Frame) -> bool:
        """Take this frame without waiting (into the outbox, for the writer); True if it
        replaced an unsent one of its slot."""
        return self.outbox.offer(frame)

    # -- from the peer ----------------------------------------------------------------------------

    def handle(self, message: str | bytes) -> None:
        """`subscribe` and `unsubscribe` change what the viewer is sent; anything else only
        proves it lives (a `pong`)."""
        if isinstance(message, bytes) or "subscribe" not in message:
            return
        request = parse_json(message)
        kind = request.get("type") if isinstance(request, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            return
        if self.delivery is None:
            self.delivery = Delivery(
                self.hub, self.subscription, False, self.settings.flood_seconds
            )
        self.outbox.offer(self.delivery.change(self, request))

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
            if len(receive):  # without a turn of the scheduler: it is our turn already
                first = receive.receive_nowait()
            else:
                first = await receive.receive()
            batch = self.outbox.take_batch([first], WRITE_BATCH_BYTES)
            while self.flow.behind(trio.current_time()):  # the ping grew old while idle
                await self._until_prompt()
                batch = self.outbox.take_batch(batch, WRITE_BATCH_BYTES)
            if (delivery := self.delivery) is not None:
                batch, after = delivery.prepare(batch)
                delivery.held.update(after)  # before the write: if it fails, the connection ends
                if not batch:
                    continue
            now = trio.current_time()
            ping = self.flow.ping_due(now)
            if ping is not None:  # counted before the write: the pong may come back first
                self.flow.ping_sent(now)
            pinged = await self.send(batch, ping)
            if ping is not None and not pinged:  # the transport cannot ping (ASGI, tests)
                self.flow.cannot_ping()

    async def _until_prompt(self) -> None:
        """Wait for the peer's answer while it is behind, away from the fan-out meanwhile (it
        would only conflate there)."""
        while self.flow.behind(trio.current_time()):
            with self.hub.away(self):
                await self._answers.park()

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

    def unanswered_since(self) -> float | None:
        """When the flow-control ping that is out left: the end of its write (a large one
        takes a while). Unanswered for slow_timeout, the peer reads nothing more."""
        out = self.flow.out_since
        return None if out is None else max(out, self.transport.progress_at)
