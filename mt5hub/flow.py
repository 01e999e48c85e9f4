"""Flow control by WebSocket pings, as a state machine: no I/O, no clock of its own.

A viewer's writer ends a write with a WebSocket ping when one is due; the peer answers it (RFC
6455; browsers do it themselves) only after reading everything written before it. So the age of
the ping that is out says how far behind its reading the peer is. A peer that answers within
`lag` is *prompt* and written to as updates come; one that does not is *behind* and gets one
write per answer, so that what it is sent next is the latest state, not a queue of stale frames
in kernel buffers that nothing can conflate. See docs/decisions/002-flow-control-by-pings.md.

The caller hands in the time (trio's clock) with each call; tests drive it event by event, as
h11's tests drive its state machine.

    states:  IDLE (no ping out) --ping_sent--> OUT --answered--> IDLE
             OUT is "behind" once the ping is `lag` old, or at once if the last answer took `lag`
             any state --cannot_ping--> OFF (the transport cannot ping: no flow control)
"""

from __future__ import annotations

import math

import attrs


@attrs.define
class FlowControl:
    """One viewer's ping bookkeeping. `lag` None (or inf) is no flow control at all."""

    lag: float | None
    interval: float = 0.0  # a prompt peer is pinged at most this often
    _out: tuple[int, float] | None = None  # (number, when sent) of the ping out
    _pings: int = 0
    _last_sent: float = -math.inf
    _last_rtt: float = 0.0  # how long the last answer took

    def __attrs_post_init__(self) -> None:
        if self.lag is not None and self.lag == math.inf:
            self.lag = None
        if self.lag is not None:
            self.interval = max(self.lag, self.interval)

    @property
    def enabled(self) -> bool:
        return self.lag is not None

    @property
    def out_since(self) -> float | None:
        """When the ping that is out was sent (None: none is out)."""
        return None if self._out is None else self._out[1]

    def behind(self, now: float) -> bool:
        """Whether the peer is too far behind in its reading to be written to now.

        It is when a ping is out and has been for `lag`, or when a ping is out at all and the
        last one took that long to come back.
        """
        if self._out is None or self.lag is None:
            return False
        return max(self._last_rtt, now - self._out[1]) >= self.lag

    def ping_due(self, now: float) -> bytes | None:
        """The payload of the ping a write now should end with, if any.

        None while one is out. A peer whose last answer took `lag` or longer is pinged with each
        write (one write per answer), at most every `lag`; one that keeps up, at most every
        `interval` (pings every write would cost as much as the fan-out).
        """
        if self.lag is None or self._out is not None:
            return None
        every = self.lag if self._last_rtt >= self.lag else self.interval
        if now - self._last_sent < every:
            return None
        return (self._pings + 1).to_bytes(8, "big")

    def ping_sent(self, now: float) -> None:
        """The ping `ping_due` gave was written (or is about to be: its answer may come first)."""
        self._pings += 1
        self._out = (self._pings, now)
        self._last_sent = now

    def answered(self, payload: bytes, now: float) -> bool:
        """A pong arrived; True if it answers the ping that is out (the peer has read all that
        came before it). Other pongs (a peer may send them unasked) change nothing."""
        if self._out is None or len(payload) != 8:
            return False
        if int.from_bytes(payload, "big") != self._out[0]:
            return False
        self._last_rtt = now - self._out[1]
        self._out = None
        return True

    def cannot_ping(self) -> None:
        """The transport wrote without the ping (ASGI, tests): no flow control from now on."""
        self.lag = None
        self._out = None
