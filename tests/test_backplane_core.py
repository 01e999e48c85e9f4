"""The backplane's rules without Redis: how a hub applies what a shared backplane delivers, what it
does with events when Redis goes away, and how its reconnects are spaced.

Redis itself is tested for real in test_backplane_redis.py; here the hub is driven directly and
viewers are subscribers that take every frame at once, on trio's MockClock.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from mt5hub.backplane import (
    BATCH_LIMIT,
    PENDING_LIMIT,
    Backoff,
    RedisBackplane,
    _redact,
    is_outage,
    records,
)
from mt5hub.hub import Event, Frame, Hub, Subscriber

T = ("EA1", "EURUSD_PERIOD_H1")


def update_record(seq: int, origin: str, table: tuple[str, str], text: str) -> bytes:
    """What the Lua scripts PUBLISH for an update (mt5hub/backplane/records.py)."""
    return records.update_record(seq, time.time(), origin, table, text)


presence_record = records.presence_record


class PromptViewer:
    """A viewer that takes every frame the moment it is offered, so none is ever conflated."""

    def __init__(self, hub: Hub) -> None:
        self.taken: list[dict[str, Any]] = []

    def offer(self, frame: Frame) -> bool:
        self.taken.append(json.loads(frame.text))
        return False


def drain(viewer: Subscriber) -> list[dict[str, Any]]:
    """What the viewer took since the last drain."""
    assert isinstance(viewer, PromptViewer)
    taken, viewer.taken = viewer.taken, []
    return taken


def update(seq: int | None, value: int = 0, table: tuple[str, str] = T) -> Event:
    text = json.dumps({"type": "update", "key": table[0], "src": table[1], "v": value})
    return Event("update", table, text, seq=seq)


async def test_updates_numbered_by_the_backplane_are_applied_once_and_never_go_back() -> None:
    hub = Hub()
    with hub.viewer(PromptViewer(hub)) as mailbox:
        drain(mailbox)  # the snapshot
        assert [hub.apply(update(seq)) for seq in (1, 2, 2, 1, 5, 4, 6)] == [
            True, True, False, False, True, False, True
        ]  # fmt: skip
        assert [m["seq"] for m in drain(mailbox)] == [1, 2, 5, 6]
        assert hub.apply(update(None, value=7))  # local numbering goes on after the last seq
        assert drain(mailbox)[0]["seq"] == 7


async def test_presence_is_sent_to_viewers_only_when_it_changes() -> None:
    hub = Hub()
    with hub.viewer(PromptViewer(hub)) as mailbox:
        drain(mailbox)
        online = hub.presence_event(T, "EA1_1", online=True)
        offline = hub.presence_event(T, "EA1_1", online=False)
        assert [hub.apply(e) for e in (online, online, offline, offline, online)] == [
            True, False, True, False, True
        ]  # fmt: skip
        assert [m["online"] for m in drain(mailbox)] == [True, False, True]
        hub.apply(update(3))
        (entry,) = json.loads(hub.snapshots.everything()[0].text)["tables"]
        assert (entry["seq"], entry["online"]) == (3, True)
        assert hub.tables[T].published_text() == update(3).text  # what a resync offers


def _up(bp: RedisBackplane) -> None:
    bp._up = True  # as after a connection: publishes queue for the writer


async def test_a_burst_while_connected_is_queued_in_order_without_merging() -> None:
    hub, bp = Hub(), RedisBackplane("redis://127.0.0.1:1/0")
    hub.backplane = bp
    _up(bp)
    for n in range(100):
        bp.publish(hub, update(None, n))
    assert [json.loads(e.text)["v"] for e in bp.outbound.unsent()] == list(range(100))
    assert hub.metrics.backplane_conflated._value.get() == 0


async def test_past_the_pending_limit_a_table_keeps_only_its_newest_update() -> None:
    hub, bp = Hub(), RedisBackplane("redis://127.0.0.1:1/0")
    _up(bp)
    other = ("EA2", "X")
    for n in range(PENDING_LIMIT):
        bp.publish(hub, update(None, n, table=other if n == 0 else T))
    bp.publish(hub, update(None, -1))  # replaces T's last pending update, in its place
    bp.publish(hub, update(None, -2, table=other))  # replaces other's
    pending = bp.outbound.unsent()
    assert len(pending) == PENDING_LIMIT
    assert json.loads(pending[0].text)["v"] == -2
    assert json.loads(pending[-1].text)["v"] == -1
    assert hub.metrics.backplane_conflated._value.get() == 2


async def test_when_redis_goes_away_unsent_and_unconfirmed_events_reach_local_viewers() -> None:
    hub, bp = Hub(), RedisBackplane("redis://127.0.0.1:1/0")
    hub.backplane = bp
    with hub.viewer(PromptViewer(hub)) as mailbox:
        drain(mailbox)
        _up(bp)
        bp.outbound.inflight = {1: update(None, 1), 2: update(None, 2)}  # written, 1 came back
        bp.deliver(hub, update_record(1, f"{bp.worker}#1", T, update(None, 1).text))
        bp.publish(hub, hub.presence_event(T, "EA1_1", online=True))
        bp.publish(hub, update(None, 3))
        bp._down(hub, ConnectionError("Connection lost"))
        got = drain(mailbox)
        assert [(m["type"], m.get("v"), m.get("seq")) for m in got] == [
            ("update", 1, 1),  # from Redis
            ("update", 2, 2),  # written but never confirmed: applied here, numbered locally
            ("presence", None, None),
            ("update", 3, 3),
        ]
        assert not bp.outbound.unsent()
        assert bp.status()["connected"] is False
        bp.publish(hub, update(None, 4))  # alone now: straight to the viewers
        assert drain(mailbox)[0]["v"] == 4


async def test_one_channel_message_carries_a_batch_of_updates_and_presence_in_order() -> None:
    hub, bp = Hub(), RedisBackplane("redis://127.0.0.1:1/0")
    with hub.viewer(PromptViewer(hub)) as mailbox:
        drain(mailbox)
        table = ("EA\n1", "src with spaces")  # JSON escapes what could split a record
        pretty = '{"type":"update",\n  "key":"EA\\n1","note":"€ two\\nlines"}'  # pretty-printed
        message = (
            presence_record(True, table, "client 1")
            + update_record(7, "other-hub#3", table, pretty)
            + update_record(8, "", table, '{"type":"update","n":8}')
            + presence_record(False, table, "client 1")
        )
        assert bp.deliver(hub, message) == 4
        online, first, second, offline = drain(mailbox)
        assert (online["key"], online["clientId"], online["online"]) == (table[0], "client 1", True)
        assert (first["seq"], first["note"], second["seq"]) == (7, "€ two\nlines", 8)
        assert offline["online"] is False


async def test_reconnects_back_off_exponentially_with_jitter_up_to_a_cap(
    autojump_clock: MockClock,
) -> None:
    backoff = Backoff(initial=0.1, maximum=5.0, rng=random.Random(7))
    waits = []
    for _ in range(10):
        start = trio.current_time()
        await trio.sleep(backoff.next())
        waits.append(trio.current_time() - start)
    ceilings = [min(5.0, 0.1 * 2**n) for n in range(10)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    assert waits[-1] >= 2.5  # capped, not growing forever
    backoff.reset()
    assert backoff.next() <= 0.1


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (ConnectionError("refused"), True),
        (TimeoutError(), True),
        (ExceptionGroup("g", [ExceptionGroup("h", [ConnectionRefusedError()])]), True),
        (ExceptionGroup("g", [OSError(), KeyError("bug")]), False),
        (KeyError("bug"), False),
    ],
)
def test_only_network_and_redis_errors_count_as_an_outage(error: Exception, outage: bool) -> None:
    assert is_outage(error) is outage


def test_a_password_in_the_backplane_url_never_reaches_the_logs() -> None:
    assert _redact("redis://:s3cret@10.0.0.5:6379/0") == "redis://***@10.0.0.5:6379/0"
    assert _redact("redis://user:s3cret@host/0") == "redis://***@host/0"
    assert _redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


async def test_a_backlog_for_redis_goes_out_in_bounded_calls_in_order(
    autojump_clock: MockClock,
) -> None:
    hub, bp = Hub(), RedisBackplane("redis://127.0.0.1:1/0")
    _up(bp)
    tables = [(f"EA{n}", "X") for n in range(BATCH_LIMIT + 10)]
    for n, table in enumerate(tables):
        bp.publish(hub, update(None, n, table=table))
    bp.publish(hub, hub.presence_event(tables[-1], "EA_last", online=True))
    calls = []

    class Script:
        async def __call__(self, keys: list[str], args: list[Any]) -> int:
            calls.append([a for a in args[3:] if a in ("U", "C")])
            return 0

    class Client:
        def register_script(self, _lua: str) -> Script:
            return Script()

    with trio.move_on_after(1):  # the writer waits for more once the backlog is out
        await bp.outbound.run(hub, Client())  # type: ignore[arg-type]
    assert [len(c) for c in calls] == [BATCH_LIMIT, 11]
    assert calls[1][-1] == "C"  # the presence stays after the updates it followed
