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

from .config import Settings
from .errors import HubError, ProtocolError, TooSlow
from .fanout import Frame, Inbox
from .flow import FlowControl
from .hub import Hub
from .models import parse_json
from .patches import patch_for
from .publisher import RateLimiter
from .session import Session, Transport, log
from .state import encode
from .subscription import Subscription, TableId, message_selectors

WRITE_BATCH_BYTES = 1024 * 1024  # a writer sends what is pending, up to this much, in one go
# Subscription changes a viewer may make (each is work over every table): per second, and at once
CHANGE_RATE, CHANGE_BURST = 10.0, 20


class ViewerSession(Session):
    """A dashboard: what it says only proves it lives; what it is sent is paced by `flow`."""

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
        self.delta = delta
        self.refused = list(refused)
        # The seq of each table's state the peer holds, once written: kept by a viewer of
        # patches (which it must hold the base of) or of some tables (whose subscription
        # changes may put an older frame in line behind a newer one).
        self.held: dict[TableId, int] | None = None
        if delta or not self.subscription.everything:
            self.held = {}
        self._changes = RateLimiter(CHANGE_RATE, CHANGE_BURST, settings.flood_seconds)
        self.flow = FlowControl(settings.viewer_lag, settings.viewer_lag_interval)
        self._answers = trio.lowlevel.ParkingLot()  # the writer waits here while behind
        self._holding = False  # the writer has taken frames it has not written yet

    async def run(self) -> None:
        with self.hub.viewer(self, self.subscription):
            if self.refused:  # keys asked for at connect beyond the token's grant
                error = ProtocolError(
                    "forbidden_key", "this viewer's token does not grant these keys",
                    keys=self.refused,
                )  # fmt: skip
                self.outbox.offer(Frame(encode({"type": "error", "code": error.code,
                                                **error.fields()})))  # fmt: skip
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
        frames: Sequence[Frame] = (frame,)
        if self.held is not None:
            frames, after = self._as_held(frames)
            if not frames:
                return True  # the peer holds it already
        try:
            if not self.transport.send_now(frames, ping):
                return False
            if self.held is not None:
                self.held.update(after)
        except Exception as exc:  # our bug: this viewer ends, the publisher's task carries on
            log.exception("%s %s: internal error", self.role, self.peer)
            self.fail(HubError(repr(exc)))
            return True
        if ping is not None:
            self.flow.ping_sent(now)
        self.sent_out(frames)
        return True

    def _as_held(self, frames: Sequence[Frame]) -> tuple[list[Frame], dict[TableId, int]]:
        """What to write for these frames, given what the peer holds, and what it then holds.

        A delta viewer gets an update as a patch when it holds the update before it (else
        whole). An update the peer holds already (a later snapshot had it), or of a table it
        has left since it was queued, is dropped; a partial snapshot older than what goes out
        before it is made again, so the peer never steps back.
        """
        held, wants = self.held, self.subscription.wants
        assert held is not None
        after: dict[TableId, int] = {}
        out: list[Frame] = []
        for frame in frames:
            table = frame.table
            if frame.seqs is not None:  # a snapshot
                if frame.partial and any(
                    after.get(t, held.get(t, 0)) > seq for t, seq in frame.seqs.items()
                ):
                    frame = self.hub.snapshots.of(frame.seqs, partial=True)
                assert frame.seqs is not None
                after.update(frame.seqs)
            elif table is not None:
                if not wants(table):
                    continue  # queued before the peer unsubscribed
                if frame.seq:  # an update
                    had = after.get(table, held.get(table))
                    if had is not None and had >= frame.seq:
                        continue
                    after[table] = frame.seq
                    if self.delta and had == frame.base and (patch := patch_for(frame)):
                        frame = patch
            out.append(frame)
        return out, after

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
        if not self._changes.allow():
            raise ProtocolError("rate_limited", f"at most {CHANGE_RATE:g} subscription changes "
                                f"a second (bursts of {CHANGE_BURST})")  # fmt: skip
        chosen = message_selectors(request)
        if kind == "subscribe" and (forbidden := self.subscription.forbidden(chosen)):
            raise ProtocolError(
                "forbidden_key", "this viewer's token does not grant these keys", keys=forbidden
            )
        self.subscription.change(kind == "subscribe", chosen)
        if self.held is None:
            self.held = {}  # now that its subscription changes (see _as_held)
        snapshot, removed = self.hub.resubscribe(self, self.subscription)
        for table in removed:
            self.held.pop(table, None)
        if kind == "subscribe":
            self.outbox.offer(snapshot)  # the acknowledgement, even if it holds no table
        else:
            tables = [{"key": key, "src": src} for key, src in removed]
            self.outbox.offer(Frame(encode({"type": "unsubscribed", "tables": tables})))

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
            if self.held is not None:
                batch, after = self._as_held(batch)
                self.held.update(after)  # before the write: if it fails, the connection ends
                if not batch:
                    self._holding = False
                    continue
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
