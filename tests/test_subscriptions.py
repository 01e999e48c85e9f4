"""Protocol v1.1 in the fan-out core: subscriptions, scoped viewers and patches.

Driven through memory channels (tests/test_hub_core.py's rig) under trio's MockClock; the same
behaviours over real sockets are in tests/test_protocol_v11.py.
"""

from __future__ import annotations

import json
import random
from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub_core import SETTINGS, MemoryTransport, rig
from trio.testing import MockClock

from mt5hub.config import ViewerGrant
from mt5hub.delta import apply as apply_patch
from mt5hub.fanout import Frame
from mt5hub.hub import Event, Hub, Inbox
from mt5hub.subscription import Selector, Subscription, TableId, query_selectors

TFS = ("M1", "H1", "D1")


def update(table: TableId, rows: list[dict[str, Any]], ts: int = 1) -> Event:
    body = {"type": "update", "key": table[0], "src": table[1], "clientId": "c", "data": rows}
    return Event("update", table, json.dumps({**body, "ts": ts}, separators=(",", ":")))


def rows(values: dict[str, list[float]]) -> list[dict[str, Any]]:
    return [
        {
            "pair": pair,
            "TF_data": [{tf: v, "cell_color": "clrGray"} for tf, v in zip(TFS, cells, strict=True)],
            "sum": sum(cells),
            "sum_cell_color": "clrGray",
        }
        for pair, cells in values.items()
    ]


def tables_in(frames: list[Frame]) -> set[TableId]:
    found = set()
    for frame in frames:
        message = json.loads(frame.text)
        if message["type"] == "snapshot":
            found |= {(t["key"], t["src"]) for t in message["tables"]}
        elif "key" in message:
            found.add((message["key"], message["src"]))
    return found


def drain(box: Inbox) -> list[Frame]:
    frames = []
    while len(box):
        frames.append(box.receive.receive_nowait())
    return frames


A, B, C = ("EA1", "H1"), ("EA2", "H1"), ("OTHER", "M5")


def test_a_viewer_of_some_keys_gets_only_their_snapshot_updates_and_presence() -> None:
    hub = Hub()
    for table in (A, B, C):
        hub.apply(update(table, rows({"EURUSD": [1, 2, 3]})))
    wanted = Subscription(initial=query_selectors("EA1,OTH*", None))
    with hub.viewer(subscription=wanted) as box, hub.viewer() as everything:
        assert isinstance(box, Inbox) and isinstance(everything, Inbox)
        for table in (A, B, C):
            hub.apply(update(table, rows({"EURUSD": [4, 5, 6]})))
            hub.apply(hub.presence_event(table, "c", online=True))
        frames = drain(box)
        assert tables_in(frames) == {A, C}
        assert [json.loads(f.text)["type"] for f in frames].count("presence") == 2
        assert tables_in(drain(everything)) == {A, B, C}


def test_a_new_table_reaches_the_viewers_whose_patterns_match_it() -> None:
    hub = Hub()
    with hub.viewer(subscription=Subscription(initial=[Selector("EA*", "H1")])) as box:
        assert isinstance(box, Inbox)
        hub.apply(update(A, rows({"EURUSD": [1, 2, 3]})))
        hub.apply(update(("EA9", "M1"), rows({"EURUSD": [1, 2, 3]})))  # src does not match
        hub.apply(update(("XEA", "H1"), rows({"EURUSD": [1, 2, 3]})))  # key does not start so
        assert tables_in(drain(box)) == {A}


class CountingViewer:
    """A subscriber that counts the offers it gets: the fan-out's work for it."""

    def __init__(self) -> None:
        self.offers = 0

    def offer(self, frame: Frame) -> bool:
        self.offers += 1
        return False


def test_an_update_of_a_table_nobody_watches_costs_no_per_viewer_work() -> None:
    hub = Hub()
    viewers = [CountingViewer() for _ in range(1000)]
    with_them = [
        hub.viewer(v, Subscription(initial=[Selector(f"EA{n % 10}")]))
        for n, v in enumerate(viewers)
    ]
    for context in with_them:
        context.__enter__()
    before = sum(v.offers for v in viewers)  # their snapshots
    hub.apply(update(("NOBODY", "X"), rows({"EURUSD": [1, 2, 3]})))
    assert sum(v.offers for v in viewers) == before
    hub.apply(update(("EA3", "X"), rows({"EURUSD": [1, 2, 3]})))
    assert sum(v.offers for v in viewers) == before + 100  # its 100 viewers, each once
    for context in with_them:
        context.__exit__(None, None, None)
    assert not hub.viewers


async def test_subscribe_sends_a_partial_snapshot_and_unsubscribe_names_what_stops(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        for table in (A, B, C):
            r.hub.apply(update(table, rows({"EURUSD": [1, 2, 3]})))
        view = await r.viewer(subscription=Subscription(initial=[Selector("EA1")]))
        snapshot = await view.hear()
        assert [(t["key"], t["seq"]) for t in snapshot["tables"]] == [("EA1", 1)]
        await view.say({"type": "subscribe", "keys": ["EA2", "OTHER"]})
        partial = await view.hear()
        assert partial["type"] == "snapshot" and partial["partial"] is True
        assert sorted(t["key"] for t in partial["tables"]) == ["EA2", "OTHER"]
        await view.say({"type": "unsubscribe", "keys": ["EA*"]})
        assert await view.hear() == {
            "type": "unsubscribed", "tables": [{"key": "EA1", "src": "H1"},
                                               {"key": "EA2", "src": "H1"}],
        }  # fmt: skip
        for table in (A, B, C):
            r.hub.apply(update(table, rows({"EURUSD": [7, 8, 9]})))
        assert (message := await view.hear())["key"] == "OTHER" and message["seq"] == 2
        await view.say({"type": "subscribe", "keys": ["EA2"]})  # back: from its latest state
        again = await view.hear()
        assert [(t["key"], t["seq"]) for t in again["tables"]] == [("EA2", 2)]


async def test_an_unsubscribe_cuts_one_table_out_of_every_table(autojump_clock: MockClock) -> None:
    async with rig() as r:
        view = await r.viewer()
        assert (await view.hear())["type"] == "snapshot"
        await view.say({"type": "unsubscribe", "keys": ["EA2"]})
        assert (await view.hear())["type"] == "unsubscribed"
        for table in (A, B, C):
            r.hub.apply(update(table, rows({"EURUSD": [1, 2, 3]})))
        await trio.sleep(1)
        assert [m["key"] for m in view.heard_so_far()] == ["EA1", "OTHER"]


async def test_a_table_queued_before_an_unsubscribe_is_not_sent_after_it(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer(window=0)  # a peer that reads only when the test hears
        r.hub.apply(update(A, rows({"EURUSD": [1, 2, 3]})))  # snapshot in flight, update waits
        await trio.testing.wait_all_tasks_blocked()
        await view.say({"type": "unsubscribe", "keys": ["EA1"]})
        heard = [await view.hear(), await view.hear()]
        assert [m["type"] for m in heard] == ["snapshot", "unsubscribed"]
        await trio.sleep(1)
        assert view.heard_so_far() == []


async def test_a_scoped_viewer_sees_only_its_keys_and_asking_beyond_them_is_forbidden(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        for table in (A, B, C):
            r.hub.apply(update(table, rows({"EURUSD": [1, 2, 3]})))
        grant = ViewerGrant("token", ("EA1",))
        subscription, refused = Subscription.at_connect(grant, query_selectors("EA*,EA1", None))
        assert refused == ["EA*"]
        view = await r.viewer(subscription=subscription, refused=refused)
        snapshot = await view.hear()
        assert [t["key"] for t in snapshot["tables"]] == ["EA1"]
        error = await view.hear()
        assert error["code"] == "forbidden_key" and error["keys"] == ["EA*"]
        await view.say({"type": "subscribe", "keys": ["EA2"]})
        assert (error := await view.hear())["code"] == "forbidden_key"
        await view.say({"type": "subscribe", "keys": ["*"]})
        assert (await view.hear())["code"] == "forbidden_key"
        for table in (A, B, C):
            r.hub.apply(update(table, rows({"EURUSD": [4, 5, 6]})))
            r.hub.apply(r.hub.presence_event(table, "c", online=False))
        await trio.sleep(1)
        assert {m["key"] for m in view.heard_so_far()} == {"EA1"}
        # Without parameters, a scoped viewer gets every table of its grant, and no other.
        everything_granted, refused = Subscription.at_connect(grant, None)
        assert refused == [] and everything_granted.wants(A) and not everything_granted.wants(B)


async def test_subscription_changes_are_rate_limited_with_an_error_frame(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        view = await r.viewer()
        await view.hear()
        for _ in range(25):
            await view.say({"type": "subscribe", "keys": ["EA1"]})
        await trio.testing.wait_all_tasks_blocked()
        kinds = [m.get("code", m["type"]) for m in view.heard_so_far()]
        assert kinds.count("snapshot") == 20 and kinds.count("rate_limited") == 5


# -- patches ----------------------------------------------------------------------------------


class Held:
    """What a delta viewer holds, applying what it is sent as the dashboard does."""

    def __init__(self) -> None:
        self.tables: dict[TableId, dict[str, Any]] = {}
        self.patches = 0

    def take(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "snapshot":
            if not message.get("partial"):
                self.tables.clear()
            for table in message["tables"]:
                self.tables[table["key"], table["src"]] = table
        elif kind == "update":
            self.tables[message["key"], message["src"]] = message
        elif kind == "patch":
            table = (message["key"], message["src"])
            held = self.tables[table]
            assert held["seq"] == message["base"], "a patch to a state this viewer does not hold"
            body = {k: v for k, v in message.items() if k not in ("type", "key", "src", "seq",
                                                                    "base", "ts")}  # fmt: skip
            new = apply_patch(held, body)
            head = {"type": "update", "seq": message["seq"], "ts": message["ts"]}
            self.tables[table] = {**new, **head, "key": table[0], "src": table[1]}
            self.patches += 1


def latest(hub: Hub) -> dict[TableId, dict[str, Any]]:
    return {t: json.loads(s.update.text) for t, s in hub.tables.items() if s.update is not None}


def comparable(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("online", "type")}


async def test_a_delta_viewer_is_sent_patches_and_ends_with_the_hubs_state(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        r.hub.apply(update(A, rows({"EURUSD": [1, 2, 3], "GBPUSD": [4, 5, 6]})))
        view, held = await r.viewer(delta=True), Held()
        plain = await r.viewer()
        held.take(await view.hear())
        for n in range(5):
            r.hub.apply(update(A, rows({"EURUSD": [1, 2, n], "GBPUSD": [4, 5, 6]}), ts=n))
            message = await view.hear()
            assert message["type"] == "patch" and message["base"] == n + 1
            held.take(message)
        assert held.patches == 5
        assert comparable(held.tables[A]) == comparable(latest(r.hub)[A])
        assert {m["type"] for m in plain.heard_so_far()} == {"snapshot", "update"}


async def test_a_delta_viewer_that_missed_the_base_is_sent_the_whole_update(
    autojump_clock: MockClock,
) -> None:
    async with rig() as r:
        r.hub.apply(update(A, rows({"EURUSD": [1, 2, 3]})))
        view = await r.viewer(window=0, delta=True)
        await trio.testing.wait_all_tasks_blocked()  # the snapshot is being written
        for n in range(3):  # seq 2 waits, 3 and 4 replace it: the viewer never holds 2 or 3
            r.hub.apply(update(A, rows({"EURUSD": [1, 2, n]})))
        assert (await view.hear())["type"] == "snapshot"
        message = await view.hear()
        assert message["type"] == "update" and message["seq"] == 4


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Random publishes to three tables, and random reads by three delta viewers."""
    steps = st.tuples(st.sampled_from(["publish", "read", "wait"]), st.integers(0, 2),
                      st.integers(0, 2**16))  # fmt: skip
    return draw(st.lists(steps, max_size=40))


def mutate(rng: random.Random, values: dict[str, list[float]]) -> dict[str, list[float]]:
    """A few cells change; sometimes a row comes, goes, or the rows swap."""
    new = {pair: list(cells) for pair, cells in values.items()}
    for pair in rng.sample(sorted(new), k=min(len(new), rng.randint(0, 2))):
        new[pair][rng.randrange(len(TFS))] = rng.randint(-5, 5)
    roll = rng.random()
    if roll < 0.15:
        new[rng.choice(["EURUSD", "GBPUSD", "USDJPY", "AUDUSD"])] = [0, 0, 0]
    elif roll < 0.25 and len(new) > 1:
        del new[rng.choice(sorted(new))]
    elif roll < 0.35:
        new = dict(reversed(list(new.items())))
    return new


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts())
def test_delta_viewers_never_drift_whatever_is_published_and_conflated(
    script: list[tuple[str, int, int]],
) -> None:
    """However publishes and reads interleave (a viewer that does not read is conflated), every
    delta viewer ends with exactly the hub's latest state of every table."""

    async def main() -> None:
        tables = [A, B, C]
        values = {t: {"EURUSD": [1.0, 2.0, 3.0]} for t in tables}
        patient = attrs.evolve(SETTINGS, slow_viewer_timeout=1e6, viewer_timeout=1e6)
        async with rig(patient) as r:
            for table in tables[:2]:
                r.hub.apply(update(table, rows(values[table])))
            views: list[tuple[MemoryTransport, Held]] = [
                (await r.viewer(window=0, delta=True), Held()) for _ in range(3)
            ]
            for kind, n, seed in script:
                if kind == "publish":
                    values[tables[n]] = mutate(random.Random(seed), values[tables[n]])
                    r.hub.apply(update(tables[n], rows(values[tables[n]])))
                elif kind == "read":
                    view, held = views[n]
                    for _ in range(seed % 3 + 1):
                        with trio.move_on_after(0.01):
                            held.take(await view.hear())
                else:
                    await trio.sleep(seed % 100 / 1000)
            for view, held in views:
                with trio.move_on_after(5):
                    while True:
                        held.take(await view.hear())
                want = {t: comparable(d) for t, d in latest(r.hub).items()}
                assert {t: comparable(d) for t, d in held.tables.items()} == want

    trio.run(main, clock=MockClock(autojump_threshold=0))
