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
    """A frame the hub did not accept: answered with an error frame, connection stays up.

    `extra` fields go into the error frame beside `code` and `detail` (e.g. the limit a frame
    went over, so that a client can adapt instead of guessing).
    """

    def __init__(self, code: str, detail: str, **extra: object) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.extra = extra

    def fields(self) -> dict[str, object]:
        """What the error frame says besides its type and code."""
        return {"detail": self.detail, **self.extra}


class OverLimit(ProtocolError):
    """A publish that would make the hub hold more than a configured limit allows (`max_tables`,
    `max_table_bytes`, `max_state_bytes`): code `over_limit`, and the detail names the limit."""

    def __init__(self, limit: str, detail: str) -> None:
        super().__init__("over_limit", f"{limit}: {detail}")
        self.limit = limit


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
