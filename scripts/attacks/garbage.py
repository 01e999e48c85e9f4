"""garbage: connections that each send one kind of junk from a seeded generator."""

from __future__ import annotations

import random
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import bench_backplane as bb
import trio
from wsproto.frame_protocol import Opcode

from mt5hub.testing.rawws import frame, frame_head, status_of, upgrade_request

from .common import GARBAGE_SOURCES, TOKEN, since
from .context import Attack, Ctx
from .hub import back_to, closes_by_code, metric_delta, poll_health, scrape_metrics
from .raw import RawWebSocket, connect_from, error_name, read_head

GARBAGE_KINDS = {  # kind: weight
    "not-http": 12,
    "bad-handshake": 10,
    "frame-before-101": 8,
    "bad-utf8": 14,
    "protocol-violation": 16,
    "oversized": 6,
    "bad-json": 22,
    "random-frames": 12,
}
JUNK = (
    "",
    "{",
    "}",
    "[]",
    "null",
    "42",
    '"text"',
    "{'key': 'EA1'}",
    '{"key":"EA1"',
    "NaN",
    '{"a":NaN}',
    "[" * 3000 + "]" * 3000,
    '{"type":"subscribe"}',
    '{"type":7}',
    '{"key":"EA1","src":"X","clientId":"c","data":"not a list"}',
    '{"key":"","src":"X","clientId":"c","data":[]}',
    '{"key":"EA1","src":"X","clientId":"c","data":[{"pair":"EURUSD","TF_data":[],"sum":"x",'
    '"sum_cell_color":"clrRed"}]}',
    '{"key":"EA1","src":"X","clientId":"c","data":[{"pair":"EURUSD","TF_data":[{"M1":1e999,'
    '"cell_color":"x"}],"sum":1,"sum_cell_color":"x"}]}',
    '{"key":"EA\\u0000","src":"X","clientId":"c","data":[]}',
    '{"key":"\\ud800","src":"X","clientId":"c","data":[]}',
    '{"key":"EA1","key":"EA2","src":"X","clientId":"c","data":[]}',
)
JSON_ALPHABET = '{}[]",:0123456789.eE+-truefalsnNaIiy\\u d8 keysrcdataTF_'


def junk_frame(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.5:
        return frame(Opcode.TEXT, rng.choice(JUNK).encode(), rng=rng)
    if roll < 0.85:
        text = "".join(rng.choice(JSON_ALPHABET) for _ in range(rng.randrange(1, 300)))
        return frame(Opcode.TEXT, text.encode(), rng=rng)
    return frame(Opcode.BINARY, rng.randbytes(rng.randrange(1, 300)), rng=rng)


def bad_handshake(rng: random.Random) -> bytes:
    """An upgrade without a key, of an old version, by POST; a bad header, a huge head, HTTP/9.9,
    a huge target."""
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
    auth = f"Authorization: Bearer {TOKEN}"
    upgrade = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    return rng.choice(
        [
            f"GET /ws/dll HTTP/1.1\r\n{upgrade}Sec-WebSocket-Version: 13\r\n{auth}\r\n\r\n",
            f"GET /ws/dll HTTP/1.1\r\n{upgrade}{key}\r\nSec-WebSocket-Version: 8\r\n{auth}\r\n\r\n",
            f"POST /ws HTTP/1.1\r\n{upgrade}{key}\r\nSec-WebSocket-Version: 13\r\n"
            "Content-Length: 5\r\n\r\nhello",
            "GET /ws HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + "a" * 20000 + "\r\n\r\n",  # a huge head
            "GET /ws HTTP/9.9\r\nHost: x\r\n\r\n",
            "GET " + "/" * 9000 + " HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
    ).encode()


def violation(rng: random.Random) -> list[bytes]:
    """Frames that break RFC 6455 (wsproto answers 1002)."""
    body = b'{"type":"ping"}'
    return rng.choice(
        [
            [
                frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), body, rng=rng)
            ],  # reserved opcode
            [
                frame(Opcode.TEXT, body, rng=rng, rsv=rng.choice([1, 2, 4]))
            ],  # RSV bits, no extension
            [frame(Opcode.TEXT, body, rng=rng, masked=False)],  # a client frame must be masked
            [frame(Opcode.PING, b"x", rng=rng, fin=False)],  # a fragmented control frame
            [frame(Opcode.PING, b"x" * 126, rng=rng)],  # a control frame over 125 bytes
            [frame(Opcode.CONTINUATION, body, rng=rng)],  # a continuation of nothing
            [frame(Opcode.TEXT, body, rng=rng, fin=False), frame(Opcode.TEXT, body, rng=rng)],
        ]
    )


def random_frames(rng: random.Random) -> list[bytes]:
    frames = []
    for _ in range(rng.randrange(1, 9)):
        opcode = rng.choice([0, 1, 1, 1, 2, 2, 8, 9, 10, rng.randrange(16)])
        payload = rng.randbytes(rng.choice([0, 1, 2, 50, 125, 126, 300, rng.randrange(2000)]))
        if opcode == Opcode.CLOSE and len(payload) >= 2 and rng.random() < 0.5:
            code = rng.choice([1000, 1001, 1005, 1006, 1011, 2999, 3000, 4999, 5000])
            payload = struct.pack("!H", code) + payload[2:]
        frames.append(
            frame(
                opcode,
                payload,
                rng=rng,
                fin=rng.random() < 0.85,
                rsv=rng.choice([0] * 10 + [1, 4]),
                masked=rng.random() < 0.9,
            )
        )
    return frames


async def http_answer(stream: trio.SocketStream, timeout: float) -> str:
    """Everything the hub answers until it hangs up: its HTTP status, or how it ended."""
    answer = b""
    reset, started = False, trio.current_time()
    with trio.move_on_after(timeout) as scope:
        try:
            while chunk := await stream.receive_some(65536):
                answer += chunk
        except trio.BrokenResourceError:
            reset = True  # closed with our junk unread: a RST, which may discard its answer
    status = status_of(answer)
    if status is not None:
        return f"HTTP {status}" + (" (left open)" if scope.cancelled_caught else "")
    if scope.cancelled_caught:
        return f"no answer, still open after {timeout:g} s"
    after = f" after {trio.current_time() - started:.0f} s"
    return ("reset by the hub, no answer read" if reset else "closed without an answer") + after


async def garbage_one(
    port: int, source: str, kind: str, rng: random.Random
) -> tuple[str, Counter[str]]:
    """One connection of one kind of junk; (outcome, error frames by code)."""
    errors: Counter[str] = Counter()
    try:
        with trio.fail_after(20):
            stream = trio.SocketStream(await connect_from(source, port))
            async with stream:
                if kind == "not-http":
                    junk = rng.randbytes(rng.randrange(1, 4000))
                    await stream.send_all(junk + (b"\r\n\r\n" if rng.random() < 0.5 else b""))
                    return await http_answer(stream, 8.0), errors
                if kind == "bad-handshake":
                    await stream.send_all(bad_handshake(rng))
                    return await http_answer(stream, 8.0), errors
                viewer = kind in ("bad-utf8", "protocol-violation", "random-frames") and (
                    rng.random() < 0.2
                )
                request = upgrade_request(
                    "/ws" if viewer else "/ws/dll", f"Authorization: Bearer {TOKEN}"
                )
                if kind == "frame-before-101":
                    await stream.send_all(request + junk_frame(rng))
                    return await http_answer(stream, 8.0), errors
                await stream.send_all(request)
                status, leftover = await read_head(stream)
                if status != 101:
                    return f"HTTP {status}", errors
                ws = RawWebSocket(stream, leftover)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ws.read)
                    outcome = await GARBAGE_SENDERS[kind](ws, rng)
                    nursery.cancel_scope.cancel()
                return outcome, ws.errors
    except trio.TooSlowError:
        return "no end within 20 s", errors
    except OSError as exc:
        return f"socket error {error_name(exc)}", errors


async def send_bad_json(ws: RawWebSocket, rng: random.Random) -> str:
    count = rng.randrange(3, 15)
    sent = 0
    for _ in range(count):
        if not await ws.send(junk_frame(rng)):
            break
        sent += 1
    await ws.wait(lambda: sum(ws.errors.values()) >= sent, 5.0)
    if ws.ended.is_set() or ws.close_code is not None:
        return ws.outcome()
    await ws.send(frame(Opcode.CLOSE, struct.pack("!H", 1000), rng=rng))
    await ws.wait(lambda: False, 2.0)
    return "stayed open" + (" after error frames" if ws.errors else "") + ", closed by us"


async def send_and_watch(ws: RawWebSocket, frames: list[bytes], wait: float = 5.0) -> str:
    for data in frames:
        if not await ws.send(data):
            break
    await ws.wait(lambda: ws.close_code is not None, wait)
    if ws.close_code is None and not ws.ended.is_set():
        return "still open after its frames" + (", with error frames" if ws.errors else "")
    await ws.wait(lambda: False, 2.0)  # the end of the connection after the close frame
    return ws.outcome()


async def send_utf8(ws: RawWebSocket, rng: random.Random) -> str:
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b'{"key":"\xe2\x82"}', b"ok\x80"])
    return await send_and_watch(ws, [frame(Opcode.TEXT, bad, rng=rng)])


async def send_violation(ws: RawWebSocket, rng: random.Random) -> str:
    return await send_and_watch(ws, violation(rng))


async def send_random(ws: RawWebSocket, rng: random.Random) -> str:
    return await send_and_watch(ws, random_frames(rng))


async def send_oversized(ws: RawWebSocket, rng: random.Random) -> str:
    """One text frame of 1 MiB + up to 1 MiB, streamed in 64 KiB writes (masked with a zero key,
    which leaves the payload as it is)."""
    length = (1 << 20) + 1 + rng.randrange(1 << 20)
    if await ws.send(frame_head(Opcode.TEXT, length) + b"\0\0\0\0"):
        chunk = b"x" * 65536
        left = length
        while left > 0 and await ws.send(chunk[: min(left, len(chunk))]):
            left -= len(chunk)
    return await send_and_watch(ws, [])


GARBAGE_SENDERS: dict[str, Callable[[RawWebSocket, random.Random], Awaitable[str]]] = {
    "bad-json": send_bad_json,
    "bad-utf8": send_utf8,
    "protocol-violation": send_violation,
    "random-frames": send_random,
    "oversized": send_oversized,
}


async def _garbage(ctx: Ctx, count: int) -> tuple[dict[str, Any], float]:
    rng = random.Random(ctx.seed)
    kinds = rng.choices(list(GARBAGE_KINDS), weights=list(GARBAGE_KINDS.values()), k=count)
    outcomes: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    errors: Counter[str] = Counter()
    started = trio.current_time()

    async def one(n: int, kind: str, seed: int) -> None:
        source = GARBAGE_SOURCES[n % len(GARBAGE_SOURCES)]
        outcome, frames = await garbage_one(ctx.hub.port, source, kind, random.Random(seed))
        outcomes[outcome] += 1
        by_kind.setdefault(kind, Counter())[outcome] += 1
        errors.update(frames)

    async with trio.open_nursery() as nursery:
        for n, kind in enumerate(kinds):
            nursery.start_soon(one, n, kind, rng.getrandbits(64))
    ended = time.time()
    figures = {
        "connections": count,
        "seed": ctx.seed,
        "took_s": round(trio.current_time() - started, 2),
        "outcomes": dict(outcomes.most_common()),
        "by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())},
        "error_frames": dict(errors.most_common()),
    }
    return figures, ended


def attack_garbage(ctx: Ctx) -> Attack:
    figures, ended = trio.run(_garbage, ctx, ctx.plan.garbage_connections)
    recovered = trio.run(
        poll_health, ctx.hub.port, back_to(ctx.baseline, "viewers", "publishers"), 30.0
    )
    after = scrape_metrics(ctx.hub.port)
    closes = {
        role: closes_by_code(ctx.metrics_before, after, role) for role in ("publisher", "viewer")
    }
    figures["hub_closes"] = closes
    figures["hub_rejects"] = {
        key.split('reason="', 1)[1].split('"', 1)[0]: n
        for key in after
        if key.startswith("mt5hub_rejects_total{")
        and (
            n := metric_delta(
                ctx.metrics_before,
                after,
                key.split("{")[0],
                reason=key.split('reason="', 1)[1].split('"', 1)[0],
            )
        )
    }
    tracebacks = bb.grep_log(ctx.hub.log_path)["lines"]
    internal = [line for line in tracebacks if "Traceback" in line or "internal error" in line]
    figures["tracebacks_or_internal_errors"] = len(internal)
    failed = []
    if any("1011" in codes for codes in closes.values()) or internal:
        failed.append("an internal error (1011 or a traceback) in the hub")
    if recovered is None:
        failed.append("the hub did not return to its connections of before")
    statuses = Counter[str]()
    for outcome, n in figures["outcomes"].items():
        statuses[outcome.split(" (")[0].split(",")[0]] += n
    parts = [f"{k} x{v}" for k, v in statuses.most_common()]
    outcome = (
        f"{figures['connections']} junk connections: {', '.join(parts)}; error frames "
        + (", ".join(f"{k} x{v}" for k, v in figures["error_frames"].items()) or "none")
        + f"; 1011 or traceback: {len(internal) + sum(c.get('1011', 0) for c in closes.values())}"
    )
    return Attack(
        outcome,
        figures,
        recovered or ended,
        since(ended, recovered),
        "from the last junk connection's end until /healthz connections are back to before",
        failed,
    )
