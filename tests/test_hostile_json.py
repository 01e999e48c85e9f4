"""Hostile JSON over a real connection: what the decoder refuses (tests/test_decoder.py) gets an
error frame and one log line and the connection stays up; binary frames, junk, huge numbers,
markup, 100,000 rows; hypothesis over the whole publish path on one connection.
What every hostile test must show: tests/hostile.py.
"""

from __future__ import annotations

import json
import re
from collections import Counter

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
    text_frame,
    viewer,
)
from hostile import Healthy, LogWatch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decoder import BIG_INT, REFUSED, _with
from test_hub_server import next_update, synced
from test_models import mangled_publishes
from wsproto.frame_protocol import Opcode

from mt5hub.errors import ProtocolError
from mt5hub.models import Decoder, parse_json
from mt5hub.state import update_text


async def test_json_the_hub_refuses_gets_an_error_frame_and_one_log_line_and_nobody_else_notices(
    shared_hub: RunningHub,
) -> None:
    """Each on a connection of its own, which stays up; a name given twice at the top level is
    refused, since parsers disagree on which one counts (see mt5hub.models._loads)."""
    log = LogWatch(shared_hub)
    async with Healthy.connect(shared_hub, key="JSON_HEALTHY") as healthy:
        for name, (text, code, detail) in REFUSED.items():
            async with RawPublisher.connect(shared_hub.http_port) as raw:
                await raw.send(text_frame(text))
                error = await raw.error()  # and the connection is still up
                assert (error["code"], name) == (code, name), error
                assert detail in error["detail"], (name, error)
            await healthy.still_served()
        assert (await health(shared_hub))["tables"] >= 1
    lines = await log.wait_for_lines(len(REFUSED), "publisher", "refused a frame")
    assert len(lines) == len(REFUSED)  # one each: none of them sent a second bad frame
    for (_, code, _), line in zip(REFUSED.values(), lines, strict=True):
        assert f"refused a frame, {code}: " in line
    async with viewer(shared_hub.ws_url) as late:  # nothing refused became a table
        keys = {t["key"] for t in (await receive(late, "snapshot"))["tables"]}
    assert not keys & {"BAD_JSON", "EA2", "ROWS"}
    log.assert_clean()


async def test_binary_frames_even_empty_ones_get_bad_json_and_the_connection_stays_up(
    shared_hub: RunningHub,
) -> None:
    """An empty binary message reached the session as "the peer has closed" (Quart-Trio passes
    on `bytes or text`), which ended it with 1000 and took its tables offline; found by the
    fuzzer below (mt5hub/transport.py)."""
    async with (
        Healthy.connect(shared_hub, key="BINARY_HEALTHY") as healthy,
        RawPublisher.connect(shared_hub.http_port) as raw,
    ):
        for payload in (b"", b"\x00", publish_frame(key="BINARY").encode()):
            await raw.send(frame(Opcode.BINARY, payload))
            error = await raw.error()
            assert (error["code"], error["detail"]) == (
                "bad_json",
                "binary frame: send JSON as a text frame",
            )
        await raw.send(text_frame(publish_frame(key="BINARY")))
        await raw.synced()
        assert (await next_update(healthy.view, "BINARY"))["seq"] == 1
        await healthy.still_served()


async def test_a_connection_that_sends_only_junk_is_logged_once_not_per_frame(
    shared_hub: RunningHub,
) -> None:
    log = LogWatch(shared_hub)
    async with RawPublisher.connect(shared_hub.http_port) as raw:
        for n in range(50):
            await raw.send(text_frame(f"junk {n}"))
        for _ in range(50):
            assert (await raw.error())["code"] == "bad_json"
    await log.wait_for_lines(1, "publisher", "refused a frame, bad_json")
    assert len(log.lines("refused a frame")) == 1
    assert await metric(shared_hub, "mt5hub_rejects_total", reason="bad_json") >= 50


async def test_huge_numbers_in_extra_fields_are_forwarded_as_they_were_written(
    shared_hub: RunningHub,
) -> None:
    """Valid JSON, even if no float holds it: the hub forwards the publisher's text."""
    async with Healthy.connect(shared_hub, key="HUGE_EXTRA") as healthy:
        text = _with(publish_frame(key="HUGE_EXTRA"), f'"big":1e400,"long":{BIG_INT}')
        await healthy.pub.send_message(text)
        with trio.fail_after(DEADLINE):
            while '"type":"update"' not in (raw := await healthy.view.get_message()):
                pass
        assert f'"big":1e400,"long":{BIG_INT}' in raw
        assert json.loads(raw)["long"] == int(BIG_INT)
        await healthy.still_served()


MARKUP = {
    "key": "<img src=x onerror=alert(1)>",
    "src": "</script><script>alert(document.cookie)</script>",
    "clientId": '" onmouseover="alert(1)',
    "pair": "<b>EUR</b>&amp;USD\u202e",
}


async def test_markup_in_names_is_accepted_and_reaches_viewers_verbatim(
    shared_hub: RunningHub,
) -> None:
    """Names are text, not HTML: the hub forwards them as they are (the dashboard renders them
    as text; tests/test_dashboard_browser.py)."""
    log = LogWatch(shared_hub)
    text = publish_frame(
        key=MARKUP["key"],
        src=MARKUP["src"],
        client_id=MARKUP["clientId"],
        pairs=[MARKUP["pair"], "GBPUSD"],
    )
    async with Healthy.connect(shared_hub, key="MARKUP_HEALTHY") as healthy:
        async with publisher(shared_hub.ws_url) as pub:
            await pub.send_message(text)
            await synced(pub)
        update = await next_update(healthy.view, MARKUP["key"])
        assert (update["key"], update["src"], update["clientId"]) == (
            MARKUP["key"],
            MARKUP["src"],
            MARKUP["clientId"],
        )
        assert update["data"] == json.loads(text)["data"]
        assert update["data"][0]["pair"] == MARKUP["pair"]
        await healthy.still_served()
    async with viewer(shared_hub.ws_url) as late:
        tables = (await receive(late, "snapshot"))["tables"]
    [table] = [t for t in tables if t["key"] == MARKUP["key"]]
    assert table["src"] == MARKUP["src"] and table["data"] == json.loads(text)["data"]
    assert not log.lines("refused a frame")
    log.assert_clean()


async def test_100000_rows_over_the_frame_limit_are_closed_with_1009(
    shared_hub: RunningHub,
) -> None:
    """Under the limit they are refused by the decoder, naming max_rows (the table above)."""
    log = LogWatch(shared_hub)
    row = {"pair": "P00000", "TF_data": [], "sum": 0, "sum_cell_color": "c"}
    text = json.dumps({"key": "ROWS", "src": "S", "clientId": "c", "data": [row] * 100_000})
    assert len(text) > 4 * 1024 * 1024
    async with Healthy.connect(shared_hub, key="ROWS_HEALTHY") as healthy:
        async with RawPublisher.connect(shared_hub.http_port) as raw:
            await raw.send(text_frame(text, key=b"\0\0\0\0"))
            assert await raw.closed_with() == 1009
        await healthy.still_served()
    await log.wait_for_lines(1, "publisher", "closed 1009 (frame too large)")
    log.assert_clean()


# -- hypothesis over the publish path -------------------------------------------------------------

DECODER = Decoder(max_rows=500)  # the shared hub's
KNOWN_CODES = {"bad_json", "bad_schema", "unknown_type"}


def expected(text: str) -> str:
    """What the hub does with this frame, computed as PublisherSession.handle and Hub.publish
    do it: "accepted", "ping", "pong", or the error code."""
    try:
        obj = parse_json(text)
        if not isinstance(obj, dict):
            return "bad_json"
        kind = obj.get("type", "publish")
        if kind == "publish":
            DECODER.accept(obj)
            update_text(text, obj, 0)
            return "accepted"
        return kind if kind in ("ping", "pong") else "unknown_type"
    except ProtocolError as error:
        return error.code


@st.composite
def publish_texts(draw: st.DrawFn) -> str:
    """A (maybe mangled) publish as text, maybe mangled again as text."""
    message = draw(mangled_publishes())
    text = json.dumps(message, ensure_ascii=draw(st.booleans()))
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: only its escape can be sent
        text = json.dumps(message)
    mutation = draw(st.sampled_from(["none", "twice", "number", "cut", "control", "deep"]))
    if mutation == "twice" and text.endswith("}"):
        name = draw(st.sampled_from(["key", "src", "clientId", "data", "type", "x"]))
        text = _with(text, f"{json.dumps(name)}:{json.dumps(message.get(name, 1))}")
    elif mutation == "number":
        numbers = list(re.finditer(r"(?<![\w.\"])-?\d+(\.\d+)?([eE][-+]?\d+)?", text))
        if numbers:
            spot = draw(st.sampled_from(numbers))
            odd = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", BIG_INT, "-0"]))
            text = text[: spot.start()] + odd + text[spot.end() :]
    elif mutation == "cut" and text:
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif mutation == "control":
        spot = draw(st.integers(0, len(text)))
        text = text[:spot] + draw(st.sampled_from(["\x00", "\x07", "\x1b", "\u0085"])) + text[spot:]
    elif mutation == "deep" and text.endswith("}"):
        text = _with(text, '"deep":' + "[" * 5000 + "]" * 5000)
    return text


async def test_any_publish_over_one_real_connection_is_accepted_or_gets_an_error_never_a_close(
    shared_hub: RunningHub,
) -> None:
    """Hypothesis (40 examples, derandomized) drives one publisher connection: each frame is
    either accepted (the viewer gets it, intact) or refused with the error code the decoder
    gives it offline, and the connection stays up through all of them."""
    counts: Counter[str] = Counter()
    log = LogWatch(shared_hub)
    async with (
        viewer(shared_hub.ws_url) as view,
        RawPublisher.connect(shared_hub.http_port) as raw,
    ):
        await receive(view, "snapshot")

        async def one(text: str) -> None:
            want = expected(text)
            counts[want] += 1
            await raw.send(text_frame(text))
            if want in KNOWN_CODES:
                error = await raw.error()
                assert error["code"] == want, (text[:300], error)
            else:  # accepted (or a heartbeat): no error before the pong (two for a ping)
                await raw.synced(pongs=2 if want == "ping" else 1)
                assert not raw.count("error"), (text[:300], raw.messages)
            if want == "accepted":
                sent = json.loads(text)
                update = await receive(view, "update", timeout=DEADLINE)
                assert (update["key"], update["src"]) == (sent["key"], sent["src"])
                assert update["data"] == sent["data"]
            assert not raw.closed.is_set(), text[:300]

        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(publish_texts())
        def check(text: str) -> None:
            trio.from_thread.run(one, text)

        await trio.to_thread.run_sync(check)

        # Nothing refused reached the viewer: the next update it gets is this one.
        await raw.send(text_frame(publish_frame(key="HYPOTHESIS_END")))
        assert (await receive(view, "update", timeout=DEADLINE))["key"] == "HYPOTHESIS_END"
    print(f"hypothesis over the socket: {dict(counts)}")
    assert counts["accepted"] >= 3 and sum(counts[c] for c in KNOWN_CODES) >= 10
    log.assert_clean()
