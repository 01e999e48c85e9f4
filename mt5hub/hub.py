"""The fan-out core: tables, their latest state, presence, and the viewers they go to.

No web framework in here. Everything is synchronous and non-blocking on the publish path: an
update is encoded once, stored, and offered to every viewer (`Subscriber.offer`), which writes it
at once or keeps it in a conflating channel (the latest frame per table) without waiting, so one
slow viewer can never hold up a publisher or another viewer. Tests drive it with `Inbox`es, which
are conflating channels alone.
"""

from __future__ import annotations

import json
import logging
import operator
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import attrs
import trio

from .channel import open_conflating_channel
from .errors import OverLimit, ProtocolError
from .metrics import Metrics
from .models import Head

log = logging.getLogger("mt5hub")

TableId = tuple[str, str]  # (key, src)
RESERVED = frozenset({"type", "seq", "ts", "online"})  # set by the hub, never by a publisher
# A snapshot at least this large is handed to new viewers again for up to SNAPSHOT_REUSE seconds
# after the state changed, with the frames that changed since; a smaller one is made anew.
SNAPSHOT_REUSE_BYTES = 64 * 1024
SNAPSHOT_REUSE = 0.5


def encode(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@attrs.define(eq=False)
class Frame:
    """One encoded message, shared by every viewer it is offered to.

    `slot` names what a newer frame may replace while it waits to be sent: an update replaces the
    previous update of its table, a presence the previous presence. A frame without a slot
    (snapshot, ping, error) is never conflated.
    """

    text: str
    slot: tuple[str, str, str] | None = None
    received: float | None = None  # trio clock at the publish's arrival, for the latency metric
    # The WebSocket frame, made once by the first transport that needs it and shared by all: plain
    # (`wire`), or compressed for viewers that negotiated permessage-deflate, per window size.
    wire: bytes | None = None
    deflated: dict[int, bytes] | None = None


frame_slot = operator.attrgetter("slot")  # what a frame may replace in a conflating channel


class Subscriber(Protocol):
    """Where the hub offers every frame a viewer must see (a ViewerSession, or an Inbox)."""

    def offer(self, frame: Frame, express: bool = True) -> bool:
        """Take this frame without waiting; True if it replaced an unsent one of its slot.

        `express=False`: frames that arrive together, to go out in one write.
        """
        ...


class Inbox:
    """What a connection has yet to be sent: a conflating channel (mt5hub.channel) of frames.

    At most one frame per slot waits (a newer one replaces it and keeps its turn), so a viewer
    that falls behind skips to the latest state of each table; frames without a slot (snapshot,
    pings, error frames) wait in order, at most `size` of them (more are dropped and counted).
    """

    def __init__(self, size: int, metrics: Metrics, role: str) -> None:
        self.send, self.receive = open_conflating_channel(size, frame_slot)
        self._dropped = metrics.dropped.labels(role)

    def offer(self, frame: Frame, express: bool = True) -> bool:
        try:
            return self.send.send_nowait(frame)
        except trio.WouldBlock:
            self._dropped.inc()
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False  # the connection is over: nobody will read it

    def __len__(self) -> int:
        return len(self.receive)


@attrs.define(eq=False)
class TableState:
    table: TableId
    seq: int = 0
    update: Frame | None = None
    # live connections of this process that published this table, and the clientId of each
    publishers: dict[Publisher, str] = attrs.Factory(dict)
    # whether any hub has a live publisher of it, as the backplane last said (presence events)
    online: bool = False
    client_id: str = ""  # who published it last, or went on/offline with it

    def published_text(self) -> str:
        """The latest update without its seq, as a backplane carries it (for a resync)."""
        assert self.update is not None
        return self.update.text[: -len(f',"seq":{self.seq}}}')] + "}"

    def snapshot_entry(self) -> str:
        assert self.update is not None
        # The update text is a JSON object: add `online` without decoding it again.
        return f'{self.update.text[:-1]},"online":{"true" if self.online else "false"}}}'


@attrs.frozen
class SavedTable:
    """A table's latest state as it outlives the process (`mt5hub.persist` keeps it in a file).

    `text` is the update frame viewers got, `seq` included (it ends with `,"seq":<seq>}`), so a
    restored table serves exactly what it served before the restart.
    """

    table: TableId
    seq: int
    client_id: str
    text: str


@attrs.frozen
class Event:
    """An accepted publish or a presence change, encoded once, on its way to every viewer.

    An update's `text` is the JSON object viewers get, but for its `seq`. `seq` is None while the
    event is local to this process: `Hub.apply` then numbers it after the table's last update. A
    shared backplane numbers it once for every hub, and `apply` drops what it has seen already.
    """

    kind: str  # "update" or "presence"
    table: TableId
    text: str
    received: float | None = None  # trio clock at the publish's arrival, for the latency metric
    client_id: str = ""
    online: bool = True  # presence only: the table's new state
    seq: int | None = None  # update only: set by a shared backplane


class Publisher(Protocol):
    """A live publisher connection, as the hub sees it (a session, or a test's stand-in)."""

    def superseded(self, client_id: str) -> None:
        """A newer connection of this clientId took over this one's tables: end this one."""


class Backplane(Protocol):
    """Where accepted publishes and presence changes go before they reach viewers.

    `publish` must not block: it is called on the publish path. The in-process backplane hands an
    event straight back to this hub; `mt5hub.backplane.RedisBackplane` carries it to every hub
    (workers and hosts) sharing one Redis, this one included. Presence events a hub publishes are
    about its own connections (its first publisher of a table came, its last one left); the
    backplane turns them into the table's presence across all hubs.
    """

    def publish(self, hub: Hub, event: Event) -> None: ...

    def status(self) -> dict[str, Any]:
        """What /healthz shows about the backplane; `connected` False means degraded."""
        ...


class LocalBackplane:
    def publish(self, hub: Hub, event: Event) -> None:
        hub.apply(event)

    def status(self) -> dict[str, Any]:
        return {"kind": "local", "connected": True}


def update_text(raw_text: str, raw: dict[str, Any], ts: int) -> str:
    """The update viewers get, but for `seq`: the publish with `type` first and the hub's `ts`.

    The publisher's JSON was just parsed and validated, so its text is spliced in rather than
    encoded again (a 28x9 table is ~11 KB): unknown fields pass through as they came. A publish
    that sets a field the hub owns (`type`, `seq`, `ts`, `online`) is re-encoded without it.
    """
    body = raw_text.strip()
    if body.startswith("{") and body.endswith("}") and RESERVED.isdisjoint(raw):
        return f'{{"type":"update",{body[1:-1]},"ts":{ts}}}'
    event = {"type": "update", **{k: v for k, v in raw.items() if k not in RESERVED}, "ts": ts}
    try:
        return encode(event)
    except (ValueError, RecursionError) as exc:  # 1e400 parses as inf; nesting deeper than dumps
        raise ProtocolError("bad_json", f"cannot be forwarded: {exc}") from None


@attrs.define
class Capacity:
    """What publishers may make a hub hold (None: no limit), and what it holds now.

    A publish over a limit is refused with OverLimit (an error frame that names the limit):
    memory is bounded by configuration, not by what publishers send. Sizes are characters of
    JSON, which is bytes for these ASCII tables.
    """

    max_tables: int | None = None
    max_table_bytes: int | None = None
    max_state_bytes: int | None = None
    state_bytes: int = 0  # characters of every table's latest update together

    def check(self, tables: dict[TableId, TableState], table: TableId, text: str) -> None:
        if self.max_table_bytes is not None and len(text) > self.max_table_bytes:
            raise OverLimit("max_table_bytes", f"this table's update is {len(text)} bytes, over "
                            f"the {self.max_table_bytes} a table may hold")  # fmt: skip
        state = tables.get(table)
        if state is None and self.max_tables is not None and len(tables) >= self.max_tables:
            raise OverLimit("max_tables", f"the hub holds {len(tables)} tables already")
        held = len(state.update.text) if state is not None and state.update is not None else 0
        after = self.state_bytes - held + len(text)
        if self.max_state_bytes is not None and after > self.max_state_bytes:
            raise OverLimit("max_state_bytes", f"this update would take the hub's tables to "
                            f"{after} bytes, over {self.max_state_bytes}")  # fmt: skip

    def replaced(self, old: Frame | None, new: str) -> None:
        """A table's latest update is now `new` (it was `old`)."""
        self.state_bytes += len(new) - (len(old.text) if old is not None else 0)


class Hub:
    """Tables, presence and viewers of one hub process."""

    def __init__(
        self,
        *,
        viewer_buffer: int = 64,
        metrics: Metrics | None = None,
        backplane: Backplane | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_tables: int | None = None,
        max_table_bytes: int | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.capacity = Capacity(max_tables, max_table_bytes, max_state_bytes)
        self.viewer_buffer = viewer_buffer
        self.tables: dict[TableId, TableState] = {}
        self.fanout = Fanout(self.metrics)
        self._snapshot: tuple[Frame, int, float] | None = None  # frame, fan-out count, made at
        self.publishers = 0
        self.backplane: Backplane = backplane or LocalBackplane()
        self._wall_clock = wall_clock
        # Bumped by every applied update: a saver compares it with what it saved last, so an
        # idle hub costs no write.
        self.changes = 0

    def now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    # -- publishers -------------------------------------------------------------------------

    def publish(
        self, publisher: Publisher, message: Head, raw: dict[str, Any], raw_text: str
    ) -> None:
        """Accept a validated publish (`raw`, parsed from `raw_text`) from a live publisher."""
        text = update_text(raw_text, raw, self.now_ms())  # may refuse it: before any state changes
        self.capacity.check(self.tables, message.table, text)
        state = self._table(message.table)
        if publisher not in state.publishers:
            self._take_over(publisher, message.client_id, state)
        first = not state.publishers
        state.publishers[publisher] = message.client_id
        if first:
            self._presence(message.table, message.client_id, online=True)
        event = Event("update", message.table, text, trio.current_time(), message.client_id)
        self.backplane.publish(self, event)

    def _take_over(self, publisher: Publisher, client_id: str, state: TableState) -> None:
        """A new connection of a clientId that an older connection still holds this table for.

        That is a reconnect (the EA's link dropped, and the hub has not noticed the old one die
        yet), so the new connection wins: it inherits every table the old one holds, so presence
        never flickers, and the old one is ended instead of lingering until publisher_timeout.
        """
        older = [p for p, c in state.publishers.items() if c == client_id]
        for old in older:
            for table in self.tables.values():
                if (inherited := table.publishers.pop(old, None)) is not None:
                    table.publishers[publisher] = inherited
            old.superseded(client_id)

    def publisher_gone(self, publisher: Publisher) -> None:
        """The connection closed or went silent: tables it was the last publisher of go offline."""
        for state in self.tables.values():
            client_id = state.publishers.pop(publisher, None)
            if client_id is not None and not state.publishers:
                self._presence(state.table, client_id, online=False)

    def _presence(self, table: TableId, client_id: str, *, online: bool) -> None:
        self.backplane.publish(self, self.presence_event(table, client_id, online=online))

    def presence_event(self, table: TableId, client_id: str, *, online: bool) -> Event:
        key, src = table
        event: dict[str, Any] = {"type": "presence", "key": key, "src": src, "clientId": client_id}
        event.update(online=online, ts=self.now_ms())
        return Event("presence", table, encode(event), client_id=client_id, online=online)

    def _table(self, table: TableId) -> TableState:
        state = self.tables.get(table)
        if state is None:
            state = self.tables[table] = TableState(table)
            self.metrics.tables.set(len(self.tables))
        return state

    # -- the backplane delivers here ----------------------------------------------------------

    def apply(self, event: Event) -> bool:
        """Record an event and fan it out: one frame, offered to every viewer without waiting.

        Returns False for what changes nothing, which viewers never see: an update whose `seq`
        this hub has applied already, a presence the table has already.
        """
        state = self._table(event.table)
        if event.kind == "update":
            if event.seq is not None and event.seq <= state.seq:
                return False
            state.seq = state.seq + 1 if event.seq is None else event.seq
            text = f'{event.text[:-1]},"seq":{state.seq}}}'
            frame = Frame(text, ("update", *event.table), event.received)
            self.capacity.replaced(state.update, text)
            state.update = frame
            self.changes += 1
            self.metrics.updates.inc()
        else:
            if state.online == event.online:
                return False
            state.online = event.online
            frame = Frame(event.text, ("presence", *event.table))
        if event.client_id:
            state.client_id = event.client_id
        self.fanout.deliver(frame)
        return True

    # -- surviving a restart ------------------------------------------------------------------

    def saved_tables(self) -> list[SavedTable]:
        """The latest state of every table, to be kept where it outlives this process."""
        return [
            SavedTable(s.table, s.seq, s.client_id, s.update.text)
            for s in self.tables.values()
            if s.update is not None
        ]

    def restore(self, saved: Iterable[SavedTable]) -> int:
        """Put back tables saved by an earlier run, before anyone publishes; how many.

        They come back offline (no connection publishes them yet) with their seq, so that a
        returning publisher's next update continues the numbering viewers already know. A table
        this hub already has is left as it is: what it holds is newer than any file.
        """
        restored = 0
        for entry in saved:
            if entry.table in self.tables:
                continue
            state = self._table(entry.table)
            state.seq = entry.seq
            state.client_id = entry.client_id
            self.capacity.replaced(state.update, entry.text)
            state.update = Frame(entry.text, ("update", *entry.table))
            restored += 1
        self._snapshot = None
        return restored

    # -- viewers ----------------------------------------------------------------------------

    def snapshot(self) -> tuple[Frame, int]:
        """Every table's latest state in one frame, and the fan-out's count it reflects.

        Made once per change and shared by every viewer (its WebSocket frame, plain or
        compressed, is made once too: see mt5hub.server.wire). A large one is shared for
        SNAPSHOT_REUSE after a change as well: the viewer then gets what changed since with it
        (`Fanout.subscribed`), so that a crowd of viewers connecting while tables change costs
        a few snapshots, not one each.
        """
        count, now = self.fanout.count, time.monotonic()
        if self._snapshot is not None:
            frame, made_at_count, made_at = self._snapshot
            if made_at_count == count or (
                len(frame.text) >= SNAPSHOT_REUSE_BYTES and now - made_at < SNAPSHOT_REUSE
            ):
                return frame, made_at_count
        entries = ",".join(s.snapshot_entry() for s in self.tables.values() if s.update)
        frame = Frame(f'{{"type":"snapshot","ts":{self.now_ms()},"tables":[{entries}]}}')
        self._snapshot = (frame, count, now)
        return frame, count

    @property
    def viewers(self) -> set[Subscriber]:
        return self.fanout.viewers

    @contextmanager
    def viewer(self, subscriber: Subscriber | None = None) -> Iterator[Subscriber]:
        """Offer this subscriber (or a new Inbox) the snapshot, then every frame, for as long as
        the block runs."""
        if subscriber is None:
            subscriber = Inbox(self.viewer_buffer, self.metrics, "viewer")
        snapshot, count = self.snapshot()
        subscriber.offer(snapshot, express=False)
        with self.fanout.subscribed(subscriber, since=count):
            yield subscriber

    def away(self, viewer: Subscriber) -> AbstractContextManager[None]:
        """See Fanout.away."""
        return self.fanout.away(viewer)


class Fanout:
    """Every frame the hub applies, offered to every viewer, without waiting.

    Viewers whose peer is behind step `away` meanwhile: every frame offered to them would only
    replace the previous one of its slot, and at a thousand viewers nearly all of them are
    behind at any moment, so those offers are work for nothing. On their way back they are
    offered what they missed: the latest frame of each slot that changed meanwhile.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.viewers: set[Subscriber] = set()
        # Viewers that are offered every frame as it is applied: all but those `away`.
        self._present: set[Subscriber] = set()
        # The latest frame of each slot, with the number of the frame, in the order they were
        # made: what a viewer back from `away` missed.
        self.count = 0  # frames delivered so far
        self._latest: OrderedDict[object, tuple[int, Frame]] = OrderedDict()
        self._away_marks: list[int] = []  # for each viewer away, the last frame before it left

    def deliver(self, frame: Frame) -> None:
        """Offer this frame to every viewer present; count what it conflated, there and away."""
        # Viewers away that missed the previous frame of this slot will never see it now.
        previous = self._latest.get(frame.slot)
        conflated = bisect_left(self._away_marks, previous[0]) if previous is not None else 0
        self.count += 1
        self._latest[frame.slot] = (self.count, frame)
        self._latest.move_to_end(frame.slot)
        for viewer in self._present:
            conflated += viewer.offer(frame)
        if conflated:
            self.metrics.conflated.inc(conflated)

    @contextmanager
    def subscribed(self, viewer: Subscriber, since: int) -> Iterator[None]:
        """Offer this viewer every frame while the block runs; first, those that changed after
        frame number `since` (what its snapshot holds), latest of each slot."""
        self.viewers.add(viewer)
        self._present.add(viewer)
        if since < self.count:
            self._back(viewer, since)
        try:
            yield
        finally:
            self.viewers.discard(viewer)
            self._present.discard(viewer)

    @contextmanager
    def away(self, viewer: Subscriber) -> Iterator[None]:
        """Leave this viewer out of the fan-out while the block runs (its peer is behind).

        On its way back it is offered, at once, what it would then hold: the latest frame of
        each slot that changed meanwhile, in the order they changed. What it skips is counted as
        conflated as it happens (see deliver), as for any viewer. (A no-op for a viewer that is
        not subscribed, or is away already.)
        """
        if viewer not in self._present:
            yield
            return
        self._present.discard(viewer)
        mark = self.count
        self._away_marks.append(mark)  # the largest yet: the list stays sorted
        try:
            yield
        finally:
            del self._away_marks[bisect_left(self._away_marks, mark)]
            if viewer in self.viewers:
                self._present.add(viewer)
                self._back(viewer, mark)

    def _back(self, viewer: Subscriber, mark: int) -> None:
        changed: list[Frame] = []
        for number, frame in reversed(self._latest.values()):
            if number <= mark:
                break
            changed.append(frame)
        conflated = 0  # frames still waiting from before it left, replaced now
        for frame in reversed(changed):  # to go out together, in one write
            conflated += viewer.offer(frame, express=False)
        if conflated:
            self.metrics.conflated.inc(conflated)
