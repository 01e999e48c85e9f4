"""Raw sockets: clients that hold, stall or write whatever bytes they are given."""

from __future__ import annotations

import errno
import json
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from mt5hub.testing.rawws import status_of, upgrade_request


async def connect_from(source: str, port: int) -> trio.socket.SocketType:
    """A TCP connection to the hub from this loopback address (any of 127/8 is lo on Linux)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


@dataclass
class HeldSockets:
    socks: list[trio.socket.SocketType] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    last_answer: float = 0.0  # seconds from the start until the last handshake answer
    errors_at: list[float] = field(default_factory=list)  # seconds from the start, per error


async def open_and_stall(
    port: int, sources: Sequence[str], count: int, timeout: float
) -> HeldSockets:
    """`count` WebSocket upgrades of /ws at once; read each answer's head, then nothing more."""
    held = HeldSockets()
    start = trio.current_time()

    async def one(n: int) -> None:
        outcome = f"no answer within {timeout:g} s"
        phase = "connecting"
        try:
            with trio.fail_after(timeout):
                sock = await connect_from(sources[n % len(sources)], port)
                held.socks.append(sock)
                phase = "awaiting the answer"
                request = upgrade_request("/ws")
                while request:
                    request = request[await sock.send(request) :]
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await sock.recv(4096)  # may hold the snapshot's first bytes: fine
                    if not chunk:
                        outcome = "closed before answering"
                        break
                    head += chunk
                else:
                    outcome = str(status_of(head))
                    held.last_answer = max(held.last_answer, trio.current_time() - start)
        except trio.TooSlowError:
            pass
        except OSError as exc:
            outcome = f"{error_name(exc)} {phase}"
            held.errors_at.append(round(trio.current_time() - start, 1))
        held.outcomes[outcome] += 1

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)
    return held


def close_all(socks: Sequence[trio.socket.SocketType]) -> None:
    for sock in socks:
        sock.close()


class RawWebSocket:
    """A client on a bare socket after a 101: writes whatever it is given, parses what the hub
    says (error frames, its close frame) and notices when the connection ends."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self.stream = stream
        self.parser = FrameProtocol(client=True, extensions=[])
        self.parts: list[str] = []
        self.errors: Counter[str] = Counter()
        self.close_code: int | None = None
        self.unparseable = False
        self.ended = trio.Event()
        self.news = trio.Event()
        self._feed(leftover)

    def _feed(self, data: bytes) -> None:
        if not data or self.unparseable:
            return
        self.parser.receive_bytes(data)
        try:
            for item in self.parser.received_frames():
                if item.opcode in (Opcode.TEXT, Opcode.CONTINUATION):
                    assert isinstance(item.payload, str)
                    self.parts.append(item.payload)
                    if item.message_finished:
                        text, self.parts = "".join(self.parts), []
                        if text.startswith('{"type":"error"'):
                            self.errors[str(json.loads(text).get("code"))] += 1
                elif item.opcode is Opcode.CLOSE:
                    assert isinstance(item.payload, tuple)
                    self.close_code = int(item.payload[0])
        except ParseFailed:
            self.unparseable = True
        self.news.set()
        self.news = trio.Event()

    async def read(self) -> None:
        try:
            while data := await self.stream.receive_some(65536):
                self._feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended.set()
            self.news.set()

    async def send(self, data: bytes) -> bool:
        """False once the connection is gone (the hub closed it)."""
        if self.ended.is_set():
            return False
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def wait(self, ready: Callable[[], bool], timeout: float) -> None:
        with trio.move_on_after(timeout):
            while not (ready() or self.ended.is_set()):
                await self.news.wait()

    def outcome(self) -> str:
        if self.close_code is not None:
            return f"close {self.close_code}"
        if self.unparseable:
            return "an answer this client cannot parse"
        if self.ended.is_set():
            return "hung up without a close frame"
        return "still open"


async def read_head(stream: trio.SocketStream) -> tuple[int | None, bytes]:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None, b""
        head += chunk
    end = head.index(b"\r\n\r\n") + 4
    return status_of(head), head[end:]
