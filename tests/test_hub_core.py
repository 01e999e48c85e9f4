"""The fan-out core and sessions, driven through memory channels: no sockets, no Quart.

Time is trio's MockClock (autojump): an hour of heartbeats and timeouts runs in milliseconds and
the outcome never depends on how busy the machine is.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from helpers import publish_frame
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import MockClock

from mt5hub.config import Settings, TokenGrant
from mt5hub.hub import Event, Frame, Hub, Inbox, Subscriber
from mt5hub.metrics import Metrics
from mt5hub.models import Decoder
from mt5hub.publisher import PublisherSession
from mt5hub.server import LINK, Link, QuartTransport
from mt5hub.session import CLOSE_GRACE, Peer
from mt5hub.state import update_text
from mt5hub.viewer import ViewerSession


class MemoryTransport:
    """A WebSocket made of a memory channel to the peer; what the peer says goes to the
    session's `feed` at once, as Hypercorn's side hands it over (mt5hub.server's Link). Like
    Hypercorn's, `send` cannot be cancelled while the peer is not reading; only `abort` frees
    it."""

    def __init__(self, window: int = 0) -> None:
        self._to_peer, self.from_hub = trio.open_memory_channel[str](window)
        self._peer: Peer | None = None
        self._early: list[str | bytes] = []
        self._gone = trio.Event()
        self.closed_with: tuple[int, str] | None = None
        self.aborted = False
        self.peer_closed = False
        self.server_stops = trio.Event()
        self.drained: list[str | bytes] = []
        self.progress_at = trio.current_time()  # when the peer last took a frame

    async def serve(self, peer: Peer) -> None:
        self._peer = peer
        for message in self._early:
            peer.feed(message)
        await self._gone.wait()

    async def send(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        with trio.CancelScope(shield=True):
            try:
                for frame in frames:
                    await self._to_peer.send(frame.text)
                    self.progress_at = trio.current_time()
            except trio.ClosedResourceError:
                pass  # aborted under us: the frames are lost, as on a reset socket
        return False  # no pings: flow control is tested on real sockets

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)
        self._to_peer.close()

    def abort(self) -> None:
        self.aborted = True
        self._to_peer.close()

    async def stopping(self) -> None:
        await self.server_stops.wait()

    async def drain(self) -> None:
        await self._gone.wait()  # what the peer says meanwhile lands in `drained`

    # the peer's side
    async def say(self, obj: Any) -> None:
        message = obj if isinstance(obj, str | bytes) else json.dumps(obj)
        if self.closed_with is not None:
            self.drained.append(message)
        elif self._peer is None:
            self._early.append(message)
        else:
            self._peer.feed(message)
        await trio.lowlevel.checkpoint()

    def hang_up(self) -> None:
        self.peer_closed = True
        self._gone.set()

    async def hear(self) -> dict[str, Any]:
        return json.loads(await self.from_hub.receive())  # type: ignore[no-any-return]

    def heard_so_far(self) -> list[dict[str, Any]]:
        messages = []
        while True:
            try:
                messages.append(json.loads(self.from_hub.receive_nowait()))
            except (trio.WouldBlock, trio.EndOfChannel):
                return messages


SETTINGS = Settings(
    ping_interval=10,
    publisher_timeout=30,
    viewer_timeout=30,
    slow_viewer_timeout=10,
    viewer_buffer=4,
    rate_limit=10,
    rate_burst=10,
    flood_seconds=3,
)
GRANT = TokenGrant("t", ("*",), "test")


@attrs.define
class Rig:
    hub: Hub
    nursery: trio.Nursery
    settings: Settings

    async def viewer(self, window: int = 100, **options: Any) -> MemoryTransport:
        """A viewer (`options`: ViewerSession's subscription, delta, refused)."""
        transport = MemoryTransport(window)
        session = ViewerSession(self.hub, transport, self.settings, "viewer", **options)
        await self._start(session.run)
        return transport

    async def publisher(self, grant: TokenGrant = GRANT) -> MemoryTransport:
        transport = MemoryTransport(100)
        session = PublisherSession(
            self.hub, transport, self.settings, "publisher", grant, Decoder(500), 1 << 20
        )
        await self._start(session.run)
        return transport

    async def _start(self, run: Callable[[], Any]) -> None:
        self.nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def rig(settings: Settings = SETTINGS) -> AsyncIterator[Rig]:
    async with trio.open_nursery() as nursery:
        yield Rig(
            Hub(viewer_buffer=settings.viewer_buffer, wall_clock=lambda: 1000.0), nursery, settings
        )
        nursery.cancel_scope.cancel()


def frame(table: str, n: int) -> Frame:
    return Frame(f'{{"table":"{table}","n":{n}}}', ("update", table, ""))


def _pending(box: Subscriber) -> list[Frame]:
    assert isinstance(box, Inbox)
    frames = []
    while True:
        try:
            frames.append(box.receive.receive_nowait())
        except trio.WouldBlock:
            return frames


def _apply_all(hub: Hub, events: list[tuple[str, int]]) -> None:
    """Updates, and presence changes that each turn their table on or off."""
    for kind, n in events:
        table = (f"EA{n}", "X")
        if kind == "update":
            hub.apply(Event("update", table, f'{{"type":"update","t":{n}}}'))
        else:
            online = table not in hub.tables or not hub.tables[table].online
            hub.apply(hub.presence_event(table, "EA_client", online=online))


events = st.lists(st.tuples(st.sampled_from(["update", "presence"]), st.integers(0, 3)))


@given(events, events, events)
def test_a_viewer_away_comes_back_to_what_its_mailbox_would_hold(
    before: list[tuple[str, int]], meanwhile: list[tuple[str, int]], after: list[tuple[str, int]]
) -> None:
    """Hub.away: leaving a viewer out of the fan-out while its peer is behind changes nothing it
    is sent (the latest frame of each slot, each slot once) or counts as conflated."""
    hub = Hub()
    with hub.viewer() as there, hub.viewer() as away:
        _apply_all(hub, before)
        assert len(_pending(there)) == len(_pending(away))  # both written out
        with hub.away(away):
            _apply_all(hub, meanwhile)
            with hub.away(away):  # away already: nothing changes
                pass
            assert len(_pending(away)) == 0
        _apply_all(hub, after)
        held_there, held_away = _pending(there), _pending(away)
    assert {f.slot: f for f in held_there} == {f.slot: f for f in held_away}
    assert len(held_there) == len(held_away)  # each slot once
    since = meanwhile + after
    conflated = len(before) - len(set(before)) + len(since) - len(set(since))
    assert hub.metrics.conflated.value == 2 * conflated  # for each of the two


async def test_inbox_holds_only_the_latest_frame_of_each_table_oldest_table_first(
    autojump_clock: MockClock,
) -> None:
    box = Inbox(2, Metrics(), "viewer")
    conflated = 0
    for n in range(1, 6):
        conflated += box.offer(frame("A", n))
        conflated += box.offer(frame("B", n))
    assert len(box) == 2  # one waiting frame per table, however far behind the reader is
    got = [json.loads((await box.receive.receive()).text) for _ in range(2)]
    assert got == [{"table": "A", "n": 5}, {"table": "B", "n": 5}]
    assert conflated == 8  # A1..A4 and B1..B4 never delivered
    with pytest.raises(trio.WouldBlock):
        box.receive.receive_nowait()


async def test_inbox_delivers_everything_to_a_reader_that_keeps_up(
    autojump_clock: MockClock,
) -> None:
    box = Inbox(2, Metrics(), "viewer")
    got = []
    for n in range(1, 6):
        assert not box.offer(frame("A", n))
        assert not box.offer(frame("B", n))
        got += [json.loads((await box.receive.receive()).text)["n"] for _ in range(2)]
    assert got == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


async def test_inbox_never_lets_an_older_frame_overtake_a_newer_one(
    autojump_clock: MockClock,
) -> None:
    box = Inbox(1, Metrics(), "viewer")
    box.offer(frame("A", 1))
    box.offer(frame("B", 1))
    box.offer(frame("A", 2))  # replaces A1 in its place, ahead of B
    assert json.loads((await box.receive.receive()).text) == {"table": "A", "n": 2}
    box.offer(frame("A", 3))  # A is not waiting any more: it queues behind B
    assert [json.loads((await box.receive.receive()).text) for _ in range(2)] == [
        {"table": "B", "n": 1},
        {"table": "A", "n": 3},
    ]
    assert len(box) == 0


async def test_inbox_keeps_frames_without_a_table_in_order_and_bounded(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    box = Inbox(2, metrics, "viewer")
    box.offer(Frame('{"type":"snapshot"}'))
    box.offer(frame("A", 1))
    box.offer(Frame('{"type":"ping"}'))
    box.offer(Frame('{"type":"error"}'))  # a third frame without a slot: over the bound
    box.offer(frame("A", 2))
    texts = [(await box.receive.receive()).text for _ in range(3)]
    assert texts == ['{"type":"snapshot"}', '{"table":"A","n":2}', '{"type":"ping"}']
    assert metrics.dropped.labels("viewer")._value.get() == 1
    box.offer(Frame('{"type":"error"}'))  # room again once the reader took them
    assert (await box.receive.receive()).text == '{"type":"error"}'


async def test_inbox_receive_waits_for_a_frame(autojump_clock: MockClock) -> None:
    box = Inbox(2, Metrics(), "viewer")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trio.sleep(1))
        got: list[Frame] = []

        async def take() -> None:
            got.append(await box.receive.receive())

        nursery.start_soon(take)
        await trio.sleep(0.5)
        assert got == []
        box.offer(frame("A", 1))
    assert [f.text for f in got] == ['{"table":"A","n":1}']


async def test_viewer_gets_snapshot_then_updates_then_presence(autojump_clock: MockClock) -> None:
    async with rig() as r:
        pub = await r.publisher()
        await pub.say(publish_frame(key="EA1", src="S1", value=1))
        await trio.testing.wait_all_tasks_blocked()
        view = await r.viewer()
        snapshot = await view.hear()
        assert snapshot["type"] == "snapshot"
        [table] = snapshot["tables"]
        assert (table["key"], table["src"], table["seq"], table["online"]) == ("EA1", "S1", 1, True)
        await pub.say(publish_frame(key="EA1", src="S1", value=2, note="kept"))
        update = await view.hear()
        assert update["type"] == "update" and update["seq"] == 2 and update["note"] == "kept"
        assert update["data"][0]["TF_data"][0] == {"M1": 2.0, "cell_color": "clrGreen"}
        pub.hang_up()
        assert await view.hear() == {
            "type": "presence",
            "key": "EA1",
            "src": "S1",
            "clientId": "EA1_1",
            "online": False,
            "ts": 1000000,
        }


async def test_table_stays_online_until_its_last_publisher_leaves(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer()
        assert (await view.hear())["type"] == "snapshot"
        first, second = await r.publisher(), await r.publisher()
        await first.say(publish_frame(client_id="A"))
        await trio.testing.wait_all_tasks_blocked()  # (in one instant, A's would be conflated)
        await second.say(publish_frame(client_id="B"))
        await trio.testing.wait_all_tasks_blocked()
        kinds = [(m["type"], m.get("clientId")) for m in view.heard_so_far()]
        assert kinds == [("presence", "A"), ("update", "A"), ("update", "B")]
        first.hang_up()
        await trio.testing.wait_all_tasks_blocked()
        assert view.heard_so_far() == []  # B still publishes it: no presence change
        second.hang_up()
        assert (await view.hear())["online"] is False


async def test_offline_presence_names_the_client_that_published_each_table(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer()
        first, second = await r.publisher(), await r.publisher()
        await first.say(publish_frame(key="EA1", client_id="A"))
        await first.say(publish_frame(key="EA2", client_id="A2"))
        await second.say(publish_frame(key="EA3", client_id="B"))
        await trio.testing.wait_all_tasks_blocked()
        view.heard_so_far()
        first.hang_up()
        await trio.testing.wait_all_tasks_blocked()
        offline = {
            (m["key"], m["clientId"]) for m in view.heard_so_far() if m["type"] == "presence"
        }
        assert offline == {("EA1", "A"), ("EA2", "A2")}


async def test_a_publish_that_cannot_be_forwarded_is_refused_and_changes_nothing(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer()
        pub = await r.publisher()
        # A field the hub owns forces re-encoding, and 1e400 (inf) cannot be encoded as JSON.
        frame = publish_frame(type="publish", huge=1)[:-1] + ',"extra":1e400}'
        await pub.say(frame)
        await pub.say(publish_frame(type="publish"))
        await trio.testing.wait_all_tasks_blocked()
        [error] = pub.heard_so_far()
        assert error["code"] == "bad_json" and "cannot be forwarded" in error["detail"]
        updates = [m for m in view.heard_so_far() if m["type"] == "update"]
        assert [m["seq"] for m in updates] == [1]
        assert pub.closed_with is None


async def test_slow_viewer_never_delays_others_and_is_dropped_when_stuck(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        stuck = await r.viewer(window=0)  # reads nothing, ever
        healthy = await r.viewer(window=1000)
        pub = await r.publisher()
        start = trio.current_time()
        for n in range(1, 6):  # 10 frames: the rate limiter's burst
            await pub.say(publish_frame(key="EA1", value=n))
            await pub.say(publish_frame(key="EA2", value=n))
            # Every task that can run has run (the clock does not move): the healthy viewer's
            # writer gets its turns whichever order trio runs the woken tasks in.
            await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == start  # nothing waited on the stuck viewer
        updates = [m for m in healthy.heard_so_far() if m["type"] == "update"]
        # All 10 came in one instant, so the healthy viewer may skip some, but it holds the
        # latest of both tables, in order, without waiting for the stuck one.
        assert {(m["key"], m["seq"]) for m in updates[-2:]} == {("EA1", 5), ("EA2", 5)}
        for key in ("EA1", "EA2"):
            seqs = [m["seq"] for m in updates if m["key"] == key]
            assert seqs == sorted(seqs) and len(seqs) >= 2
        await trio.sleep(SETTINGS.slow_viewer_timeout + 1)
        assert stuck.aborted and r.hub.metrics.closes.labels("viewer", "4009")._value.get() == 1
        assert len(r.hub.viewers) == 1


class PingingTransport(MemoryTransport):
    """A viewer's socket with flow control: each write may end with a ping, which the peer
    answers (`pong`) only when the test says it has read that far."""

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.pings: list[bytes] = []

    async def send(self, frames: Sequence[Frame], ping: bytes | None = None) -> bool:
        await super().send(frames)
        if ping is None:
            return False
        self.pings.append(ping)
        return True

    def pong(self) -> None:
        assert self._peer is not None
        for ping in self.pings:
            self._peer.pong(ping)
        self.pings.clear()


async def test_a_prompt_viewer_is_written_to_as_updates_come_and_a_lagging_one_once_per_answer(
    autojump_clock: MockClock,
) -> None:
    lag, interval = 0.05, 0.25
    async with rig(attrs.evolve(SETTINGS, viewer_lag=lag, viewer_lag_interval=interval)) as r:
        view = PingingTransport(1000)
        await r._start(ViewerSession(r.hub, view, r.settings, "viewer").run)
        pub = await r.publisher()

        async def publish(*values: int) -> list[tuple[str, int | None]]:
            """Publish these values; what the viewer was written meanwhile (type, seq)."""
            for value in values:
                await pub.say(publish_frame(key="EA1", value=value))
                await trio.testing.wait_all_tasks_blocked()
            return [(m["type"], m.get("seq")) for m in view.heard_so_far()]

        assert (await view.hear())["type"] == "snapshot"
        assert len(view.pings) == 1  # the first write carries a ping
        # Its ping is out, but younger than `lag`: the viewer counts as keeping up.
        assert await publish(1) == [("presence", None), ("update", 1)]
        assert len(view.pings) == 1  # one ping out at a time
        await trio.sleep(lag)  # the ping is now `lag` old: behind, so the hub holds what comes
        assert await publish(2, 3) == []
        view.pong()  # read it all: the latest goes out, with a new ping
        await trio.testing.wait_all_tasks_blocked()
        assert [m["seq"] for m in view.heard_so_far()] == [3]
        assert r.hub.metrics.conflated.value == 1  # update 2, never sent
        assert len(view.pings) == 1
        # Its last answer took `lag`: until one comes back sooner, one write per answer.
        assert await publish(4) == []
        view.pong()  # at once
        await trio.testing.wait_all_tasks_blocked()
        assert [m["seq"] for m in view.heard_so_far()] == [4]
        assert view.pings == []  # the last ping went out less than `lag` ago
        assert await publish(5) == [("update", 5)]  # prompt again: written as it comes
        await trio.sleep(lag)
        assert await publish(6) == [("update", 6)]
        assert view.pings == []  # it keeps up: pinged at most every `interval`
        await trio.sleep(interval - lag)
        assert await publish(7) == [("update", 7)]
        assert len(view.pings) == 1  # `interval` since the last: this write carried one
        await trio.sleep(SETTINGS.slow_viewer_timeout - 1)  # it answers nothing more...
        assert not view.aborted
        await trio.sleep(2)  # ...and is dropped once slow_viewer_timeout has passed
        assert view.aborted
        assert r.hub.metrics.closes.labels("viewer", "4009")._value.get() == 1


async def test_viewer_lag_is_0_to_inf_seconds_inf_is_no_flow_control_its_interval_finite(
    tmp_path: Any,
) -> None:
    from mt5hub.config import load_config
    from mt5hub.errors import ConfigError

    for bad in ("-0.1", "nan"):
        (tmp_path / "hub.toml").write_text(f"[mt5hub]\nviewer_lag = {bad}\n")
        with pytest.raises(ConfigError, match="viewer_lag: must be 0 seconds or more"):
            load_config(tmp_path / "hub.toml", environ={})
    for bad in ("-1.0", "nan", "inf"):  # a viewer that keeps up must be pinged now and then
        (tmp_path / "hub.toml").write_text(f"[mt5hub]\nviewer_lag_interval = {bad}\n")
        with pytest.raises(ConfigError, match="viewer_lag_interval: must be 0 seconds or more"):
            load_config(tmp_path / "hub.toml", environ={})
    (tmp_path / "hub.toml").write_text("[mt5hub]\nviewer_lag = inf\n")
    settings = load_config(tmp_path / "hub.toml", environ={}).settings
    assert ViewerSession(Hub(), MemoryTransport(), settings, "viewer").flow.lag is None


async def test_conflated_viewer_still_ends_with_the_latest_state_of_every_table(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        slow = await r.viewer(window=0)
        pub = await r.publisher()
        for n in range(1, 10):  # rate limit is 10 frames/s with a burst of 10
            for key in ("EA1", "EA2", "EA3"):
                await pub.say(publish_frame(key=key, value=n))
            await trio.sleep(1)
        latest: dict[str, int] = {}
        with trio.move_on_after(1):
            while True:
                message = await slow.hear()
                if message["type"] == "update":
                    assert message["seq"] > latest.get(message["key"], 0)  # never backwards
                    latest[message["key"]] = message["seq"]
        assert latest == {"EA1": 9, "EA2": 9, "EA3": 9}


async def test_quiet_viewer_is_pinged_and_silent_viewer_dropped_with_4008(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        answering, silent = await r.viewer(), await r.viewer()
        for transport in (answering, silent):
            assert (await transport.hear())["type"] == "snapshot"
        with trio.move_on_after(SETTINGS.viewer_timeout + 5):
            while True:
                assert (await answering.hear())["type"] == "ping"
                await answering.say({"type": "pong"})
        assert silent.closed_with == (4008, "heartbeat timeout")
        assert [m["type"] for m in silent.heard_so_far()] == ["ping"] * 2  # at 10 s and 20 s
        assert answering.closed_with is None


async def test_silent_publisher_is_reported_offline_and_closed_with_4008(
    autojump_clock: MockClock,
) -> None:
    async with rig(attrs.evolve(SETTINGS, viewer_timeout=1000)) as r:  # the viewer outlives it
        view = await r.viewer()
        pub = await r.publisher()
        await pub.say(publish_frame())
        start = trio.current_time()
        while (message := await view.hear())["type"] != "presence" or message["online"]:
            pass
        assert trio.current_time() - start == pytest.approx(SETTINGS.publisher_timeout)
        assert pub.closed_with == (4008, "heartbeat timeout")


async def test_publisher_heartbeat_keeps_it_online(autojump_clock: MockClock) -> None:
    async with rig() as r:
        pub = await r.publisher()
        await pub.say(publish_frame())
        for _ in range(20):
            await trio.sleep(SETTINGS.ping_interval - 1)  # before the hub would ping it
            await pub.say({"type": "ping"})
        await trio.testing.wait_all_tasks_blocked()
        assert pub.closed_with is None
        assert [m["type"] for m in pub.heard_so_far()] == ["pong"] * 20
        assert all(state.online for state in r.hub.tables.values())


async def test_bad_frames_get_error_frames_and_the_connection_carries_on(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer()
        pub = await r.publisher(TokenGrant("t", ("EA1",), "ea1"))
        for bad in (
            "{nope",
            "[1,2]",
            '{"key":"EA1"}',
            publish_frame(key="EA2"),
            '{"type":"dance"}',
            b"\x00binary",
            '{"sum": NaN}',
        ):
            await pub.say(bad)
        await pub.say(publish_frame(key="EA1"))
        await trio.testing.wait_all_tasks_blocked()
        errors = pub.heard_so_far()
        assert [e["code"] for e in errors] == [
            "bad_json",
            "bad_json",
            "bad_schema",
            "forbidden_key",
            "unknown_type",
            "bad_json",
            "bad_json",
        ]
        assert errors[2]["detail"].startswith("$.src: required field missing")
        assert [m["type"] for m in view.heard_so_far()] == ["snapshot", "presence", "update"]
        assert pub.closed_with is None


async def test_rate_limit_drops_excess_then_closes_a_sustained_flood_with_1008(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer()
        polite, flood = await r.publisher(), await r.publisher()
        for tick in range(50):  # 5 s: the flood sends 100 frames/s, the polite one 5/s
            if tick % 2 == 0:
                await polite.say(publish_frame(key="POLITE", value=tick))
            for _ in range(10):
                await flood.say(publish_frame(key="FLOOD", value=tick))
            await trio.sleep(0.1)
        assert flood.closed_with == (1008, "rate limit exceeded")
        notices = [m for m in flood.heard_so_far() if m["type"] == "error"]
        assert {m["code"] for m in notices} == {"rate_limited"}
        assert 2 <= len(notices) <= 4  # one a second, not one per dropped frame
        polite_updates = [m for m in view.heard_so_far() if m.get("key") == "POLITE"]
        assert [m["seq"] for m in polite_updates if m["type"] == "update"] == list(range(1, 26))
        assert polite.closed_with is None


async def test_cancelled_sessions_close_with_1001(autojump_clock: MockClock) -> None:
    async with trio.open_nursery() as outer:
        hub = Hub()
        transport = MemoryTransport(10)
        outer.start_soon(ViewerSession(hub, transport, SETTINGS, "v").run)
        await trio.testing.wait_all_tasks_blocked()
        outer.cancel_scope.cancel()
    assert transport.closed_with == (1001, "hub shutting down")
    assert not hub.viewers


async def test_when_the_server_starts_to_stop_every_session_says_1001_at_once(
    autojump_clock: MockClock,
) -> None:
    hub = Hub()
    viewer_side, publisher_side = MemoryTransport(10), MemoryTransport(10)
    grant = SETTINGS.tokens[0]
    async with trio.open_nursery() as outer:
        outer.start_soon(ViewerSession(hub, viewer_side, SETTINGS, "v").run)
        outer.start_soon(
            PublisherSession(hub, publisher_side, SETTINGS, "p", grant, Decoder(500), 2**20).run
        )
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        viewer_side.server_stops.set()
        publisher_side.server_stops.set()
    assert trio.current_time() == start  # not at the end of any grace period: now
    assert viewer_side.closed_with == publisher_side.closed_with == (1001, "hub shutting down")
    assert not hub.viewers and hub.publishers == 0


async def test_shutdown_aborts_a_viewer_stuck_in_a_send(
    autojump_clock: MockClock,
) -> None:
    hub = Hub()
    stuck = MemoryTransport(0)  # never reads: its writer hangs in a send nothing can cancel
    async with trio.open_nursery() as outer:
        outer.start_soon(ViewerSession(hub, stuck, SETTINGS, "v").run)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        outer.cancel_scope.cancel()
    assert stuck.aborted
    assert trio.current_time() - start <= 2 * CLOSE_GRACE  # the grace, the abort, the close
    assert not hub.viewers


def test_update_text_splices_the_publish_and_drops_fields_the_hub_owns() -> None:
    raw = '  {"key":"EA1","src":"S","clientId":"c","data":[],"note":"é"} '
    spliced = json.loads(update_text(raw, json.loads(raw), 5))
    assert spliced == {
        "type": "update",
        "key": "EA1",
        "src": "S",
        "clientId": "c",
        "data": [],
        "note": "é",
        "ts": 5,
    }
    forged = '{"key":"EA1","src":"S","clientId":"c","data":[],"seq":99,"type":"publish","ts":1}'
    assert json.loads(update_text(forged, json.loads(forged), 5)) == {
        "type": "update",
        "key": "EA1",
        "src": "S",
        "clientId": "c",
        "data": [],
        "ts": 5,
    }


async def test_without_a_direct_socket_frames_go_through_asgi_one_message_each() -> None:
    """With the adapter off (asgi_only), frames go through plain ASGI sends."""
    sent: list[dict[str, Any]] = []

    async def asgi_send(message: dict[str, Any]) -> None:
        sent.append(message)

    link = Link(asgi_send, raw_ok=False)
    websocket = type("FakeWebsocket", (), {"scope": {LINK: link}})()
    transport = QuartTransport(websocket, Metrics())  # type: ignore[arg-type]
    await transport.send([Frame('{"type":"update","n":1}'), Frame('{"type":"update","n":2}')])
    assert sent == [
        {"type": "websocket.send", "text": '{"type":"update","n":1}'},
        {"type": "websocket.send", "text": '{"type":"update","n":2}'},
    ]
    assert link.raw_server() is None and link.deflate_bits is None
