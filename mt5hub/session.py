"""One connection's life: its tasks, its heartbeat, and the one reason it ends.

A session runs a reader, a writer and a watchdog in one nursery, so they start and stop
together. Nothing here knows about Quart: a session talks to a `Transport`, which the app
implements over a Quart websocket and the tests over memory channels.

The first task to find a reason to end the session (`fail`) records it and cancels the nursery;
the session then closes the transport with that reason's close code and logs one line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from .config import Settings, TokenGrant
from .errors import (
    Flooding,
    FrameTooLarge,
    HeartbeatTimeout,
    HubError,
    ProtocolError,
    ShuttingDown,
    Superseded,
    TooSlow,
)
from .hub import Frame, Hub, Mailbox, encode
from .limits import LogThrottle
from .models import Decoder, parse_json

log = logging.getLogger("mt5hub")

WRITE_BATCH_BYTES = 1024 * 1024  # a writer sends what is pending, up to this much, in one go
PUBLISHER_OUTBOX = 64  # error frames and pings waiting to be sent; past that they are dropped
CLOSE_GRACE = 1.0  # seconds to get a close frame out before giving up on a peer
REFUSAL_LOG_INTERVAL = 10.0  # a connection's refused frames: one log line per this, at most
# Closes are one line each, but per (code, address) at most one per 10 s: 5,000 sockets that
# never read, dropped together, are a few lines that say how many, not 5,000.
_CLOSE_LINES = LogThrottle()


class Transport(Protocol):
    """What a session needs from a WebSocket. Implementations: transport.QuartTransport, tests."""

    @property
    def peer_closed(self) -> bool:
        """True once the peer has closed the connection."""

    async def receive(self) -> str | bytes | None:
        """The next frame, or None once the peer has closed."""

    def deliver_to(
        self, take: Callable[[str | bytes], None], answered: Callable[[bytes], None]
    ) -> None:
        """From now on, hand each frame to `take` as it is read, instead of to `receive`, and
        the payload of each pong to `answered`.

        Frames that arrived before are handed over first, in order. A transport that cannot
        (the tests' memory channels) keeps returning them from `receive`.
        """

    async def send(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        """Write these frames in order, then a WebSocket ping with this payload if one is given
        and the transport can; True if it did. May block (uncancellably) while the peer reads
        nothing."""

    def send_now(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        """Like `send`, but at once, without waiting, and only if the socket surely takes it
        all; False (and nothing written) otherwise."""

    async def close(self, code: int, reason: str) -> None: ...

    async def drain(self) -> None:
        """Read and drop frames until the peer's answer to our close has arrived."""

    async def stopping(self) -> None:
        """Return once the server begins a graceful shutdown (never, if it cannot tell)."""

    def abort(self) -> None:
        """Drop the connection now, so that a `send` stuck on a full socket returns."""


class RateLimiter:
    """A token bucket per connection, plus how long the peer has been over it without pause.

    Frames over the bucket are dropped. A peer that stays over the limit (rejections less than a
    second apart) for `flood_seconds` is flooding and gets disconnected.
    """

    def __init__(self, rate: float, burst: int, flood_seconds: float) -> None:
        self.rate, self.burst, self.flood_seconds = rate, burst, flood_seconds
        self._tokens = float(burst)
        self._updated = trio.current_time()
        self._streak_start = -math.inf
        self._last_reject = -math.inf
        self._last_notice = -math.inf

    def allow(self) -> bool:
        """True if this frame is within the limit; raises Flooding after a sustained flood."""
        now = trio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if now - self._last_reject > 1.0:
            self._streak_start = now
        self._last_reject = now
        if now - self._streak_start >= self.flood_seconds:
            raise Flooding(f"over {self.rate:g} frames/s for {self.flood_seconds:g} s")
        return False

    def notice_due(self) -> bool:
        """Whether to tell the peer about a dropped frame: at most once a second, not per frame."""
        now = trio.current_time()
        if now - self._last_notice >= 1.0:
            self._last_notice = now
            return True
        return False


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


class Session:
    role = "session"
    outbox: Mailbox  # what the writer sends; set by the subclass before run()

    def __init__(
        self, hub: Hub, transport: Transport, settings: Settings, peer: str, timeout: float
    ) -> None:
        self.hub = hub
        self.transport = transport
        self.settings = settings
        self.peer = peer
        self.timeout = timeout
        self.error: HubError | None = None
        self.last_seen = trio.current_time()
        self._sending_since: float | None = None
        self._sent = trio.Event()  # set when the send in progress (if any) returns
        self._scope = trio.CancelScope()
        # A peer that sends nothing but junk cannot flood the log: its first refused frame is a
        # line, then one per REFUSAL_LOG_INTERVAL with the count of those in between.
        self._refusal_lines = LogThrottle(REFUSAL_LOG_INTERVAL)
        self._frames_in = hub.metrics.frames_in.labels(self.role)
        self._bytes_in = hub.metrics.bytes_in.labels(self.role)
        self._frames_out = hub.metrics.frames_out.labels(self.role)  # resolved once: hot path
        self._bytes_out = hub.metrics.bytes_out.labels(self.role)
        # Flow control by WebSocket pings (see _write); None: none (publishers, HTTP/2).
        self.lag: float | None = None
        self._ping: tuple[int, float] | None = None  # (number, when sent) of the ping out
        self._pings = 0
        self._last_ping_at = -math.inf
        self._lag_interval = 0.0  # pings go at most this often while the peer keeps up
        self._last_rtt = 0.0  # how long the last ping took to come back
        self._answers = trio.lowlevel.ParkingLot()

    async def run(self) -> None:
        metrics = self.hub.metrics
        metrics.connections.labels(self.role).inc()
        metrics.connections_total.labels(self.role).inc()
        self.transport.deliver_to(self.take, self.answered)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read)
                    nursery.start_soon(self._write)
                    nursery.start_soon(self._watch)
                    nursery.start_soon(self._until_stopping)
        except BaseException as exc:
            # Cancelled from outside: the server is stopping (when the peer leaves, the framework
            # cancels us too, but then there is nobody to tell). Anything else is our bug.
            if self.error is None and not self.transport.peer_closed:
                if _only_cancelled(exc):
                    self.error = ShuttingDown()
                else:
                    log.exception("%s %s: internal error", self.role, self.peer)
                    self.error = HubError(repr(exc))
            raise
        finally:
            metrics.connections.labels(self.role).dec()
            self.ended()
            with trio.CancelScope(shield=True):
                await self._close()

    def fail(self, error: HubError) -> None:
        """End the session for this reason (the first reason wins)."""
        if self.error is None:
            self.error = error
            if isinstance(error, TooSlow):
                # Its writer is stuck in a send that Hypercorn shields from cancellation: only
                # closing the socket under it frees the task (and a close frame cannot get out).
                self.transport.abort()
        self._scope.cancel()

    async def _close(self) -> None:
        error = self.error
        if error is None:
            return  # the peer closed: nothing to say
        self.hub.metrics.closes.labels(self.role, str(error.close_code)).inc()
        if not isinstance(error, ShuttingDown):
            _CLOSE_LINES.warning(
                str(error.close_code),
                self.peer,
                "%s %s closed %s (%s): %s",
                self.role,
                self.peer,
                error.close_code,
                error.reason,
                error,
            )
        if isinstance(error, TooSlow):
            return  # aborted already (see fail)
        with trio.move_on_after(CLOSE_GRACE) as scope:
            try:
                await self.transport.close(error.close_code, error.reason)
                if not isinstance(error, ShuttingDown):  # (the server ends those itself)
                    # Frames the peer sent meanwhile must still be read, even a flood's: left
                    # unread they fill Hypercorn's queue for this connection, its reader waits
                    # on it forever, the peer's answer never gets in and the socket is never
                    # released. A peer that does not answer within CLOSE_GRACE is cut off.
                    await self.transport.drain()
            except Exception:  # the peer may be gone already; nothing left to tell it
                pass
        if scope.cancelled_caught:
            self.transport.abort()

    def ended(self) -> None:
        """Hook for subclasses: the connection is over."""

    async def _until_stopping(self) -> None:
        """Say 1001 as soon as the server starts to stop.

        Hypercorn waits `graceful_timeout` for connections to end by themselves, then cancels
        them; a WebSocket never ends by itself, so every shutdown would take the whole grace
        period, and clients would learn of it last.
        """
        await self.transport.stopping()
        self.fail(ShuttingDown())

    async def _read(self) -> None:
        """Frames that come through the framework (tests; Hypercorn when its internals changed).

        Normally the transport hands each frame to `take` from Hypercorn's reading task and this
        only waits: Quart then cancels the session when the peer leaves.
        """
        while self.error is None:
            frame = await self.transport.receive()
            if frame is None:
                self._scope.cancel()  # the peer closed; writer and watchdog go with it
                return
            self.take(frame)

    def take(self, frame: str | bytes) -> None:
        """One frame from the peer, handled at once, without waiting (so it never raises).

        Called by the transport as each message is read off the socket: every frame a read
        brought in is handled in that one step, instead of one frame per turn of the scheduler
        through Hypercorn's and Quart's queues. Under load that made a publisher's frames wait
        in its socket for seconds, unconflated, while every viewer was served between two of
        them.
        """
        if self.error is not None:
            return  # ending: what the peer still sends is dropped
        self.last_seen = trio.current_time()
        self._frames_in.inc()
        self._bytes_in.inc(len(frame))
        try:
            self.handle(frame)
        except ProtocolError as exc:
            self.hub.metrics.rejects.labels(exc.code).inc()
            self._log_refusal(exc)
            error = {"type": "error", "code": exc.code, "detail": exc.detail, **exc.fields}
            self.outbox.put(Frame(encode(error)))
        except HubError as exc:
            self.fail(exc)
        except Exception as exc:  # our bug: this session ends, the task that read it carries on
            log.exception("%s %s: internal error", self.role, self.peer)
            self.fail(HubError(repr(exc)))

    def handle(self, frame: str | bytes) -> None:
        raise NotImplementedError

    def _log_refusal(self, exc: ProtocolError) -> None:
        self._refusal_lines.warning(
            "refused",
            self.peer,
            "%s %s: refused a frame, %s: %s",
            self.role,
            self.peer,
            exc.code,
            exc.detail[:200],
        )

    def answered(self, payload: bytes) -> None:
        """A pong: the peer has read everything written before the ping it answers."""
        if len(payload) != 8:
            return  # not ours (a peer may send pongs unasked, as a heartbeat)
        now = self.last_seen = trio.current_time()
        if self._ping is not None and int.from_bytes(payload, "big") == self._ping[0]:
            self._last_rtt = now - self._ping[1]
            self._ping = None
            self._answers.unpark_all()

    def _behind(self) -> bool:
        """Whether the peer is too far behind in its reading to be written to now.

        It is when a ping is out and has been for `lag` seconds, or when a ping is out at all and
        the last one took that long to come back: a peer that answers promptly is written to as
        updates come, one that does not gets one write per answer.
        """
        if self._ping is None or self.lag is None:
            return False
        return max(self._last_rtt, trio.current_time() - self._ping[1]) >= self.lag

    async def _write(self) -> None:
        """Send what the outbox holds, a batch at a time, at the pace the peer reads it.

        A write ends with a WebSocket ping when one is due (see `_ping_due`); the peer answers
        it (RFC 6455; browsers do it themselves) only after reading everything written before
        it. While the peer is behind (see `_behind`) the
        writer waits, and newer updates replace older ones in the outbox: a viewer that reads
        slowly gets fewer, fresher frames instead of a queue of stale ones in the kernel's
        buffers (its own and ours) that nothing can conflate. Without this, a viewer behind by
        500 KB of compressed updates was seconds behind. A prompt viewer is written to at once
        and answers a ping every `_lag_interval` seconds, not one per write.
        """
        while True:
            # Behind: wait for the pong first, not for mail, so that every update put meanwhile
            # does not wake this task only for it to park again (once per round per viewer).
            while self._behind():
                with self.hub.away(self.outbox):  # what it misses meanwhile: see Hub.away
                    await self._answers.park()
            await self.outbox.wait()
            if self._behind():
                continue  # the ping grew old while there was nothing to send
            # Everything pending goes out in one write: a viewer that fell behind catches up in
            # fewer, larger sends instead of paying the per-send cost for every frame.
            batch: list[Frame] = []
            size = 0
            while size < WRITE_BATCH_BYTES and (frame := self.outbox.get_nowait()) is not None:
                batch.append(frame)
                size += len(frame.text)
            # A send may not be cancellable once started (Hypercorn shields it): never start one
            # after the session was cancelled, or the watchdog may already have stopped watching.
            await trio.lowlevel.checkpoint_if_cancelled()
            self._sending_since, self._sent = trio.current_time(), trio.Event()
            ping = self._ping_due(self._sending_since)
            if ping is not None:  # counted before the write: the pong may come back first
                self._pinged(self._sending_since)
            try:
                pinged = await self.transport.send(batch, ping)
            finally:
                self._sending_since = None
                self._sent.set()
            if ping is not None and not pinged:  # the transport cannot ping (HTTP/2, tests)
                self.lag = None
                self._ping = None
            self._sent_out(batch, size)

    def _ping_due(self, now: float) -> bytes | None:
        """The payload of the ping a write now should end with, if any (see _write).

        None while one is out. A peer whose last answer took `lag` or longer is pinged with each
        write (so that it gets one write per answer), at most every `lag`; one that keeps up, at
        most every `_lag_interval`: at 50 plain viewers, pings every 50 ms cost the hub as much
        CPU as the fan-out, and their answers, coming in all at once, held up updates.
        """
        if self.lag is None or self._ping is not None:
            return None
        every = self.lag if self._last_rtt >= self.lag else self._lag_interval
        if now - self._last_ping_at < every:
            return None
        return (self._pings + 1).to_bytes(8, "big")

    def _pinged(self, now: float) -> None:
        self._pings += 1
        self._ping = (self._pings, now)
        self._last_ping_at = now

    def _sent_out(self, batch: Sequence[Frame], size: int) -> None:
        self._frames_out.inc(len(batch))
        self._bytes_out.inc(size)
        now = trio.current_time()
        for frame in batch:
            if frame.received is not None:
                self.hub.metrics.latency.observe(now - frame.received)

    def express(self, frame: Frame) -> bool:
        """Write this frame now, from the task that has it (a publisher's), if that is safe.

        It is when the writer is idle (its outbox was empty: see Mailbox.put), the peer is not
        behind, and the socket takes the frame whole at once. Then a prompt viewer costs the
        fan-out one write, not a wake-up and a turn of its writer task per update (at 50 plain
        viewers: p50 latency 20-26 -> 14-16 ms). Otherwise the frame goes to the outbox, and
        the writer sends it.
        """
        if self._sending_since is not None or self.error is not None or self._behind():
            return False
        now = trio.current_time()
        ping = self._ping_due(now)
        try:
            if not self.transport.send_now((frame,), ping):
                return False
        except Exception as exc:  # our bug: this viewer ends, the publisher's task carries on
            log.exception("%s %s: internal error", self.role, self.peer)
            self.fail(HubError(repr(exc)))
            return True
        if ping is not None:
            self._pinged(now)
        self._sent_out((frame,), len(frame.text))
        return True

    async def _watch(self) -> None:
        """Ping a quiet peer, drop a silent one, and drop one whose socket stopped taking data.

        Pings go through the outbox, so a peer that does not read cannot block this task. When
        the session is cancelled (shutdown) while the writer is stuck in a send that cannot be
        cancelled, the watchdog gives it CLOSE_GRACE and then aborts the socket, so that the
        session's nursery can always exit.
        """
        try:
            await self._watch_loop()
        finally:
            if self._sending_since is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
                    await self._sent.wait()
                if not self._sent.is_set():
                    self.transport.abort()

    async def _watch_loop(self) -> None:
        pinged_at = -math.inf
        interval = self.settings.ping_interval
        stuck_after = self.settings.slow_viewer_timeout
        while True:
            now = trio.current_time()
            quiet = now - self.last_seen
            if quiet >= self.timeout:
                self.fail(HeartbeatTimeout(f"no frame for {quiet:.0f} s"))
                return
            if quiet >= interval and now - pinged_at >= interval:
                self.outbox.put(Frame(encode({"type": "ping", "ts": self.hub.now_ms()})))
                pinged_at = now
            if self._sending_since is not None and now - self._sending_since >= stuck_after:
                self.fail(TooSlow(f"socket took nothing for {now - self._sending_since:.0f} s"))
                return
            if self._ping is not None and now - self._ping[1] >= stuck_after:
                waited = now - self._ping[1]
                self.fail(TooSlow(f"read nothing it was sent for {waited:.0f} s"))
                return
            wake = [self.last_seen + self.timeout, max(self.last_seen, pinged_at) + interval]
            if self._sending_since is not None:
                wake.append(self._sending_since + stuck_after)
            elif self._ping is not None:
                wake.append(self._ping[1] + stuck_after)
            else:
                wake.append(now + stuck_after)  # a send may start meanwhile: look again by then
            await trio.sleep_until(min(wake))


class PublisherSession(Session):
    """A DLL: its frames are publishes (or heartbeats); it hears only errors and pings."""

    role = "publisher"

    def __init__(
        self,
        hub: Hub,
        transport: Transport,
        settings: Settings,
        peer: str,
        grant: TokenGrant,
        decoder: Decoder,
        max_frame_bytes: int,
    ) -> None:
        super().__init__(hub, transport, settings, peer, settings.publisher_timeout)
        self.outbox = Mailbox(PUBLISHER_OUTBOX, hub.metrics, self.role)
        self.grant = grant
        self.decoder = decoder
        self.max_frame_bytes = max_frame_bytes
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst, settings.flood_seconds)

    async def run(self) -> None:
        self.hub.publishers += 1
        try:
            await super().run()
        finally:
            self.hub.publishers -= 1

    def ended(self) -> None:
        self.hub.publisher_gone(self)

    def superseded(self, client_id: str) -> None:
        self.fail(Superseded(f"clientId {client_id!r} connected again"))

    def handle(self, frame: str | bytes) -> None:
        if len(frame) > self.max_frame_bytes:  # Hypercorn enforces it first; this is for tests
            raise FrameTooLarge(f"{len(frame)} bytes")
        if not self.limiter.allow():
            if self.limiter.notice_due():
                raise ProtocolError(
                    "rate_limited",
                    f"over {self.settings.rate_limit:g} frames/s",
                    limit=self.settings.rate_limit,  # so that a client can slow down to it
                    burst=self.settings.rate_burst,
                )
            self.hub.metrics.rejects.labels("rate_limited").inc()
            return
        obj = parse_json(frame)
        assert isinstance(frame, str)  # parse_json refuses binary frames
        if not isinstance(obj, dict):
            raise ProtocolError("bad_json", "expected a JSON object")
        kind = obj.get("type", "publish")
        if kind == "publish":
            self._publish(obj, frame)
        elif kind == "ping":
            self.outbox.put(Frame(encode({"type": "pong", "ts": self.hub.now_ms()})))
        elif kind != "pong":
            raise ProtocolError("unknown_type", f"$.type: unknown message type {str(kind)[:40]!r}")

    def _publish(self, obj: dict[str, Any], text: str) -> None:
        head = self.decoder.accept(obj)
        if not self.grant.allows(head.key):
            raise ProtocolError("forbidden_key", f"$.key: this token may not publish {head.key!r}")
        self.hub.publish(self, head, obj, text)


class ViewerSession(Session):
    """A dashboard: it hears the snapshot, then every update; what it says only proves it lives."""

    role = "viewer"

    def __init__(self, hub: Hub, transport: Transport, settings: Settings, peer: str) -> None:
        super().__init__(hub, transport, settings, peer, settings.viewer_timeout)
        lag = settings.viewer_lag
        self.lag = lag if lag < math.inf else None
        self._lag_interval = max(lag, settings.viewer_lag_interval)

    async def run(self) -> None:
        with self.hub.viewer() as self.outbox:
            self.outbox.express = self.express
            await super().run()

    def handle(self, frame: str | bytes) -> None:
        pass  # any frame (normally {"type":"pong"}) refreshed last_seen; there is nothing else
