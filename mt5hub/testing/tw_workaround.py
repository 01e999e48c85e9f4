"""A workaround for trio-websocket clients of the hub (the tests, attack_report, fake_dll).

trio-websocket 0.12 answers a ping that crosses its own close frame, which wsproto refuses
(LocalProtocolError out of the client's reader task: python-trio/trio-websocket#184, fix
proposed in #198). The hub pings its viewers while updates flow (flow control), so a
trio-websocket viewer that closes meanwhile meets that race: one that reads the snapshot and
leaves at once (the hub's first write carries a ping) nearly always does. RFC 6455 says a ping
after a close need not be answered; this does what #198 does.
"""

from __future__ import annotations

from typing import Any


def pong_unless_closing() -> None:
    """Patch trio-websocket (once per process) to answer pings only while the connection is open."""
    import trio_websocket._impl as impl
    from wsproto.connection import ConnectionState

    original = impl.WebSocketConnection._handle_ping_event
    if getattr(original, "_pong_unless_closing", False):
        return

    async def handle_ping(self: Any, event: Any) -> None:
        if self._wsproto.state == ConnectionState.OPEN:
            await original(self, event)

    handle_ping._pong_unless_closing = True  # type: ignore[attr-defined]
    impl.WebSocketConnection._handle_ping_event = handle_ping  # type: ignore[method-assign]
