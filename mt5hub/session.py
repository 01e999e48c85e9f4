"""One connection's life: its tasks, and the one reason it ends.

A session runs its tasks in one nursery, so they start and stop together: the transport handing
over what the peer sends (`Transport.serve`, which calls the session's `feed` and `pong`), the
writer (`write`, the subclass's), the watchdog, and a task that notices the server stopping.
Nothing here knows about Quart or Hypercorn: a session talks to a `Transport`, which
mt5hub.server implements over Hypercorn and the tests over memory channels.

The first task to find a reason to end the session (`fail`) records it and cancels the nursery;
the session then closes the transport with that reason's close code and logs one line.
Subclasses: mt5hub.publisher.PublisherSession, mt5hub.viewer.ViewerSession.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import trio

from .config import Settings
from .errors import HubError, ProtocolError, ShuttingDown, TooSlow
from .fanout import Frame, Inbox
from .hub import Hub
from .limits import LogThrottle
from .state import encode
from .watchdog import CLOSE_GRACE, Watchdog

log = logging.getLogger("mt5hub")

REFUSAL_LOG_INTERVAL = 10.0  # a connection's refused frames: one log line per this, at most
# Closes are one line each, but per (code, address) at most one per 10 s: 5,000 sockets that
# never read, dropped together, are a few lines that say how many, not 5,000.
_CLOSE_LINES = LogThrottle()


class Peer(Protocol):
    """What a transport hands the peer's messages and pongs to, as it reads them."""

    def feed(self, message: str | bytes) -> None: ...

    def pong(self, payload: bytes) -> None: ...


class Transport(Protocol):
    """What a session needs from a WebSocket. Implementations: mt5hub.server, the tests'."""

    @property
    def peer_closed(self) -> bool:
        """True once the peer has closed the connection."""

    @property
    def progress_at(self) -> float:
        """When the socket last took part of a write (trio's clock)."""

    async def serve(self, peer: Peer) -> None:
        """Hand each message the peer sends to `peer.feed`, and the payload of each pong to
        `peer.pong`, as they are read (those that came before, first); return once the peer
        has closed the connection."""

    async def send(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        """Write these frames in order, then a WebSocket ping with this payload if one is given
        and the transport can; True if it did. May block (uncancellably) while the peer reads
        nothing."""

    async def close(self, code: int, reason: str) -> None: ...

    async def drain(self) -> None:
        """Read and drop frames until the peer's answer to our close has arrived."""

    async def stopping(self) -> None:
        """Return once the server begins a graceful shutdown (never, if it cannot tell)."""

    def abort(self) -> None:
        """Drop the connection now, so that a `send` stuck on a full socket returns."""


def error_frame(error: ProtocolError) -> Frame:
    """The error frame that answers a refused frame (the connection stays up)."""
    return Frame(encode({"type": "error", "code": error.code, **error.fields()}))


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


class Session:
    """The lifetime of one connection; subclasses say what it reads (`handle`) and writes."""

    role = "session"
    outbox: Inbox  # frames of the session's own (errors, pings); set by the subclass

    def __init__(
        self, hub: Hub, transport: Transport, settings: Settings, peer: str, timeout: float
    ) -> None:
        self.hub, self.transport, self.settings = hub, transport, settings
        self.peer, self.timeout = peer, timeout
        self.error: HubError | None = None
        self.last_seen = trio.current_time()
        self.sending_since: float | None = None  # when the write in progress began
        self._sent = trio.Event()  # set when the write in progress (if any) returns
        self._scope = trio.CancelScope()
        # A peer that sends nothing but junk cannot flood the log: its first refused frame is a
        # line, then one per REFUSAL_LOG_INTERVAL with the count of those in between.
        self._refusals = LogThrottle(REFUSAL_LOG_INTERVAL)
        metrics = hub.metrics  # resolved once: feed and the writers are hot paths
        self._frames_in = metrics.frames_in.labels(self.role)
        self._bytes_in = metrics.bytes_in.labels(self.role)
        self._frames_out = metrics.frames_out.labels(self.role)
        self._bytes_out = metrics.bytes_out.labels(self.role)

    async def run(self) -> None:
        metrics = self.hub.metrics
        metrics.connections.labels(self.role).inc()
        metrics.connections_total.labels(self.role).inc()
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._serve)
                    nursery.start_soon(self.write)
                    nursery.start_soon(Watchdog(self).run)
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
            if self.error is not None:  # else the peer closed: nothing to say
                with trio.CancelScope(shield=True):
                    await _close(self, self.error)

    def fail(self, error: HubError) -> None:
        """End the session for this reason (the first reason wins)."""
        if self.error is None:
            self.error = error
            if isinstance(error, TooSlow):
                # Its writer is stuck in a send that Hypercorn shields from cancellation: only
                # closing the socket under it frees the task (and a close frame cannot get out).
                self.transport.abort()
        self._scope.cancel()

    def ended(self) -> None:
        """Hook for subclasses: the connection is over."""

    async def write(self) -> None:
        """Send the outbox as it fills (subclasses with more to write replace this)."""
        async for frame in self.outbox.receive:
            await self.send([frame])

    async def send(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        """One write, watched by the watchdog; True if it ended with the ping."""
        # A send may not be cancellable once started (Hypercorn shields it): never start one
        # after the session was cancelled, or the watchdog may already have stopped watching.
        await trio.lowlevel.checkpoint_if_cancelled()
        self.sending_since, self._sent = trio.current_time(), trio.Event()
        try:
            pinged = await self.transport.send(frames, ping)
        finally:
            self.sending_since = None
            self._sent.set()
        self.sent_out(frames)
        return pinged

    def sent_out(self, frames: Sequence[Frame]) -> None:
        self._frames_out.inc(len(frames))
        self._bytes_out.inc(sum([len(frame.text) for frame in frames]))

    # -- what the peer sends, as the transport reads it ----------------------------------------

    async def _serve(self) -> None:
        await self.transport.serve(self)
        self._scope.cancel()  # the peer closed; writer and watchdog go with it

    def feed(self, message: str | bytes) -> None:
        """One message from the peer, handled at once, without waiting (so it never raises).

        The transport calls this as it reads each message off the socket, so every message a
        read brought in is handled in that one step, in order.
        """
        if self.error is not None:
            return  # ending: what the peer still sends is dropped
        self.last_seen = trio.current_time()
        self._frames_in.inc()
        self._bytes_in.inc(len(message))
        try:
            self.handle(message)
        except ProtocolError as exc:
            self.hub.metrics.rejects.labels(exc.code).inc()
            self._refusals.warning(
                "refused", self.peer, "%s %s: refused a frame, %s: %s",
                self.role, self.peer, exc.code, exc.detail[:200],
            )  # fmt: skip
            self.outbox.offer(error_frame(exc))
        except HubError as exc:
            self.fail(exc)
        except Exception as exc:  # our bug: this session ends, the task that read it carries on
            log.exception("%s %s: internal error", self.role, self.peer)
            self.fail(HubError(repr(exc)))

    def handle(self, message: str | bytes) -> None:
        """Subclasses: what a message from the peer means."""

    def pong(self, payload: bytes) -> None:
        """A WebSocket pong: proof of life (a viewer's also says how far it has read)."""
        self.last_seen = trio.current_time()

    # -- ending ---------------------------------------------------------------------------------

    async def _until_stopping(self) -> None:
        """Say 1001 as soon as the server starts to stop (Hypercorn would otherwise wait out
        `graceful_timeout` for connections that never end by themselves)."""
        await self.transport.stopping()
        self.fail(ShuttingDown())

    @property
    def ping_interval(self) -> float:
        return self.settings.ping_interval

    def abort(self) -> None:
        self.transport.abort()

    async def write_done(self) -> None:
        """Until the write in progress (if any) has returned."""
        await self._sent.wait()

    def ping(self) -> None:
        """An application ping (`{"type":"ping"}`), through the outbox like any frame."""
        self.outbox.offer(Frame(encode({"type": "ping", "ts": self.hub.now_ms()})))

    def write_idle_since(self) -> float | None:
        """Since when the write in progress (if any) has made no progress."""
        since = self.sending_since
        return None if since is None else max(since, self.transport.progress_at)

    def unanswered_since(self) -> float | None:
        """Since when the peer has left unanswered what proves it reads (None: nothing out)."""
        return None

    @property
    def slow_timeout(self) -> float:
        return self.settings.slow_viewer_timeout


async def _close(session: Session, error: HubError) -> None:
    """Count and log why the session ends (one line), then tell the peer with its close code."""
    session.hub.metrics.closes.labels(session.role, str(error.close_code)).inc()
    if not isinstance(error, ShuttingDown):
        _CLOSE_LINES.warning(
            str(error.close_code), session.peer, "%s %s closed %s (%s): %s",
            session.role, session.peer, error.close_code, error.reason, error,
        )  # fmt: skip
    if isinstance(error, TooSlow):
        return  # aborted already (see Session.fail)
    transport = session.transport
    with trio.move_on_after(CLOSE_GRACE) as scope:
        try:
            await transport.close(error.close_code, error.reason)
            if not isinstance(error, ShuttingDown):  # (the server ends those itself)
                # Frames the peer sent meanwhile must still be read, even a flood's: left unread
                # they fill Hypercorn's queue for this connection, its reader waits on it
                # forever, the peer's answer never gets in and the socket is never released. A
                # peer that does not answer within CLOSE_GRACE is cut off.
                await transport.drain()
        except Exception:  # the peer may be gone already; nothing left to tell it
            pass
    if scope.cancelled_caught:
        transport.abort()
