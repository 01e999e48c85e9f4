"""The hub's Transport over a Quart websocket, and the one thing Quart cannot do: abort.

Hypercorn writes to the socket inside a shielded cancel scope, so a viewer whose TCP window stays
shut blocks `websocket.send` forever and no timeout can interrupt it; a close frame would queue
behind it too. The only way out is to close the socket under it. ASGI offers no handle for that,
so `TrackConnections` (an ASGI middleware) keeps each websocket's ASGI `send`, and `abort` follows
it to the trio stream Hypercorn's TCPServer owns. The walk depends on Hypercorn's internals (pinned
in pyproject.toml); tests/test_hub_server.py proves it against a real stalled socket.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart import Websocket

log = logging.getLogger("mt5hub")

LINK = "mt5hub.link"  # key of the Link in the ASGI scope


class Link:
    """What the middleware learned about one websocket connection."""

    def __init__(self, send: Callable[..., Awaitable[None]]) -> None:
        self.asgi_send = send
        self.peer_closed = False

    def abort(self) -> bool:
        """Close the TCP socket with a reset, waking a send stuck on it. False if not found."""
        stream = _find_trio_stream(self.asgi_send)
        if stream is None:
            log.error("cannot abort a stuck connection: Hypercorn's internals changed")
            return False
        sock = (
            stream.transport_stream.socket if isinstance(stream, trio.SSLStream) else stream.socket
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed
        sock.close()  # trio wakes any task blocked on this socket with ClosedResourceError
        return True


def _find_trio_stream(send: Any) -> trio.SocketStream | trio.SSLStream[Any] | None:
    """Follow WSStream -> H11/H2 protocol -> TCPServer along their `send` callables."""
    owner = getattr(send, "__self__", None)
    for _ in range(6):
        if owner is None:
            return None
        stream = getattr(owner, "stream", None)
        if isinstance(stream, trio.SocketStream | trio.SSLStream):
            return stream
        owner = getattr(getattr(owner, "send", None), "__self__", None)
    return None


class TrackConnections:
    """ASGI middleware: a Link per websocket, and a note when the peer disconnects."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        link = scope[LINK] = Link(send)

        async def tracked_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "websocket.disconnect":
                link.peer_closed = True
            return message

        await self.app(scope, tracked_receive, send)


class QuartTransport:
    """session.Transport over Quart's websocket proxy."""

    def __init__(self, websocket: Websocket) -> None:
        self._ws = websocket
        self._link: Link = websocket.scope[LINK]  # type: ignore[literal-required]

    @property
    def peer_closed(self) -> bool:
        return self._link.peer_closed

    async def receive(self) -> str | bytes | None:
        # When the peer leaves, quart-trio cancels the handler instead of returning.
        return await self._ws.receive()

    async def send(self, text: str) -> None:
        # Straight to Hypercorn's ASGI send: the socket is accepted already, and the hot path of a
        # fan-out is worth not going through Quart's two wrapper layers (~6% of the hub's CPU).
        await self._link.asgi_send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)

    def abort(self) -> None:
        self._link.abort()
