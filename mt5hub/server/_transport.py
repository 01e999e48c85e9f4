"""The hub's Transport over a Quart websocket, and the two things ASGI cannot do: batch, abort.

Hypercorn writes to the socket inside a shielded cancel scope, so a viewer whose TCP window stays
shut blocks a send forever and no timeout can interrupt it; a close frame would queue behind it
too. The only way out is to close the socket under it. ASGI offers no handle for that, so
`TrackConnections` (an ASGI middleware) keeps each websocket's ASGI `send`, and `abort` follows it
to the trio stream Hypercorn's TCPServer owns.

The same stream makes the fan-out cheap. Through ASGI every message costs a trip through
Hypercorn's WSStream, wsproto and the TCPServer's lock, per viewer, and with permessage-deflate
(which browsers always offer and Hypercorn always accepts) a compression per viewer with its own
zlib context. On an HTTP/1.1
WebSocket a server's data frame is the same for every viewer: a header and the UTF-8 payload, or,
where deflate was negotiated, the payload compressed on its own (a message that refers to no
earlier one is valid whether or not the peer expects context takeover). So each update's frame is
made once (`wire`) and a viewer's pending frames go out in one `send_all`, under the TCPServer's
own send lock so that nothing interleaves with Hypercorn's control frames (over TLS, the
records are made here too: see `_write_all`). With the adapter off (`asgi_only`), ASGI.
A write may end with a WebSocket ping (flow control, see mt5hub.flow); the pongs, like the
peer's messages, come back through the Link (`Link.pong`, `Link.feed`), called by
mt5hub.server._hardening as Hypercorn reads them.

The walk depends on Hypercorn's and trio's internals (pinned in pyproject.toml). Real sockets
prove both paths, over WS and WSS: tests/test_hub_server.py the direct one (its clients offer no
compression, like the DLL), tests/test_dashboard_browser.py and a wsproto client the compressed
one (Chromium offers permessage-deflate).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import trio
from hypercorn.events import Closed, RawData
from quart import Websocket
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from ..fanout import Frame
from ..metrics import Metrics
from ..session import Peer

log = logging.getLogger("mt5hub")

LINK = "mt5hub.link"  # key of the Link in the ASGI scope


class _Adapter:
    """Whether mt5hub.server.install put the adapter in place: then messages come through each
    connection's Link and frames go to its socket directly; otherwise ASGI alone."""

    direct = False


def direct() -> bool:
    return _Adapter.direct


EARLY_FRAMES = 64  # frames kept for a session that has not started yet; more are dropped


_MAX_RECV = (
    2**16
)  # what Hypercorn reads at once  # at most, per record: header, tag, padding (TLS 1.2 or 1.3)
_FRAMER = FrameProtocol(client=False, extensions=[])  # stateless for whole, unmasked messages
_DEFLATERS: dict[int, FrameProtocol] = {}


def _deflater(bits: int) -> FrameProtocol:
    """A framer that compresses each message on its own, in a window of 2**bits bytes."""
    if bits not in _DEFLATERS:
        extension = PerMessageDeflate()
        extension.accept(
            f"permessage-deflate; server_no_context_takeover; server_max_window_bits={bits}"
        )
        _DEFLATERS[bits] = FrameProtocol(client=False, extensions=[extension])
    return _DEFLATERS[bits]


def wire(frame: Frame, deflate_bits: int | None = None) -> bytes:
    """The WebSocket frame for this message, made once and shared by every viewer."""
    if deflate_bits is None:
        if frame.wire is None:
            frame.wire = bytes(_FRAMER.send_data(frame.text))
        return frame.wire
    if frame.deflated is None:
        frame.deflated = {}
    data = frame.deflated.get(deflate_bits)
    if data is None:
        data = frame.deflated[deflate_bits] = bytes(_deflater(deflate_bits).send_data(frame.text))
    return data


class Link:
    """What the adapter knows about one websocket connection, and where its messages go.

    mt5hub.server._hardening calls `feed` with each message and `pong` with each pong's payload
    as Hypercorn reads them; they go to the session `attach`ed (kept until then, so that none
    overtakes another).
    """

    def __init__(self, send: Callable[..., Awaitable[None]], raw_ok: bool) -> None:
        self.asgi_send = send
        self.peer_closed = False
        self.disconnected = trio.Event()  # set with peer_closed, by the middleware
        self.direct = raw_ok  # messages come through `feed`, frames go to the socket
        self._raw_ok = raw_ok
        self._server: Any = None
        self.deflate_bits: int | None = None  # permessage-deflate's window, if negotiated
        self._peer: Peer | None = None
        self._early: list[str | bytes] = []

    def attach(self, peer: Peer) -> None:
        """From now on `peer` gets every message and pong; what came before, first."""
        early, self._early = self._early, []
        self._peer = peer
        for message in early:
            peer.feed(message)

    def feed(self, message: str | bytes) -> None:
        if self._peer is not None:
            self._peer.feed(message)
        elif len(self._early) < EARLY_FRAMES:
            self._early.append(message)

    def pong(self, payload: bytes) -> None:
        if self._peer is not None:
            self._peer.pong(payload)

    def raw_server(self) -> Any:
        """Hypercorn's TCPServer of this connection, if frames may be written to it directly."""
        if self._raw_ok and self._server is None:
            self._server = _find_tcp_server(self.asgi_send)
            self._raw_ok = self._server is not None and hasattr(self._server, "send_lock")
            if self._raw_ok:
                self._raw_ok, self.deflate_bits = _negotiated_deflate(self.asgi_send)
            if not self._raw_ok:  # install() checked for these: never silently slow
                log.error("a connection's socket was not found: frames go through ASGI")
        return self._server if self._raw_ok else None

    async def server_stopping(self) -> None:
        """Wait for Hypercorn's `terminated` event: set when its graceful shutdown begins."""
        context = getattr(_find_tcp_server(self.asgi_send), "context", None)
        terminated = getattr(context, "terminated", None)
        if terminated is None:
            await trio.sleep_forever()  # cannot tell: Hypercorn cancels us at the end of grace
        await terminated.wait()

    def _socket(self) -> trio.socket.SocketType | None:
        server = _find_tcp_server(self.asgi_send)
        if server is None:
            return None
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = server.stream
        if isinstance(stream, trio.SocketStream):
            return stream.socket
        return stream.transport_stream.socket

    def limit_send_buffer(self, size: int) -> None:
        """Cap the kernel's send buffer, a FIFO the hub cannot conflate.

        Left to autotuning it grows to megabytes, and a viewer that reads slowly then receives
        seconds-old frames in order. Capped, backpressure reaches the mailbox early, where
        newer updates replace older ones of the same table.
        """
        sock = self._socket()
        if sock is not None and size > 0:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def abort(self) -> bool:
        """Close the TCP socket with a reset, waking a send stuck on it. False if not found."""
        sock = self._socket()
        if sock is None:
            log.error("cannot abort a stuck connection: Hypercorn's internals changed")
            return False
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already closed
        sock.close()  # trio wakes any task blocked on this socket with ClosedResourceError
        return True


def _find_tcp_server(send: Any) -> Any:
    """Follow WSStream -> H11/H2 protocol -> TCPServer along their `send` callables."""
    owner = getattr(send, "__self__", None)
    for _ in range(6):
        if owner is None:
            return None
        if isinstance(getattr(owner, "stream", None), trio.SocketStream | trio.SSLStream):
            return owner
        owner = getattr(getattr(owner, "send", None), "__self__", None)
    return None


def _negotiated_deflate(send: Any) -> tuple[bool, int | None]:
    """(usable, window bits): what Hypercorn's WSStream agreed on for permessage-deflate.

    Not usable if the walk finds something unexpected (a Hypercorn change): then ASGI it is.
    """
    connection = getattr(getattr(send, "__self__", None), "connection", None)
    extensions = getattr(getattr(connection, "_proto", None), "extensions", None)
    if not isinstance(extensions, list):
        return False, None
    for extension in extensions:
        if isinstance(extension, PerMessageDeflate) and extension.enabled():
            return True, max(9, int(extension.server_max_window_bits))
    return not extensions, None


class TrackConnections:
    """ASGI middleware: a Link per websocket, and a note when the peer disconnects."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        link = scope[LINK] = Link(send, direct() and scope.get("http_version") == "1.1")

        async def tracked_receive() -> dict[str, Any]:
            message: dict[str, Any] = await receive()
            if message["type"] == "websocket.disconnect":
                link.peer_closed = True
                link.disconnected.set()
            return message

        await self.app(scope, tracked_receive, send)


def _tls_ready(stream: trio.SSLStream[Any]) -> bool:
    """Whether records may be made and written for this TLS stream here and now, bypassing
    SSLStream.send_all: its handshake is over, it is sound, and nothing of it is in flight (no
    task sending through it, no bytes made and not yet written). trio runs nothing else between
    this check and a write that does not wait. (trio's private attributes: pinned, and tested
    in tests/test_server_adapter.py.)"""
    return (
        stream._state.name == "OK"
        and stream._handshook.done
        and stream._delayed_outgoing is None
        and not stream._inner_send_lock.locked()
        and not stream._outer_send_conflict_detector._held
        and not stream._outgoing.pending
    )


def _tls_receive_ready(stream: trio.SSLStream[Any]) -> bool:
    """Whether a read may bypass SSLStream.receive_some: the handshake is over, the stream is
    sound and nobody else is reading it (Hypercorn's reader is its only reader)."""
    return (
        stream._state.name == "OK"
        and stream._handshook.done
        and not stream._outer_recv_conflict_detector._held
        and not stream._inner_recv_lock.locked()
    )


async def _tls_receive(stream: trio.SSLStream[Any], max_bytes: int) -> bytes | bytearray:
    """SSLStream.receive_some, but without its retry loop on the common path: decrypt what the
    socket brought in, read more from the socket when a record is not whole yet. Anything
    unusual (an error, the end of the stream, a renegotiation) is left to trio's own path.

    A read may make TLS bytes to send (an answer to a key update): they go out under the
    stream's own send lock, after whatever a writer is sending (see _write_all).
    """
    if not _tls_receive_ready(stream):
        return await stream.receive_some(max_bytes)
    ssl_object = stream._ssl_object
    while True:
        try:
            data = ssl_object.read(max_bytes)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:  # trio's path raises (or ends) as it should
            return await stream.receive_some(max_bytes)
        else:
            if not data:  # the peer's close_notify: trio's path says what that means
                return await stream.receive_some(max_bytes)
            if stream._outgoing.pending:
                async with stream._inner_send_lock:
                    if stream._outgoing.pending:
                        await stream.transport_stream.send_all(stream._outgoing.read())
            return data
        raw = await stream.transport_stream.receive_some(max_bytes)
        if not raw:  # end of the TCP stream: trio's path tells a clean end from a cut one
            return await stream.receive_some(max_bytes)
        stream._incoming.write(raw)


async def read_data(server: Any) -> None:
    """Hypercorn's TCPServer._read_data, but TLS read through `_tls_receive`, and no cancel
    scope per read when there is no `read_timeout` (Hypercorn's default)."""
    stream = server.stream
    timeout = server.config.read_timeout
    receive: Callable[[], Awaitable[bytes | bytearray]]
    if isinstance(stream, trio.SocketStream):
        receive = functools.partial(stream.receive_some, _MAX_RECV)
    else:
        receive = functools.partial(_tls_receive, stream, _MAX_RECV)
    while True:
        try:
            if timeout:
                with trio.fail_after(timeout):
                    data = await receive()
            else:
                data = await receive()
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
            break
        await server.protocol.handle(RawData(bytes(data)))
        if data == b"":
            break
    await server.protocol.handle(Closed())


def _encrypt(stream: trio.SSLStream[Any], data: bytes | memoryview) -> bytes:
    """The TLS records for `data` (memory BIOs take all of it at once)."""
    stream._ssl_object.write(data)
    records: bytes = stream._outgoing.read()
    return records


WRITE_CHUNK = 256 * 1024  # a write goes out this much at a time: progress is seen, memory bounded
JOIN_BELOW = 64 * 1024  # frames of a write smaller than this in all go in one buffer (one syscall)


async def _write_all(
    stream: trio.SocketStream | trio.SSLStream[Any],
    pieces: Sequence[bytes],
    progress: Callable[[], None],
) -> None:
    """Write these buffers in order, WRITE_CHUNK at a time, calling `progress` after each chunk
    the socket took: a large write (a snapshot) is judged by its progress, never copied whole
    (over TLS, its records are made one chunk at a time).

    A chunk the socket buffer takes whole costs one syscall and no more: trio's SocketStream
    path (conflict detector, error translation, a trip through the scheduler) and SSLStream's
    (its retry loop around the same) cost more than the write. Skipping the schedule point is
    safe here: the writer's next receive waits whenever its outbox is empty, and a batch empties
    it. Over TLS the records are made here, holding the stream's own send lock until they are
    all out, so that nothing it sends by itself (a TLS alert, say) can come between them.
    """
    # (isinstance(x, trio.SocketStream) is quick for a SocketStream: an exact type; the ABC's
    # own check, which isinstance(x, trio.SSLStream) would make for one, is not)
    if isinstance(stream, trio.SocketStream):
        for piece in pieces:
            if len(piece) <= WRITE_CHUNK:  # nearly always: no generator
                await _write_socket(stream, piece)
                progress()
                continue
            for chunk in _chunks(piece):
                await _write_socket(stream, chunk)
                progress()
        return
    if not _tls_ready(stream):
        for piece in pieces:
            for chunk in _chunks(piece):
                await stream.send_all(chunk)
                progress()
        return
    lock = stream._inner_send_lock
    lock.acquire_nowait()  # free: _tls_ready
    try:
        for piece in pieces:
            for chunk in _chunks(piece):
                try:
                    records = _encrypt(stream, chunk)
                except ssl.SSLError as exc:  # e.g. a renegotiation asked for: not for us
                    raise trio.BrokenResourceError from exc
                await _write_socket(stream.transport_stream, records)
                progress()
    finally:
        lock.release()


def _chunks(piece: bytes) -> Iterator[bytes | memoryview]:
    if len(piece) <= WRITE_CHUNK:
        yield piece
        return
    view = memoryview(piece)
    for start in range(0, len(piece), WRITE_CHUNK):
        yield view[start : start + WRITE_CHUNK]


async def _write_socket(stream: trio.SocketStream, data: bytes | memoryview) -> None:
    sent = 0
    try:
        sent = os.write(stream.socket.fileno(), data)  # the socket is non-blocking
    except BlockingIOError:
        pass
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])


class QuartTransport:
    """session.Transport over Quart's websocket proxy."""

    def __init__(self, websocket: Websocket, metrics: Metrics) -> None:
        self._ws = websocket
        self._link: Link = websocket.scope[LINK]  # type: ignore[literal-required]
        self._compressions = metrics.compressions
        self.progress_at = trio.current_time()  # when the socket last took part of a write

    def _progressed(self) -> None:
        self.progress_at = trio.current_time()

    @property
    def peer_closed(self) -> bool:
        return self._link.peer_closed

    async def serve(self, peer: Peer) -> None:
        """Messages and pongs to `peer` as Hypercorn reads them (through the Link), until the
        peer leaves; with the adapter off (ASGI alone), messages one at a time from Quart."""
        if not self._link.direct:
            while True:  # ends when Quart cancels the handler: the peer left
                message = await self._ws.receive()
                # quart-trio returns None only for an empty binary message: not a close.
                peer.feed(b"" if message is None else message)
        self._link.attach(peer)
        await self._link.disconnected.wait()

    def _encode(self, frames: Sequence[Frame], ping: bytes | None) -> list[bytes]:
        """The WebSocket frames to write, each made once for all viewers (and the ping): in
        one buffer if they are small, else as they are (never a copy of a snapshot)."""
        bits = self._link.deflate_bits
        if bits is not None:  # count what this viewer is the first to need compressed
            fresh = [f for f in frames if f.deflated is None or bits not in f.deflated]
            self._compressions.inc(len(fresh))
        pieces = [wire(frame, bits) for frame in frames]
        if ping is not None:
            pieces.append(bytes(_FRAMER.ping(ping)))
        if len(pieces) > 1 and sum(len(p) for p in pieces) < JOIN_BELOW:
            return [b"".join(pieces)]
        return pieces

    async def send(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        server = self._link.raw_server()
        if server is None:
            # ASGI, one message at a time (but not through Quart's wrappers: the socket is
            # accepted already and this is the fan-out's hot path). ASGI cannot ping.
            for frame in frames:
                await self._link.asgi_send({"type": "websocket.send", "text": frame.text})
            return False
        pieces = self._encode(frames, ping)
        async with server.send_lock:  # Hypercorn's own writes (pongs, close frames) take it
            try:
                # Shielded like Hypercorn's own writes: half a frame would corrupt the stream.
                # A stuck send is ended by abort(), which closes the socket under it.
                with trio.CancelScope(shield=True):
                    await _write_all(server.stream, pieces, self._progressed)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._link.peer_closed = True  # Hypercorn's reader sees it too and ends us
        return ping is not None

    async def close(self, code: int, reason: str) -> None:
        await self._ws.close(code, reason)

    async def drain(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drop_frames)
            await self._link.disconnected.wait()
            nursery.cancel_scope.cancel()

    async def _drop_frames(self) -> None:
        while True:  # ends when drain() has seen the disconnect and cancels it
            await self._ws.receive()

    def abort(self) -> None:
        self._link.abort()

    async def stopping(self) -> None:
        await self._link.server_stopping()

    def limit_send_buffer(self, size: int) -> None:
        self._link.limit_send_buffer(size)
