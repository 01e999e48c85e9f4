"""Holes in Hypercorn (0.18) that hostile clients reach, closed for the hub's connections.

0. After an HTTP response, Hypercorn either closes the connection (`Connection: close`) or
   restarts its idle timer (keep_alive_timeout), from the app's task, which Quart-Trio cancels
   as soon as the response is out: neither happened. A connection that made one request stayed
   open forever, idle or trickling its next request head one byte at a time (slowloris after
   one good request).
1. Bytes after an upgrade request, before the hub has answered it (a client that sends its
   token in a first frame without waiting, say): Hypercorn answers 400 but marks the stream
   closed only once that answer is out. The hub's own answer (401, or the 101 of an accepted
   publisher), sent meanwhile, then collides with it in h11, and the exception ended the whole
   worker: one request stopped the hub (pgjones/hypercorn#225, still open).
2. A handshake Hypercorn refuses itself (no Sec-WebSocket-Key, say): it answers 400 and then
   leaves the connection open for as long as the client likes, with no timeout.
3. A message over `websocket_max_message_size`: Hypercorn sends close 1009, but then keeps
   reading and appends everything the peer still sends to the message buffer it has refused. A
   50 MiB frame cost the hub 50 MiB, a peer that never stops sending cost it all its memory, and
   the connection stayed open until the hub's heartbeat timeout (logged as that).
4. A frame wsproto cannot accept (invalid UTF-8 in a text message: 1007; a protocol violation such
   as a reserved opcode, RSV bits or an unmasked frame: 1002): Hypercorn dropped the TCP
   connection without the close frame that says why, and nothing was logged.

5. A compressed message (permessage-deflate, which anyone opening a viewer may negotiate):
   wsproto inflated each read of the socket whole, before any size check. 64 MiB of one byte
   deflate to 64 KiB: one frame cost the hub 190 MiB.

6. A request head is bounded by h11 only while it is incomplete (h11_max_incomplete_size): a
   head of 10,000 headers in 48 KB that arrived in one read was parsed whole (tens of ms of the
   loop) and upgraded, the same head in two reads got 431. `_bounded_heads` counts the bytes and
   lines of each head as they arrive, whatever the reads, and answers 431 past `max_head_bytes`
   or `max_headers` before h11 parses any of it.

7. With workers >= 1, Hypercorn's parent process exits 0 when the app refuses to start in a
   worker: `hypercorn.run.run` takes the worker's exit status from `_join_exited`, then calls it
   again on the (now empty) list of workers and keeps that 0 (pgjones/hypercorn#269, #372). The
   parent never loads the app, so no patch can reach it: `refuse_to_start` (called by the app's
   startup hook) ends it with SIGUSR1, which it does not handle, so that its status is a failure
   (killed by SIGUSR1: systemd's Restart=on-failure acts); `follow_parent` makes every worker
   end with its parent, so that none is left serving alone.

`install()` (called by mt5hub.server.install when the app starts serving) lets no cancellation
stop a connection's close or its idle timer (0), wraps `WSStream.handle` (1, 2) and replaces
`WSStream._handle_events` with Hypercorn's own but for 3 and 4: early bytes get a 400 before
anything else can answer, and the connection ends; a refused handshake's connection ends; after
a 1009 the rest of the message is read and dropped (memory stays at the limit) and the
connection ends when the peer answers the close, or CLOSE_GRACE later; a frame wsproto refuses
is answered with its close code; a compressed message is inflated at most `max_message` bytes at
a time (5); request heads are bounded (6). 1, 3, 4, 5 and 6 are a log line each. The same handler
also hands each whole message, and each pong, to the connection's Link (`Link.feed`,
`Link.pong`) at once, instead of through Hypercorn's and Quart's queues (one message per turn of
the scheduler each). Like `_transport`, this relies on Hypercorn's internals (pinned in
pyproject.toml); tests/test_hostile_*.py show each on real sockets,
tests/test_server_adapter.py event by event.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import logging
import multiprocessing
import os
import re
import signal
import zlib
from collections.abc import Callable
from typing import Any

import h11
import trio
from hypercorn.events import Closed, RawData
from hypercorn.protocol import h11 as h11_protocol
from hypercorn.protocol import ws_stream
from hypercorn.protocol.events import Body, Data, Request, StreamClosed
from hypercorn.trio import tcp_server
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, Pong
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from ..limits import LogThrottle
from ._transport import LINK, read_data

log = logging.getLogger("mt5hub")

CLOSE_GRACE = 1.0  # seconds a peer has to answer a 1009 before the hub hangs up
_DISCARDING = "_mt5hub_discarding"  # set on a WSStream once it has refused a message
_ROLES = {"/ws/dll": "publisher", "/ws": "viewer"}
_on_close: Callable[[str, int], None] | None = None  # counts closes by (role, code) in metrics
_max_inflated = 1024 * 1024  # bytes one inflation may produce: the message limit
_max_head_bytes = 16 * 1024  # a request head's bytes (request line and headers), at most
_max_headers = 100  # a request head's header lines, at most
_on_reject: Callable[[str], None] | None = None  # counts refused request heads in metrics
_HEAD = "_mt5hub_head"  # on an H11Protocol: (bytes, lines, last bytes) of the head so far
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head, as h11 finds it
_head_lines = LogThrottle()


def missing() -> list[str]:
    """The internals of Hypercorn and wsproto this module needs and cannot find (none: [])."""
    stream: Any = getattr(ws_stream, "WSStream", None)
    server: Any = getattr(tcp_server, "TCPServer", None)
    protocol: Any = getattr(h11_protocol, "H11Protocol", None)
    wanted = {
        "hypercorn H11Protocol.handle": hasattr(protocol, "handle"),
        "hypercorn H11Protocol._send_error_response": hasattr(protocol, "_send_error_response"),
        "hypercorn TCPServer.protocol_send": hasattr(server, "protocol_send"),
        "hypercorn TCPServer._read_data": hasattr(server, "_read_data"),
        "trio SSLStream's SSL object and buffers": all(
            name in _init_names(trio.SSLStream)
            for name in ("_ssl_object", "_incoming", "_outgoing", "_inner_send_lock", "_state")
        ),
        "hypercorn TCPServer.send_lock/stream": "send_lock" in _init_names(server),
        "hypercorn WSStream.handle": hasattr(stream, "handle"),
        "hypercorn WSStream._handle_events": hasattr(stream, "_handle_events"),
        "hypercorn WSStream._send_wsproto_event": hasattr(stream, "_send_wsproto_event"),
        "hypercorn WSStream._send_error_response": hasattr(stream, "_send_error_response"),
        "hypercorn ws_stream.FrameTooLargeError": hasattr(ws_stream, "FrameTooLargeError"),
        "hypercorn ws_stream.ASGIWebsocketState": hasattr(ws_stream, "ASGIWebsocketState"),
        "wsproto PerMessageDeflate.frame_inbound_payload_data": hasattr(
            PerMessageDeflate, "frame_inbound_payload_data"
        ),
    }
    return [name for name, found in wanted.items() if not found]


def _init_names(cls: Any) -> str:
    """The source of `cls.__init__` (attributes set there are not on the class)."""
    try:
        return inspect.getsource(cls.__init__)
    except (TypeError, OSError):
        return ""


def install(
    on_close: Callable[[str, int], None],
    max_message: int,
    *,
    max_head_bytes: int = 16 * 1024,
    max_headers: int = 100,
    on_reject: Callable[[str], None] | None = None,
) -> None:
    """Patch Hypercorn (once per process; `missing()` must be empty).

    `on_close(role, code)` is told of every connection closed here, for the metrics;
    `max_message` is websocket_max_message_size, the most one inflation may produce;
    `max_head_bytes` and `max_headers` bound a request head (431), and `on_reject(reason)` is
    told of each head refused.
    """
    global _on_close, _max_inflated, _max_head_bytes, _max_headers, _on_reject
    _on_close = on_close
    _max_inflated = max_message
    _max_head_bytes, _max_headers, _on_reject = max_head_bytes, max_headers, on_reject
    stream: Any = ws_stream.WSStream
    server: Any = tcp_server.TCPServer
    protocol: Any = h11_protocol.H11Protocol
    if getattr(stream, "_mt5hub_guarded", False):
        return
    server.protocol_send = _shield_all_but_data(server.protocol_send)
    server._read_data = read_data  # TLS reads without trio's retry loop (see _transport)
    original_handle = stream.handle

    async def handle(self: Any, event: Any) -> None:
        if isinstance(event, Body | Data) and not self.closed and not self.handshake.accepted:
            await _early_data(self)
            return
        await original_handle(self, event)
        if isinstance(event, Request) and self.closed:  # Hypercorn refused the handshake
            await self.send(StreamClosed(stream_id=self.stream_id))

    stream.handle = handle
    stream._handle_events = _handle_events
    protocol.handle = _bounded_heads(protocol.handle)
    PerMessageDeflate.frame_inbound_payload_data = _bounded_inflate  # type: ignore[method-assign]
    stream._mt5hub_guarded = True


_PR_SET_PDEATHSIG = 1  # prctl(2)


def _prctl_deathsig(sig: int) -> bool:
    """Ask Linux to send this process `sig` when its parent ends (0: not any more)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux
        return False


def _hypercorn_parent() -> int | None:
    """The pid of Hypercorn's parent process if this is one of its workers (else None)."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None or os.getppid() != parent.pid:
        return None
    return parent.pid


def follow_parent() -> None:
    """A worker ends (SIGTERM) when Hypercorn's parent process does, whatever ended it."""
    if _hypercorn_parent() is not None:
        _prctl_deathsig(signal.SIGTERM)


def refuse_to_start(reason: str) -> None:
    """The app will not start: make Hypercorn's exit status a failure (see 7 above).

    In a worker, Hypercorn's parent is ended with SIGUSR1 (its siblings follow it, see
    `follow_parent`); this worker then exits as Hypercorn lets it, its traceback logged. Without
    workers (workers = 0) Hypercorn's own process fails, with status 1: nothing to do.
    """
    parent = _hypercorn_parent()
    if parent is None:
        return
    _prctl_deathsig(0)  # this worker lives on to log the traceback and exit by itself
    log.error(
        "refusing to start: %s; stopping Hypercorn (pid %s) with SIGUSR1, so that its exit "
        "status says so",
        reason,
        parent,
    )
    os.kill(parent, signal.SIGUSR1)


def _bounded_heads(handle: Any) -> Any:
    """H11Protocol.handle, but each request head counted as it arrives (see 6 above)."""

    async def bounded(self: Any, event: Any) -> None:
        if isinstance(event, RawData) and isinstance(self.connection, h11.Connection):
            problem = _head_problem(self, event.data)
            if problem is not None:
                await _refuse_head(self, problem)
                return
        await handle(self, event)

    return bounded


def _head_problem(protocol: Any, data: bytes) -> str | None:
    """What is wrong with the head these bytes continue, if anything (None: carry on).

    Counts the bytes and line ends of the head so far, keeping only its last two bytes to find
    a blank line split across reads. Whatever follows a head's end (the next request of a
    pipelining client) begins the next head: the hub serves no request bodies.
    """
    size, lines, tail = getattr(protocol, _HEAD, (0, 0, b""))
    buffer = tail + data
    start = 0
    while (end := _HEAD_END.search(buffer, start)) is not None:
        size += max(0, end.start() + 1 - max(start, len(tail)))
        lines += buffer.count(b"\n", max(start, len(tail)), end.start() + 1)
        if size > _max_head_bytes or lines > _max_headers + 1:
            break
        size, lines, start = 0, 0, end.end()
    else:
        rest = max(start, len(tail))
        size += len(buffer) - rest
        lines += buffer.count(b"\n", rest)
        setattr(protocol, _HEAD, (size, lines, buffer[max(start, len(buffer) - 2) :]))
    if size > _max_head_bytes:
        return f"a request head over max_head_bytes ({_max_head_bytes} bytes)"
    if lines > _max_headers + 1:  # the request line, then the headers
        return f"a request head of more than max_headers ({_max_headers} header lines)"
    return None


async def _refuse_head(protocol: Any, problem: str) -> None:
    """431, and hang up: nothing of the head reaches h11 or the app."""
    client = protocol.client[0] if protocol.client else "?"
    _head_lines.warning(problem, str(client), "refused a request from %s: 431 %s", client, problem)
    if _on_reject is not None:
        _on_reject("head_too_large")
    connection = protocol.connection
    if connection.our_state in {h11.IDLE, h11.SEND_RESPONSE} and protocol.stream is None:
        await protocol._send_error_response(431)
    await protocol.send(Closed())


def _shield_all_but_data(protocol_send: Any) -> Any:
    """TCPServer.protocol_send, but closing the connection and (re)starting or stopping its idle
    timer run to the end even when called from an app task that is being cancelled. (Data is
    written shielded already; an app cancelled while it waits to write may lose it.)"""

    async def send(self: Any, event: Any) -> None:
        if isinstance(event, RawData):
            await protocol_send(self, event)
        else:
            with trio.CancelScope(shield=True):
                await protocol_send(self, event)

    return send


async def _early_data(self: Any) -> None:
    """Bytes before the handshake is answered, which RFC 6455 forbids: 400, and hang up."""
    if self.state != ws_stream.ASGIWebsocketState.HANDSHAKE or getattr(self, "response", None):
        # The app has begun its answer (a refusal, whose state Hypercorn changes only once the
        # status line is out): that answer stands, and the bytes go unread.
        return
    self.closed = True  # first: nothing the app sends from now on may follow the 400
    log.warning(
        "refused %s from %s: 400 data sent before the handshake was answered",
        self.scope.get("path", ""),
        _host(self),
    )
    await self._send_error_response(400)
    await self.send(StreamClosed(stream_id=self.stream_id))
    if self.app_put is not None:
        await self.app_put({"type": "websocket.disconnect", "code": CloseReason.ABNORMAL_CLOSURE})


async def _handle_events(self: Any) -> None:
    """Hypercorn 0.18's WSStream._handle_events, but for a refused message and a refused frame."""
    for event in self.connection.events():
        if isinstance(event, Message):
            if getattr(self, _DISCARDING, False):
                continue  # the rest of a message already refused with 1009
            try:
                self.buffer.extend(event)
            except ws_stream.FrameTooLargeError:
                limit = self.buffer.max_length
                self.buffer.clear()
                setattr(self, _DISCARDING, True)
                too_big = CloseReason.MESSAGE_TOO_BIG
                _log_close(self, too_big, "frame too large", f"over {limit} bytes")
                await self._send_wsproto_event(CloseConnection(code=too_big))
                self.task_group.spawn(_close_later, self)
                continue
            if event.message_finished:
                message = self.buffer.to_message()
                self.buffer.clear()
                link = self.scope.get(LINK)
                if link is None:
                    await self.app_put(message)
                else:  # straight to the session (see mt5hub.server._transport.Link.feed)
                    text = message.get("text")
                    link.feed(text if text is not None else message.get("bytes") or b"")
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, Pong):
            link = self.scope.get(LINK)
            if link is not None:  # the viewer has read everything up to the ping it answers
                link.pong(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            elif self.connection.state == ConnectionState.OPEN:
                # Not the peer's close: wsproto refused its data and says with which code.
                # (Its parser stops there: nothing more can be read from this connection.)
                _log_close(self, event.code, "bad frame", event.reason or "")
                reason = (event.reason or "").encode()[:120].decode(errors="ignore")
                await self._send_wsproto_event(CloseConnection(code=event.code, reason=reason))
            await self.send(StreamClosed(stream_id=self.stream_id))
            return


def _bounded_inflate(self: Any, proto: Any, data: bytes) -> bytes | CloseReason:
    """wsproto's PerMessageDeflate.frame_inbound_payload_data, but inflating at most the message
    limit (+1 byte) from one read: more than that is a message over the limit (1009)."""
    if not self._inbound_compressed or not self._inbound_is_compressible:
        return data
    try:
        inflated: bytes = self._decompressor.decompress(bytes(data), _max_inflated + 1)
    except zlib.error:
        return CloseReason.INVALID_FRAME_PAYLOAD_DATA
    if self._decompressor.unconsumed_tail:
        return CloseReason.MESSAGE_TOO_BIG
    return inflated


async def _close_later(self: Any) -> None:
    await self.context.sleep(CLOSE_GRACE)
    if not self.closed:
        await self.send(StreamClosed(stream_id=self.stream_id))


def _host(stream: Any) -> str:
    client = stream.scope.get("client")
    return str(client[0]) if client else "?"


def _log_close(stream: Any, code: int, reason: str, detail: str) -> None:
    path = str(stream.scope.get("path", ""))
    role = _ROLES.get(path, f"websocket {path}")
    log.warning("%s %s closed %s (%s): %s", role, _host(stream), int(code), reason, detail)
    if _on_close is not None:
        _on_close(role, int(code))
