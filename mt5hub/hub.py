"""The fan-out core: tables, their latest state, presence, and the viewers they go to.

No web framework in here. Everything is synchronous and non-blocking on the publish path: an
update is encoded once, stored, and offered to every viewer (`Subscriber.offer`), which writes it
at once or keeps it in a conflating channel (the latest frame per table) without waiting, so one
slow viewer can never hold up a publisher or another viewer. Tests drive it with `Inbox`es, which
are conflating channels alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import attrs
import trio

from .fanout import Fanout, Frame, Inbox, Subscriber
from .metrics import Metrics
from .models import Head
from .state import (
    Capacity,
    Publisher,
    Snapshots,
    TableState,
    encode,
    update_text,
)
from .subscription import Subscription, TableId

__all__ = ["Backplane", "Event", "Frame", "Hub", "Inbox", "LocalBackplane", "Subscriber"]

log = logging.getLogger("mt5hub")


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
        self.fanout = Fanout(self.metrics, self.tables)
        self.snapshots = Snapshots(self.tables, self.fanout, self.now_ms)
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
        state = self.table_state(message.table)
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

    def table_state(self, table: TableId) -> TableState:
        """This table's state, new (and empty) if the hub did not know it."""
        state = self.tables.get(table)
        if state is None:
            state = self.tables[table] = TableState(table)
            self.metrics.tables.set(len(self.tables))
            self.fanout.new_table(table)
        return state

    # -- the backplane delivers here ----------------------------------------------------------

    def apply(self, event: Event) -> bool:
        """Record an event and fan it out: one frame, offered to every viewer without waiting.

        Returns False for what changes nothing, which viewers never see: an update whose `seq`
        this hub has applied already, a presence the table has already.
        """
        state = self.table_state(event.table)
        if event.kind == "update":
            if event.seq is not None and event.seq <= state.seq:
                return False
            base, previous = state.seq, state.update
            state.seq = state.seq + 1 if event.seq is None else event.seq
            text = f'{event.text[:-1]},"seq":{state.seq}}}'
            frame = Frame(text, ("update", *event.table), event.received, seq=state.seq)
            if previous is not None:  # what a patch to this update starts from (mt5hub.patches)
                frame.base, frame.previous, previous.previous = base, previous, None
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

    # -- viewers ----------------------------------------------------------------------------

    @property
    def viewers(self) -> set[Subscriber]:
        return self.fanout.viewers

    @contextmanager
    def viewer(
        self, subscriber: Subscriber | None = None, subscription: Subscription | None = None
    ) -> Iterator[Subscriber]:
        """Offer this subscriber (or a new Inbox) the snapshot of the tables it wants, then
        their every frame, for as long as the block runs."""
        if subscriber is None:
            subscriber = Inbox(self.viewer_buffer, self.metrics, "viewer")
        if subscription is None or subscription.everything:
            snapshot, count = self.snapshots.everything()
        else:
            count = self.fanout.count
            snapshot = self.snapshots.of(t for t in self.tables if subscription.wants(t))
        subscriber.offer(snapshot)
        with self.fanout.subscribed(subscriber, count, subscription):
            yield subscriber

    def resubscribe(
        self, viewer: Subscriber, subscription: Subscription
    ) -> tuple[Frame, list[TableId]]:
        """The viewer's subscription changed: the latest state of the tables it now gets (a
        partial snapshot, maybe of none), and the tables it no longer gets."""
        added, removed = self.fanout.resubscribe(viewer, subscription)
        return self.snapshots.of(sorted(added), partial=True), sorted(removed)

    def away(self, viewer: Subscriber) -> AbstractContextManager[None]:
        """See Fanout.away."""
        return self.fanout.away(viewer)
