"""A publisher's connection (an EA's DLL on /ws/dll): its frames are publishes or heartbeats.

It hears only error frames, pongs to its application pings, and the hub's own application pings
when it is quiet: never a WebSocket protocol ping, which WinHTTP breaks on while it sends.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from .config import Settings, TokenGrant
from .errors import Flooding, FrameTooLarge, ProtocolError, Superseded
from .fanout import Frame, Inbox
from .hub import Hub
from .models import Decoder, parse_json
from .session import Session, Transport
from .state import encode

PUBLISHER_OUTBOX = 64  # error frames and pings waiting to be sent; past that they are dropped


class RateLimiter:
    """Token buckets per connection, for frames and for bytes, plus how long the peer has been
    over either without pause.

    Frames over a bucket are dropped before they are parsed. A peer that stays over the limit
    (rejections less than a second apart) for `flood_seconds` is flooding and gets disconnected.
    A frame larger than the byte burst passes only when the byte bucket is full (and empties it
    below zero), so no frame the hub accepts at all is refused for its size alone.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        flood_seconds: float,
        byte_rate: float = math.inf,
        byte_burst: int = 0,
    ) -> None:
        self.rate, self.burst, self.flood_seconds = rate, burst, flood_seconds
        self.byte_rate, self.byte_burst = byte_rate, byte_burst
        self.exceeded = f"{rate:g} frames/s"  # the limit the last refused frame was over
        self._tokens = float(burst)
        self._bytes = float(byte_burst)
        self._updated = trio.current_time()
        self._streak_start = -math.inf
        self._last_reject = -math.inf
        self._last_notice = -math.inf

    def allow(self, size: int = 0) -> bool:
        """True if this frame (of `size` bytes) is within the limits; raises Flooding after a
        sustained flood."""
        now = trio.current_time()
        elapsed = now - self._updated
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self.byte_rate < math.inf:
            self._bytes = min(self.byte_burst, self._bytes + elapsed * self.byte_rate)
        self._updated = now
        bytes_ok = self.byte_rate == math.inf or self._bytes >= min(size, self.byte_burst)
        if self._tokens >= 1 and bytes_ok:
            self._tokens -= 1
            if self.byte_rate < math.inf:
                self._bytes -= size
            return True
        self.exceeded = f"{self.rate:g} frames/s" if bytes_ok else f"{self.byte_rate:g} bytes/s"
        if now - self._last_reject > 1.0:
            self._streak_start = now
        self._last_reject = now
        if now - self._streak_start >= self.flood_seconds:
            raise Flooding(f"over {self.exceeded} for {self.flood_seconds:g} s")
        return False

    def notice_due(self) -> bool:
        """Whether to tell the peer about a dropped frame: at most once a second, not per frame."""
        now = trio.current_time()
        if now - self._last_notice >= 1.0:
            self._last_notice = now
            return True
        return False


class PublisherSession(Session):
    """A DLL: each frame it sends is a publish, a ping, or a pong."""

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
        self.outbox = Inbox(PUBLISHER_OUTBOX, hub.metrics, self.role)
        self.grant = grant
        self.decoder = decoder
        self.max_frame_bytes = max_frame_bytes
        self.limiter = RateLimiter(
            settings.rate_limit,
            settings.rate_burst,
            settings.flood_seconds,
            settings.byte_rate,
            settings.byte_burst,
        )

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

    def handle(self, message: str | bytes) -> None:
        if len(message) > self.max_frame_bytes:  # Hypercorn enforces it first; this is for tests
            raise FrameTooLarge(f"{len(message)} bytes")
        if not self.limiter.allow(len(message)):
            if self.limiter.notice_due():
                limiter = self.limiter
                raise ProtocolError(  # its limits in numbers, so that a client can slow down
                    "rate_limited",
                    f"over {limiter.exceeded}",
                    limit=limiter.rate,
                    burst=limiter.burst,
                    byte_rate=limiter.byte_rate if limiter.byte_rate < math.inf else None,
                    byte_burst=limiter.byte_burst,
                )
            self.hub.metrics.rejects.labels("rate_limited").inc()
            return
        obj = parse_json(message)
        assert isinstance(message, str)  # parse_json refuses binary frames
        if not isinstance(obj, dict):
            raise ProtocolError("bad_json", "expected a JSON object")
        kind = obj.get("type", "publish")
        if kind == "publish":
            self._publish(obj, message)
        elif kind == "ping":
            self.outbox.offer(Frame(encode({"type": "pong", "ts": self.hub.now_ms()})))
        elif kind != "pong":
            raise ProtocolError("unknown_type", f"$.type: unknown message type {str(kind)[:40]!r}")

    def _publish(self, obj: dict[str, Any], text: str) -> None:
        head = self.decoder.accept(obj)
        if not self.grant.allows(head.key):
            raise ProtocolError("forbidden_key", f"$.key: this token may not publish {head.key!r}")
        self.hub.publish(self, head, obj, text)
