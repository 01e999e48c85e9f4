"""Hostile input at the WebSocket frame layer, against a real hub over raw sockets: invalid UTF-8,
protocol violations, messages over the size limit (in one frame, in many fragments, 50 MiB of
them, a deflate bomb), and a seeded random frame generator (MT5HUB_FUZZ_SEED picks another seed).
What every hostile test must show: tests/hostile.py.
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from conftest import RunningHub
from helpers import (
    DEADLINE,
    RawPublisher,
    frame,
    health,
    metric,
    publish_frame,
    publisher,
    receive,
    table_rows,
    text_frame,
    viewer,
    wait_for,
)
from hostile import FUZZ_SEED, Healthy, HubMaker, LogWatch
from test_hub_server import next_update, synced
from trio_websocket import WebSocketConnection
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import Opcode

# -- frames the WebSocket layer refuses -----------------------------------------------------------


async def each_closed_with(
    hub: RunningHub, log: LogWatch, cases: dict[str, bytes], code: int, healthy_key: str
) -> None:
    """Each case, on a connection of its own, is closed with `code` and logged once, while a
    healthy publisher and viewer are served between every two of them."""
    async with Healthy.connect(hub, key=healthy_key) as healthy:
        for name, data in cases.items():
            async with RawPublisher.connect(hub.http_port) as raw:
                await raw.send(data)
                assert await raw.closed_with() == code, name
            await healthy.still_served()
    lines = await log.wait_for_lines(len(cases), "publisher", f"closed {code} (bad frame)")
    assert len(lines) == len(cases)
    log.assert_clean()


async def test_invalid_utf8_in_a_text_frame_is_closed_with_1007_and_logged(
    shared_hub: RunningHub,
) -> None:
    """wsproto finds it; Hypercorn 0.18 then dropped the connection without a close frame or a
    log line (mt5hub/hardening.py sends the 1007 and logs it)."""
    log = LogWatch(shared_hub)
    publish = publish_frame(key="UTF8").encode()
    cases = {
        "invalid-start-byte": text_frame(b'{"key":"\xff\xfe"}'),
        "truncated-sequence-at-the-end": text_frame(publish[:-1] + b"\xe2\x82"),
        "encoded-surrogate": text_frame(b'{"key":"\xed\xa0\x80"}'),
        "overlong-encoding": text_frame(b'{"key":"\xc0\xaf"}'),
        "in-the-second-fragment": text_frame(publish[:10], fin=False)
        + frame(Opcode.CONTINUATION, b"\xff" + publish[10:]),
    }
    await each_closed_with(shared_hub, log, cases, 1007, healthy_key="UTF8_HEALTHY")


async def test_websocket_protocol_violations_are_closed_with_1002_and_logged(
    shared_hub: RunningHub,
) -> None:
    log = LogWatch(shared_hub)
    ping = '{"type":"ping"}'
    cases = {
        "reserved-opcode": frame(3, b"x"),
        "reserved-control-opcode": frame(11, b"x"),
        "rsv1-without-compression": text_frame(ping, rsv=4),
        "rsv2-rsv3": text_frame(ping, rsv=3),
        "unmasked": text_frame(ping, masked=False),
        "control-frame-over-125-bytes": frame(Opcode.PING, b"p" * 126),
        "fragmented-control-frame": frame(Opcode.PING, b"p", fin=False),
        "continuation-without-a-start": frame(Opcode.CONTINUATION, ping.encode()),
        "new-message-inside-a-fragmented-one": text_frame(ping[:5], fin=False) + text_frame(ping),
        "close-with-a-one-byte-payload": frame(Opcode.CLOSE, b"\x03"),
        "close-with-a-reserved-code": frame(Opcode.CLOSE, struct.pack("!H", 1005)),
        "length-with-the-top-bit-set": b"\x81\xff" + b"\x80" + b"\0" * 7 + b"\0\0\0\0",
    }
    await each_closed_with(shared_hub, log, cases, 1002, healthy_key="PROTO_HEALTHY")


async def test_a_message_over_the_limit_in_many_fragments_is_closed_with_1009(
    make_hub: HubMaker,
) -> None:
    """The limit is on the message, not the frame: 100 fragments of 1 KiB each against 64 KiB."""
    hub = make_hub(websocket_max_message_size=65536, rate_limit=1000, rate_burst=1000)
    log = LogWatch(hub)
    fitting = publish_frame(key="FRAGMENTED", pairs=[f"P{i:03d}" for i in range(100)]).encode()
    assert 32768 < len(fitting) < 65536
    async with Healthy.connect(hub) as healthy:
        async with RawPublisher.connect(hub.http_port) as raw:  # under the limit: fine
            chunks = [fitting[i : i + 1024] for i in range(0, len(fitting), 1024)]
            data = text_frame(chunks[0], fin=False)
            for n, chunk in enumerate(chunks[1:], 2):
                data += frame(Opcode.CONTINUATION, chunk, fin=n == len(chunks))
            await raw.send(data)
            update = await next_update(healthy.view, "FRAGMENTED")
            assert update["data"] == json.loads(fitting)["data"]

        async with RawPublisher.connect(hub.http_port) as raw:
            data = text_frame(b"[" + b" " * 1023, fin=False)
            data += b"".join(frame(Opcode.CONTINUATION, b" " * 1024, fin=False) for _ in range(99))
            await raw.send(data)
            assert await raw.closed_with() == 1009
        await healthy.still_served()
    await log.wait_for_lines(1, "publisher", "closed 1009 (frame too large): over 65536 bytes")
    assert await metric(hub, "mt5hub_closes_total", role="publisher", code="1009") == 1
    log.assert_clean()


async def test_a_50_mib_frame_is_closed_with_1009_without_the_hub_holding_it(
    make_hub: HubMaker,
) -> None:
    """Hypercorn 0.18 kept appending the rest of a refused message to its buffer (the whole 50
    MiB, and forever for a peer that never stops) and left the connection open until the
    heartbeat timeout: mt5hub/hardening.py drops the rest and hangs up."""
    hub = make_hub()  # websocket_max_message_size: 1 MiB
    log = LogWatch(hub)
    size = 50 * 1024 * 1024
    chunk = b"a" * (1024 * 1024)
    rss: list[int] = []
    sent = 0

    async with Healthy.connect(hub) as healthy:
        before = (await health(hub))["rss_bytes"]

        async def watch_rss(done: trio.Event) -> None:
            while not done.is_set():
                rss.append((await health(hub))["rss_bytes"])
                await trio.sleep(0.05)

        async with RawPublisher.connect(hub.http_port) as raw, trio.open_nursery() as nursery:
            done = trio.Event()
            nursery.start_soon(watch_rss, done)
            # Masked with a zero key: the payload goes out as it is, at full speed. And all of
            # it, whatever the hub says meanwhile, until the hub hangs up.
            if await raw.send(frame(Opcode.TEXT, length=size, key=b"\0\0\0\0")):
                while sent < size and await raw.send(chunk):
                    sent += len(chunk)
            code = await raw.closed_with()
            done.set()
        await healthy.still_served()
        after = (await health(hub))["rss_bytes"]

    grew = (max(rss, default=before) - before) / 2**20
    print(
        f"50 MiB frame: closed with {code}; {sent / 2**20:.0f} MiB written before it hung up; RSS "
        f"{before / 2**20:.1f} MiB before, +{grew:.1f} MiB at most during, "
        f"{after / 2**20:.1f} MiB after"
    )
    assert code == 1009
    assert grew < 40, f"the hub grew by {grew:.1f} MiB: it held on to the refused message"
    await log.wait_for_lines(1, "publisher", "closed 1009 (frame too large)")
    assert not log.lines("heartbeat timeout")  # it was not left open until then
    log.assert_clean()


# -- random frames on a raw socket ----------------------------------------------------------------


def _random_frame(rng: random.Random, n: int) -> tuple[str, bytes, int | None]:
    """One frame for the fuzzer: (what it is, its bytes, the code if it is a close frame: 1005
    for none). Valid publishes and pings now and then, so that the connection does real work
    between the hostile frames."""
    kind = rng.choices(
        ["publish", "ping", "junk-text", "random", "lying-length", "truncated"],
        weights=[20, 5, 15, 40, 10, 10],
    )[0]
    if kind == "publish":
        publish = publish_frame(key="FUZZ", value=n, pairs=["EURUSD", "GBPUSD"])
        return kind, text_frame(publish), None
    if kind == "ping":
        return kind, text_frame('{"type":"ping"}'), None
    if kind == "junk-text":
        alphabet = '{}[]",:0123456789.eE+-truefalsnNaIiy\\u d8 keysrcdataTF_'
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        return kind, text_frame(text), None
    size = rng.choice([0, 1, 2, 125, 126, 127, 200, 65535, 65536, 70000, rng.randrange(300)])
    payload = rng.randbytes(size)
    opcode = rng.choice([0, 1, 1, 1, 2, 2, 8, 9, 10, rng.randrange(16)])
    if opcode == Opcode.CLOSE and rng.random() < 0.5 and size >= 2:
        code = rng.choice([1000, 1001, 1005, 1006, 1011, 2999, 3000, 4999, 5000, 65535])
        payload = struct.pack("!H", code) + payload[2:]
    options: dict[str, Any] = {
        "fin": rng.random() < 0.8,
        "rsv": rng.choice([0] * 8 + [1, 2, 4, 7]),
        "masked": rng.random() < 0.9,
    }
    if kind == "lying-length":
        options["length"] = rng.choice(
            [size + 1, size + 100, 126, 65536, 2**32, 2**63 - 1, 2**64 - 1, max(size - 1, 0)]
        )
    data = frame(opcode, payload, **options)
    if kind == "truncated":
        data = data[: rng.randrange(len(data))] if len(data) > 1 else b""
    if opcode != Opcode.CLOSE:
        return kind, data, None
    return kind, data, struct.unpack("!H", payload[:2])[0] if size >= 2 else 1005


async def test_random_frames_on_a_raw_socket_never_hurt_the_hub_or_anyone_else(
    make_hub: HubMaker,
) -> None:
    """300 random frames from a seeded generator (MT5HUB_FUZZ_SEED to vary it): reserved opcodes,
    RSV bits, unmasked, 7/16/64-bit lengths that lie, truncated frames, close codes good and bad,
    among valid publishes. Whenever the hub hangs up, the fuzzer reconnects; after a lie or a
    truncation it hangs up itself. The hub answers each with an error frame or a close code,
    never 1011, and the healthy pair and every viewer's state end where the publishes left them."""
    hub = make_hub(rate_limit=100000, rate_burst=100000)
    log = LogWatch(hub)
    rng = random.Random(FUZZ_SEED)
    print(f"fuzz seed {FUZZ_SEED} (set MT5HUB_FUZZ_SEED to vary it)")
    kinds: Counter[str] = Counter()
    closes: Counter[int | None] = Counter()  # the hub's own close codes
    echoed: Counter[int] = Counter()  # its answers to a close the fuzzer sent
    errors: Counter[str] = Counter()
    published: dict[int, list[dict[str, Any]]] = {}
    seen: list[dict[str, Any]] = []

    async def watch(view: WebSocketConnection) -> None:
        while True:
            seen.append(await next_update(view, "FUZZ"))

    async with (
        Healthy.connect(hub, key="FUZZ_HEALTHY") as healthy,
        viewer(hub.ws_url) as fuzz_view,
        trio.open_nursery() as bg,
    ):
        await receive(fuzz_view, "snapshot")
        bg.start_soon(watch, fuzz_view)
        n = connections = 0
        with trio.fail_after(3 * DEADLINE):
            while n < 300:
                connections += 1
                async with RawPublisher.connect(hub.http_port) as raw:
                    sent_close = None
                    while n < 300 and not raw.closed.is_set():
                        n += 1
                        kind, data, close_code = _random_frame(rng, n)
                        sent_close = close_code or sent_close
                        kinds[kind] += 1
                        if kind == "publish":
                            published[n] = table_rows(("EURUSD", "GBPUSD"), n)
                        if not await raw.send(data) or kind in ("lying-length", "truncated"):
                            break
                        await trio.sleep(0)
                    if raw.closed.is_set():
                        code = await raw.closed_with()
                        if code is not None and code == sent_close:
                            echoed[code] += 1
                        else:
                            closes[code] += 1
                    errors.update(m["code"] for m in raw.messages if m["type"] == "error")
                if connections % 10 == 0:
                    await healthy.still_served()
        await healthy.still_served()

        # The last word: a clean publish, which every viewer must end with, once the hub is
        # done with the fuzzer's connections (a publish still in flight there could come after).
        async def only_the_healthy_publisher() -> bool:
            return bool((await health(hub))["publishers"] == 1)

        await wait_for(only_the_healthy_publisher, "the fuzzer's connections gone")
        async with publisher(hub.ws_url) as pub:
            await pub.send_message(publish_frame(key="FUZZ", value=1000, pairs=["EURUSD"]))
            await synced(pub)
        final = table_rows(("EURUSD",), 1000)
        await wait_for(_has(seen, final), "the final publish at the live viewer")
        bg.cancel_scope.cancel()

    print(
        f"fuzz: {dict(kinds)} on {connections} connections; the hub closed {dict(closes)}, "
        f"echoed closes {dict(echoed)}, sent error frames {dict(errors)}"
    )
    assert kinds["random"] > 50 and kinds["lying-length"] > 5 and kinds["truncated"] > 5
    assert set(closes) <= {1002, 1007, 1009, None}, closes  # never 1011
    assert set(errors) <= {"bad_json", "bad_schema", "unknown_type"}, errors
    seqs = [m["seq"] for m in seen]
    # In order and never twice; frames of one read may be conflated to their latest.
    assert seqs == sorted(set(seqs)), seqs
    assert all(m["data"] in published.values() for m in seen[:-1])  # only real publishes
    async with viewer(hub.ws_url) as late:
        [table] = [t for t in (await receive(late, "snapshot"))["tables"] if t["key"] == "FUZZ"]
    assert table["data"] == final and table["seq"] == seqs[-1]
    assert (await health(hub))["status"] == "ok"
    assert await metric(hub, "mt5hub_closes_total", role="publisher", code="1011") == 0
    log.assert_clean()


def _has(seen: list[dict[str, Any]], data: list[dict[str, Any]]) -> Callable[[], Any]:
    async def check() -> bool:
        return bool(seen) and seen[-1]["data"] == data

    return check


async def test_a_deflate_bomb_is_closed_with_1009_without_the_hub_inflating_it(
    make_hub: HubMaker,
) -> None:
    """64 MiB of one byte compresses to ~64 KiB. Anyone may open a viewer and negotiate
    permessage-deflate (browsers do), and wsproto inflated each read of the socket whole before
    any size check: one read could cost the hub 64 MiB. mt5hub/hardening.py inflates at most
    the message limit at a time and refuses the message past it."""
    hub = make_hub()  # websocket_max_message_size: 1 MiB
    log = LogWatch(hub)
    async with Healthy.connect(hub) as healthy:
        pid = (await health(hub))["pid"]
        before = _peak_rss(pid)
        client = WSConnection(ConnectionType.CLIENT)
        stream = await trio.open_tcp_stream("127.0.0.1", hub.http_port)
        async with stream:
            offer = Request(host="127.0.0.1", target="/ws", extensions=[PerMessageDeflate()])
            await stream.send_all(client.send(offer))
            events: list[Any] = []
            with trio.fail_after(DEADLINE):
                while not any(isinstance(e, AcceptConnection) for e in events):
                    client.receive_data(await stream.receive_some(65536))
                    events += list(client.events())
            accepted = next(e for e in events if isinstance(e, AcceptConnection))
            assert [x.name for x in accepted.extensions] == ["permessage-deflate"]
            bomb = client.send(Message(data=b" " * (64 * 2**20)))  # compressed on our side
            assert len(bomb) < 2**20
            code = None
            with trio.fail_after(DEADLINE):
                await stream.send_all(bomb)
                while code is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    client.receive_data(data)
                    for event in client.events():
                        if isinstance(event, CloseConnection):
                            code = event.code
        peak = _peak_rss(pid)
        await healthy.still_served()
    grew = (peak - before) / 2**20
    print(f"deflate bomb ({len(bomb):,} bytes for 64 MiB): closed {code}, peak RSS +{grew:.1f} MiB")
    assert code == 1009
    assert grew < 32, f"the hub grew by {grew:.1f} MiB: it inflated the bomb"
    await log.wait_for_lines(1, "viewer", "closed 1009")
    log.assert_clean()


def _peak_rss(pid: int) -> int:
    """The hub worker's high-water mark of resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
