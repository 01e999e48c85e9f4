"""The few ways a connection can go wrong, and the close code each one maps to.

Raise these anywhere in a connection's tasks; the session turns them into one close code and
one log line. `ProtocolError` is the exception: it becomes an error frame and the connection
stays up.
"""

from __future__ import annotations


class HubError(Exception):
    """Base of every error the hub reports to a peer."""

    close_code: int = 1011
    reason: str = "internal error"


class ProtocolError(HubError):
    """A frame the hub did not accept: answered with an error frame, connection stays up."""

    def __init__(self, code: str, detail: str, **fields: float) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.fields = fields  # numbers a client can act on, sent in the error frame


class FrameTooLarge(HubError):
    close_code = 1009
    reason = "frame too large"


class Flooding(HubError):
    close_code = 1008
    reason = "rate limit exceeded"


class HeartbeatTimeout(HubError):
    close_code = 4008
    reason = "heartbeat timeout"


class TooSlow(HubError):
    close_code = 4009
    reason = "viewer too slow"


class Superseded(HubError):
    """A newer connection with the same clientId took over this one's tables (a reconnect)."""

    close_code = 4010
    reason = "replaced by a newer connection"


class ShuttingDown(HubError):
    close_code = 1001
    reason = "hub shutting down"


class ConfigError(Exception):
    """hub.toml or the environment asks for something the hub will not do."""
