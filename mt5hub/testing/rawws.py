"""A WebSocket client's bytes, written by hand: for clients that must send what a well-behaved
library refuses to (a frame before the handshake's answer, unmasked frames, RSV bits, a length
that is not the payload's) or that must read nothing past the handshake's answer."""

from __future__ import annotations

import base64
import os
import random
import struct


def upgrade_request(path: str, *headers: str) -> bytes:
    """A WebSocket upgrade request (RFC 6455) for `path` on 127.0.0.1, plus these header lines."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(head: bytes) -> int | None:
    """The status of an HTTP response head (`HTTP/1.1 101 ...`); None if it is not one."""
    parts = head.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return None


def mask(payload: bytes, key: bytes) -> bytes:
    """`payload` XORed with the 4-byte masking `key`, as a client masks what it sends."""
    if not payload or key == b"\0\0\0\0":
        return payload
    n = len(payload)
    keys = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ keys).to_bytes(n, "big")


def frame_head(
    opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """A frame's first bytes up to (not including) the masking key: flags, opcode, length."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    bit = 0x80 if masked else 0
    if length < 126:
        return head + bytes([bit | length])
    if length < 1 << 16:
        return head + bytes([bit | 126]) + struct.pack("!H", length)
    return head + bytes([bit | 127]) + struct.pack("!Q", length)


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
    key: bytes | None = None,
    rng: random.Random | None = None,
) -> bytes:
    """One WebSocket frame as a client sends it, or as a client must not: any opcode, RSV bits,
    unmasked, and a `length` that need not be the payload's. The masking key is `key`, else drawn
    from `rng` (reproducible runs), else random."""
    size = len(payload) if length is None else length
    head = frame_head(opcode, size, fin=fin, rsv=rsv, masked=masked)
    if not masked:
        return head + payload
    if key is None:
        key = rng.randbytes(4) if rng is not None else os.urandom(4)
    return head + key + mask(payload, key)
